package enroll

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esir-project/esir/ssi"
)

func fixture(t *testing.T, name string) []byte {
	t.Helper()
	data, err := os.ReadFile("testdata/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func TestParseCrmMonRemote(t *testing.T) {
	tests := []struct {
		file     string
		online   []string
		stonith  bool
		devices  int
		failures int
		wantErr  string
	}{
		{file: "crm_mon-remote.xml", online: []string{"p1", "p2", "p3", "r1"}},
		{file: "crm_mon-remote-lost.xml", online: []string{"p1", "p2", "p3"}, failures: 1},
		{file: "crm_mon-stonith.xml", online: []string{"p1", "p2", "p3", "r1"}, stonith: true, devices: 2},
		{file: "crm_mon-remote-unconnected.xml", wantErr: "check pacemaker: crm_mon: Could not connect to the CIB: Transport endpoint is not connected"},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			s, err := parseCrmMon(fixture(t, tt.file))
			if tt.wantErr != "" {
				var ce *CheckError
				if err == nil || err.Error() != tt.wantErr || !errors.As(err, &ce) || ce.Check != CheckPacemaker {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(s.online(), tt.online) || s.StonithEnabled != tt.stonith || s.StonithDevices != tt.devices || len(s.Failures) != tt.failures {
				t.Errorf("got online %v stonith %v devices %d failures %v", s.online(), s.StonithEnabled, s.StonithDevices, s.Failures)
			}
		})
	}
}

func TestParseTracking(t *testing.T) {
	tests := []struct {
		file string
		want TimeStatus
	}{
		{file: "chrony-local.txt", want: TimeStatus{Source: "local", Stratum: 10, Leap: "Normal"}},
		{file: "chrony-remote.txt", want: TimeStatus{Source: "198.18.0.2", Stratum: 11, OffsetMS: -0.118879, Leap: "Normal"}},
		{file: "chrony-unsynced.txt", want: TimeStatus{Leap: "Not synchronised"}},
	}
	for _, tt := range tests {
		got, err := parseTracking(fixture(t, tt.file))
		if err != nil {
			t.Fatalf("%s: %v", tt.file, err)
		}
		if fmt.Sprintf("%.6f", got.OffsetMS) != fmt.Sprintf("%.6f", tt.want.OffsetMS) {
			t.Errorf("%s: offset %v ms, want %v", tt.file, got.OffsetMS, tt.want.OffsetMS)
		}
		got.OffsetMS = tt.want.OffsetMS
		if got != tt.want {
			t.Errorf("%s: %+v, want %+v", tt.file, got, tt.want)
		}
	}
	fast, err := parseTracking([]byte("Reference ID    : C6120001 (198.18.0.1)\nSystem time     : 0.002000000 seconds fast of NTP time\nLeap status     : Normal\n"))
	if err != nil || fast.OffsetMS != 2 {
		t.Errorf("fast clock: %+v, %v; want offset +2 ms", fast, err)
	}
	if _, err := parseTracking([]byte("506 Cannot talk to daemon\n")); err == nil {
		t.Error("parseTracking accepted chronyc's error")
	}
}

// bundle returns a bundle for node name of role in a cluster whose core
// members are 198.18.0.1-3.
func bundle(name string, id int, role ssi.Role, services ...string) *ssi.Bundle {
	b := &ssi.Bundle{Cluster: "t", Member: ssi.Member{ID: id, Name: name, Addr: netip.AddrFrom4([4]byte{198, 18, 0, byte(id)}), Role: role}, Services: services}
	for i := 1; i <= 3; i++ {
		b.Core = append(b.Core, ssi.Member{ID: i, Name: fmt.Sprintf("p%d", i), Addr: netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}), Role: ssi.Core})
	}
	b.Members = slices.Clone(b.Core)
	if role == ssi.Remote {
		b.Members = append(b.Members, b.Member)
	}
	return b
}

func TestTimeVerdict(t *testing.T) {
	core, remote := bundle("p1", 1, ssi.Core), bundle("r1", 4, ssi.Remote)
	tests := []struct {
		name    string
		ts      TimeStatus
		b       *ssi.Bundle
		wantErr string
	}{
		{name: "core local clock", ts: TimeStatus{Source: "local", Leap: "Normal"}, b: core},
		{name: "core follows a peer", ts: TimeStatus{Source: "198.18.0.2", Leap: "Normal"}, b: core},
		{name: "core unsynced", ts: TimeStatus{Leap: "Not synchronised"}, b: core, wantErr: "not synchronised"},
		{name: "remote follows core", ts: TimeStatus{Source: "198.18.0.3", Leap: "Normal"}, b: remote},
		{name: "remote follows another", ts: TimeStatus{Source: "198.18.1.1", Leap: "Normal"}, b: remote, wantErr: "tracks 198.18.1.1, not a core member (198.18.0.1, 198.18.0.2, 198.18.0.3)"},
		{name: "remote local clock", ts: TimeStatus{Source: "local", Leap: "Normal"}, b: remote, wantErr: "tracks local"},
		{name: "remote unsynced", ts: TimeStatus{Leap: "Not synchronised"}, b: remote, wantErr: "not synchronised"},
	}
	for _, tt := range tests {
		err := timeVerdict(tt.ts, tt.b)
		var ce *CheckError
		switch {
		case tt.wantErr == "" && err != nil:
			t.Errorf("%s: %v", tt.name, err)
		case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr) || !errors.As(err, &ce) || ce.Check != CheckTime):
			t.Errorf("%s: err %v, want a time check error with %q", tt.name, err, tt.wantErr)
		}
	}
}

func TestNFSMounted(t *testing.T) {
	mi := []byte(`22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/sda2 rw
35 22 0:30 / /home rw,relatime shared:20 - nfs4 198.18.0.1:/home rw,vers=4.2,addr=198.18.0.1
36 22 0:31 / /srv rw,relatime shared:21 - tmpfs tmpfs rw
37 22 0:32 / /scratch\040space rw - nfs 198.18.0.1:/s rw
`)
	for dir, want := range map[string]bool{"/home": true, "/srv": false, "/": false, "/data": false, `/scratch\040space`: true} {
		if got := nfsMounted(mi, dir); got != want {
			t.Errorf("nfsMounted(%s) = %v, want %v", dir, got, want)
		}
	}
}

func TestAddrsAndVIPs(t *testing.T) {
	out := []byte(`1: lo    inet 127.0.0.1/8 scope host lo\       valid_lft forever preferred_lft forever
1: lo    inet 198.18.0.100/32 scope global lo\       valid_lft forever preferred_lft forever
2: eth0    inet 198.18.0.1/24 brd 198.18.0.255 scope global eth0\       valid_lft forever preferred_lft forever
2: eth0    inet 198.18.0.101/24 scope global secondary eth0\       valid_lft forever preferred_lft forever
`)
	as := parseAddrs(out)
	vip := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	if got := heldVIPs(as, []netip.Addr{vip("198.18.0.100"), vip("198.18.0.101"), vip("198.18.0.102")}); !slices.Equal(got, []string{"198.18.0.101"}) {
		t.Errorf("held VIPs %v, want [198.18.0.101] (a VIP on lo is a real server's, not held)", got)
	}
	if err := loopbackVerdict(as, []netip.Addr{vip("198.18.0.100")}); err != nil {
		t.Errorf("VIP on lo: %v", err)
	}
	var ce *CheckError
	if err := loopbackVerdict(as, []netip.Addr{vip("198.18.0.101")}); !errors.As(err, &ce) || ce.Check != CheckVIP {
		t.Errorf("VIP not on lo: %v", err)
	}
}

func TestCheckError(t *testing.T) {
	err := fmt.Errorf("agent: %w", named(failed(CheckQuorum, "partition is not quorate (%d of %d votes)", 1, 3), "n3"))
	var ce *CheckError
	if !errors.As(err, &ce) || ce.Node != "n3" || ce.Check != CheckQuorum {
		t.Fatalf("errors.As: %+v", ce)
	}
	if want := "agent: n3 not enrolled: check quorum: partition is not quorate (1 of 3 votes)"; err.Error() != want {
		t.Errorf("Error() = %q, want %q", err, want)
	}
	// A name is given once: the innermost caller knows best.
	named(err, "other")
	if ce.Node != "n3" {
		t.Errorf("node renamed to %s", ce.Node)
	}
	if got := failed(CheckTime, "x").Error(); got != "check time: x" {
		t.Errorf("unnamed: %q", got)
	}
}

func TestMembershipJSON(t *testing.T) {
	data, err := json.Marshal(Membership{NodeID: 1, Joined: []int{1}, Online: []string{"p1"}, TimeOffsetMS: 0.5, FencingEnabled: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"node_id", "joined", "nodelist", "quorate", "expected", "total", "online", "role",
		"time_source", "time_offset_ms", "time_synced", "home_mounted", "home_exported", "vips", "fencing_enabled", "fencing_devices"} {
		if !strings.Contains(string(data), `"`+key+`":`) {
			t.Errorf("JSON lacks %q: %s", key, data)
		}
	}
}

// script is a Runner answering commands from a table: the first entry whose
// key prefixes the command line answers; an unknown command fails.
type script struct {
	mu    sync.Mutex
	table map[string]func() ([]byte, error)
	ran   []string
}

func (s *script) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	line := strings.Join(append([]string{name}, args...), " ")
	s.mu.Lock()
	s.ran = append(s.ran, line)
	s.mu.Unlock()
	keys := make([]string, 0, len(s.table))
	for k := range s.table {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int { return len(b) - len(a) }) // longest first
	for _, k := range keys {
		if strings.HasPrefix(line, k) {
			return s.table[k]()
		}
	}
	return nil, fmt.Errorf("%s: not found", line)
}

// upAfterStart makes pidof find chronyd and pacemaker-remoted in s once the
// command that starts each ran (Start waits for an engine it started).
func upAfterStart(s *script) {
	var mu sync.Mutex
	up := map[string]bool{}
	for start, daemon := range map[string]string{"chronyd -x -f": "chronyd", "sh -c setsid pacemaker-remoted": "pacemaker-remoted"} {
		prev := s.table[start]
		if prev == nil {
			prev = answer("")
		}
		s.table[start] = func() ([]byte, error) {
			mu.Lock()
			up[daemon] = true
			mu.Unlock()
			return prev()
		}
		s.table["pidof "+daemon] = func() ([]byte, error) {
			mu.Lock()
			defer mu.Unlock()
			if up[daemon] {
				return []byte("42\n"), nil
			}
			return nil, errors.New("exit status 1")
		}
	}
}

func answer(out string) func() ([]byte, error) {
	return func() ([]byte, error) { return []byte(out), nil }
}

func fail(out string) func() ([]byte, error) {
	return func() ([]byte, error) { return []byte(out), errors.New("exit status 1") }
}

// TestEnrollRemoteChecks enrolls a remote node against scripted engines: each
// missing condition is reported as its own check, and the node is enrolled
// once pacemaker shows it online and chrony tracks a core member.
func TestEnrollRemoteChecks(t *testing.T) {
	b := bundle("r1", 4, ssi.Remote, "pacemaker_remote", "chrony")
	b.Members[3].Name = "r1"
	tests := []struct {
		name      string
		crmMon    func() ([]byte, error)
		chrony    func() ([]byte, error)
		wantCheck string
		wantText  string
	}{
		{name: "not connected", crmMon: answer(string(fixture(t, "crm_mon-remote-unconnected.xml"))), chrony: answer(string(fixture(t, "chrony-remote.txt"))),
			wantCheck: CheckPacemaker, wantText: "r1 not enrolled: check pacemaker: crm_mon: Could not connect to the CIB"},
		{name: "offline", crmMon: answer(string(fixture(t, "crm_mon-remote-lost.xml"))), chrony: answer(string(fixture(t, "chrony-remote.txt"))),
			wantCheck: CheckPacemaker, wantText: "r1 is not online (online: [p1 p2 p3])"},
		{name: "unsynced", crmMon: answer(string(fixture(t, "crm_mon-remote.xml"))), chrony: answer(string(fixture(t, "chrony-unsynced.txt"))),
			wantCheck: CheckTime, wantText: "r1 not enrolled: check time: chronyd is not synchronised"},
		{name: "chronyd down", crmMon: answer(string(fixture(t, "crm_mon-remote.xml"))), chrony: fail("506 Cannot talk to daemon"),
			wantCheck: CheckTime, wantText: "506 Cannot talk to daemon"},
		{name: "enrolled", crmMon: answer(string(fixture(t, "crm_mon-remote.xml"))), chrony: answer(string(fixture(t, "chrony-remote.txt")))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			run := &script{table: map[string]func() ([]byte, error){
				"pidof":                          fail(""),
				"chronyd -x -f":                  answer(""),
				"sh -c setsid pacemaker-remoted": answer(""),
				"crm_mon":                        tt.crmMon,
				"chronyc -n tracking":            tt.chrony,
			}}
			upAfterStart(run)
			n := &Node{Root: t.TempDir(), Run: run, Init: Direct, SharedClock: true, Timeout: 300 * time.Millisecond}
			m, err := n.Enroll(context.Background(), b)
			if tt.wantCheck == "" {
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(m.Online, []string{"p1", "p2", "p3", "r1"}) || m.TimeSource != "198.18.0.2" || !m.TimeSynced || m.Role != "remote" || m.NodeID != 0 || m.FencingEnabled {
					t.Errorf("view %+v", m)
				}
				return
			}
			var ce *CheckError
			if !errors.As(err, &ce) || ce.Check != tt.wantCheck || ce.Node != "r1" || !strings.Contains(err.Error(), tt.wantText) {
				t.Fatalf("err = %v, want check %s with %q", err, tt.wantCheck, tt.wantText)
			}
			if !strings.Contains(err.Error(), "still failing after 300ms") {
				t.Errorf("err %v does not say how long it waited", err)
			}
		})
	}
	// Started with -x (SharedClock) and pacemaker-remoted detached.
	run := &script{table: map[string]func() ([]byte, error){"pidof": fail(""), "": answer("")}}
	upAfterStart(run)
	n := &Node{Root: t.TempDir(), Run: run, Init: Direct, SharedClock: true}
	if err := n.Start(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(run.ran, "sh -c setsid pacemaker-remoted </dev/null >/dev/null 2>&1 &") || !slices.Contains(run.ran, "chronyd -x -f /etc/chrony/chrony.conf") {
		t.Errorf("Start ran %q", run.ran)
	}
	// A daemon that runs already is not started twice.
	run = &script{table: map[string]func() ([]byte, error){"pidof": answer("42"), "": answer("")}}
	n.Run = run
	if err := n.Start(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(run.ran, func(l string) bool { return !strings.HasPrefix(l, "pidof ") }) {
		t.Errorf("second Start ran %q", run.ran)
	}
}

func TestParseIPVS(t *testing.T) {
	out := []byte(`IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  198.18.0.100:80 wlc
  -> 198.18.0.3:80                Route   1      2          7
  -> 198.18.0.4:80                Route   1      0          5
UDP  198.18.0.100:53 rr
  -> 198.18.0.3:53                Route   1      0          0
`)
	got := parseIPVS(out)
	want := []IPVSEntry{
		{Service: "TCP 198.18.0.100:80 wlc", Real: "198.18.0.3:80", Forward: "Route", Weight: 1, Active: 2, Inactive: 7},
		{Service: "TCP 198.18.0.100:80 wlc", Real: "198.18.0.4:80", Forward: "Route", Weight: 1, Active: 0, Inactive: 5},
		{Service: "UDP 198.18.0.100:53 rr", Real: "198.18.0.3:53", Forward: "Route", Weight: 1},
	}
	if len(got) != len(want) {
		t.Fatalf("parseIPVS = %+v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("entry %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	if es := parseIPVS([]byte("garbage\n  -> x y z\n")); len(es) != 0 {
		t.Errorf("garbage parsed as %+v", es)
	}
}

// TestRealServerSysctls checks that a real server's ARP settings are applied
// before its VIP goes on lo (written alone, they wait for the next boot).
func TestRealServerSysctls(t *testing.T) {
	c, _, err := ssi.Parse([]byte(`name: rs
profile: {keepalived: true}
core_size: 1
vips:
  - name: web
    address: 198.18.0.100/24
    vrid: 51
    directors: [d1]
    real_servers: [r1]
    services: [{port: 80}]
`))
	if err != nil {
		t.Fatal(err)
	}
	st := ssi.NewState()
	for i, name := range []string{"d1", "r1"} {
		if _, _, err := st.Join(name, netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)}), c.CoreSize); err != nil {
			t.Fatal(err)
		}
	}
	keys, err := ssi.LoadKeys(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	b, err := ssi.Render(c, st, keys, "r1")
	if err != nil {
		t.Fatal(err)
	}
	run := &script{table: map[string]func() ([]byte, error){"": answer(""), "sysctl -n": answer("0\n")}}
	n := &Node{Root: t.TempDir(), Run: run, Init: Direct}
	_, _ = n.Enroll(context.Background(), b) // no engine answers here; only the order matters
	sys, lo := -1, -1
	for i, l := range run.ran {
		if l == "sysctl -w net.ipv4.conf.all.arp_ignore=1" && sys < 0 {
			sys = i
		}
		if strings.HasPrefix(l, "ip addr replace 198.18.0.100/32 dev lo") && lo < 0 {
			lo = i
		}
	}
	if sys < 0 || lo < 0 || sys > lo {
		t.Fatalf("want arp_ignore set before the VIP goes on lo; ran %q", run.ran)
	}
	if !slices.Contains(run.ran, "sysctl -w net.ipv4.conf.lo.arp_announce=2") {
		t.Fatalf("arp_announce on lo not set; ran %q", run.ran)
	}
}

// TestHomeExported checks the NFS home server's check against scripted
// engines: it passes only while nfsd has threads, rpc.mountd runs and
// exportfs -s lists the home; otherwise its error names the home check and
// what is missing.
func TestHomeExported(t *testing.T) {
	const list = "/srv/other  198.18.0.0/24(sync,wdelay,hide,no_subtree_check,sec=sys,rw,secure,root_squash,no_all_squash)\n" +
		"/home  198.18.0.0/24(sync,wdelay,hide,no_subtree_check,sec=sys,rw,secure,root_squash,no_all_squash)\n"
	for _, tc := range []struct {
		name            string
		threads, mountd func() ([]byte, error)
		exports         func() ([]byte, error)
		want            string // "" passes
	}{
		{"served", answer("8\n"), answer("412\n"), answer(list), ""},
		{"no nfsd threads", answer("0\n"), answer("412\n"), answer(list), "NFS server is not running"},
		{"no nfsd filesystem", fail("cat: /proc/fs/nfsd/threads: No such file or directory"), answer("412\n"), answer(list), "NFS server is not running"},
		{"no rpc.mountd", answer("8\n"), fail(""), answer(list), "NFS server is not running"},
		{"not exported", answer("8\n"), answer("412\n"), answer("/srv/other  198.18.0.0/24(rw)\n/home/user  *(ro)\n"), "/home is not exported"},
		{"exportfs fails", answer("8\n"), answer("412\n"), fail("exportfs: could not open /var/lib/nfs/etab"), "exportfs -s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &script{table: map[string]func() ([]byte, error){
				"cat " + nfsdThreads: tc.threads, "pidof rpc.mountd": tc.mountd, "exportfs -s": tc.exports}}
			n := &Node{Root: t.TempDir(), Run: s, Init: Direct}
			err := n.HomeExported(context.Background(), "/home")
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			var ce *CheckError
			if !errors.As(err, &ce) || ce.Check != CheckHome || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want check home saying %q", err, tc.want)
			}
		})
	}
}
