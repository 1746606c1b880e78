package initramfs

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestArchiveUnpacksWithCpio(t *testing.T) {
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Skip("cpio not installed (scripts/setup-test.sh installs it)")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.WriteFile(src, []byte("hello from disk\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	a := New()
	if err := a.File("/sbin/tool", src, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := a.Bytes("etc/motd", []byte("motd"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := a.Symlink("bin/sh", "/sbin/tool"); err != nil {
		t.Fatal(err)
	}
	if err := a.Dir("proc", 0o555); err != nil {
		t.Fatal(err)
	}
	if err := a.File("missing", filepath.Join(dir, "nope"), 0o644); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("adding a missing source: want an error naming the entry, got %v", err)
	}
	if err := a.Symlink("sbin/tool/x", "y"); err == nil {
		t.Fatal("an entry below a regular file was accepted")
	}
	var raw bytes.Buffer
	if err := a.WriteCPIO(&raw); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("cpio", "-idm", "--quiet")
	cmd.Dir = out
	cmd.Stdin = &raw
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio: %v: %s", err, b)
	}
	if b, err := os.ReadFile(filepath.Join(out, "sbin/tool")); err != nil || string(b) != "hello from disk\n" {
		t.Fatalf("sbin/tool = %q, %v", b, err)
	}
	if fi, err := os.Stat(filepath.Join(out, "sbin/tool")); err != nil || fi.Mode().Perm() != 0o755 {
		t.Fatalf("sbin/tool mode: %v %v", fi, err)
	}
	if l, err := os.Readlink(filepath.Join(out, "bin/sh")); err != nil || l != "/sbin/tool" {
		t.Fatalf("bin/sh -> %q, %v", l, err)
	}
	if fi, err := os.Stat(filepath.Join(out, "proc")); err != nil || !fi.IsDir() {
		t.Fatalf("proc: %v %v", fi, err)
	}
}

func TestDeterministicCompressed(t *testing.T) {
	build := func() []byte {
		a := New()
		for _, n := range []string{"z", "a/b/c", "m"} {
			if err := a.Bytes(n, []byte(n), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		var b bytes.Buffer
		if _, err := a.WriteTo(&b); err != nil {
			t.Fatal(err)
		}
		return b.Bytes()
	}
	x, y := build(), build()
	if !bytes.Equal(x, y) {
		t.Fatal("two builds of the same archive differ")
	}
	if len(x) < 4 || !bytes.Equal(x[:4], []byte{0x28, 0xb5, 0x2f, 0xfd}) {
		t.Fatalf("not a zstd frame: % x", x[:4])
	}
}
