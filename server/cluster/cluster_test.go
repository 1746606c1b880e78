package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esir-project/esir/ssi"
)

const def = `name: lab
profile: {corosync: true, pacemaker: true, keepalived: true, chrony: true}
core_size: 3
vips:
  - name: web
    address: 198.18.0.100/24
    vrid: 51
    services: [{port: 80}]
time:
  allow: 198.18.0.0/24
`

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time        { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration)   { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }
func addr(i int) netip.Addr            { return netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}) }
func mac(i int) string                 { return "52:54:00:00:00:0" + string(rune('0'+i)) }
func view(t *testing.T, v View) []byte { b, err := json.Marshal(v); must(t, err); return b }

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func open(t *testing.T, dir string, c *clock) *Service {
	t.Helper()
	p := filepath.Join(dir, "cluster.yaml")
	if _, err := os.Stat(p); err != nil {
		must(t, os.WriteFile(p, []byte(def), 0o644))
	}
	s, err := Open(p, filepath.Join(dir, "state"), Options{Now: c.now, LeaveTimeout: 30 * time.Second, StaleAfter: 30 * time.Second})
	must(t, err)
	return s
}

func TestJoinRolesAndRefusals(t *testing.T) {
	c := &clock{t: time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)}
	s := open(t, t.TempDir(), c)
	for i := 1; i <= 4; i++ {
		m, err := s.Join("n"+string(rune('0'+i)), mac(i), addr(i))
		must(t, err)
		want := ssi.Core
		if i == 4 {
			want = ssi.Remote
		}
		if m.ID != i || m.Role != want || m.State != Joining {
			t.Fatalf("join n%d = id %d role %s state %s, want id %d role %s joining", i, m.ID, m.Role, m.State, i, want)
		}
	}
	// A reboot joins again: same allocation, same version.
	v := s.Snapshot().Version
	if m, err := s.Join("n2", mac(2), addr(2)); err != nil || m.ID != 2 || s.Snapshot().Version != v {
		t.Fatalf("rejoin n2 = %+v, %v (version %d, was %d)", m, err, s.Snapshot().Version, v)
	}
	for _, tc := range []struct {
		name, mac string
		addr      netip.Addr
	}{
		{"n2", mac(9), addr(9)}, // another machine claims n2's name
		{"n9", mac(1), addr(9)}, // n1's MAC under another name
		{"n9", mac(9), addr(3)}, // n3's address
	} {
		if _, err := s.Join(tc.name, tc.mac, tc.addr); !errors.Is(err, ErrConflict) {
			t.Errorf("join %s %s %s: err %v, want a conflict", tc.name, tc.mac, tc.addr, err)
		}
	}
	b, action, err := s.Assignment(mac(4))
	must(t, err)
	if action != "join" || b.Member.Name != "n4" || b.Member.Role != ssi.Remote || len(b.Core) != 3 {
		t.Fatalf("assignment of n4: action %s bundle member %+v core %d", action, b.Member, len(b.Core))
	}
	if _, _, err := s.Assignment(mac(8)); !errors.Is(err, ErrNotMember) {
		t.Fatalf("assignment of a stranger: %v", err)
	}
}

func TestReportsLeaveAndRestart(t *testing.T) {
	dir := t.TempDir()
	c := &clock{t: time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)}
	s := open(t, dir, c)
	for i := 1; i <= 4; i++ {
		_, err := s.Join("n"+string(rune('0'+i)), mac(i), addr(i))
		must(t, err)
	}
	ver := s.Snapshot().Version
	_, first, err := s.Report(mac(1), Report{Version: ver, State: "failed", Check: "quorum", Error: "partition is not quorate (1 of 3 votes)"})
	must(t, err)
	if first {
		t.Fatal("a failed report counted as the first enrollment")
	}
	for i := 1; i <= 4; i++ {
		v := View{NodeID: i, Joined: []int{1, 2, 3}, Quorate: true, Online: []string{"n1", "n2", "n3", "n4"}}
		if i == 1 {
			v.VIPs = []string{"198.18.0.100"}
		}
		_, first, err := s.Report(mac(i), Report{Version: ver, State: "enrolled", View: view(t, v)})
		must(t, err)
		if !first {
			t.Fatalf("n%d: first enrolled report not flagged first", i)
		}
		c.add(time.Second)
	}
	if _, first, _ := s.Report(mac(2), Report{Version: ver, State: "enrolled"}); first {
		t.Fatal("a repeated enrolled report flagged first")
	}
	snap := s.Snapshot()
	if !snap.Quorate || !slices.Equal(snap.Joined, []int{1, 2, 3}) || !slices.Equal(snap.VIPHolders["198.18.0.100"], []string{"n1"}) {
		t.Fatalf("snapshot: quorate %v joined %v vip holders %v", snap.Quorate, snap.Joined, snap.VIPHolders)
	}
	for _, m := range snap.Members {
		if m.State != Enrolled {
			t.Fatalf("%s is %s, want enrolled", m.Name, m.State)
		}
	}
	if _, _, err := s.Report(mac(3), Report{Version: ver, State: "left"}); !errors.Is(err, ErrConflict) {
		t.Fatalf("left without a leave: %v", err)
	}

	// A leave waits for the node to stop its stack; the node is told.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	woke := make(chan struct{})
	go func() { s.Wait(ctx, mac(3), ver, time.Minute); close(woke) }()
	if _, err := s.Leave("n3", "test"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-woke:
	case <-ctx.Done():
		t.Fatal("Wait did not return when the node was told to leave")
	}
	if _, action, _ := s.Assignment(mac(3)); action != "leave" {
		t.Fatalf("n3's action %q, want leave", action)
	}
	if _, err := s.Join("n3", mac(3), addr(3)); !errors.Is(err, ErrConflict) {
		t.Fatalf("a leaving node joined again: %v", err)
	}
	if s.Snapshot().Version != ver {
		t.Fatal("the nodelist changed before the node confirmed its leave")
	}
	_, _, err = s.Report(mac(3), Report{Version: ver, State: "left"})
	must(t, err)
	snap = s.Snapshot()
	if snap.Version != ver+1 || !slices.Equal(snap.Retired, []int{3}) || len(snap.Members) != 3 {
		t.Fatalf("after n3 left: version %d (want %d) retired %v members %d", snap.Version, ver+1, snap.Retired, len(snap.Members))
	}

	// A silent member shows as unreachable, and its leave does not wait.
	c.add(time.Minute)
	if _, _, err := s.Report(mac(1), Report{Version: ver + 1, State: "enrolled"}); err != nil {
		t.Fatal(err)
	}
	for _, m := range s.Snapshot().Members {
		if want := map[string]State{"n1": Enrolled, "n2": Unreachable, "n4": Unreachable}[m.Name]; m.State != want {
			t.Errorf("%s is %s, want %s", m.Name, m.State, want)
		}
	}
	if _, err := s.Leave("n4", "test"); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.MemberOf(mac(4)); ok {
		t.Fatal("an unreachable member's leave waited for it")
	}

	// A reachable member that never confirms is removed after the timeout.
	_, _, err = s.Report(mac(2), Report{Version: ver + 2, State: "enrolled"})
	must(t, err)
	if _, err := s.Leave("n2", "test"); err != nil {
		t.Fatal(err)
	}
	s.Tick()
	if _, ok := s.MemberOf(mac(2)); !ok {
		t.Fatal("n2 removed before its leave timeout")
	}
	c.add(31 * time.Second)
	s.Tick()
	if _, ok := s.MemberOf(mac(2)); ok {
		t.Fatal("n2 still a member after its leave timeout")
	}

	// A restart keeps the allocation, the retired ids and the reports; a
	// new node never gets a retired id.
	// (Heartbeats are not written: after a restart a member shows as
	// unreachable until it reports again.)
	s2 := open(t, dir, c)
	snap = s2.Snapshot()
	if n1, _ := s2.MemberOf(mac(1)); len(snap.Members) != 1 || n1.State != Enrolled || !slices.Equal(snap.Retired, []int{2, 3, 4}) {
		t.Fatalf("after restart: members %+v retired %v", snap.Members, snap.Retired)
	}
	m, err := s2.Join("n5", mac(5), addr(5))
	must(t, err)
	if m.ID != 5 || m.Role != ssi.Core {
		t.Fatalf("n5 after restart: id %d role %s, want id 5 core", m.ID, m.Role)
	}
	fi, err := os.Stat(filepath.Join(dir, "state", "secrets"))
	must(t, err)
	if fi.Mode().Perm() != 0o700 {
		t.Fatalf("secrets directory mode %v", fi.Mode().Perm())
	}
}

// TestNotReady: a bundle naming a node that has not joined is not ready
// (the node asks again), not an error of the server.
func TestNotReady(t *testing.T) {
	dir := t.TempDir()
	must(t, os.WriteFile(filepath.Join(dir, "cluster.yaml"), []byte(`name: lab
profile: {keepalived: true}
core_size: 1
vips:
  - name: web
    address: 198.18.0.100/24
    vrid: 51
    directors: [n1]
    real_servers: [n2]
    services: [{port: 80}]
`), 0o644))
	c := &clock{t: time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)}
	s := open(t, dir, c)
	_, err := s.Join("n1", mac(1), addr(1))
	must(t, err)
	if _, _, err := s.Assignment(mac(1)); !errors.Is(err, ErrNotReady) {
		t.Fatalf("n1's bundle before n2 joined: %v, want not ready", err)
	}
	_, err = s.Join("n2", mac(2), addr(2))
	must(t, err)
	if _, _, err := s.Assignment(mac(1)); err != nil {
		t.Fatalf("n1's bundle once n2 joined: %v", err)
	}
}

// TestDefinitionWarnings checks that a VIP whose backup directors are real
// servers under a per-connection scheduler is warned about like the other
// definition warnings: logged once when the server opens the definition (or,
// with directors left to the core members, when the core members joined)
// and shown in the snapshot (esir cluster show, the console's Cluster page).
func TestDefinitionWarnings(t *testing.T) {
	const vip = `name: lab
profile: {keepalived: true}
core_size: 3
vips:
  - name: web
    address: 198.18.0.100/24
    vrid: 51
%s    real_servers: [n1, n2, n3, n4]
    services: [{port: 80, scheduler: rr}]
`
	const want = "vips[0] web (198.18.0.100): directors n1, n2, n3 are also its real servers, and port 80/tcp uses IPVS scheduler rr"
	for _, tt := range []struct {
		name, directors string
		atOpen          bool
	}{
		{name: "named directors", directors: "    directors: [n1, n2, n3]\n", atOpen: true},
		{name: "core members as directors"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "cluster.yaml")
			must(t, os.WriteFile(p, fmt.Appendf(nil, vip, tt.directors), 0o644))
			var log bytes.Buffer
			s, err := Open(p, filepath.Join(dir, "state"), Options{Log: slog.New(slog.NewTextHandler(&log, nil))})
			must(t, err)
			shown := func() bool {
				return slices.ContainsFunc(s.Snapshot().Warnings, func(w string) bool { return strings.HasPrefix(w, want) })
			}
			if shown() != tt.atOpen {
				t.Fatalf("warnings at open: %q", s.Snapshot().Warnings)
			}
			for i := 1; i <= 4; i++ {
				_, err := s.Join(fmt.Sprintf("n%d", i), mac(i), addr(i))
				must(t, err)
			}
			if !shown() {
				t.Fatalf("warnings with n1-n4 joined: %q", s.Snapshot().Warnings)
			}
			if n := strings.Count(log.String(), want); n != 1 {
				t.Errorf("logged %d times, want once:\n%s", n, log.String())
			}
			if !strings.Contains(log.String(), "level=WARN msg=\"cluster definition\" cluster=lab file="+p) {
				t.Errorf("log does not name the cluster and the file:\n%s", log.String())
			}
		})
	}
}

func TestViewTexts(t *testing.T) {
	for _, tc := range []struct {
		nfs, server bool
		v           View
		home, time  string
	}{
		{false, false, View{HomeMounted: true}, "—", "—"},
		{true, true, View{HomeExported: true, TimeSource: "local", TimeSynced: true}, "exported", "local +0.000 ms"},
		{true, true, View{TimeSource: "198.18.0.1"}, "NOT exported", "NOT synced (198.18.0.1)"},
		{true, false, View{HomeMounted: true, TimeSource: "198.18.0.1", TimeOffsetMS: -0.04, TimeSynced: true}, "mounted", "198.18.0.1 -0.040 ms"},
		{true, false, View{TimeSynced: true, TimeOffsetMS: 1.5}, "NOT mounted", "+1.500 ms"},
	} {
		if got := tc.v.HomeText(tc.nfs, tc.server); got != tc.home {
			t.Errorf("%+v.HomeText(%v, %v) = %q, want %q", tc.v, tc.nfs, tc.server, got, tc.home)
		}
		if got := tc.v.TimeText(); got != tc.time {
			t.Errorf("%+v.TimeText() = %q, want %q", tc.v, got, tc.time)
		}
	}
}

// threeMembers opens a service in a new directory with members n1-n3
// joined, and returns its clock, directory, service and nodelist version.
func threeMembers(t *testing.T) (*clock, string, *Service, int) {
	t.Helper()
	c := &clock{t: time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)}
	dir := t.TempDir()
	s := open(t, dir, c)
	for i := 1; i <= 3; i++ {
		_, err := s.Join("n"+string(rune('0'+i)), mac(i), addr(i))
		must(t, err)
	}
	return c, dir, s, s.Snapshot().Version
}

// TestDefinitionChangeBumpsVersion restarts the service over the same state:
// the same definition (comments and layout aside) keeps the nodelist
// version; a changed one, or a changed BMC password file, bumps it once, so
// that every member applies it.
func TestDefinitionChangeBumpsVersion(t *testing.T) {
	c, dir, _, v := threeMembers(t)
	p := filepath.Join(dir, "cluster.yaml")
	reopen := func(step string, want int) {
		t.Helper()
		s := open(t, dir, c)
		if got := s.Snapshot().Version; got != want {
			t.Fatalf("%s: nodelist version %d, want %d", step, got, want)
		}
	}
	reopen("restart, same definition", v)
	must(t, os.WriteFile(p, []byte("# the lab's cluster\n"+def+"\n\n"), 0o644))
	reopen("a comment and blank lines added", v)
	must(t, os.WriteFile(p, []byte(strings.Replace(def, "vrid: 51", "vrid: 52", 1)), 0o644))
	reopen("VRID changed", v+1)
	reopen("restart again", v+1)

	fenced := strings.Replace(def, "profile: {corosync: true, pacemaker: true,", "profile: {corosync: true, pacemaker: true, fencing: true,", 1) +
		"fencing:\n  bmcs:\n" +
		"    - {node: n1, address: 198.18.1.1, username: admin, password_file: bmc-n1}\n" +
		"    - {node: n2, address: 198.18.1.2, username: admin, password_file: bmc-n2}\n" +
		"    - {node: n3, address: 198.18.1.3, username: admin, password_file: bmc-n3}\n"
	for i := 1; i <= 3; i++ {
		must(t, os.WriteFile(filepath.Join(dir, fmt.Sprintf("bmc-n%d", i)), []byte("pw-one\n"), 0o600))
	}
	must(t, os.WriteFile(p, []byte(fenced), 0o644))
	reopen("fencing on", v+2)
	must(t, os.WriteFile(filepath.Join(dir, "bmc-n2"), []byte("pw-two\n"), 0o600))
	reopen("n2's BMC password changed", v+3)
	reopen("restart after the password change", v+3)

	// Another cluster's definition over this state is refused, naming
	// the directory and the cluster it holds.
	must(t, os.WriteFile(p, []byte(strings.Replace(fenced, "name: lab", "name: other", 1)), 0o644))
	_, err := Open(p, filepath.Join(dir, "state"), Options{Now: c.now})
	if err == nil || !strings.Contains(err.Error(), "holds cluster lab's members") || !strings.Contains(err.Error(), filepath.Join(dir, "state")) {
		t.Fatalf("a renamed definition over the state of cluster lab: %v", err)
	}
	must(t, os.WriteFile(p, []byte(fenced), 0o644))
	reopen("renamed back", v+3)
}

// TestReload reads the definition again while the service runs: an
// unchanged file changes nothing; a changed one bumps the nodelist version
// once and wakes a node service waiting on the old one, and its bundle
// carries the change; a file that does not load, or renames the cluster, is
// refused and the running definition stays.
func TestReload(t *testing.T) {
	c, dir, s, v := threeMembers(t)
	p := filepath.Join(dir, "cluster.yaml")
	if got, changed, err := s.Reload(); err != nil || changed || got != v {
		t.Fatalf("reload of the same file = %d, %v, %v; want %d, unchanged", got, changed, err, v)
	}

	woke := make(chan time.Duration, 1)
	go func() {
		start := time.Now()
		s.Wait(context.Background(), mac(1), v, 10*time.Second)
		woke <- time.Since(start)
	}()
	time.Sleep(50 * time.Millisecond)
	must(t, os.WriteFile(p, []byte(strings.Replace(def, "vrid: 51", "vrid: 52", 1)), 0o644))
	if got, changed, err := s.Reload(); err != nil || !changed || got != v+1 {
		t.Fatalf("reload of a changed file = %d, %v, %v; want %d, changed", got, changed, err, v+1)
	}
	if d := <-woke; d > 5*time.Second {
		t.Errorf("a node service waiting on version %d woke after %v", v, d)
	}
	b, _, err := s.Assignment(mac(1))
	must(t, err)
	if b.Version != v+1 || !slices.ContainsFunc(b.Files, func(f ssi.File) bool { return bytes.Contains(f.Data, []byte("virtual_router_id 52")) }) {
		t.Errorf("n1's bundle after the reload: version %d, want %d with VRID 52", b.Version, v+1)
	}

	for _, bad := range []struct{ name, yaml, want string }{
		{"broken", "name: lab\ncore_size: [\n", "the running definition stays"},
		{"renamed", strings.Replace(def, "name: lab", "name: other", 1), "keeps its name"},
	} {
		must(t, os.WriteFile(p, []byte(bad.yaml), 0o644))
		got, changed, err := s.Reload()
		if err == nil || changed || got != v+1 || !strings.Contains(err.Error(), bad.want) || !strings.Contains(err.Error(), "cluster lab") {
			t.Errorf("%s definition: reload = %d, %v, %v; want refused (%q) at version %d", bad.name, got, changed, err, bad.want, v+1)
		}
		if s.Name() != "lab" || s.Snapshot().Version != v+1 {
			t.Errorf("%s definition: the running cluster is now %s version %d", bad.name, s.Name(), s.Snapshot().Version)
		}
	}
	// The last good definition is what a restart finds unchanged: once
	// the file is put back, no new version.
	must(t, os.WriteFile(p, []byte(strings.Replace(def, "vrid: 51", "vrid: 52", 1)), 0o644))
	if got := open(t, dir, c).Snapshot().Version; got != v+1 {
		t.Errorf("restart after the reload: version %d, want %d", got, v+1)
	}
}
