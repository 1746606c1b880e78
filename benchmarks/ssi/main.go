// Command ssi benchmarks ESIR's SSI enrollment with real engines, every node
// in its own network, mount, UTS and PID namespaces (root needed):
//
//   - enroll, 3 core: from "files installed, corosync not running" to ESIR's
//     enroll verdict on every node (joined and quorate, as reported by
//     corosync's tools), beside the bare engine: the same configs started by
//     hand and polled with corosync-quorumtool until it exits 0 on every node.
//   - detect: from killing one node (its whole PID namespace) to ESIR's
//     membership view on a survivor no longer listing it, beside corosync's
//     own bound for declaring a node lost: the runtime token (token plus
//     token_coefficient per node beyond two) plus consensus, read from cmap.
//   - enroll, 3 core + N remote (--remotes, default 1,4,16): corosync and
//     pacemaker on the core nodes, pacemaker-remoted on the remote ones,
//     chrony everywhere (chronyd -x: the namespaces share the host's clock),
//     STONITH off. From "files installed, no engine running" to Enroll
//     returning on every node (core: joined, quorate, online in crm_mon,
//     chrony synchronised; remote: online in its own crm_mon, chrony tracking
//     a core member), with the core nodes running Reconcile every second as
//     the node service does. Reported for the whole cluster (the last node)
//     and per role (median and max over the role's nodes). Beside it, the
//     engines by hand: the same files, the daemons started directly, the
//     remote resources and stonith-enabled=false created with one cibadmin
//     call as soon as the CIB answers, and each node polled every 250 ms for
//     the same conditions with the engines' own tools.
//
// Medians over --runs. Prints a table; --json FILE writes the figures. All
// nodes share the host's CPUs: on a 2-core host, 19 nodes' engines and
// pollers compete, which real clusters do not.
//
//	flock /tmp/esir-bench.lock go run ./benchmarks/ssi [--runs 3] [--token-ms 1000] [--remotes 1,4,16] [--json out.json]
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/esir-project/esir/netlab"
	"github.com/esir-project/esir/ssi"
	"github.com/esir-project/esir/ssi/enroll"
	"github.com/esir-project/esir/ssi/nodens"
)

// remotedDir holds pacemaker-remoted, unpacked aside by scripts/setup.sh
// (Debian 12's pacemaker-remote package conflicts with pacemaker).
const remotedDir = "/opt/esir-test/pacemaker-remote/usr/sbin"

type row struct {
	Measure    string  `json:"measure"`
	Remotes    int     `json:"remotes"` // remote nodes beside the 3 core ones
	ESIRMs     float64 `json:"esir_ms"`
	Baseline   string  `json:"baseline"`
	BaselineMs float64 `json:"baseline_ms"`
	Ratio      float64 `json:"ratio"` // ESIR / baseline
}

type report struct {
	CoreNodes   int    `json:"core_nodes"`
	RemoteNodes []int  `json:"remote_nodes"`
	TokenMs     int    `json:"token_ms"`
	Runs        int    `json:"runs"`
	Uptime      string `json:"uptime"` // load before the run
	Rows        []row  `json:"rows"`
	// Failures lists the full-stack runs that failed and were run again
	// (at most twice per run), with their errors.
	Failures []string `json:"failures"`
}

func main() {
	runs := flag.Int("runs", 3, "repetitions (medians are reported)")
	token := flag.Int("token-ms", 1000, "corosync totem token timeout")
	remotes := flag.String("remotes", "1,4,16", "numbers of remote nodes beside the 3 core ones, comma-separated; empty: core only")
	jsonOut := flag.String("json", "", "write the figures as JSON to this file")
	flag.Parse()
	var ns []int
	for f := range strings.SplitSeq(*remotes, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > 200 {
			fmt.Fprintf(os.Stderr, "benchmarks/ssi: --remotes: %q is not a number of remote nodes (1..200)\n", f)
			os.Exit(2)
		}
		ns = append(ns, n)
	}
	if err := run(*runs, *token, ns, *jsonOut); err != nil {
		fmt.Fprintln(os.Stderr, "benchmarks/ssi:", err)
		os.Exit(1)
	}
}

func run(runs, token int, remotes []int, jsonOut string) error {
	if err := netlab.Available(); err != nil {
		return err
	}
	if len(remotes) > 0 {
		for _, bin := range []string{"/usr/sbin/pacemakerd", "/usr/sbin/crm_mon", "/usr/sbin/cibadmin", "/usr/sbin/chronyd", remotedDir + "/pacemaker-remoted"} {
			if _, err := os.Stat(bin); err != nil {
				return fmt.Errorf("%s is not installed (scripts/setup.sh test installs pacemaker and chrony and unpacks pacemaker-remoted)", bin)
			}
		}
	}
	up, _ := exec.Command("uptime").Output()
	fmt.Printf("uptime: %s", up)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Minute)
	defer cancel()
	tmp, err := os.MkdirTemp("", "esir-ssi-bench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	keys, err := ssi.LoadKeys(tmp + "/secrets")
	if err != nil {
		return err
	}
	rep := report{CoreNodes: 3, RemoteNodes: remotes, TokenMs: token, Runs: runs, Uptime: strings.TrimSpace(string(up))}

	c, _, err := ssi.Parse(fmt.Appendf(nil, "name: bench\nprofile:\n  corosync: true\ncore_size: 3\ntoken_ms: %d\n", token))
	if err != nil {
		return err
	}
	var enrollMs, bareMs, detectMs, boundMs, srvEnrollMs, srvDetectMs, srvBoundMs []float64
	coreDef := fmt.Sprintf("name: bench\nprofile:\n  corosync: true\ncore_size: 3\ntoken_ms: %d\n", token)
	for i := range runs {
		e, d, bd, err := serverRun(ctx, coreDef, fmt.Sprintf("%s/srv%d", tmp, i))
		if err != nil {
			return fmt.Errorf("run %d, through the server: %w", i, err)
		}
		srvEnrollMs, srvDetectMs, srvBoundMs = append(srvEnrollMs, ms(e)), append(srvDetectMs, ms(d)), append(srvBoundMs, ms(bd))
		fmt.Fprintf(os.Stderr, "through the server, run %d: enrolled %.0f ms, killed node gone %.0f ms (bound %.0f ms)\n", i, ms(e), ms(d), ms(bd))
	}
	for i := range runs {
		e, d, bd, err := esirRun(ctx, c, keys, fmt.Sprintf("%s/e%d", tmp, i))
		if err != nil {
			return fmt.Errorf("run %d, ESIR: %w", i, err)
		}
		b, err := bareRun(ctx, c, keys, fmt.Sprintf("%s/b%d", tmp, i))
		if err != nil {
			return fmt.Errorf("run %d, bare corosync: %w", i, err)
		}
		enrollMs, detectMs, bareMs, boundMs = append(enrollMs, ms(e)), append(detectMs, ms(d)), append(bareMs, ms(b)), append(boundMs, ms(bd))
	}
	rep.Rows = append(rep.Rows,
		row{Measure: "installed -> enrolled (3 core, corosync)", ESIRMs: median(enrollMs), Baseline: "corosync started by hand, quorumtool polled", BaselineMs: median(bareMs)},
		row{Measure: "killed node gone from view", ESIRMs: median(detectMs), Baseline: "runtime token + consensus (corosync's bound)", BaselineMs: median(boundMs)},
		row{Measure: "installed -> enrolled at the server (3 core)", ESIRMs: median(srvEnrollMs), Baseline: "corosync started by hand, quorumtool polled", BaselineMs: median(bareMs)},
		row{Measure: "killed node gone from the server's view", ESIRMs: median(srvDetectMs), Baseline: "runtime token + consensus (corosync's bound)", BaselineMs: median(srvBoundMs)})

	full, _, err := ssi.Parse(fmt.Appendf(nil, "name: bench\nprofile:\n  corosync: true\n  pacemaker: true\n  chrony: true\ncore_size: 3\ntoken_ms: %d\ntime:\n  allow: 198.18.0.0/16\n", token))
	if err != nil {
		return err
	}
	// attempt runs one full-stack run, again after a failure (noted in the
	// report), at most three times.
	attempt := func(what, dir string, n int, byHand bool) (timing, error) {
		for try := 1; ; try++ {
			t, err := stackRun(ctx, full, keys, fmt.Sprintf("%s-%d", dir, try), n, byHand)
			if err == nil {
				return t, nil
			}
			err = fmt.Errorf("%s, attempt %d: %w", what, try, err)
			fmt.Fprintln(os.Stderr, err)
			rep.Failures = append(rep.Failures, err.Error())
			if try == 3 || ctx.Err() != nil {
				return t, err
			}
		}
	}
	for _, n := range remotes {
		var esir, hand []timing
		for i := range runs {
			e, err := attempt(fmt.Sprintf("3 core + %d remote, run %d, ESIR", n, i), fmt.Sprintf("%s/s%d-%d", tmp, n, i), n, false)
			if err != nil {
				return err
			}
			h, err := attempt(fmt.Sprintf("3 core + %d remote, run %d, by hand", n, i), fmt.Sprintf("%s/h%d-%d", tmp, n, i), n, true)
			if err != nil {
				return err
			}
			esir, hand = append(esir, e), append(hand, h)
			fmt.Fprintf(os.Stderr, "3 core + %d remote, run %d: ESIR last node %.0f ms, by hand %.0f ms\n", n, i, e.last(), h.last())
		}
		const base = "engines by hand, polled"
		m := func(ts []timing, f func(timing) float64) float64 {
			var v []float64
			for _, t := range ts {
				v = append(v, f(t))
			}
			return median(v)
		}
		label := fmt.Sprintf("3 core + %d remote: ", n)
		rep.Rows = append(rep.Rows,
			row{Measure: label + "whole cluster", Remotes: n, ESIRMs: m(esir, timing.last), Baseline: base + " (last node)", BaselineMs: m(hand, timing.last)},
			row{Measure: label + "core median", Remotes: n, ESIRMs: m(esir, timing.coreMedian), Baseline: base, BaselineMs: m(hand, timing.coreMedian)},
			row{Measure: label + "core max", Remotes: n, ESIRMs: m(esir, timing.coreMax), Baseline: base, BaselineMs: m(hand, timing.coreMax)},
			row{Measure: label + "remote median", Remotes: n, ESIRMs: m(esir, timing.remoteMedian), Baseline: base, BaselineMs: m(hand, timing.remoteMedian)},
			row{Measure: label + "remote max", Remotes: n, ESIRMs: m(esir, timing.remoteMax), Baseline: base, BaselineMs: m(hand, timing.remoteMax)})
	}

	fmt.Printf("SSI enrollment in namespaces, token %d ms, median of %d runs\n", token, runs)
	fmt.Printf("%-42s %9s  %-46s %11s  %6s\n", "measure", "ESIR ms", "baseline", "baseline ms", "ratio")
	for i := range rep.Rows {
		r := &rep.Rows[i]
		r.Ratio = r.ESIRMs / r.BaselineMs
		fmt.Printf("%-42s %9.0f  %-46s %11.0f  %6.2f\n", r.Measure, r.ESIRMs, r.Baseline, r.BaselineMs, r.Ratio)
	}
	fmt.Printf("full-stack runs failed and run again: %d\n", len(rep.Failures))
	for _, f := range rep.Failures {
		fmt.Printf("  %.300s\n", f)
	}
	if jsonOut != "" {
		data, err := json.MarshalIndent(rep, "", "  ")
		if err != nil {
			return err
		}
		return os.WriteFile(jsonOut, append(data, '\n'), 0o644)
	}
	return nil
}

// benchNode is one node of a benchmark cluster.
type benchNode struct {
	*nodens.Node
	member ssi.Member
}

// cluster builds a lab of 3 core node namespaces and remotes remote ones
// (core p1..p3 at 198.18.0.1-3, remote r1.. from 198.18.1.1) and the
// allocation for them.
func cluster(ctx context.Context, c *ssi.Cluster, dir string, remotes int) (*netlab.Lab, []*benchNode, *ssi.State, error) {
	lab, err := netlab.New(ctx, "ssibench")
	if err != nil {
		return nil, nil, nil, err
	}
	st := ssi.NewState()
	var nodes []*benchNode
	fail := func(err error) (*netlab.Lab, []*benchNode, *ssi.State, error) {
		closeAll(lab, nodes)
		return nil, nil, nil, err
	}
	for i := range 3 + remotes {
		name, a := fmt.Sprintf("p%d", i+1), netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)})
		if i >= 3 {
			name, a = fmt.Sprintf("r%d", i-2), netip.AddrFrom4([4]byte{198, 18, 1, byte(i - 2)})
		}
		m, _, err := st.Join(name, a, c.CoreSize)
		if err != nil {
			return fail(err)
		}
		h, err := lab.AddHost(ctx, name, netip.PrefixFrom(a, 16), netlab.Link{})
		if err != nil {
			return fail(err)
		}
		n, err := nodens.Start(ctx, h, dir+"/"+name)
		if err != nil {
			return fail(err)
		}
		n.Env = []string{"PATH=" + remotedDir + ":" + os.Getenv("PATH")}
		nodes = append(nodes, &benchNode{Node: n, member: m})
	}
	return lab, nodes, st, nil
}

func closeAll(lab *netlab.Lab, nodes []*benchNode) {
	for _, n := range nodes {
		n.Close()
	}
	lab.Close()
}

// esirRun times ESIR's enrollment of three corosync nodes and the time until
// a survivor's view drops a killed node.
func esirRun(ctx context.Context, c *ssi.Cluster, keys *ssi.Keys, dir string) (enrolled, detect, bound time.Duration, err error) {
	lab, nodes, st, err := cluster(ctx, c, dir, 0)
	if err != nil {
		return 0, 0, 0, err
	}
	defer closeAll(lab, nodes)
	enr := make([]*enroll.Node, len(nodes))
	bundles := make([]*ssi.Bundle, len(nodes))
	for i, n := range nodes {
		enr[i] = &enroll.Node{Root: n.Root, Run: n, Init: enroll.Direct, Timeout: time.Minute}
		if bundles[i], err = ssi.Render(c, st, keys, n.Host.Name); err != nil {
			return 0, 0, 0, err
		}
		if err := enr[i].Install(bundles[i]); err != nil {
			return 0, 0, 0, err
		}
	}
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, len(nodes))
	for i := range nodes {
		wg.Go(func() { _, errs[i] = enr[i].Enroll(ctx, bundles[i]) })
	}
	wg.Wait()
	enrolled = time.Since(start)
	for _, e := range errs {
		if e != nil {
			return 0, 0, 0, e
		}
	}
	if bound, err = corosyncBound(ctx, nodes[0]); err != nil {
		return 0, 0, 0, err
	}
	nodes[2].Kill()
	start = time.Now()
	for time.Since(start) < time.Minute {
		m, err := enr[0].Status(ctx)
		if err == nil && slices.Equal(m.Joined, []int{1, 2}) {
			return enrolled, time.Since(start), bound, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return 0, 0, 0, fmt.Errorf("n1 still lists the killed n3 after a minute")
}

// bareRun starts corosync by hand on three nodes with the same files and polls
// corosync-quorumtool until it reports quorate everywhere.
func bareRun(ctx context.Context, c *ssi.Cluster, keys *ssi.Keys, dir string) (time.Duration, error) {
	lab, nodes, st, err := cluster(ctx, c, dir, 0)
	if err != nil {
		return 0, err
	}
	defer closeAll(lab, nodes)
	for _, n := range nodes {
		b, err := ssi.Render(c, st, keys, n.Host.Name)
		if err != nil {
			return 0, err
		}
		if err := (&enroll.Node{Root: n.Root}).Install(b); err != nil {
			return 0, err
		}
	}
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, len(nodes))
	for i, n := range nodes {
		wg.Go(func() {
			if _, errs[i] = n.Run(ctx, "corosync"); errs[i] != nil {
				return
			}
			for time.Since(start) < time.Minute {
				if _, err := n.Run(ctx, "corosync-quorumtool", "-s"); err == nil {
					return
				}
				time.Sleep(20 * time.Millisecond)
			}
			errs[i] = fmt.Errorf("%s: not quorate after a minute", n.Host.Name)
		})
	}
	wg.Wait()
	for _, e := range errs {
		if e != nil {
			return 0, e
		}
	}
	return time.Since(start), nil
}

// timing is one run's per-node times from "installed" to "enrolled", ms.
type timing struct{ core, remote []float64 }

func (t timing) last() float64         { return slices.Max(slices.Concat(t.core, t.remote)) }
func (t timing) coreMedian() float64   { return median(t.core) }
func (t timing) coreMax() float64      { return slices.Max(t.core) }
func (t timing) remoteMedian() float64 { return median(t.remote) }
func (t timing) remoteMax() float64    { return slices.Max(t.remote) }

// stackRun enrolls 3 core + remotes remote nodes running the full stack, with
// ESIR (Enroll on every node, Reconcile every second on the core ones) or by
// hand, and returns each node's time from "installed" to "enrolled".
func stackRun(ctx context.Context, c *ssi.Cluster, keys *ssi.Keys, dir string, remotes int, byHand bool) (timing, error) {
	lab, nodes, st, err := cluster(ctx, c, dir, remotes)
	if err != nil {
		return timing{}, err
	}
	defer closeAll(lab, nodes)
	bundles := make([]*ssi.Bundle, len(nodes))
	enr := make([]*enroll.Node, len(nodes))
	for i, n := range nodes {
		enr[i] = &enroll.Node{Root: n.Root, Run: n, Init: enroll.Direct, SharedClock: true, Timeout: 3 * time.Minute}
		if bundles[i], err = ssi.Render(c, st, keys, n.Host.Name); err != nil {
			return timing{}, err
		}
		if err := enr[i].Install(bundles[i]); err != nil {
			return timing{}, err
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	start := time.Now()
	done := make([]time.Duration, len(nodes))
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	var addErr error
	if byHand {
		wg.Go(func() { addErr = addRemotesByHand(ctx, nodes[0], remoteXMLs(st)) })
		for i, n := range nodes {
			wg.Go(func() {
				if errs[i] = startByHand(ctx, n); errs[i] == nil {
					errs[i] = pollByHand(ctx, n, st)
				}
				done[i] = time.Since(start)
			})
		}
	} else {
		rctx, stop := context.WithCancel(ctx)
		var rg sync.WaitGroup
		for i := range 3 {
			rg.Go(func() {
				for rctx.Err() == nil {
					enr[i].Reconcile(rctx, bundles[i]) // errors while pacemaker starts: retried
					select {
					case <-rctx.Done():
					case <-time.After(time.Second):
					}
				}
			})
		}
		defer func() { stop(); rg.Wait() }()
		for i := range nodes {
			wg.Go(func() {
				_, errs[i] = enr[i].Enroll(ctx, bundles[i])
				done[i] = time.Since(start)
			})
		}
	}
	wg.Wait()
	if addErr != nil {
		return timing{}, fmt.Errorf("adding the remote resources: %w", addErr)
	}
	var t timing
	for i, n := range nodes {
		if errs[i] != nil {
			return timing{}, fmt.Errorf("%s: %w", n.Host.Name, errs[i])
		}
		if n.member.Role == ssi.Core {
			t.core = append(t.core, ms(done[i]))
		} else {
			t.remote = append(t.remote, ms(done[i]))
		}
	}
	return t, nil
}

// startByHand starts a node's daemons directly, as an administrator would.
func startByHand(ctx context.Context, n *benchNode) error {
	cmds := [][]string{{"chronyd", "-x", "-f", "/etc/chrony/chrony.conf"}}
	if n.member.Role == ssi.Core {
		cmds = append(cmds, []string{"corosync"}, []string{"sh", "-c", "setsid pacemakerd </dev/null >/dev/null 2>&1 &"})
	} else {
		cmds = append(cmds, []string{"sh", "-c", "setsid pacemaker-remoted </dev/null >/dev/null 2>&1 &"})
	}
	for _, c := range cmds {
		if out, err := n.Run(ctx, c[0], c[1:]...); err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
	}
	return nil
}

// remoteXMLs is the resources section an administrator would load: one
// ocf:pacemaker:remote primitive per remote member (the same as Reconcile's).
func remoteXMLs(st *ssi.State) string {
	var w strings.Builder
	w.WriteString("<resources>")
	for _, m := range st.Members {
		if m.Role != ssi.Remote {
			continue
		}
		fmt.Fprintf(&w, `<primitive id="%[1]s" class="ocf" provider="pacemaker" type="remote"><instance_attributes id="%[1]s-ia">`+
			`<nvpair id="%[1]s-ia-server" name="server" value="%[2]s"/><nvpair id="%[1]s-ia-ri" name="reconnect_interval" value="15s"/>`+
			`</instance_attributes><operations><op id="%[1]s-monitor" name="monitor" interval="10s" timeout="15s"/></operations></primitive>`, m.Name, m.Addr)
	}
	w.WriteString("</resources>")
	return w.String()
}

// addRemotesByHand waits until p1's CIB answers, then disables STONITH and
// loads every remote resource in one cibadmin call each.
func addRemotesByHand(ctx context.Context, p1 *benchNode, resources string) error {
	for {
		if _, err := p1.Run(ctx, "cibadmin", "--query", "--scope", "resources"); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("p1's CIB never answered: %w", ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
	for _, c := range [][]string{
		{"crm_attribute", "--type", "crm_config", "--name", "stonith-enabled", "--update", "false"},
		{"cibadmin", "--replace", "--scope", "resources", "--xml-text", resources},
	} {
		if out, err := p1.Run(ctx, c[0], c[1:]...); err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
	}
	return nil
}

// pollByHand polls a node every 250 ms with the engines' own tools until it
// is a member: corosync quorate (core), online in its own crm_mon, chrony
// synchronised (to a core member, off the core).
func pollByHand(ctx context.Context, n *benchNode, st *ssi.State) error {
	var core []string
	for _, m := range st.Core() {
		core = append(core, "("+m.Addr.String()+")")
	}
	online := fmt.Sprintf(`name="%s" id="%s" online="true"`, n.member.Name, n.member.Name)
	if n.member.Role == ssi.Core {
		online = fmt.Sprintf(`name="%s" id="%d" online="true"`, n.member.Name, n.member.ID)
	}
	var last string // what the last failed poll saw
	for {
		ok := true
		if n.member.Role == ssi.Core {
			out, err := n.Run(ctx, "corosync-quorumtool", "-s")
			ok, last = err == nil, fmt.Sprintf("corosync-quorumtool: %v: %s", err, out)
		}
		if ok {
			out, err := n.Run(ctx, "crm_mon", "-1", "--output-as=xml")
			ok, last = err == nil && bytes.Contains(out, []byte(online)), fmt.Sprintf("crm_mon: %v: %s", err, out)
		}
		if ok {
			out, err := n.Run(ctx, "chronyc", "-n", "tracking")
			ok, last = err == nil && bytes.Contains(out, []byte("Leap status     : Normal")), fmt.Sprintf("chronyc: %v: %s", err, out)
			if ok && n.member.Role != ssi.Core {
				ok = slices.ContainsFunc(core, func(a string) bool { return bytes.Contains(out, []byte(a)) })
			}
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("not a member: %w; last poll: %s", ctx.Err(), last)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// corosyncBound is corosync's own bound on noticing a dead node: the runtime
// token (the configured token plus token_coefficient per node beyond two)
// and consensus timeouts, as the running corosync on n reports them.
func corosyncBound(ctx context.Context, n *benchNode) (time.Duration, error) {
	var bound time.Duration
	for _, key := range []string{"runtime.config.totem.token", "runtime.config.totem.consensus"} {
		out, err := n.Run(ctx, "corosync-cmapctl", "-g", key)
		if err != nil {
			return 0, err
		}
		_, v, _ := strings.Cut(strings.TrimSpace(string(out)), " = ")
		ms, err := strconv.Atoi(v)
		if err != nil {
			return 0, fmt.Errorf("%s: %q", key, out)
		}
		bound += time.Duration(ms) * time.Millisecond
	}
	return bound, nil
}
