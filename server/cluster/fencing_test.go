package cluster

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestFencing keeps a cluster with fencing by BMC: the server reads the BMC
// password from its 0600 file, names in its warnings (logged once, listed
// in the snapshot) the member without a BMC, never logs or shows the
// password, and hands the password only to core members.
func TestFencing(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "cluster.yaml")
	must(t, os.WriteFile(p, []byte(`name: f
profile: {corosync: true, pacemaker: true, fencing: true}
core_size: 3
fencing:
  bmcs:
    - {node: n1, address: 198.18.1.1, username: admin, password_file: n1.pw}
    - {node: n4, address: 198.18.1.4, username: admin, password_file: n4.pw}
`), 0o644))
	for _, n := range []string{"n1", "n4"} {
		must(t, os.WriteFile(filepath.Join(dir, n+".pw"), []byte("secret-of-"+n+"\n"), 0o600))
	}
	var logs bytes.Buffer
	c := &clock{t: time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)}
	s, err := Open(p, filepath.Join(dir, "state"), Options{Now: c.now, Log: slog.New(slog.NewTextHandler(&logs, nil))})
	must(t, err)
	for i := 1; i <= 4; i++ {
		_, err := s.Join("n"+string(rune('0'+i)), mac(i), addr(i))
		must(t, err)
	}
	snap := s.Snapshot()
	var named []string
	for _, w := range snap.Warnings {
		if strings.Contains(w, "has no BMC") {
			named = append(named, w)
		}
	}
	if len(named) != 2 || !strings.Contains(named[0], "member n2 ") || !strings.Contains(named[1], "member n3 ") {
		t.Errorf("warnings about members without a BMC: %q; want n2 and n3", named)
	}
	if n := strings.Count(logs.String(), "member n2 has no BMC"); n != 1 {
		t.Errorf("the warning about n2 logged %d times, want once:\n%s", n, logs.String())
	}
	data, err := json.Marshal(snap)
	must(t, err)
	if strings.Contains(logs.String()+string(data), "secret-of") {
		t.Errorf("a BMC password leaked into the log or the snapshot")
	}
	for i, wantPW := range []bool{true, true, true, false} {
		b, _, err := s.Assignment(mac(i + 1))
		must(t, err)
		var pws []string
		for _, f := range b.Files {
			if strings.HasPrefix(f.Path, "/etc/pacemaker/esir-fence-") {
				pws = append(pws, strings.TrimPrefix(f.Path, "/etc/pacemaker/esir-fence-")+"="+string(f.Data))
			}
		}
		want := []string(nil)
		if wantPW {
			want = []string{"n1.password=secret-of-n1", "n4.password=secret-of-n4"}
		}
		if !slices.Equal(pws, want) {
			t.Errorf("n%d (%s) gets BMC passwords %q, want %q", i+1, b.Member.Role, pws, want)
		}
	}
}
