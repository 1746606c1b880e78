package enroll

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/esir-project/esir/ssi"
)

// TestInstallSSHKey: a core node's Install puts the cluster's private key
// (0600 in a 0700 .ssh) and ssh configuration in place and adds the public
// key to root's authorized_keys beside the administrator's keys, once; a new
// cluster key replaces ESIR's line alone; a bundle without clustershell
// removes ESIR's line, private key and configuration and keeps the
// administrator's keys.
func TestInstallSSHKey(t *testing.T) {
	c, _, err := ssi.Parse([]byte("name: sk\nprofile: {clustershell: true}\ncore_size: 1\n"))
	if err != nil {
		t.Fatal(err)
	}
	st := ssi.NewState()
	if _, _, err := st.Join("c1", netip.MustParseAddr("198.18.0.1"), 1); err != nil {
		t.Fatal(err)
	}
	keys, err := ssi.LoadKeys(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	b, err := ssi.Render(c, st, keys, "c1")
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	n := &Node{Root: root, Run: Local{}}
	// The administrator's keys, as the installer wrote them (the last
	// line without its newline, as an editor may leave it).
	const admin = "ssh-ed25519 AAAAadmin admin@desk\nfrom=\"198.18.1.0/24\" ssh-rsa AAAAops ops"
	ak := filepath.Join(root, "root/.ssh/authorized_keys")
	if err := os.MkdirAll(filepath.Dir(ak), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ak, []byte(admin), 0o600); err != nil {
		t.Fatal(err)
	}
	for range 2 { // the second Install changes nothing
		if err := n.Install(b); err != nil {
			t.Fatal(err)
		}
		if got, want := read(t, ak), admin+"\n"+keys.SSHPublic+"\n"; got != want {
			t.Fatalf("authorized_keys:\n%s\nwant:\n%s", got, want)
		}
	}
	for path, mode := range map[string]os.FileMode{"root/.ssh/authorized_keys": 0o600, strings.TrimPrefix(ssi.SSHKeyPath, "/"): 0o600, strings.TrimPrefix(ssi.SSHConfigPath, "/"): 0o644} {
		if st, err := os.Stat(filepath.Join(root, path)); err != nil || st.Mode().Perm() != mode {
			t.Errorf("%s: %v, want mode %v", path, err, mode)
		}
	}
	if got := read(t, filepath.Join(root, ssi.SSHKeyPath)); got != string(keys.SSH) {
		t.Error("the private key differs from the cluster's")
	}

	// A fresh node: .ssh is made 0700.
	fresh := &Node{Root: t.TempDir(), Run: Local{}}
	if err := fresh.Install(b); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(filepath.Join(fresh.Root, "root/.ssh")); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("root/.ssh on a fresh node: %v %v", st.Mode(), err)
	}

	// Another cluster key replaces ESIR's line.
	other, err := ssi.LoadKeys(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	b2, err := ssi.Render(c, st, other, "c1")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Install(b2); err != nil {
		t.Fatal(err)
	}
	if got, want := read(t, ak), admin+"\n"+other.SSHPublic+"\n"; got != want {
		t.Fatalf("authorized_keys after a new cluster key:\n%s\nwant:\n%s", got, want)
	}

	// clustershell off: ESIR's line and files go, the administrator's stay.
	c.Profile.ClusterShell = false
	b3, err := ssi.Render(c, st, other, "c1")
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Install(b3); err != nil {
		t.Fatal(err)
	}
	if got := read(t, ak); got != admin+"\n" {
		t.Fatalf("authorized_keys without clustershell:\n%s", got)
	}
	for _, p := range []string{ssi.SSHKeyPath, ssi.SSHConfigPath} {
		if _, err := os.Stat(filepath.Join(root, p)); !os.IsNotExist(err) {
			t.Errorf("%s stays without clustershell: %v", p, err)
		}
	}
	if bytes.Contains([]byte(read(t, ak)), []byte(ssi.SSHKeyMark)) {
		t.Error("ESIR's key stays")
	}
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
