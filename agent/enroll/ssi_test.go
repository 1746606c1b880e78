package enroll

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esir-project/esir/netlab"
	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/apitest"
	"github.com/esir-project/esir/server/cluster"
	"github.com/esir-project/esir/server/deploy"
	ssienroll "github.com/esir-project/esir/ssi/enroll"
	"github.com/esir-project/esir/ssi/nodens"
)

// remotedPath is where scripts/setup.sh unpacks pacemaker-remote's daemon
// (its package conflicts with pacemaker's).
const remotedPath = "/opt/esir-test/pacemaker-remote/usr/sbin"

const followDef = `# Three corosync voters with pacemaker, remote members with
# pacemaker-remote, chrony; STONITH off (a test cluster in namespaces).
name: l1s
profile: {corosync: true, pacemaker: true, chrony: true}
core_size: 3
token_ms: 1000
time: {allow: 198.18.0.0/24}
`

// corosyncDef is a cluster of three corosync voters and nothing else, for
// the fault tests: the faults are corosync's, and the other engines would
// only add time.
const corosyncDef = `name: l1f
profile: {corosync: true}
core_size: 3
token_ms: 1000
`

// waitFor polls cond every 100 ms until it holds or the deadline.
func waitFor(t *testing.T, ctx context.Context, what string, d time.Duration, cond func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	last := ""
	for time.Since(start) < d && ctx.Err() == nil {
		ok, why := cond()
		if ok {
			return time.Since(start)
		}
		last = why
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: not after %v: %s", what, d, last)
	return 0
}

// TestFollowNetns is issue #10's level 1 through ESIR's node service and
// server: three core nodes and one remote node, each in its own network,
// mount, UTS and PID namespaces, enroll by following their SSI assignment
// from the server; each is enrolled at the server only once its engines
// agree. A killed core node disappears from the server's membership view,
// and a remote node told to leave is gone from pacemaker.
func TestFollowNetns(t *testing.T) {
	if err := netlab.Available(); err != nil {
		t.Skipf("needs root and network namespaces: %v", err)
	}
	for _, bin := range []string{"/usr/sbin/corosync", "/usr/sbin/pacemakerd", "/usr/sbin/crm_mon", "/usr/sbin/chronyd", remotedPath + "/pacemaker-remoted"} {
		if _, err := os.Stat(bin); err != nil {
			t.Skipf("%s is not installed (scripts/setup.sh test installs it)", bin)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	l := newFollowLab(ctx, t, "ssifol", followDef)
	srv := l.srv
	var members []*follower
	for i, name := range []string{"c1", "c2", "c3", "r1"} {
		members = append(members, l.add(ctx, name, i+1))
	}
	// The nodes enroll in name order, so the first three are the core
	// voters, and each node service follows the cluster as soon as its node
	// enrolled: the first ones apply nodelists the later ones replace.
	for _, m := range members {
		l.follow(ctx, m, &ssienroll.Node{Root: m.ns.Root, Run: m.ns, Init: ssienroll.Direct, SharedClock: true, Timeout: 90 * time.Second}, 3*time.Second)
	}
	nodeState := func(mac string) string { return string(l.node(ctx, mac).State) }
	snapshot := func() cluster.Snapshot { return l.snapshot(ctx) }
	enrolled := waitFor(t, ctx, "all four enrolled at the server", 3*time.Minute, func() (bool, string) {
		snap := snapshot()
		var states []string
		all := len(snap.Members) == 4
		for _, m := range snap.Members {
			states = append(states, fmt.Sprintf("%s=%s %s", m.Name, m.State, m.Error))
			all = all && m.State == cluster.Enrolled
		}
		return all, strings.Join(states, "; ")
	})
	t.Logf("installed -> enrolled for 3 core + 1 remote through the server: %v", enrolled.Round(time.Millisecond))
	for _, m := range members {
		if st := nodeState(m.cfg.MAC); st != "enrolled" {
			t.Fatalf("%s: node state %s at the server, want enrolled", m.name, st)
		}
	}
	// Every core member's pacemaker shows the three cores and the remote.
	for _, m := range members[:3] {
		out, err := m.ns.Run(ctx, "crm_mon", "-1", "--output-as=xml")
		if err != nil {
			t.Fatalf("%s: crm_mon: %v: %s", m.name, err, out)
		}
		for _, n := range []string{"c1", "c2", "c3", "r1"} {
			if !strings.Contains(string(out), `name="`+n+`"`) {
				t.Errorf("%s: crm_mon does not list %s", m.name, n)
			}
		}
	}

	// A remote member told to leave stops pacemaker-remoted, the server
	// drops it, and a core member removes its resource.
	if err := srv.Do(ctx, http.MethodPost, "/api/v1/cluster/members/r1/leave", http.StatusAccepted, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, "r1 gone from the cluster and from pacemaker", 90*time.Second, func() (bool, string) {
		snap := snapshot()
		if slices.ContainsFunc(snap.Members, func(m cluster.Member) bool { return m.Name == "r1" }) {
			return false, "r1 is still a member at the server"
		}
		out, err := members[0].ns.Run(ctx, "cibadmin", "--query")
		if err != nil {
			return false, err.Error()
		}
		if strings.Contains(string(out), `"r1"`) {
			return false, "r1 still appears in c1's CIB"
		}
		return true, ""
	})

	// A killed core node is gone from the server's membership view.
	killed := time.Now()
	members[2].stop()
	members[2].ns.Kill()
	gone := waitFor(t, ctx, "c3 gone from the server's view", time.Minute, func() (bool, string) {
		snap := snapshot()
		if snap.Quorate && len(snap.Joined) == 2 && !slices.Contains(snap.Joined, 3) {
			return true, ""
		}
		return false, fmt.Sprintf("view of %s: quorate %v joined %v", snap.ViewFrom, snap.Quorate, snap.Joined)
	})
	t.Logf("killed core node gone from the server's view after %v (%v)", time.Since(killed).Round(time.Millisecond), gone.Round(time.Millisecond))
	// The survivors stay enrolled: a dead peer is in their view, not a
	// failure of theirs.
	waitFor(t, ctx, "c1 and c2 enrolled after c3 died", 30*time.Second, func() (bool, string) {
		snap := snapshot()
		var states []string
		ok := true
		for _, m := range snap.Members {
			states = append(states, fmt.Sprintf("%s=%s %s", m.Name, m.State, m.Error))
			if (m.Name == "c1" || m.Name == "c2") && (m.State != cluster.Enrolled || m.Reported.Before(killed.Add(5*time.Second))) {
				ok = false
			}
		}
		return ok, strings.Join(states, "; ")
	})
}

// followLab is a cluster of nodes, each in its own network, mount, UTS and
// PID namespaces, whose node services follow their SSI assignment from the
// server's API running in-process (apitest). Everything it starts ends with
// the test, failed or not: node services, namespaces and their processes,
// the server.
type followLab struct {
	t     *testing.T
	srv   *apitest.Server
	lab   *netlab.Lab
	logMu sync.Mutex
	nodes []*follower
}

// follower is one node of a followLab.
type follower struct {
	name string
	ns   *nodens.Node
	cfg  Config
	stop context.CancelFunc // ends its node service
	done chan error
	log  *strings.Builder // its node service's log, printed when the test failed
}

// newFollowLab starts the server with cluster definition def and an empty
// network called labName.
func newFollowLab(ctx context.Context, t *testing.T, labName, def string) *followLab {
	t.Helper()
	srv, err := apitest.New(t.TempDir(), def, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	lab, err := netlab.New(ctx, labName)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Close() })
	l := &followLab{t: t, srv: srv, lab: lab}
	t.Cleanup(func() {
		for _, m := range l.nodes {
			if m.stop != nil {
				m.stop()
				<-m.done
			}
			if t.Failed() {
				l.logMu.Lock()
				t.Logf("%s node service log:\n%s", m.name, m.log.String())
				l.logMu.Unlock()
			}
			m.ns.Close()
		}
	})
	return l
}

// add creates node number i called name, at 198.18.0.i, installed at the
// server.
func (l *followLab) add(ctx context.Context, name string, i int) *follower {
	t := l.t
	t.Helper()
	a := netip.AddrFrom4([4]byte{198, 18, 0, byte(i)})
	h, err := l.lab.AddHost(ctx, name, netip.PrefixFrom(a, 24), netlab.Link{})
	if err != nil {
		t.Fatal(err)
	}
	ns, err := nodens.Start(ctx, h, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	m := &follower{name: name, ns: ns, done: make(chan error, 1), log: &strings.Builder{}}
	l.nodes = append(l.nodes, m)
	ns.Env = []string{"PATH=" + remotedPath + ":/usr/sbin:/usr/bin:/sbin:/bin"}
	mac, tok, err := l.srv.Installed(i, name)
	if err != nil {
		t.Fatal(err)
	}
	m.cfg = Config{Server: l.srv.URL, Token: tok, MAC: mac, Hostname: name, Addr: a.String()}
	return m
}

// follow enrolls m's node service at the server and has it follow the
// cluster with node (its log set here), retrying a failed enrollment after
// retry, until the test ends or m.stop.
func (l *followLab) follow(ctx context.Context, m *follower, node *ssienroll.Node, retry time.Duration) {
	t := l.t
	t.Helper()
	log := slog.New(slog.NewTextHandler(&lockedWriter{mu: &l.logMu, w: m.log}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ack, err := Run(ctx, m.cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	if want := l.snapshot(ctx).Name; ack.Cluster != want {
		t.Fatalf("%s: enroll ack names cluster %q, want %q", m.name, ack.Cluster, want)
	}
	node.Log = log
	mctx, stop := context.WithCancel(ctx)
	m.stop = stop
	f := &Follower{
		Client: &agentapi.Client{Server: m.cfg.Server, Token: m.cfg.Token},
		MAC:    m.cfg.MAC,
		Node:   node,
		Log:    log,
		Retry:  retry,
	}
	go func() { m.done <- f.Follow(mctx) }()
}

// snapshot returns the server's view of the cluster.
func (l *followLab) snapshot(ctx context.Context) cluster.Snapshot {
	l.t.Helper()
	snap, err := l.srv.Cluster(ctx)
	if err != nil {
		l.t.Fatal(err)
	}
	return snap
}

// member returns the server's record of member name (State "" when it is
// no member).
func (l *followLab) member(ctx context.Context, name string) cluster.Member {
	l.t.Helper()
	for _, m := range l.snapshot(ctx).Members {
		if m.Name == name {
			return m
		}
	}
	return cluster.Member{}
}

// node returns the server's record of the node booting from mac, with its
// events.
func (l *followLab) node(ctx context.Context, mac string) api.NodeDetail {
	l.t.Helper()
	var d api.NodeDetail
	if err := l.srv.Do(ctx, http.MethodGet, "/api/v1/nodes/"+mac, http.StatusOK, &d); err != nil {
		l.t.Fatal(err)
	}
	return d
}

// enrolledSince polls the server every 100 ms until the returned stop is
// called, and stop returns when each member was first seen enrolled.
func (l *followLab) enrolledSince(ctx context.Context) (stop func() map[string]time.Time) {
	ctx, cancel := context.WithCancel(ctx)
	seen := map[string]time.Time{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			if snap, err := l.srv.Cluster(ctx); err == nil {
				now := time.Now()
				for _, m := range snap.Members {
					if _, ok := seen[m.Name]; !ok && m.State == cluster.Enrolled {
						seen[m.Name] = now
					}
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return func() map[string]time.Time { cancel(); <-done; return seen }
}

// failedWith waits until the server shows member name failed at check
// with an error containing text and every one of more, and returns the
// member.
func (l *followLab) failedWith(ctx context.Context, name, check, text string, limit time.Duration, more ...string) cluster.Member {
	l.t.Helper()
	var m cluster.Member
	texts := append([]string{text}, more...)
	waitFor(l.t, ctx, fmt.Sprintf("%s failed at check %s (%q)", name, check, texts), limit, func() (bool, string) {
		m = l.member(ctx, name)
		return m.State == cluster.Failed && m.Check == check && !slices.ContainsFunc(texts, func(s string) bool { return !strings.Contains(m.Error, s) }),
			fmt.Sprintf("%s is %s, check %q: %s", name, m.State, m.Check, m.Error)
	})
	return m
}

// allEnrolled waits until every member the server lists is enrolled.
func (l *followLab) allEnrolled(ctx context.Context, want int, limit time.Duration) time.Duration {
	l.t.Helper()
	return waitFor(l.t, ctx, fmt.Sprintf("all %d enrolled at the server", want), limit, func() (bool, string) {
		snap := l.snapshot(ctx)
		var states []string
		all := len(snap.Members) == want
		for _, m := range snap.Members {
			states = append(states, fmt.Sprintf("%s=%s %s", m.Name, m.State, m.Error))
			all = all && m.State == cluster.Enrolled
		}
		return all, strings.Join(states, "; ")
	})
}

// wrongKey is a node's Runner that corrupts the node's corosync authkey,
// once ESIR installed it, just before corosync starts, while on: the node's
// corosync then runs with a key the other members do not share.
type wrongKey struct {
	r    ssienroll.Runner
	root string
	on   atomic.Bool
}

func (w *wrongKey) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	if name == "corosync" && len(args) == 0 && w.on.Load() {
		path := filepath.Join(w.root, "etc/corosync/authkey")
		key, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		for i := range key {
			key[i] ^= 0x5a
		}
		if err := os.WriteFile(path, key, 0o400); err != nil {
			return nil, err
		}
	}
	return w.r.Run(ctx, name, args...)
}

// stopCorosync stops corosync in node ns and waits until it is gone.
func stopCorosync(ctx context.Context, t *testing.T, ns *nodens.Node) {
	t.Helper()
	if out, err := ns.Run(ctx, "corosync-cfgtool", "-H", "--force"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	waitFor(t, ctx, ns.Host.Name+": corosync stopped", 30*time.Second, func() (bool, string) {
		out, err := ns.Run(ctx, "pidof", "corosync")
		return err != nil, "corosync still runs as " + strings.TrimSpace(string(out))
	})
}

// faultPrereqs skips a fault test on a machine that cannot run it.
func faultPrereqs(t *testing.T) {
	t.Helper()
	if err := netlab.Available(); err != nil {
		t.Skipf("needs root and network namespaces: %v", err)
	}
	for _, bin := range []string{"/usr/sbin/corosync", "/usr/sbin/corosync-cfgtool", "/usr/sbin/corosync-cmapctl", "/usr/sbin/corosync-quorumtool"} {
		if _, err := os.Stat(bin); err != nil {
			t.Skipf("%s is not installed (scripts/setup.sh test installs corosync)", bin)
		}
	}
}

// TestFollowWrongAuthkeyNetns: three core nodes follow their assignment
// from the server, and the third one's corosync runs with a corrupted
// authkey (corrupted on the node after ESIR installed it). That node is never
// reported enrolled: the server shows it failed, naming the node, the check
// (membership: it sees only itself) and the cause (the others' packets fail
// authentication), over several enrollment rounds, and the other two wait
// for it (membership: 2 of 3; c3's packets fail authentication). Once its corosync
// restarts with the key the server handed out, all three enroll.
func TestFollowWrongAuthkeyNetns(t *testing.T) {
	faultPrereqs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := newFollowLab(ctx, t, "ssikey", corosyncDef)
	var ms []*follower
	for i, name := range []string{"c1", "c2", "c3"} {
		ms = append(ms, l.add(ctx, name, i+1))
	}
	bad := &wrongKey{r: ms[2].ns, root: ms[2].ns.Root}
	bad.on.Store(true)
	t0 := time.Now()
	stop := l.enrolledSince(ctx)
	for _, m := range ms {
		var run ssienroll.Runner = m.ns
		if m.name == "c3" {
			run = bad
		}
		l.follow(ctx, m, &ssienroll.Node{Root: m.ns.Root, Run: run, Init: ssienroll.Direct, Timeout: 6 * time.Second}, 2*time.Second)
	}
	// Each names the cause: corosync on c3 cannot authenticate the
	// others' packets, and theirs cannot authenticate c3's.
	first := l.failedWith(ctx, "c3", "membership", "c3 not enrolled: check membership: 1 of 3 core members joined ([3])", time.Minute,
		"; packets from 198.18.0.1 (c1), 198.18.0.2 (c2) fail authentication (wrong authkey on this node?)")
	t.Logf("%v: c3 failed: %s", time.Since(t0).Round(time.Millisecond), first.Error)
	for _, name := range []string{"c1", "c2"} {
		m := l.failedWith(ctx, name, "membership", name+" not enrolled: check membership: 2 of 3 core members joined ([1 2])", 30*time.Second,
			"; packets from 198.18.0.3 (c3) fail authentication (wrong authkey?)")
		if strings.Contains(m.Error, "partition") {
			t.Errorf("%s blames a partition for a wrong authkey: %s", name, m.Error)
		}
	}
	// Another round (retry, install, corosync runs already with the files
	// it was given) fails the same way.
	waitFor(t, ctx, "c3 failed again in a later round", 40*time.Second, func() (bool, string) {
		m := l.member(ctx, "c3")
		return m.State == cluster.Failed && m.Check == "membership" && m.Reported.After(first.Reported.Add(5*time.Second)),
			fmt.Sprintf("c3 is %s, check %q, reported %v (first failure %v)", m.State, m.Check, m.Reported, first.Reported)
	})
	d := l.node(ctx, ms[2].cfg.MAC)
	if d.State != "installed" {
		t.Errorf("c3's node state %s at the server, want installed (not enrolled)", d.State)
	}
	if !slices.ContainsFunc(d.Events, func(e deploy.Event) bool {
		return strings.Contains(e.Reason, "cluster l1f: check membership failed") && strings.Contains(e.Reason, "c3 not enrolled")
	}) {
		t.Errorf("c3's events name no failed membership check: %+v", d.Events)
	}
	if seen := stop(); len(seen) != 0 {
		t.Fatalf("enrolled at the server with a wrong authkey in the cluster: %v", seen)
	}
	t.Logf("%v: c3 still failed after several rounds; restarting its corosync with the served key", time.Since(t0).Round(time.Millisecond))

	// The key is right again once corosync restarts with the installed one.
	bad.on.Store(false)
	stopCorosync(ctx, t, ms[2].ns)
	took := l.allEnrolled(ctx, 3, time.Minute)
	t.Logf("%v: all three enrolled %v after c3's corosync got the right key", time.Since(t0).Round(time.Millisecond), took.Round(time.Millisecond))
}

// TestFollowPartitionNetns: three core nodes follow their assignment from
// the server while the third one's cluster link is cut (its eth0 down in its
// namespace; it still reaches the server). None is reported enrolled while
// the partition lasts, over several enrollment rounds: the server shows the
// cut-off node failed at check membership seeing only itself and no member
// reachable, and the two others at check membership with 2 of 3 and c3 not
// reachable: a partition, not an authkey. Once the link is back, all three
// enroll.
func TestFollowPartitionNetns(t *testing.T) {
	faultPrereqs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := newFollowLab(ctx, t, "ssipart", corosyncDef)
	var ms []*follower
	for i, name := range []string{"c1", "c2", "c3"} {
		ms = append(ms, l.add(ctx, name, i+1))
	}
	if out, err := ms[2].ns.Host.Run(ctx, "ip", "link", "set", "eth0", "down"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t0 := time.Now()
	stop := l.enrolledSince(ctx)
	for _, m := range ms {
		l.follow(ctx, m, &ssienroll.Node{Root: m.ns.Root, Run: m.ns, Init: ssienroll.Direct, Timeout: 6 * time.Second}, 2*time.Second)
	}
	// Each names the cause: corosync's link to the others is down.
	first := l.failedWith(ctx, "c3", "membership", "c3 not enrolled: check membership: 1 of 3 core members joined ([3])", time.Minute,
		"; no core member reachable on link 0 (partition?)")
	t.Logf("%v: c3 failed: %s", time.Since(t0).Round(time.Millisecond), first.Error)
	for _, name := range []string{"c1", "c2"} {
		m := l.failedWith(ctx, name, "membership", name+" not enrolled: check membership: 2 of 3 core members joined ([1 2])", 30*time.Second,
			"; c3 (198.18.0.3) not reachable on link 0 (partition?)")
		if strings.Contains(m.Error, "authentication") {
			t.Errorf("%s blames an authkey for a partition: %s", name, m.Error)
		}
	}
	waitFor(t, ctx, "c3 failed again in a later round", 40*time.Second, func() (bool, string) {
		m := l.member(ctx, "c3")
		return m.State == cluster.Failed && m.Check == "membership" && m.Reported.After(first.Reported.Add(5*time.Second)),
			fmt.Sprintf("c3 is %s, check %q, reported %v (first failure %v)", m.State, m.Check, m.Reported, first.Reported)
	})
	if seen := stop(); len(seen) != 0 {
		t.Fatalf("enrolled at the server during the partition: %v", seen)
	}
	if st := l.node(ctx, ms[2].cfg.MAC).State; st != "installed" {
		t.Errorf("c3's node state %s at the server during the partition, want installed", st)
	}

	// Heal: the three merge and enroll.
	t.Logf("%v: healing the partition", time.Since(t0).Round(time.Millisecond))
	if out, err := ms[2].ns.Host.Run(ctx, "ip", "link", "set", "eth0", "up"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	took := l.allEnrolled(ctx, 3, 90*time.Second)
	t.Logf("%v: all three enrolled %v after the partition healed", time.Since(t0).Round(time.Millisecond), took.Round(time.Millisecond))
}

// TestFollowEngineDiesNetns: three core nodes enrolled through the server;
// the second one's corosync then stops. Its node service reports the failed
// check, enrolls again (which starts corosync) and is enrolled once more,
// while the other two stay enrolled throughout.
func TestFollowEngineDiesNetns(t *testing.T) {
	faultPrereqs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l := newFollowLab(ctx, t, "ssidie", corosyncDef)
	var ms []*follower
	for i, name := range []string{"c1", "c2", "c3"} {
		ms = append(ms, l.add(ctx, name, i+1))
	}
	t0 := time.Now()
	for _, m := range ms {
		l.follow(ctx, m, &ssienroll.Node{Root: m.ns.Root, Run: m.ns, Init: ssienroll.Direct, Timeout: 6 * time.Second}, 2*time.Second)
	}
	l.allEnrolled(ctx, 3, 90*time.Second)
	before, err := ms[1].ns.Run(ctx, "pidof", "corosync")
	if err != nil {
		t.Fatalf("c2: corosync not running once enrolled: %v", err)
	}
	t.Logf("%v: all enrolled; stopping c2's corosync (pid %s)", time.Since(t0).Round(time.Millisecond), strings.TrimSpace(string(before)))
	stopCorosync(ctx, t, ms[1].ns)
	// The two others stay enrolled throughout.
	others := func() string {
		for _, name := range []string{"c1", "c3"} {
			if m := l.member(ctx, name); m.State != cluster.Enrolled {
				return fmt.Sprintf("%s is %s (%s)", name, m.State, m.Error)
			}
		}
		return ""
	}
	var bad []string
	waitFor(t, ctx, "c2 failed at the server", 30*time.Second, func() (bool, string) {
		if o := others(); o != "" {
			bad = append(bad, o)
		}
		m := l.member(ctx, "c2")
		return m.State == cluster.Failed, fmt.Sprintf("c2 is %s (%s)", m.State, m.Error)
	})
	m := l.member(ctx, "c2")
	t.Logf("%v: c2 failed at the server, check %s: %s", time.Since(t0).Round(time.Millisecond), m.Check, m.Error)
	waitFor(t, ctx, "c2 enrolled again", 60*time.Second, func() (bool, string) {
		if o := others(); o != "" {
			bad = append(bad, o)
		}
		m := l.member(ctx, "c2")
		return m.State == cluster.Enrolled, fmt.Sprintf("c2 is %s (%s)", m.State, m.Error)
	})
	after, err := ms[1].ns.Run(ctx, "pidof", "corosync")
	if err != nil || strings.TrimSpace(string(after)) == strings.TrimSpace(string(before)) {
		t.Errorf("c2's corosync after re-enrollment: %q (%v), was %q: want a new process", after, err, before)
	}
	if len(bad) > 0 {
		t.Errorf("the other members left the enrolled state while c2's corosync was down: %v", bad[:min(len(bad), 5)])
	}
	t.Logf("%v: c2 enrolled again with corosync %s", time.Since(t0).Round(time.Millisecond), strings.TrimSpace(string(after)))
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
