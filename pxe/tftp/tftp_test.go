package tftp

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pin/tftp/v3"
)

func TestClean(t *testing.T) {
	tests := []struct {
		in, want string
		bad      bool
	}{
		{in: "ipxe.efi", want: "ipxe.efi"},
		{in: "/ipxe.efi", want: "ipxe.efi"},
		{in: "efi//x/./snponly.efi", want: "efi/x/snponly.efi"},
		{in: "\\efi\\ipxe.efi", want: "efi/ipxe.efi"},
		{in: "../etc/passwd", bad: true},
		{in: "/../../etc/shadow", bad: true},
		{in: "a/../../b", bad: true},
		{in: "..\\boot.ini", bad: true},
		{in: "", bad: true},
		{in: "/", bad: true},
		{in: "a\x00b", bad: true},
	}
	for _, tt := range tests {
		got, err := Clean(tt.in)
		if tt.bad {
			if err == nil {
				t.Errorf("Clean(%q) = %q, want an error", tt.in, got)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("Clean(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

// fixture makes a root with a random "ipxe.efi", a file outside the root and
// a symbolic link pointing at it.
func fixture(t *testing.T) (root string, data []byte) {
	t.Helper()
	dir := t.TempDir()
	root = filepath.Join(dir, "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	data = make([]byte, 1<<20+123)
	rand.Read(data)
	if err := os.WriteFile(filepath.Join(root, "ipxe.efi"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "secret"), []byte("secret\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../secret", filepath.Join(root, "escape")); err != nil {
		t.Fatal(err)
	}
	return root, data
}

func start(t *testing.T, root string) (*Server, string) {
	t.Helper()
	var logs bytes.Buffer
	s, err := New(root, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx, conn) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		s.Close()
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
		}
	})
	return s, conn.LocalAddr().String()
}

func need(t *testing.T, bin string) {
	t.Helper()
	if _, err := exec.LookPath(bin); err != nil {
		t.Skipf("%s not installed (Debian package in scripts/setup.sh)", bin)
	}
}

func TestRealClientsFetchIdentically(t *testing.T) {
	root, data := fixture(t)
	s, addr := start(t, root)
	host, port, _ := net.SplitHostPort(addr)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out := t.TempDir()
	tests := []struct {
		name string
		bin  string
		args func(dst string) []string
	}{
		{name: "tftp-hpa", bin: "tftp", args: func(dst string) []string {
			return []string{host, port, "-m", "binary", "-c", "get", "ipxe.efi", dst}
		}},
		{name: "curl blksize 1400", bin: "curl", args: func(dst string) []string {
			return []string{"-sS", "--tftp-blksize", "1400", "-o", dst, fmt.Sprintf("tftp://%s/ipxe.efi", addr)}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			need(t, tt.bin)
			before := s.Stats()
			dst := filepath.Join(out, tt.name)
			if b, err := exec.CommandContext(ctx, tt.bin, tt.args(dst)...).CombinedOutput(); err != nil {
				t.Fatalf("%s: %v\n%s", tt.bin, err, b)
			}
			got, err := os.ReadFile(dst)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatalf("%s fetched %d bytes that differ from the %d served", tt.bin, len(got), len(data))
			}
			// The handler's accounting finishes just after the client's last ACK.
			after := s.Stats()
			for i := 0; i < 100 && after.Bytes != before.Bytes+int64(len(data)); i++ {
				time.Sleep(10 * time.Millisecond)
				after = s.Stats()
			}
			if after.Completed != before.Completed+1 || after.Bytes != before.Bytes+int64(len(data)) {
				t.Errorf("stats before %+v after %+v", before, after)
			}
			if strings.Contains(tt.name, "1400") {
				// Negotiated 1400-byte blocks: ~750 datagrams, not the ~2050 of 512-byte blocks.
				if d := after.Datagrams - before.Datagrams; d > int64(len(data)/1400+2) {
					t.Errorf("blksize not negotiated: %d datagrams for %d bytes", d, len(data))
				}
			}
		})
	}
}

func TestTraversalAndWritesRefused(t *testing.T) {
	root, _ := fixture(t)
	s, addr := start(t, root)
	host, port, _ := net.SplitHostPort(addr)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, name := range []string{"../secret", "/../secret", "escape", "nothere"} {
		t.Run(name, func(t *testing.T) {
			need(t, "tftp")
			dst := filepath.Join(t.TempDir(), "out")
			b, _ := exec.CommandContext(ctx, "tftp", host, port, "-m", "binary", "-c", "get", name, dst).CombinedOutput()
			if !strings.Contains(string(b), "Error code") {
				t.Errorf("tftp get %s: no TFTP error in %q", name, b)
			}
			if got, _ := os.ReadFile(dst); bytes.Contains(got, []byte("secret")) {
				t.Fatalf("%s leaked the file outside the root", name)
			}
		})
	}
	if st := s.Stats(); st.Refused != 3 || st.NotFound != 1 || st.Completed != 0 {
		t.Errorf("stats %+v: want 3 refused, 1 not found", st)
	}
	// Writes are refused.
	c, err := tftp.NewClient(addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetTimeout(2 * time.Second)
	c.SetRetries(1)
	w, err := c.Send("upload", "octet")
	if err == nil {
		_, err = w.ReadFrom(io.LimitReader(rand.Reader, 4096))
	}
	if err == nil {
		t.Fatal("write request accepted")
	}
	if _, err := os.Stat(filepath.Join(root, "upload")); err == nil {
		t.Fatal("write created a file")
	}
}

func TestDebianCatalogue(t *testing.T) {
	files, err := DebianFiles()
	if err != nil {
		t.Skip(err)
	}
	s, err := NewFiles(files, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	for name, p := range files {
		f, err := s.Open("/" + name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		got, _ := io.ReadAll(f)
		f.Close()
		if want, _ := os.ReadFile(p); !bytes.Equal(got, want) {
			t.Errorf("%s: content differs from %s", name, p)
		}
	}
	// Only catalogued names: the package's other files and traversal are not served.
	for _, name := range []string{"ipxe.iso", "../ipxe/ipxe.efi", "qemu/pxe-virtio.rom"} {
		if f, err := s.Open(name); err == nil {
			f.Close()
			t.Errorf("%s served", name)
		}
	}
}
