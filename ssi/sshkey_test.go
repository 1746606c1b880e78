package ssi

import (
	"bytes"
	"crypto/ed25519"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"
)

// fixedSSHKey writes an ed25519 key made from a fixed seed in dir and
// returns it and its authorized_keys line as LoadKeys reads them.
func fixedSSHKey(t *testing.T) ([]byte, string) {
	t.Helper()
	block, err := ssh.MarshalPrivateKey(ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, ed25519.SeedSize)), SSHKeyMark)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "ssh-ed25519")
	if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
		t.Fatal(err)
	}
	priv, pub, err := loadSSHKey(path)
	if err != nil {
		t.Fatal(err)
	}
	return priv, pub
}

// TestLoadSSHKey: LoadKeys makes the cluster's SSH key once (0600, an
// OpenSSH ed25519 key that ssh-keygen reads, its public line marked as
// ESIR's), keeps it, and refuses it with its file named when others may
// read it or it is no key.
func TestLoadSSHKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "secrets")
	k1, err := LoadKeys(dir)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "ssh-ed25519")
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("%s: %v", path, err)
	}
	f := strings.Fields(k1.SSHPublic)
	if len(f) != 3 || f[0] != "ssh-ed25519" || f[2] != SSHKeyMark {
		t.Fatalf("public key line %q", k1.SSHPublic)
	}
	k2, err := LoadKeys(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(k1.SSH, k2.SSH) || k1.SSHPublic != k2.SSHPublic {
		t.Fatal("the SSH key was made again instead of kept")
	}
	if keygen, err := exec.LookPath("ssh-keygen"); err == nil {
		out, err := exec.Command(keygen, "-y", "-f", path).CombinedOutput()
		if err != nil {
			t.Fatalf("ssh-keygen cannot read the key: %v: %s", err, out)
		}
		if g := strings.Fields(string(out)); len(g) < 2 || g[1] != f[1] {
			t.Fatalf("ssh-keygen -y says %q, LoadKeys %q", out, k1.SSHPublic)
		}
	}
	if err := os.Chmod(path, 0o640); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKeys(dir); err == nil || !strings.Contains(err.Error(), path+": mode -rw-r----- lets others read it") {
		t.Fatalf("group-readable SSH key accepted: %v", err)
	}
	if err := os.WriteFile(path, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKeys(dir); err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("garbage SSH key accepted: %v", err)
	}
}

// TestRenderSSH: every member gets the public key for root's
// authorized_keys; only core nodes get the private key (0600) and the ssh
// configuration; without clustershell nobody gets either, and clustershell
// without the key is an error.
func TestRenderSSH(t *testing.T) {
	c, s, keys := fixture(t)
	for _, m := range s.Members {
		b, err := Render(c, s, keys, m.Name)
		if err != nil {
			t.Fatal(err)
		}
		if b.SSHAuthorizedKey != keys.SSHPublic {
			t.Errorf("%s: authorized key %q, want %q", m.Name, b.SSHAuthorizedKey, keys.SSHPublic)
		}
		i := slices.IndexFunc(b.Files, func(f File) bool { return f.Path == SSHKeyPath })
		j := slices.IndexFunc(b.Files, func(f File) bool { return f.Path == SSHConfigPath })
		if m.Role != Core {
			if i >= 0 || j >= 0 {
				t.Errorf("remote %s receives the cluster's private SSH key or ssh configuration", m.Name)
			}
			continue
		}
		if i < 0 || b.Files[i].Mode != 0o600 || b.Files[i].Owner != "" || !bytes.Equal(b.Files[i].Data, keys.SSH) {
			t.Errorf("core %s: private key file %+v", m.Name, b.Files[max(i, 0)])
		}
		if j < 0 || !strings.Contains(string(b.Files[j].Data), "Match localuser root originalhost n1,198.18.0.1,n2,198.18.0.2,n3,198.18.0.3,r1,198.18.0.4,r2,198.18.0.5\n") {
			t.Errorf("core %s: no ssh configuration naming every member", m.Name)
		}
		if j >= 0 && !strings.Contains(string(b.Files[j].Data), "Host n2\n\tHostName 198.18.0.2\nHost n3\n") {
			t.Errorf("core %s: ssh configuration does not map member names to addresses:\n%s", m.Name, b.Files[j].Data)
		}
	}
	c.Profile.ClusterShell = false
	b, err := Render(c, s, keys, "n1")
	if err != nil {
		t.Fatal(err)
	}
	if b.SSHAuthorizedKey != "" || slices.ContainsFunc(b.Files, func(f File) bool { return strings.HasPrefix(f.Path, "/root/") }) {
		t.Error("SSH key rendered without clustershell")
	}
	c.Profile.ClusterShell = true
	keys.SSH, keys.SSHPublic = nil, ""
	if _, err := Render(c, s, keys, "r1"); err == nil || !strings.Contains(err.Error(), "render r1: profile.clustershell needs the cluster's SSH key") {
		t.Errorf("render without the SSH key: %v", err)
	}
}

// TestSSHConfigScoped asks OpenSSH (ssh -G prints the configuration it would
// use, without connecting) how root reaches a member, by name and by
// address, and another host: the cluster key and accept-new apply to the
// members alone.
func TestSSHConfigScoped(t *testing.T) {
	bin, err := exec.LookPath("ssh")
	if err != nil {
		t.Skip("ssh is not installed (Debian package openssh-client)")
	}
	if os.Geteuid() != 0 {
		t.Skip("the configuration applies to root (localuser root): run as root")
	}
	c, s, keys := fixture(t)
	b, err := Render(c, s, keys, "n1")
	if err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(t.TempDir(), "ssh_config")
	for _, f := range b.Files {
		if f.Path == SSHConfigPath {
			if err := os.WriteFile(conf, f.Data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	for host, member := range map[string]bool{"r2": true, "198.18.0.2": true, "n3": true, "other.example": false, "198.18.0.9": false} {
		out, err := exec.Command(bin, "-G", "-F", conf, host).Output()
		if err != nil {
			t.Fatalf("ssh -G %s: %v", host, err)
		}
		lines := strings.Split(string(out), "\n")
		key := slices.Contains(lines, "identityfile "+SSHKeyPath)
		acceptNew := slices.Contains(lines, "stricthostkeychecking accept-new")
		if key != member || acceptNew != member {
			t.Errorf("ssh to %s (member %v): cluster key %v, accept-new %v", host, member, key, acceptNew)
		}
	}
}
