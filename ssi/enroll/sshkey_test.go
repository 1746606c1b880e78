package enroll

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/netlab"
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

// TestLevel1ClushNetns runs real sshd on a remote member and clush on a
// core member, each node in its own namespaces, with what ESIR installed
// from their bundles: the cluster key the core node got logs in as root on
// the remote one through the line Install added to its authorized_keys
// (beside the administrator's), and the ssh configuration accepts the
// member's new host key (accept-new) and keeps it. The namespaces share the
// host's /root and /etc/ssh, so sshd and ssh are pointed at the nodes'
// copies (AuthorizedKeysFile, ssh -F, the configuration's IdentityFile
// under the node's root).
func TestLevel1ClushNetns(t *testing.T) {
	if err := netlab.Available(); err != nil {
		t.Skipf("needs root and network namespaces: %v", err)
	}
	for _, bin := range []string{"/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/ssh-keygen", "/usr/bin/clush"} {
		if _, err := os.Stat(bin); err != nil {
			t.Skipf("%s is not installed (scripts/setup.sh test installs openssh-server and clustershell)", bin)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, _, err := ssi.Parse([]byte("name: l1s\nprofile: {clustershell: true}\ncore_size: 1\n"))
	if err != nil {
		t.Fatal(err)
	}
	keys, err := ssi.LoadKeys(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	st := ssi.NewState()
	lab := newLab(ctx, t, "ssish")
	var nodes []*node
	for i, name := range []string{"c1", "r1"} {
		nodes = append(nodes, joinNode(ctx, t, lab, st, c.CoreSize, i, name))
	}
	core, remote := nodes[0], nodes[1]
	// The administrator's key on the remote node stays beside ESIR's.
	ak := filepath.Join(remote.Root, "root/.ssh/authorized_keys")
	if err := os.MkdirAll(filepath.Dir(ak), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ak, []byte("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdmin admin@desk\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		b, err := ssi.Render(c, st, keys, n.Host.Name)
		if err != nil {
			t.Fatal(err)
		}
		if err := n.enr.Install(b); err != nil {
			t.Fatal(err)
		}
	}

	// sshd on the remote node, with a host key made now (as at a node's
	// first boot) and root's authorized_keys under the node's root.
	hostKey := filepath.Join(remote.Root, "ssh_host_ed25519_key")
	if out, err := remote.Run(ctx, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", hostKey); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	sshdConf := filepath.Join(remote.Root, "sshd_config")
	if err := os.WriteFile(sshdConf, fmt.Appendf(nil, "ListenAddress 198.18.0.2\nHostKey %s\nAuthorizedKeysFile %s\nPidFile /run/sshd-esir.pid\n"+
		"PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"+
		"# The test's temporary directories sit under the world-writable /tmp.\nStrictModes no\n", hostKey, ak), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := remote.Run(ctx, "mkdir", "-p", "/run/sshd"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if out, err := remote.Run(ctx, "/usr/sbin/sshd", "-f", sshdConf, "-E", filepath.Join(remote.Root, "sshd.log")); err != nil {
		t.Fatalf("sshd: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if t.Failed() {
			log, _ := os.ReadFile(filepath.Join(remote.Root, "sshd.log"))
			t.Logf("sshd log:\n%s", log)
		}
	})

	// clush on the core node with its ssh configuration, the key path
	// moved under the node's root, and a known_hosts file of its own.
	conf, err := os.ReadFile(filepath.Join(core.Root, ssi.SSHConfigPath))
	if err != nil {
		t.Fatal(err)
	}
	sshConf := filepath.Join(core.Root, "ssh_config")
	conf = bytes.ReplaceAll(conf, []byte(ssi.SSHKeyPath), []byte(filepath.Join(core.Root, ssi.SSHKeyPath)))
	if err := os.WriteFile(sshConf, conf, 0o644); err != nil {
		t.Fatal(err)
	}
	known := filepath.Join(core.Root, "known_hosts")
	opts := fmt.Sprintf("-F %s -oUserKnownHostsFile=%s", sshConf, known)
	var out []byte
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		out, err = core.Run(ctx, "clush", "-S", "-w", "198.18.0.2", "-o", opts, "-O", "connect_timeout=5", "cat", "/proc/sys/kernel/hostname")
		if err == nil || time.Now().After(deadline) {
			break
		}
	}
	// ssh's warning that it added the host key comes first (stderr).
	if err != nil || !slices.Contains(strings.Split(string(out), "\n"), "198.18.0.2: r1") {
		t.Fatalf("clush from c1 to r1: %v: %q", err, out)
	}
	hk, err := os.ReadFile(hostKey + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	kh, err := os.ReadFile(known)
	if err != nil || !bytes.Contains(kh, bytes.Fields(hk)[1]) {
		t.Fatalf("r1's host key was not accepted into known_hosts (%v):\n%s", err, kh)
	}
	// Without the cluster key, root is refused: the key is what logs in.
	noKey := bytes.ReplaceAll(conf, []byte(filepath.Join(core.Root, ssi.SSHKeyPath)), []byte(filepath.Join(core.Root, "no-such-key")))
	if err := os.WriteFile(sshConf, noKey, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := core.Run(ctx, "clush", "-S", "-w", "198.18.0.2", "-o", opts+" -oIdentitiesOnly=yes -oIdentityAgent=none", "true"); err == nil {
		t.Fatalf("clush without the cluster key logged in: %s", out)
	}
}
