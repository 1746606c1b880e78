package enroll

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esir-project/esir/netlab"
	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/apitest"
	"github.com/esir-project/esir/server/cluster"
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
	srv, err := apitest.New(t.TempDir(), followDef, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	lab, err := netlab.New(ctx, "ssifol")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Close() })

	type member struct {
		name string
		ns   *nodens.Node
		cfg  Config
		stop context.CancelFunc
		done chan error
		log  *strings.Builder
	}
	var (
		members []*member
		logMu   sync.Mutex
	)
	t.Cleanup(func() {
		for _, m := range members {
			m.stop()
			<-m.done
			if t.Failed() {
				logMu.Lock()
				t.Logf("%s node service log:\n%s", m.name, m.log.String())
				logMu.Unlock()
			}
			m.ns.Close()
		}
	})
	for i, name := range []string{"c1", "c2", "c3", "r1"} {
		a := netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)})
		h, err := lab.AddHost(ctx, name, netip.PrefixFrom(a, 24), netlab.Link{})
		if err != nil {
			t.Fatal(err)
		}
		ns, err := nodens.Start(ctx, h, t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		ns.Env = []string{"PATH=" + remotedPath + ":/usr/sbin:/usr/bin:/sbin:/bin"}
		mac, tok, err := srv.Installed(i+1, name)
		if err != nil {
			t.Fatal(err)
		}
		cfg := Config{Server: srv.URL, Token: tok, MAC: mac, Hostname: name, Addr: a.String()}
		m := &member{name: name, ns: ns, cfg: cfg, done: make(chan error, 1), log: &strings.Builder{}}
		members = append(members, m)
	}
	// The nodes enroll in name order, so the first three are the core
	// voters, and each node service follows the cluster as soon as its node
	// enrolled: the first ones apply nodelists the later ones replace.
	for _, m := range members {
		log := slog.New(slog.NewTextHandler(&lockedWriter{mu: &logMu, w: m.log}, &slog.HandlerOptions{Level: slog.LevelDebug}))
		ack, err := Run(ctx, m.cfg, log)
		if err != nil {
			t.Fatal(err)
		}
		if ack.Cluster != "l1s" {
			t.Fatalf("%s: enroll ack names cluster %q", m.name, ack.Cluster)
		}
		mctx, stop := context.WithCancel(ctx)
		m.stop = stop
		f := &Follower{
			Client: &agentapi.Client{Server: m.cfg.Server, Token: m.cfg.Token},
			MAC:    m.cfg.MAC,
			Node:   &ssienroll.Node{Root: m.ns.Root, Run: m.ns, Init: ssienroll.Direct, SharedClock: true, Log: log, Timeout: 90 * time.Second},
			Log:    log,
			Retry:  3 * time.Second,
		}
		go func() { m.done <- f.Follow(mctx) }()
	}
	nodeState := func(mac string) string {
		var d api.NodeDetail
		if err := srv.Do(ctx, http.MethodGet, "/api/v1/nodes/"+mac, http.StatusOK, &d); err != nil {
			t.Fatal(err)
		}
		return string(d.State)
	}
	snapshot := func() cluster.Snapshot {
		snap, err := srv.Cluster(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return snap
	}
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

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
