// Command lab measures the time to deploy the sample image onto 2, 4 (and
// more, if asked) virtual machines of the lab, split by phase:
//
//	firmware+PXE  QEMU start -> the agent's netboot marker on the console
//	agent boot    marker -> the agent registered (modules loaded, DHCP)
//	fetch         registered -> the server saw the install start
//	install       installing -> installed (unpack finishing, bootloader)
//	reboot        installed -> the installed system is up (console line)
//	enroll        up -> the server marked the node enrolled
//
// Phase boundaries come from the node's event log at the server and from the
// serial consoles. The baseline beside each lab size is the smallest size of
// the run: the ratio says how the deployment time grows with the number of
// machines sharing one image (ideal: 1.0, BitTorrent lets every node serve).
// On a 2-core host TCG machines share the CPU, so the ratio here measures
// the host as much as ESIR: the table says so.
//
// It writes a PNG timeline (one row per node, phases coloured; gnuplot) and,
// with --json, the figures. Needs root, QEMU, OVMF and iPXE (scripts/setup.sh).
//
//	go run ./benchmarks/lab [--sizes 2,4] [--png lab-timeline.png] [--json FILE]
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/esir-project/esir/lab"
	"github.com/esir-project/esir/server/deploy"
)

// phaseNames lists the phases in order.
func phaseNames() []string {
	return []string{"firmware+PXE", "agent boot", "fetch", "install", "reboot", "enroll"}
}

type nodeTimes struct {
	Node     string    `json:"node"`
	Firmware string    `json:"firmware"`
	NIC      string    `json:"nic"`
	Disk     string    `json:"disk"`
	Phases   []float64 `json:"phase_s"` // seconds, in phaseNames() order
	Total    float64   `json:"total_s"`
	State    string    `json:"state"`
}

type sizeResult struct {
	Nodes    int         `json:"nodes"`
	Total    float64     `json:"last_node_s"`
	PerNode  []nodeTimes `json:"per_node"`
	Median   []float64   `json:"median_phase_s"`
	Ratio    float64     `json:"ratio_to_smallest"`
	Complete bool        `json:"complete"`
}

func main() {
	sizes := flag.String("sizes", "2,4", "lab sizes to deploy onto, comma-separated")
	png := flag.String("png", "lab-timeline.png", "PNG timeline to write (empty: none)")
	jsonOut := flag.String("json", "", "write the figures as JSON to this file")
	dir := flag.String("dir", "/var/tmp/esir-bench-lab", "lab state directory")
	mem := flag.Int("memory", 768, "memory per machine in MiB")
	timeout := flag.Duration("timeout", 40*time.Minute, "limit per lab size")
	agentBin := flag.String("agent", "", "prebuilt static esir-agent (default: built from this checkout)")
	shot := flag.String("screenshot", "", "save a picture of the console's rollout page, taken mid-rollout on the largest lab, to this PNG")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *sizes, *png, *jsonOut, *dir, *agentBin, *shot, *mem, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "benchmarks/lab:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, sizeList, png, jsonOut, dir, agentBin, shot string, mem int, timeout time.Duration) error {
	if err := lab.Available(); err != nil {
		return err
	}
	var sizes []int
	for _, s := range strings.Split(sizeList, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			return fmt.Errorf("--sizes: %q is not a positive number", s)
		}
		sizes = append(sizes, n)
	}
	bin, err := os.MkdirTemp("", "esir-bench-lab-bin-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(bin)
	esir, agent := filepath.Join(bin, "esir"), filepath.Join(bin, "esir-agent")
	builds := [][2]string{{esir, "./cmd/esir"}, {agent, "./cmd/esir-agent"}}
	if agentBin != "" {
		agent, builds = agentBin, builds[:1]
	}
	for _, b := range builds {
		cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", b[0], b[1])
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s (run from the repository root): %w\n%s", b[1], err, out)
		}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	var results []sizeResult
	largest := slices.Max(sizes)
	for _, n := range sizes {
		shotHere := ""
		if n == largest {
			shotHere, largest = shot, 0
		}
		r, err := deployOnto(ctx, n, dir, esir, agent, shotHere, mem, timeout, log)
		if derr := lab.Down(context.Background(), dir, "bench"); derr != nil {
			fmt.Fprintln(os.Stderr, "lab down:", derr)
		}
		if err != nil {
			return fmt.Errorf("%d nodes: %w", n, err)
		}
		results = append(results, r)
	}
	for i := range results {
		results[i].Ratio = results[i].Total / results[0].Total
	}
	printTable(results)
	if png != "" {
		if err := plot(ctx, results, png); err != nil {
			fmt.Fprintln(os.Stderr, "timeline:", err)
		} else {
			fmt.Printf("timeline written to %s\n", png)
		}
	}
	if jsonOut != "" {
		b, _ := json.MarshalIndent(results, "", "  ")
		if err := os.WriteFile(jsonOut, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// deployOnto brings up a lab of n nodes, waits until every node is enrolled
// or failed, and splits each node's time into phases.
func deployOnto(ctx context.Context, n int, dir, esir, agent, shot string, mem int, timeout time.Duration, log *slog.Logger) (sizeResult, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	res := sizeResult{Nodes: n}
	agentUp := regexp.MustCompile(`esir-agent: netboot environment up`)
	systemUp := regexp.MustCompile(`esir-sample: up hostname=`)
	fmt.Fprintf(os.Stderr, "deploying onto %d machines...\n", n)
	st, err := lab.Up(ctx, lab.Options{Dir: dir, Name: "bench", Nodes: n, Firmware: lab.FirmwareMixed,
		Hardware: lab.HardwareMixed, Esir: esir, Agent: agent, MemoryMiB: mem, Log: log})
	if err != nil {
		return res, err
	}
	start := time.Now() // the machines started just before Up returned
	c, err := st.Client()
	if err != nil {
		return res, err
	}
	// Console marks, watched as they appear.
	type mark struct {
		node string
		up   bool // system up (else agent up)
		at   time.Time
	}
	marks := make(chan mark, 2*n)
	for _, nd := range st.Nodes {
		go func() {
			if _, _, err := st.WaitConsole(ctx, nd.Name, agentUp, 0); err == nil {
				marks <- mark{nd.Name, false, time.Now()}
			}
			if _, _, err := st.WaitConsole(ctx, nd.Name, systemUp, 0); err == nil {
				marks <- mark{nd.Name, true, time.Now()}
			}
		}()
	}
	agentAt, upAt := map[string]time.Time{}, map[string]time.Time{}
	shotTaken := shot == ""
	var shooting sync.WaitGroup
	defer shooting.Wait()
	for {
		for len(marks) > 0 {
			m := <-marks
			if m.up {
				upAt[m.node] = m.at
			} else {
				agentAt[m.node] = m.at
			}
		}
		nodes, err := c.Nodes(ctx, "", lab.LabelKey+"="+st.Name)
		if err == nil {
			done, busy := 0, 0
			for _, nv := range nodes {
				if nv.State == deploy.Enrolled || nv.State == deploy.Failed {
					done++
				}
				if nv.State == deploy.Fetching || nv.State == deploy.Installing {
					busy++
				}
			}
			// The picture for the README: most machines mid-deployment.
			if !shotTaken && 2*busy >= n {
				shotTaken = true
				shooting.Add(1)
				go func() {
					defer shooting.Done()
					if err := takeShot(ctx, st.ConsoleURL, st.Token, c.Rollouts, shot); err != nil {
						fmt.Fprintln(os.Stderr, err)
					} else {
						fmt.Fprintf(os.Stderr, "console picture written to %s\n", shot)
					}
				}()
			}
			if done == n {
				break
			}
		}
		select {
		case <-ctx.Done():
			return res, fmt.Errorf("waiting for enrollment: %w", ctx.Err())
		case <-time.After(time.Second):
		}
	}
	time.Sleep(time.Second) // let the console watchers report
	for len(marks) > 0 {
		m := <-marks
		if m.up {
			upAt[m.node] = m.at
		} else {
			agentAt[m.node] = m.at
		}
	}
	res.Complete = true
	for _, nd := range st.Nodes {
		det, err := c.Node(ctx, nd.MAC)
		if err != nil {
			return res, err
		}
		// The last time the node entered each state (a retried node counts
		// from its last attempt).
		at := map[deploy.State]time.Time{}
		for _, e := range det.Events {
			at[e.To] = e.Time
		}
		bounds := []time.Time{start, agentAt[nd.Name], at[deploy.Booting], at[deploy.Installing], at[deploy.Installed], upAt[nd.Name], at[deploy.Enrolled]}
		nt := nodeTimes{Node: nd.Name, Firmware: string(nd.Firmware), NIC: nd.NIC, Disk: nd.Disk, State: string(det.State)}
		for i := 1; i < len(bounds); i++ {
			d := 0.0
			if !bounds[i].IsZero() && !bounds[i-1].IsZero() {
				d = bounds[i].Sub(bounds[i-1]).Seconds()
			}
			nt.Phases = append(nt.Phases, max(d, 0))
		}
		if end := at[deploy.Enrolled]; !end.IsZero() {
			nt.Total = end.Sub(start).Seconds()
		} else {
			res.Complete = false
		}
		res.Total = max(res.Total, nt.Total)
		res.PerNode = append(res.PerNode, nt)
	}
	for i := range phaseNames() {
		var v []float64
		for _, nt := range res.PerNode {
			v = append(v, nt.Phases[i])
		}
		sort.Float64s(v)
		res.Median = append(res.Median, v[len(v)/2])
	}
	if !res.Complete {
		return res, errors.New("not every node enrolled")
	}
	return res, nil
}

func printTable(results []sizeResult) {
	fmt.Println("Deployment of the sample image onto lab VMs (TCG, this host), seconds")
	fmt.Printf("%-7s", "nodes")
	for _, p := range phaseNames() {
		fmt.Printf(" %13s", p)
	}
	fmt.Printf(" %12s %18s\n", "last node", "ratio to "+strconv.Itoa(results[0].Nodes)+" nodes")
	for _, r := range results {
		fmt.Printf("%-7d", r.Nodes)
		for _, m := range r.Median {
			fmt.Printf(" %13.1f", m)
		}
		fmt.Printf(" %12.1f %18.2f\n", r.Total, r.Ratio)
	}
	fmt.Println("(phase columns: median over the nodes; baseline of the ratio: the smallest lab of this run)")
	for _, r := range results {
		fmt.Printf("\n%d nodes, per node:\n", r.Nodes)
		for _, nt := range r.PerNode {
			fmt.Printf("  %s %-4s %-14s %-10s", nt.Node, nt.Firmware, nt.NIC, nt.Disk)
			for _, p := range nt.Phases {
				fmt.Printf(" %7.1f", p)
			}
			fmt.Printf("  total %6.1f  %s\n", nt.Total, nt.State)
		}
	}
}

// plot draws the timeline with gnuplot: one row per node (all sizes stacked),
// one coloured box per phase.
func plot(ctx context.Context, results []sizeResult, png string) error {
	if _, err := exec.LookPath("gnuplot"); err != nil {
		return errors.New("gnuplot not installed (Debian package gnuplot-nox)")
	}
	tmp, err := os.MkdirTemp("", "esir-lab-plot-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	var data strings.Builder
	var labels []string
	row := 0
	for _, r := range results {
		for _, nt := range r.PerNode {
			t := 0.0
			for i, p := range nt.Phases {
				// x-start x-end y phase-index
				fmt.Fprintf(&data, "%f %f %d %d\n", t, t+p, row, i)
				t += p
			}
			labels = append(labels, fmt.Sprintf(`"%d: %s (%s %s %s)" %d`, r.Nodes, nt.Node, nt.Firmware, nt.NIC, nt.Disk, row))
			row++
		}
	}
	df := filepath.Join(tmp, "data")
	if err := os.WriteFile(df, []byte(data.String()), 0o644); err != nil {
		return err
	}
	colors := []string{"#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1"}
	var s strings.Builder
	fmt.Fprintf(&s, "set terminal pngcairo size 1200,%d\nset output %q\n", 160+row*40, png)
	fmt.Fprintf(&s, "set title \"ESIR lab: deployment timeline per node (seconds since the machines started)\"\n")
	fmt.Fprintf(&s, "set ytics (%s)\nset yrange [-1:%d]\nset xlabel \"seconds\"\nset grid x\nset key outside right\n", strings.Join(labels, ", "), row)
	var plots []string
	for i, p := range phaseNames() {
		plots = append(plots, fmt.Sprintf(`%q using (($4==%d)?($1+$2)/2:1/0):3:(($2-$1)/2):(0.35) with boxxyerror fs solid 0.9 lc rgb %q title %q`, df, i, colors[i], p))
	}
	fmt.Fprintf(&s, "plot %s\n", strings.Join(plots, ", \\\n  "))
	gp := filepath.Join(tmp, "plot.gp")
	if err := os.WriteFile(gp, []byte(s.String()), 0o644); err != nil {
		return err
	}
	out, err := exec.CommandContext(ctx, "gnuplot", gp).CombinedOutput()
	if err != nil {
		return fmt.Errorf("gnuplot: %w: %s", err, out)
	}
	return nil
}
