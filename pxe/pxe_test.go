package pxe

import (
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestScriptAndPolicy(t *testing.T) {
	known, _ := net.ParseMAC("52:54:00:00:00:01")
	local, _ := net.ParseMAC("52:54:00:00:00:02")
	stranger, _ := net.ParseMAC("52:54:00:00:00:03")
	p := &StaticPolicy{Kernel: "http://s/k", Initrd: "http://s/i", Server: "http://s", Extra: "console=ttyS0",
		Nodes: map[string]Action{known.String(): Install, local.String(): LocalDisk}}
	tests := []struct {
		name      string
		discovery bool
		mac       string
		status    int
		want      []string
		not       []string
	}{
		{name: "install", mac: known.String(), status: 200, want: []string{"#!ipxe", "kernel http://s/k initrd=initrd esir.server=http://s esir.mac=52:54:00:00:00:01 esir.mode=install console=ttyS0", "initrd --name initrd http://s/i", "boot"}},
		{name: "installed node exits to disk", mac: local.String(), status: 200, want: []string{"exit 1\n"}, not: []string{"kernel"}},
		{name: "unknown ignored", mac: stranger.String(), status: 200, want: []string{"exit"}, not: []string{"kernel"}},
		{name: "unknown discovered", discovery: true, mac: stranger.String(), status: 200, want: []string{"esir.mode=inventory"}},
		{name: "bad mac", mac: "nope", status: 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p.Discovery = tt.discovery
			h := &ScriptHandler{Policy: p, Log: quiet()}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, httptest.NewRequest("GET", "/pxe/boot.ipxe?mac="+tt.mac, nil))
			if rec.Code != tt.status {
				t.Fatalf("status %d, want %d: %s", rec.Code, tt.status, rec.Body)
			}
			body := rec.Body.String()
			for _, w := range tt.want {
				if !strings.Contains(body, w) {
					t.Errorf("script lacks %q:\n%s", w, body)
				}
			}
			for _, w := range tt.not {
				if strings.Contains(body, w) {
					t.Errorf("script has %q:\n%s", w, body)
				}
			}
		})
	}
	if _, err := Script(Decision{Action: Install}); err == nil {
		t.Error("install without URLs accepted")
	}
	if _, err := Script(Decision{Action: Install, Kernel: "k", Initrd: "i", Cmdline: "a\nshell"}); err == nil {
		t.Error("newline in the command line accepted")
	}
}

func TestLoadNodes(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.json")
	os.WriteFile(good, []byte(`[{"mac":"52:54:00:00:00:01","action":"install"},{"mac":"52-54-00-00-00-02","action":"local"}]`), 0o644)
	p := &StaticPolicy{}
	if err := p.LoadNodes(good); err != nil {
		t.Fatal(err)
	}
	if p.Nodes["52:54:00:00:00:02"] != LocalDisk || len(p.MACs()) != 2 {
		t.Errorf("nodes %v", p.Nodes)
	}
	for content, want := range map[string]string{
		`[{"mac":"zz","action":"install"}]`:             "entry 0",
		`[{"mac":"52:54:00:00:00:01","action":"wipe"}]`: "unknown boot action",
		`{"mac":1}`: "bad.json",
	} {
		bad := filepath.Join(dir, "bad.json")
		os.WriteFile(bad, []byte(content), 0o644)
		if err := (&StaticPolicy{}).LoadNodes(bad); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want it to mention %q", content, err, want)
		}
	}
}

func TestFileHandlerRangeAndRoot(t *testing.T) {
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	os.Mkdir(root, 0o755)
	os.WriteFile(filepath.Join(root, "vmlinuz"), []byte("0123456789"), 0o644)
	os.WriteFile(filepath.Join(dir, "secret"), []byte("secret"), 0o644)
	os.Symlink("../secret", filepath.Join(root, "link"))
	h, err := FileHandler(root, quiet())
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	defer srv.Close()
	req, _ := http.NewRequest("GET", srv.URL+"/vmlinuz", nil)
	req.Header.Set("Range", "bytes=2-4")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusPartialContent || string(b) != "234" {
		t.Errorf("range: %d %q", resp.StatusCode, b)
	}
	for _, p := range []string{"/link", "/../secret", "/%2e%2e/secret"} {
		resp, err := http.Get(srv.URL + p)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 200 || strings.Contains(string(b), "secret") {
			t.Errorf("%s served: %d %q", p, resp.StatusCode, b)
		}
	}
}

func TestFirmwareOf(t *testing.T) {
	for arch, want := range map[uint16]Firmware{0: FirmwareBIOS, 7: FirmwareUEFI, 9: FirmwareUEFI, 11: FirmwareUEFI, 16: FirmwareUEFIHTTP, 19: FirmwareUEFIHTTP} {
		if got, ok := FirmwareOf(arch); !ok || got != want {
			t.Errorf("arch %d: %v %v", arch, got, ok)
		}
	}
	for _, arch := range []uint16{1, 6, 10, 15, 42} {
		if _, ok := FirmwareOf(arch); ok {
			t.Errorf("arch %d accepted", arch)
		}
	}
}
