package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/imaging"
)

// esir runs the CLI in-process and returns stdout, stderr and the error
// main would turn into a non-zero exit.
func esir(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	app := cli.NewApp()
	app.Stdout, app.Stderr = &out, &errb
	root := newRootCmd(app)
	root.SetArgs(args)
	root.SetOut(&out)
	root.SetErr(&errb)
	err := root.ExecuteContext(context.Background())
	return out.String(), errb.String(), err
}

func TestImageCommands(t *testing.T) {
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "hello"), []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	store := t.TempDir()
	exported := filepath.Join(t.TempDir(), "x.tar")
	for _, tc := range []struct {
		name    string
		args    []string
		wantErr string // substring of the error; "" means success
		wantOut string // substring of stdout
	}{
		{"build", []string{"image", "build", "--store", store, "--from", src, "--name", "x", "--version", "1"}, "", "x:1"},
		{"build-again", []string{"image", "build", "--store", store, "--from", src, "--name", "x", "--version", "1"}, "already exists", ""},
		{"build-two-sources", []string{"image", "build", "--store", store, "--from", src, "--from-tar", "a.tar", "--name", "x", "--version", "2"}, "exactly one", ""},
		{"build-missing-source", []string{"image", "build", "--store", store, "--from", filepath.Join(src, "nope"), "--name", "x", "--version", "3"}, filepath.Join(src, "nope"), ""},
		{"build-bad-mode", []string{"image", "build", "--store", store, "--from", src, "--name", "x", "--version", "4", "--mode", "disk"}, "want file or partition", ""},
		{"ls", []string{"image", "ls", "--store", store}, "", "x     1"},
		{"inspect", []string{"image", "inspect", "--store", store, "x"}, "", "info hash:"},
		{"inspect-missing", []string{"image", "inspect", "--store", store, "y"}, "not found", ""},
		{"verify", []string{"image", "verify", "--store", store, "x:1"}, "", "x:1: ok"},
		{"export", []string{"image", "export", "--store", store, "x:1", "--out", exported}, "", ""},
		{"rm-needs-version", []string{"image", "rm", "--store", store, "x"}, "give the version", ""},
		{"rm", []string{"image", "rm", "--store", store, "x:1"}, "", "removed x:1"},
		{"import", []string{"image", "import", "--store", store, exported}, "", "x:1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, _, err := esir(t, tc.args...)
			if tc.wantErr == "" && err != nil {
				t.Fatalf("esir %v: %v", tc.args, err)
			}
			if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("esir %v: error %v, want one containing %q", tc.args, err, tc.wantErr)
			}
			if !strings.Contains(out, tc.wantOut) {
				t.Errorf("esir %v: output %q lacks %q", tc.args, out, tc.wantOut)
			}
		})
	}

	out, _, err := esir(t, "image", "ls", "--store", store, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var ms []imaging.Manifest
	if err := json.Unmarshal([]byte(out), &ms); err != nil || len(ms) != 1 || ms[0].Ref() != "x:1" {
		t.Fatalf("ls -o json: %v %q", err, out)
	}

	// A flipped byte makes verify fail, naming the archive.
	archive := filepath.Join(store, "images", "x", "1", imaging.ArchiveFile)
	b, err := os.ReadFile(archive)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 1
	if err := os.WriteFile(archive, b, 0o644); err != nil {
		t.Fatal(err)
	}
	_, stderr, err := esir(t, "image", "verify", "--store", store, "x:1")
	if err == nil || !strings.Contains(stderr, archive) {
		t.Errorf("verify of a corrupt image: err %v, stderr %q", err, stderr)
	}
}
