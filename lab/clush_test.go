package lab

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/esir-project/esir/server"
	"golang.org/x/crypto/ssh"
)

func TestParseClush(t *testing.T) {
	out := "node01: node01\nnode02: node02\nnode03: line one\nnode03: line two\na line without a node prefix\n\n"
	got := ParseClush(out)
	want := map[string]string{"node01": "node01", "node02": "node02", "node03": "line one\nline two"}
	if len(got) != len(want) {
		t.Fatalf("ParseClush = %q, want %q", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("ParseClush[%s] = %q, want %q", k, got[k], v)
		}
	}
	if m := clushMissing(got, []string{"node01", "node02", "node03", "node04"}); !slices.Equal(m, []string{"node03", "node04"}) {
		t.Errorf("clushMissing = %q, want node03 (wrong answer) and node04 (none)", m)
	}
	if c := ClushCommand("labssi"); !strings.Contains(c, "-s labssi -g all hostname") || !strings.Contains(c, " -L ") {
		t.Errorf("ClushCommand = %q", c)
	}
}

func TestClushStderr(t *testing.T) {
	// As the lab run printed it (progress redrawn among ssh's warnings).
	in := "clush: 0/3           node03: Warning: Permanently added '198.18.0.101' (ED25519) to the list of known hosts.\n" +
		"node01: Warning: Permanently added '198.18.0.100' (ED25519) to the list of known hosts.\n" +
		"clush: 0/3clush: 1/3clush: 2/3           clush: 3/3\n"
	want := "node03: Warning: Permanently added '198.18.0.101' (ED25519) to the list of known hosts.\n" +
		"node01: Warning: Permanently added '198.18.0.100' (ED25519) to the list of known hosts."
	if got := clushStderr(in); got != want {
		t.Errorf("clushStderr = %q, want %q", got, want)
	}
}

// TestAdminKeyReachesServerConfig: lab up's administrator key is in the
// server's authorized_keys_file, which the server reads back as the key
// the private half signs with.
func TestAdminKeyReachesServerConfig(t *testing.T) {
	st := &State{Dir: t.TempDir()}
	if err := st.writeAdminKey(); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(st.AdminKey()); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("private key %s: %v, %v", st.AdminKey(), fi.Mode(), err)
	}
	if err := st.writeServerConfig(); err != nil {
		t.Fatal(err)
	}
	cfg := server.DefaultConfig()
	if err := cfg.LoadFile(st.serverConfig()); err != nil {
		t.Fatal(err)
	}
	keys, err := cfg.AuthorizedKeys()
	if err != nil || len(keys) != 1 {
		t.Fatalf("server's authorized keys = %q, %v", keys, err)
	}
	signer, err := st.adminSigner()
	if err != nil {
		t.Fatal(err)
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(keys[0]))
	if err != nil || ssh.FingerprintSHA256(pub) != ssh.FingerprintSHA256(signer.PublicKey()) {
		t.Fatalf("server hands out %q (%v), the lab signs with %s", keys[0], err, ssh.FingerprintSHA256(signer.PublicKey()))
	}
}
