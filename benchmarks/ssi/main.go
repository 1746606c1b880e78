// Command ssi benchmarks ESIR's SSI enrollment with real corosync, 3 core
// nodes each in its own network, mount, UTS and PID namespaces (root needed):
//
//   - enroll: from "files installed, corosync not running" to ESIR's enroll
//     verdict on every node (joined and quorate, as reported by corosync's
//     tools), beside the bare engine: the same configs started by hand and
//     polled with corosync-quorumtool until it exits 0 on every node.
//   - detect: from killing one node (its whole PID namespace) to ESIR's
//     membership view on a survivor no longer listing it, beside corosync's
//     own bound for declaring a node lost: the runtime token (token plus
//     token_coefficient per node beyond two) plus consensus, read from cmap.
//
// Medians over --runs. Prints a table; --json FILE writes the figures.
//
//	go run ./benchmarks/ssi [--runs 3] [--token-ms 1000] [--json out.json]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
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

type row struct {
	Measure    string  `json:"measure"`
	ESIRMs     float64 `json:"esir_ms"`
	Baseline   string  `json:"baseline"`
	BaselineMs float64 `json:"baseline_ms"`
	Ratio      float64 `json:"ratio"` // ESIR / baseline
}

type report struct {
	CoreNodes   int   `json:"core_nodes"`
	RemoteNodes int   `json:"remote_nodes"`
	TokenMs     int   `json:"token_ms"`
	Runs        int   `json:"runs"`
	Rows        []row `json:"rows"`
}

func main() {
	runs := flag.Int("runs", 3, "repetitions (medians are reported)")
	token := flag.Int("token-ms", 1000, "corosync totem token timeout")
	jsonOut := flag.String("json", "", "write the figures as JSON to this file")
	flag.Parse()
	if err := run(*runs, *token, *jsonOut); err != nil {
		fmt.Fprintln(os.Stderr, "benchmarks/ssi:", err)
		os.Exit(1)
	}
}

func run(runs, token int, jsonOut string) error {
	if err := netlab.Available(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c, _, err := ssi.Parse(fmt.Appendf(nil, "name: bench\nprofile:\n  corosync: true\ncore_size: 3\ntoken_ms: %d\n", token))
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "esir-ssi-bench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	keys, err := ssi.LoadKeys(tmp + "/secrets")
	if err != nil {
		return err
	}
	var enrollMs, bareMs, detectMs, boundMs []float64
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
	bound := median(boundMs)
	rep := report{CoreNodes: 3, RemoteNodes: 0, TokenMs: token, Runs: runs, Rows: []row{
		{Measure: "installed -> enrolled (3 core)", ESIRMs: median(enrollMs), Baseline: "corosync started by hand, quorumtool polled", BaselineMs: median(bareMs)},
		{Measure: "killed node gone from view", ESIRMs: median(detectMs), Baseline: "runtime token + consensus (corosync's bound)", BaselineMs: bound},
	}}
	fmt.Printf("SSI enrollment, 3 core nodes in namespaces, token %d ms, median of %d runs\n", token, runs)
	fmt.Printf("%-34s %10s  %-46s %11s  %6s\n", "measure", "ESIR ms", "baseline", "baseline ms", "ratio")
	for i := range rep.Rows {
		r := &rep.Rows[i]
		r.Ratio = r.ESIRMs / r.BaselineMs
		fmt.Printf("%-34s %10.0f  %-46s %11.0f  %6.2f\n", r.Measure, r.ESIRMs, r.Baseline, r.BaselineMs, r.Ratio)
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

// cluster builds a lab of three node namespaces and the allocation for them.
func cluster(ctx context.Context, c *ssi.Cluster, dir string) (*netlab.Lab, []*nodens.Node, *ssi.State, error) {
	lab, err := netlab.New(ctx, "ssibench")
	if err != nil {
		return nil, nil, nil, err
	}
	st := ssi.NewState()
	var nodes []*nodens.Node
	for i, name := range []string{"n1", "n2", "n3"} {
		a := netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)})
		if _, _, err := st.Join(name, a, c.CoreSize); err != nil {
			lab.Close()
			return nil, nil, nil, err
		}
		h, err := lab.AddHost(ctx, name, netip.PrefixFrom(a, 24), netlab.Link{})
		if err != nil {
			lab.Close()
			return nil, nil, nil, err
		}
		n, err := nodens.Start(ctx, h, dir+"/"+name)
		if err != nil {
			lab.Close()
			return nil, nil, nil, err
		}
		nodes = append(nodes, n)
	}
	return lab, nodes, st, nil
}

func closeAll(lab *netlab.Lab, nodes []*nodens.Node) {
	for _, n := range nodes {
		n.Close()
	}
	lab.Close()
}

// esirRun times ESIR's enrollment of three nodes and the time until a
// survivor's view drops a killed node.
func esirRun(ctx context.Context, c *ssi.Cluster, keys *ssi.Keys, dir string) (enrolled, detect, bound time.Duration, err error) {
	lab, nodes, st, err := cluster(ctx, c, dir)
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
	// corosync's own bound: the runtime token (the configured token plus
	// token_coefficient per node beyond two) and consensus timeouts.
	for _, key := range []string{"runtime.config.totem.token", "runtime.config.totem.consensus"} {
		out, err := nodes[0].Run(ctx, "corosync-cmapctl", "-g", key)
		if err != nil {
			return 0, 0, 0, err
		}
		_, v, _ := strings.Cut(strings.TrimSpace(string(out)), " = ")
		n, err := strconv.Atoi(v)
		if err != nil {
			return 0, 0, 0, fmt.Errorf("%s: %q", key, out)
		}
		bound += time.Duration(n) * time.Millisecond
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
	lab, nodes, st, err := cluster(ctx, c, dir)
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

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}
