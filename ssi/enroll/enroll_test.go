package enroll

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esir-project/esir/netlab"
	"github.com/esir-project/esir/ssi"
	"github.com/esir-project/esir/ssi/nodens"
)

func TestParseMembers(t *testing.T) {
	out := []byte(`runtime.members.1.config_version (u64) = 0
runtime.members.1.ip (str) = r(0) ip(198.18.0.1)
runtime.members.1.join_count (u32) = 1
runtime.members.1.status (str) = joined
runtime.members.2.status (str) = left
runtime.members.12.status (str) = joined
`)
	if got := parseMembers(out); !slices.Equal(got, []int{1, 12}) {
		t.Fatalf("parseMembers = %v, want [1 12]", got)
	}
}

func TestParseNodelist(t *testing.T) {
	out := []byte(`nodelist.local_node_pos (u32) = 0
nodelist.node.0.name (str) = n1
nodelist.node.0.nodeid (u32) = 4
nodelist.node.0.ring0_addr (str) = 198.18.0.1
nodelist.node.1.name (str) = n2
nodelist.node.1.nodeid (u32) = 2
`)
	if got := parseNodelist(out); !slices.Equal(got, []int{2, 4}) {
		t.Fatalf("parseNodelist = %v, want [2 4]", got)
	}
}

func TestParseOnline(t *testing.T) {
	out, err := os.ReadFile("testdata/crm_mon.xml")
	if err != nil {
		t.Fatal(err)
	}
	s, err := parseCrmMon(out)
	if got := s.online(); err != nil || !slices.Equal(got, []string{"p1", "p3"}) {
		t.Fatalf("parseCrmMon online = %v, %v; want [p1 p3]", got, err)
	}
	if !s.StonithEnabled {
		t.Error("stonith-enabled unset read as false; pacemaker's default is true")
	}
	if _, err := parseCrmMon([]byte("crm_mon: Error: cluster is not available on this node")); err == nil {
		t.Fatal("parseCrmMon accepted a non-XML answer")
	}
}

func TestParseQuorum(t *testing.T) {
	tests := []struct {
		name    string
		out     string
		want    Membership
		wantErr bool
	}{
		{name: "quorate", out: "Quorum information\n------------------\nDate:             Sun Nov 22 04:40:00 2026\nQuorum provider:  corosync_votequorum\nNodes:            3\nNode ID:          2\nRing ID:          1.d\nQuorate:          Yes\n\nVotequorum information\n----------------------\nExpected votes:   3\nHighest expected: 3\nTotal votes:      3\nQuorum:           2\nFlags:            Quorate\n",
			want: Membership{NodeID: 2, Quorate: true, Expected: 3, Total: 3}},
		{name: "minority", out: "Node ID:          3\nQuorate:          No\nExpected votes:   3\nTotal votes:      1\nQuorum:           2 Activity blocked\n",
			want: Membership{NodeID: 3, Expected: 3, Total: 1}},
		{name: "garbage", out: "Cannot initialize QUORUM service\n", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var m Membership
			err := parseQuorum([]byte(tt.out), &m)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v", err)
			}
			if !tt.wantErr && fmt.Sprint(m) != fmt.Sprint(tt.want) {
				t.Fatalf("got %+v, want %+v", m, tt.want)
			}
		})
	}
}

func TestInstall(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/fstab"), []byte("/dev/sda2 / ext4 defaults 0 1"), 0o644); err != nil {
		t.Fatal(err)
	}
	b := &ssi.Bundle{Member: ssi.Member{Name: "r1"},
		Files: []ssi.File{
			{Path: "/etc/corosync/authkey", Mode: 0o400, Data: []byte("key")},
			{Path: "/etc/chrony/chrony.conf", Mode: 0o644, Data: []byte("server 198.18.0.1 iburst\n")},
		},
		FstabLines: []string{"198.18.0.1:/home /home nfs4 defaults,_netdev 0 0"},
	}
	n := &Node{Root: root, Run: Local{}}
	for range 2 { // the second run must change nothing
		if err := n.Install(b); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range b.Files {
		st, err := os.Stat(filepath.Join(root, f.Path))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != f.Mode {
			t.Errorf("%s: mode %v, want %v", f.Path, st.Mode().Perm(), f.Mode)
		}
		if data, _ := os.ReadFile(filepath.Join(root, f.Path)); !bytes.Equal(data, f.Data) {
			t.Errorf("%s: content %q", f.Path, data)
		}
	}
	fstab, _ := os.ReadFile(filepath.Join(root, "etc/fstab"))
	want := "/dev/sda2 / ext4 defaults 0 1\n198.18.0.1:/home /home nfs4 defaults,_netdev 0 0 # esir ssi\n"
	if string(fstab) != want {
		t.Errorf("fstab = %q, want %q", fstab, want)
	}
	bad := &ssi.Bundle{Member: ssi.Member{Name: "r1"}, Files: []ssi.File{{Path: "/etc/x", Mode: 0o600, Owner: "no-such-user-esir"}}}
	if err := n.Install(bad); err == nil || !strings.Contains(err.Error(), "/etc/x") || !strings.Contains(err.Error(), "r1") {
		t.Errorf("unknown owner: %v", err)
	}
}

// node is one cluster node of the level 1 test and its enrollment.
type node struct {
	*nodens.Node
	enr *Node
}

func startNode(ctx context.Context, t *testing.T, h *netlab.Host) *node {
	t.Helper()
	n, err := nodens.Start(ctx, h, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return &node{Node: n, enr: &Node{Root: n.Root, Run: n, Init: Direct, Timeout: 30 * time.Second}}
}

// newLab opens network lab name for a test and closes it when the test ends.
func newLab(ctx context.Context, t *testing.T, name string) *netlab.Lab {
	t.Helper()
	lab, err := netlab.New(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Close() })
	return lab
}

// memberAddr is the address of the test cluster's i-th member (from 0).
func memberAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)}) }

// joinNode allocates member name at memberAddr(i) in st and starts its node
// in lab.
func joinNode(ctx context.Context, t *testing.T, lab *netlab.Lab, st *ssi.State, coreSize, i int, name string) *node {
	t.Helper()
	if _, _, err := st.Join(name, memberAddr(i), coreSize); err != nil {
		t.Fatal(err)
	}
	h, err := lab.AddHost(ctx, name, netip.PrefixFrom(memberAddr(i), 24), netlab.Link{})
	if err != nil {
		t.Fatal(err)
	}
	return startNode(ctx, t, h)
}

// keepLogs copies the nodes' corosync logs to $ESIR_ARTIFACTS and the test log
// when the test failed.
func keepLogs(t *testing.T, nodes []*node) {
	if !t.Failed() {
		return
	}
	dir := os.Getenv("ESIR_ARTIFACTS")
	for _, n := range nodes {
		log := n.Log()
		if len(log) > 4000 {
			t.Logf("%s corosync.log (tail):\n%s", n.Host.Name, log[len(log)-4000:])
		} else {
			t.Logf("%s corosync.log:\n%s", n.Host.Name, log)
		}
		if dir != "" {
			os.WriteFile(filepath.Join(dir, "ssi-"+n.Host.Name+"-corosync.log"), log, 0o644)
		}
	}
}

// waitFor polls node n's corosync until ok holds.
func waitFor(ctx context.Context, t *testing.T, n *node, what string, ok func(Membership) bool) Membership {
	t.Helper()
	return waitForWithin(ctx, t, n, 20*time.Second, what, ok)
}

// waitForWithin is waitFor with its own time limit.
func waitForWithin(ctx context.Context, t *testing.T, n *node, limit time.Duration, what string, ok func(Membership) bool) Membership {
	t.Helper()
	deadline := time.Now().Add(limit)
	var last Membership
	var err error
	for time.Now().Before(deadline) {
		last, err = n.enr.Status(ctx)
		if err == nil && ok(last) {
			return last
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s: %s never held: last %+v, %v", n.Host.Name, what, last, err)
	return last
}

// TestLevel1CoreNetns enrolls three core nodes with real corosync, each in its
// own network, mount, UTS and PID namespaces; isolates one (it alone loses
// quorum), heals the partition; makes one leave (no ghost in the others'
// membership, nodelist or expected votes) and come back under a new id; then
// kills one (the other two stay quorate).
func TestLevel1CoreNetns(t *testing.T) {
	if err := netlab.Available(); err != nil {
		t.Skipf("needs root and network namespaces: %v", err)
	}
	for _, bin := range []string{"corosync", "corosync-cmapctl", "corosync-quorumtool", "corosync-cfgtool", "nsenter", "unshare"} {
		if _, err := os.Stat("/usr/sbin/" + bin); err != nil {
			if _, err := os.Stat("/usr/bin/" + bin); err != nil {
				t.Skipf("%s is not installed (scripts/setup.sh test installs corosync and util-linux)", bin)
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, _, err := ssi.Load("testdata/core3.yaml")
	if err != nil {
		t.Fatal(err)
	}
	keys, err := ssi.LoadKeys(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	st := ssi.NewState()
	lab := newLab(ctx, t, "ssil1")
	var nodes []*node
	t.Cleanup(func() { keepLogs(t, nodes) })
	for i, name := range []string{"n1", "n2", "n3"} {
		nodes = append(nodes, joinNode(ctx, t, lab, st, c.CoreSize, i, name))
	}

	t0 := time.Now()
	// Enroll all three at once: each waits for the full membership.
	var wg sync.WaitGroup
	errs := make([]error, len(nodes))
	views := make([]Membership, len(nodes))
	for i, n := range nodes {
		b, err := ssi.Render(c, st, keys, n.Host.Name)
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() { views[i], errs[i] = n.enr.Enroll(ctx, b) })
	}
	wg.Wait()
	for i, n := range nodes {
		if errs[i] != nil {
			t.Fatalf("%s: %v", n.Host.Name, errs[i])
		}
		if !slices.Equal(views[i].Joined, []int{1, 2, 3}) || !views[i].Quorate || views[i].NodeID != i+1 {
			t.Fatalf("%s enrolled with view %+v", n.Host.Name, views[i])
		}
	}
	t.Logf("%v: step done", time.Since(t0).Round(time.Millisecond))
	// Enrolling again (next boot) reloads instead of starting a second corosync.
	b, _ := ssi.Render(c, st, keys, "n1")
	if _, err := nodes[0].enr.Enroll(ctx, b); err != nil {
		t.Fatalf("n1 second enrollment: %v", err)
	}

	t.Logf("%v: step done", time.Since(t0).Round(time.Millisecond))
	// Isolate n3: it alone is not quorate, n1 and n2 are.
	if out, err := nodes[2].Host.Run(ctx, "ip", "link", "set", "eth0", "down"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	waitFor(ctx, t, nodes[2], "isolated n3 non-quorate", func(m Membership) bool { return !m.Quorate && slices.Equal(m.Joined, []int{3}) })
	for _, n := range nodes[:2] {
		waitFor(ctx, t, n, "majority quorate without n3", func(m Membership) bool { return m.Quorate && slices.Equal(m.Joined, []int{1, 2}) })
	}
	short := *nodes[2].enr
	short.Timeout = 2 * time.Second
	var ce *CheckError
	if _, err := short.WaitMember(ctx, 3, 3); !errors.As(err, &ce) || ce.Check != CheckMembership || ce.Node != "node 3" ||
		!strings.Contains(err.Error(), "check membership: 1 of 3 core members joined") {
		t.Errorf("isolated n3 passes the enrollment check: %v", err)
	}

	t.Logf("%v: step done", time.Since(t0).Round(time.Millisecond))
	// Heal: the three merge again.
	if out, err := nodes[2].Host.Run(ctx, "ip", "link", "set", "eth0", "up"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for _, n := range nodes {
		// After a link comes back, knet may run a reduced MTU until its next
		// path MTU discovery (every 30 s by default); merges can wait for it.
		waitForWithin(ctx, t, n, 45*time.Second, "healed membership", func(m Membership) bool { return m.Quorate && slices.Equal(m.Joined, []int{1, 2, 3}) })
	}

	t.Logf("%v: step done", time.Since(t0).Round(time.Millisecond))
	// n3 leaves: its corosync stops, the server drops it from the nodelist
	// and the others reload: no ghost remains in their view.
	b3, _ := ssi.Render(c, st, keys, "n3")
	if err := nodes[2].enr.Leave(ctx, b3); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Leave("n3"); err != nil {
		t.Fatal(err)
	}
	// reenroll pushes the new nodelist to every node of ns first, then enrolls
	// them all at once (members reload, a new node starts).
	reenroll := func(ns []*node, want []int) {
		t.Helper()
		bundles := make([]*ssi.Bundle, len(ns))
		for i, n := range ns {
			b, err := ssi.Render(c, st, keys, n.Host.Name)
			if err != nil {
				t.Fatal(err)
			}
			if err := n.enr.Install(b); err != nil {
				t.Fatal(err)
			}
			bundles[i] = b
		}
		var wg sync.WaitGroup
		errs := make([]error, len(ns))
		for i, n := range ns {
			wg.Go(func() { _, errs[i] = n.enr.Enroll(ctx, bundles[i]) })
		}
		wg.Wait()
		for i, n := range ns {
			if errs[i] != nil {
				t.Fatalf("%s: %v", n.Host.Name, errs[i])
			}
			waitFor(ctx, t, n, fmt.Sprintf("membership %v after nodelist version %d", want, st.Version), func(m Membership) bool {
				return m.Quorate && slices.Equal(m.Joined, want) && slices.Equal(m.Nodelist, want) && m.Expected == len(want)
			})
		}
	}
	reenroll(nodes[:2], []int{1, 2})
	t.Logf("%v: step done", time.Since(t0).Round(time.Millisecond))

	// n3 comes back (reinstalled): it gets a new id, never the retired 3.
	m3, _, err := st.Join("n3", nodes[2].Host.IP(), c.CoreSize)
	if err != nil || m3.ID != 4 {
		t.Fatalf("rejoin n3: %+v, %v", m3, err)
	}
	reenroll(nodes, []int{1, 2, 4})
	t.Logf("%v: step done", time.Since(t0).Round(time.Millisecond))

	// Kill n1 (its whole PID namespace): n2 and n3 stay quorate.
	nodes[0].Kill()
	for _, n := range nodes[1:] {
		waitFor(ctx, t, n, "quorate after n1 died", func(m Membership) bool { return m.Quorate && slices.Equal(m.Joined, []int{2, 4}) && m.Total == 2 })
	}
	t.Logf("%v: step done", time.Since(t0).Round(time.Millisecond))
}

// waitHolder waits until want alone among live holds vip, for five polls
// in a row, or fails the test with why.
func waitHolder(ctx context.Context, t *testing.T, vip netip.Addr, live []*node, want, why string) {
	t.Helper()
	var held []string
	same := 0
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		held = held[:0]
		for _, n := range live {
			ok, err := n.enr.HoldsVIP(ctx, vip)
			if err != nil {
				t.Fatal(err)
			}
			if ok {
				held = append(held, n.Host.Name)
			}
		}
		if len(held) != 1 || held[0] != want {
			same = 0
			continue
		}
		if same++; same == 5 {
			return
		}
	}
	t.Fatalf("%s: VIP %s held by %v, want %s alone", why, vip, held, want)
}

// TestLevel1VRRPNetns starts keepalived on three directors of one VIP, each a
// node in its own namespaces: exactly one holds the VIP (the highest
// priority). When the definition takes the first off the VIP's directors,
// its keepalived stops and the VIP moves to the next, while the first
// carries it on lo as a real server; when it is no real server either, the
// VIP leaves its lo and its ARP settings are restored. When the holder
// dies, the VIP moves to the next director.
func TestLevel1VRRPNetns(t *testing.T) {
	if err := netlab.Available(); err != nil {
		t.Skipf("needs root and network namespaces: %v", err)
	}
	if _, err := os.Stat("/usr/sbin/keepalived"); err != nil {
		t.Skip("keepalived is not installed (scripts/setup.sh test installs it)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, _, err := ssi.Load("testdata/vrrp3.yaml")
	if err != nil {
		t.Fatal(err)
	}
	vip := c.VIPs[0].Address.Addr()
	st := ssi.NewState()
	lab := newLab(ctx, t, "ssivr")
	var nodes []*node
	for i, name := range []string{"d1", "d2", "d3"} {
		nodes = append(nodes, joinNode(ctx, t, lab, st, c.CoreSize, i, name))
	}
	for _, n := range nodes {
		b, err := ssi.Render(c, st, &ssi.Keys{}, n.Host.Name)
		if err != nil {
			t.Fatal(err)
		}
		if err := n.enr.Install(b); err != nil {
			t.Fatal(err)
		}
		if err := n.enr.Start(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	waitHolder(ctx, t, vip, nodes, "d1", "priority 150")

	// d1 is no longer a director: its keepalived stops, the VIP moves to
	// d2, and d1 carries it on lo as a real server instead.
	c.VIPs[0].Directors = []string{"d2", "d3"}
	st.Version++
	for _, n := range nodes {
		b, err := ssi.Render(c, st, &ssi.Keys{}, n.Host.Name)
		if err != nil {
			t.Fatal(err)
		}
		withoutRealServers(t, b)
		if _, err := n.enr.Enroll(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := nodes[0].Run(ctx, "pidof", "keepalived"); err == nil {
		t.Fatalf("d1 is no director any more but keepalived still runs as %s", out)
	}
	waitHolder(ctx, t, vip, nodes, "d2", "d1 demoted, d2 has priority 150")
	onLo := func(n *node) bool {
		out, err := n.Run(ctx, "ip", "-o", "addr", "show", "dev", "lo")
		if err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		return strings.Contains(string(out), " "+vip.String()+"/32 ")
	}
	sysctl := func(n *node, key string) string {
		out, err := n.Run(ctx, "sysctl", "-n", key)
		if err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		return strings.TrimSpace(string(out))
	}
	if !onLo(nodes[0]) || sysctl(nodes[0], "net.ipv4.conf.all.arp_ignore") != "1" {
		t.Fatal("d1, a real server now, does not carry the VIP on lo with arp_ignore 1")
	}

	// d1 is no real server either: the VIP leaves its lo and the ARP
	// settings are back to what they were.
	c.VIPs[0].RealServers = []string{"d3"}
	st.Version++
	b, err := ssi.Render(c, st, &ssi.Keys{}, "d1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := nodes[0].enr.Enroll(ctx, b); err != nil {
		t.Fatal(err)
	}
	if onLo(nodes[0]) || sysctl(nodes[0], "net.ipv4.conf.all.arp_ignore") != "0" || sysctl(nodes[0], "net.ipv4.conf.lo.arp_announce") != "0" {
		t.Fatal("d1 is no real server any more but keeps the VIP on lo or the ARP settings")
	}

	nodes[1].Kill()
	waitHolder(ctx, t, vip, nodes[2:], "d3", "d2 died, d3 has priority 140")
}

// withoutRealServers takes the real_server blocks out of b's
// keepalived.conf: on this host's kernel (no ip_vs) keepalived exits when
// it reloads a configuration with real servers. IPVS is level 2's
// (ssi/vmtest).
func withoutRealServers(t *testing.T, b *ssi.Bundle) {
	t.Helper()
	for i, f := range b.Files {
		if f.Path != "/etc/keepalived/keepalived.conf" {
			continue
		}
		conf := string(f.Data)
		for {
			i := strings.Index(conf, "\n\treal_server ")
			if i < 0 {
				break
			}
			j := strings.Index(conf[i:], "\n\t}\n")
			if j < 0 {
				t.Fatalf("keepalived.conf: real_server block without its end:\n%s", f.Data)
			}
			conf = conf[:i] + conf[i+j+3:]
		}
		b.Files[i].Data = []byte(conf)
	}
}

// recorder is a node's Runner that records the command lines it runs.
type recorder struct {
	r   Runner
	mu  sync.Mutex
	ran []string
}

func (r *recorder) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	r.mu.Lock()
	r.ran = append(r.ran, strings.Join(append([]string{name}, args...), " "))
	r.mu.Unlock()
	return r.r.Run(ctx, name, args...)
}

// acts returns the commands run since the last call that act on an engine
// (start, stop, reload), leaving out the queries.
func (r *recorder) acts() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, l := range r.ran {
		switch f := strings.Fields(l); f[0] {
		case "pidof", "cat", "ip", "chronyc":
			if l != "chronyc shutdown" {
				continue
			}
		}
		out = append(out, l)
	}
	r.ran = nil
	return out
}

// TestLevel1ReloadNetns changes the configuration of running engines under
// three nodes, each in its own network, mount, UTS and PID namespaces,
// running keepalived (directors of one VIP) and chrony (serving each other):
// Start with unchanged files touches no engine; reversed director priorities
// reach keepalived by a reload (same process; the VIP moves to the new
// first director) and leave chronyd alone; a narrower time.allow restarts
// chronyd (which now refuses a client it allowed) and leaves keepalived
// alone.
func TestLevel1ReloadNetns(t *testing.T) {
	if err := netlab.Available(); err != nil {
		t.Skipf("needs root and network namespaces: %v", err)
	}
	for _, bin := range []string{"/usr/sbin/keepalived", "/usr/sbin/chronyd", "/usr/bin/chronyc"} {
		if _, err := os.Stat(bin); err != nil {
			t.Skipf("%s is not installed (scripts/setup.sh test installs keepalived and chrony)", bin)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, _, err := ssi.Load("testdata/reload3.yaml")
	if err != nil {
		t.Fatal(err)
	}
	vip := c.VIPs[0].Address.Addr()
	st := ssi.NewState()
	lab := newLab(ctx, t, "ssirl")
	var nodes []*node
	var recs []*recorder
	for i, name := range []string{"d1", "d2", "d3"} {
		n := joinNode(ctx, t, lab, st, c.CoreSize, i, name)
		n.enr.SharedClock = true
		rec := &recorder{r: n.Node}
		n.enr.Run = rec
		nodes, recs = append(nodes, n), append(recs, rec)
	}
	// apply installs every node's bundle of the definition as it is now and
	// starts it, then returns what each node's Start did to its engines.
	apply := func(step string) [][]string {
		t.Helper()
		for _, r := range recs {
			r.acts()
		}
		acts := make([][]string, len(nodes))
		for i, n := range nodes {
			b, err := ssi.Render(c, st, &ssi.Keys{}, n.Host.Name)
			if err != nil {
				t.Fatal(err)
			}
			if err := n.enr.Install(b); err != nil {
				t.Fatal(err)
			}
			if err := n.enr.Start(ctx, b); err != nil {
				t.Fatalf("%s: %s: %v", step, n.Host.Name, err)
			}
			acts[i] = recs[i].acts()
		}
		return acts
	}
	// pids returns keepalived's parent and chronyd's pid on every node.
	type pid struct{ keepalived, chronyd string }
	pids := func() []pid {
		t.Helper()
		out := make([]pid, len(nodes))
		for i, n := range nodes {
			k, err := n.Run(ctx, "cat", keepalivedPID)
			if err != nil {
				t.Fatal(err)
			}
			c, err := n.Run(ctx, "pidof", "chronyd")
			if err != nil {
				t.Fatal(err)
			}
			out[i] = pid{strings.TrimSpace(string(k)), strings.TrimSpace(string(c))}
		}
		return out
	}
	// access asks each node's chronyd whether it serves 198.18.0.200.
	access := func() []string {
		t.Helper()
		out := make([]string, len(nodes))
		for i, n := range nodes {
			a, err := n.Run(ctx, "chronyc", "accheck", "198.18.0.200")
			if err != nil {
				t.Fatalf("%s: %v: %s", n.Host.Name, err, a)
			}
			out[i] = strings.TrimSpace(string(a))
		}
		return out
	}
	t0 := time.Now()
	for i, a := range apply("first start") {
		if !slices.Contains(a, "keepalived -f /etc/keepalived/keepalived.conf") || !slices.Contains(a, "chronyd -x -f /etc/chrony/chrony.conf") {
			t.Fatalf("%s: first Start ran %q", nodes[i].Host.Name, a)
		}
	}
	waitHolder(ctx, t, vip, nodes, "d1", "priority 150")
	before := pids()
	if a := access(); !slices.Equal(a, []string{"208 Access allowed", "208 Access allowed", "208 Access allowed"}) {
		t.Fatalf("chronyd serving 198.18.0.0/24 answers for 198.18.0.200: %q", a)
	}
	t.Logf("%v: started", time.Since(t0).Round(time.Millisecond))

	// The same files again (the next boot, a nodelist change that leaves
	// these engines' files alone): nothing is touched.
	for i, a := range apply("unchanged") {
		if len(a) != 0 {
			t.Errorf("%s: Start with unchanged files ran %q", nodes[i].Host.Name, a)
		}
	}

	// Director priorities reversed: every keepalived.conf changes, no
	// chrony.conf does.
	c.VIPs[0].Directors = []string{"d3", "d2", "d1"}
	for i, a := range apply("directors reversed") {
		if want := []string{"kill -HUP " + before[i].keepalived}; !slices.Equal(a, want) {
			t.Errorf("%s: after the directors changed Start ran %q, want %q", nodes[i].Host.Name, a, want)
		}
	}
	waitHolder(ctx, t, vip, nodes, "d3", "keepalived reloaded: d3 has priority 150 now")
	if after := pids(); !slices.Equal(after, before) {
		t.Errorf("pids (keepalived, chronyd) went from %v to %v; want both unchanged (keepalived reloads in place, chrony is untouched)", before, after)
	}
	t.Logf("%v: keepalived reloaded", time.Since(t0).Round(time.Millisecond))

	// time.allow narrowed: every chrony.conf changes, no keepalived.conf
	// does.
	c.Time.Allow = netip.MustParsePrefix("198.18.0.0/25")
	for i, a := range apply("time.allow narrowed") {
		if want := []string{"chronyc shutdown", "chronyd -x -f /etc/chrony/chrony.conf"}; !slices.Equal(a, want) {
			t.Errorf("%s: after time.allow changed Start ran %q, want %q", nodes[i].Host.Name, a, want)
		}
	}
	after := pids()
	for i := range nodes {
		if after[i].keepalived != before[i].keepalived || after[i].chronyd == before[i].chronyd {
			t.Errorf("%s: pids (keepalived, chronyd) went from %v to %v; want keepalived's unchanged and a new chronyd", nodes[i].Host.Name, before[i], after[i])
		}
	}
	if a := access(); !slices.Equal(a, []string{"209 Access denied", "209 Access denied", "209 Access denied"}) {
		t.Errorf("chronyd now serving 198.18.0.0/25 answers for 198.18.0.200: %q", a)
	}
	waitHolder(ctx, t, vip, nodes, "d3", "chrony restarted, keepalived untouched")
	t.Logf("%v: chrony restarted", time.Since(t0).Round(time.Millisecond))
}

// remotedDir holds pacemaker-remoted, unpacked aside by scripts/setup.sh:
// Debian 12's pacemaker-remote package conflicts with pacemaker.
const remotedDir = "/opt/esir-test/pacemaker-remote/usr/sbin"

// cluster is the level 1 pacemaker test's cluster: its definition, secrets,
// allocation and nodes. The allocation changes as nodes leave; bundle
// renders from the current one.
type cluster struct {
	def   *ssi.Cluster
	keys  *ssi.Keys
	mu    sync.Mutex
	st    *ssi.State
	nodes map[string]*node
}

func (c *cluster) bundle(t *testing.T, name string) *ssi.Bundle {
	c.mu.Lock()
	defer c.mu.Unlock()
	b, err := ssi.Render(c.def, c.st, c.keys, name)
	if err != nil {
		t.Error(err)
		return nil
	}
	return b
}

func (c *cluster) leave(t *testing.T, name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := c.st.Leave(name); err != nil {
		t.Fatal(err)
	}
}

// reconcile runs Reconcile on every current core member every second, as
// the node service does, until the returned stop is called.
func (c *cluster) reconcile(ctx context.Context, t *testing.T) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		for ctx.Err() == nil {
			c.mu.Lock()
			core := c.st.Core()
			c.mu.Unlock()
			for _, m := range core {
				b := c.bundle(t, m.Name)
				if b == nil {
					continue
				}
				if err := c.nodes[m.Name].enr.Reconcile(ctx, b); err != nil && ctx.Err() == nil {
					// Expected while pacemaker starts; the next round retries.
					t.Logf("reconcile on %s: %v", m.Name, err)
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	})
	return func() { cancel(); wg.Wait() }
}

// keepPacemakerLogs copies the nodes' pacemaker logs to $ESIR_ARTIFACTS and
// the tails to the test log when the test failed.
func keepPacemakerLogs(t *testing.T, nodes []*node) {
	if !t.Failed() {
		return
	}
	dir := os.Getenv("ESIR_ARTIFACTS")
	for _, n := range nodes {
		log := n.PacemakerLog()
		if len(log) > 3000 {
			log = log[len(log)-3000:]
		}
		t.Logf("%s pacemaker.log (tail):\n%s", n.Host.Name, log)
		if dir != "" {
			os.WriteFile(filepath.Join(dir, "ssi-"+n.Host.Name+"-pacemaker.log"), n.PacemakerLog(), 0o644)
		}
	}
}

// eventually polls cond every 500 ms until it returns nil or limit passes,
// then fails with its last error.
func eventually(ctx context.Context, t *testing.T, limit time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("%s: not after %v: %v", what, limit, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// noTrace checks that pacemaker on n knows nothing of node gone: crm_mon does
// not list it and the CIB (configuration and status) never names it.
func noTrace(ctx context.Context, n *node, gone string, online []string) error {
	got, err := n.enr.Online(ctx)
	if err != nil {
		return err
	}
	if !slices.Equal(got, online) {
		return fmt.Errorf("%s: crm_mon shows online %v, want %v", n.Host.Name, got, online)
	}
	ps, err := n.enr.crmMon(ctx)
	if err != nil {
		return err
	}
	for _, nd := range ps.Nodes {
		if nd.Name == gone {
			return fmt.Errorf("%s: crm_mon still lists %s (online %v)", n.Host.Name, gone, nd.Online)
		}
	}
	cib, err := n.Run(ctx, "cibadmin", "--query")
	if err != nil {
		return err
	}
	if q := `"` + gone + `"`; bytes.Contains(cib, []byte(q)) {
		i := bytes.Index(cib, []byte(q))
		return fmt.Errorf("%s: the CIB still names %s: ...%s...", n.Host.Name, gone, cib[max(0, i-120):min(len(cib), i+40)])
	}
	return nil
}

// TestLevel1PacemakerRemoteNetns enrolls three core nodes (corosync,
// pacemaker, chrony) and one remote node (pacemaker-remoted, chrony), each in
// its own network, mount, UTS and PID namespaces, with the core nodes
// reconciling pacemaker every second as the node service does: every node
// is enrolled only once its engines agree, every core's crm_mon shows the
// three core nodes and the remote online, the remote's chrony tracks a core
// member. Then the remote leaves (no trace in crm_mon or the CIB), and a core
// member, the reconciling one, leaves (purged from pacemaker by the next
// reconciler; no ghost in corosync).
func TestLevel1PacemakerRemoteNetns(t *testing.T) {
	if err := netlab.Available(); err != nil {
		t.Skipf("needs root and network namespaces: %v", err)
	}
	for _, bin := range []string{"/usr/sbin/corosync", "/usr/sbin/pacemakerd", "/usr/sbin/crm_mon", "/usr/sbin/cibadmin",
		"/usr/sbin/crm_node", "/usr/sbin/crm_attribute", "/usr/sbin/chronyd", "/usr/bin/chronyc", remotedDir + "/pacemaker-remoted"} {
		if _, err := os.Stat(bin); err != nil {
			t.Skipf("%s is not installed (scripts/setup.sh test installs corosync, pacemaker, pacemaker-cli-utils, chrony and unpacks pacemaker-remote's daemon)", bin)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	def, _, err := ssi.Load("testdata/pcmk-remote.yaml")
	if err != nil {
		t.Fatal(err)
	}
	keys, err := ssi.LoadKeys(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{def: def, keys: keys, st: ssi.NewState(), nodes: map[string]*node{}}
	lab := newLab(ctx, t, "ssipm")
	var nodes []*node
	t.Cleanup(func() { keepLogs(t, nodes[:3]); keepPacemakerLogs(t, nodes) })
	names := []string{"p1", "p2", "p3", "r1"}
	for i, name := range names {
		n := joinNode(ctx, t, lab, c.st, def.CoreSize, i, name)
		n.Env = []string{"PATH=" + remotedDir + ":" + os.Getenv("PATH")}
		n.enr.Timeout = 60 * time.Second
		n.enr.SharedClock = true
		nodes = append(nodes, n)
		c.nodes[name] = n
	}
	if m, _ := c.st.Member("r1"); m.Role != ssi.Remote {
		t.Fatalf("r1 allocated as %s, want remote", m.Role)
	}
	stop := c.reconcile(ctx, t)
	defer func() { stop() }()

	t0 := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, len(nodes))
	views := make([]Membership, len(nodes))
	for i, n := range nodes {
		b := c.bundle(t, n.Host.Name)
		wg.Go(func() { views[i], errs[i] = n.enr.Enroll(ctx, b) })
	}
	wg.Wait()
	for i, n := range nodes {
		if errs[i] != nil {
			t.Fatalf("%s: %v", n.Host.Name, errs[i])
		}
	}
	t.Logf("%v: all four enrolled", time.Since(t0).Round(time.Millisecond))
	coreAddrs := []string{"198.18.0.1", "198.18.0.2", "198.18.0.3"}
	for i, v := range views[:3] {
		// A core node's enrollment waits for itself, not for the remote.
		if v.NodeID != i+1 || !slices.Equal(v.Joined, []int{1, 2, 3}) || !v.Quorate || v.Role != "core" || !v.TimeSynced ||
			!slices.Contains(v.Online, names[i]) || v.TimeSource != "local" && !slices.Contains(coreAddrs, v.TimeSource) {
			t.Errorf("%s enrolled with view %+v", names[i], v)
		}
	}
	if v := views[3]; v.NodeID != 0 || v.Joined != nil || v.Role != "remote" || !slices.Contains(v.Online, "r1") ||
		!v.TimeSynced || !slices.Contains(coreAddrs, v.TimeSource) {
		t.Errorf("r1 enrolled with view %+v", v)
	}
	for _, n := range nodes[:3] {
		online, err := n.enr.Online(ctx)
		if err != nil || !slices.Equal(online, []string{"p1", "p2", "p3", "r1"}) {
			t.Errorf("%s: pacemaker shows online %v, %v; want the three core nodes and r1", n.Host.Name, online, err)
		}
	}
	for i, n := range nodes[:3] {
		v, err := n.enr.View(ctx, c.bundle(t, names[i]))
		if err != nil || !slices.Equal(v.Online, []string{"p1", "p2", "p3", "r1"}) || v.FencingEnabled || !v.TimeSynced || !v.Quorate {
			t.Errorf("%s's view: %+v, %v; want all four online and fencing disabled by the reconciler", names[i], v, err)
		}
	}
	r1 := nodes[3]
	rb := c.bundle(t, "r1")
	v, err := r1.enr.View(ctx, rb)
	if err != nil || v.Role != "remote" || !slices.Contains(coreAddrs, v.TimeSource) || !slices.Equal(v.Online, []string{"p1", "p2", "p3", "r1"}) || v.FencingEnabled {
		t.Errorf("r1's view: %+v, %v", v, err)
	}
	// Enrolling again (next boot) starts no second daemon.
	if _, err := r1.enr.Enroll(ctx, rb); err != nil {
		t.Errorf("r1 second enrollment: %v", err)
	}
	if out, err := r1.Run(ctx, "pidof", "pacemaker-remoted", "chronyd"); err != nil || len(strings.Fields(string(out))) != 2 {
		t.Errorf("r1 runs pacemaker-remoted and chronyd as %q, %v; want one process each", out, err)
	}
	t.Logf("%v: views checked", time.Since(t0).Round(time.Millisecond))

	// The remote leaves: its engines stop, the server drops it, the
	// reconciling core removes its connection and purges it.
	if err := r1.enr.Leave(ctx, rb); err != nil {
		t.Fatal(err)
	}
	if out, err := r1.Run(ctx, "pidof", "pacemaker-remoted"); err == nil {
		t.Errorf("pacemaker-remoted still runs after Leave: %s", out)
	}
	c.leave(t, "r1")
	for _, n := range nodes[:3] {
		eventually(ctx, t, 30*time.Second, n.Host.Name+": no trace of r1", func() error {
			return noTrace(ctx, n, "r1", []string{"p1", "p2", "p3"})
		})
	}
	t.Logf("%v: r1 left without trace", time.Since(t0).Round(time.Millisecond))

	// p1, the reconciling core member, leaves: its stack stops, the others
	// get the nodelist without it and reload, then p2 (the next reconciler)
	// purges it from pacemaker.
	if err := nodes[0].enr.Leave(ctx, c.bundle(t, "p1")); err != nil {
		t.Fatal(err)
	}
	c.leave(t, "p1")
	rest := nodes[1:3]
	bundles := make([]*ssi.Bundle, len(rest))
	for i, n := range rest {
		bundles[i] = c.bundle(t, n.Host.Name)
		if err := n.enr.Install(bundles[i]); err != nil {
			t.Fatal(err)
		}
	}
	for i, n := range rest {
		wg.Go(func() { views[i], errs[i] = n.enr.Enroll(ctx, bundles[i]) })
	}
	wg.Wait()
	for i, n := range rest {
		if errs[i] != nil {
			t.Fatalf("%s after p1 left: %v", n.Host.Name, errs[i])
		}
		waitFor(ctx, t, n, "membership [2 3] without p1", func(m Membership) bool {
			return m.Quorate && slices.Equal(m.Joined, []int{2, 3}) && slices.Equal(m.Nodelist, []int{2, 3}) && m.Expected == 2
		})
		eventually(ctx, t, 30*time.Second, n.Host.Name+": no trace of p1", func() error {
			return noTrace(ctx, n, "p1", []string{"p2", "p3"})
		})
	}
	t.Logf("%v: p1 left without trace", time.Since(t0).Round(time.Millisecond))
	stop()
}
