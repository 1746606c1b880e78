package install

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestHostKeyUnit: an image with OpenSSH's server under systemd gets a unit,
// enabled for ssh.service and ordered before it, that makes the node's host
// keys at first boot (the installer removed the image's); an image without
// sshd, or without systemd, gets none.
func TestHostKeyUnit(t *testing.T) {
	for _, tt := range []struct {
		name  string
		files []string
		want  bool
	}{
		{"sshd under systemd", []string{"usr/sbin/sshd", "lib/systemd/systemd"}, true},
		{"no sshd", []string{"lib/systemd/systemd"}, false},
		{"no systemd", []string{"usr/sbin/sshd"}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			for _, f := range tt.files {
				p := filepath.Join(root, f)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, nil, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			r := &run{mnt: root}
			if err := r.writeHostKeyUnit(); err != nil {
				t.Fatal(err)
			}
			unit, err := os.ReadFile(filepath.Join(root, HostKeyUnit))
			if !tt.want {
				if err == nil {
					t.Fatalf("%s written", HostKeyUnit)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range []string{"Before=ssh.service", "ExecStart=/usr/bin/ssh-keygen -A", "WantedBy=ssh.service"} {
				if !strings.Contains(string(unit), s) {
					t.Errorf("unit lacks %q:\n%s", s, unit)
				}
			}
			if dst, err := os.Readlink(filepath.Join(root, hostKeyWants)); err != nil || dst != HostKeyUnit {
				t.Errorf("unit not enabled for ssh.service: %q %v", dst, err)
			}
			// Idempotent: a second install replaces the link.
			if err := r.writeHostKeyUnit(); err != nil {
				t.Fatal(err)
			}
		})
	}
}
