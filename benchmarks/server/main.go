// Command server benchmarks the deployment server under a fleet's load: N
// simulated agents (default 1,000) each report progress once a second
// through the real agent protocol while L CLI clients (default 10) list the
// nodes once a second, against a real `esir server` process on loopback.
//
// The baseline, measured in the same run with the same load generator, is a
// floor server: a plain net/http process (this program re-executed) that
// decodes each report and answers a fixed acknowledgement, and serves the
// node list as pre-rendered bytes: no authentication, no database. The table
// shows ESIR's figure, the floor's, their ratio and the target, plus
// the load generator's own CPU.
//
// Run: go run ./benchmarks/server [--agents 1000 --listers 10 --duration 30s] [--json FILE]
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/client"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/fleet"
)

type result struct {
	Target          string  `json:"target"`
	Reports         int64   `json:"reports"`
	ReportErrors    int64   `json:"report_errors"`
	ReportRate      float64 `json:"reports_per_s"`
	ReportP50Ms     float64 `json:"report_p50_ms"`
	ReportP99Ms     float64 `json:"report_p99_ms"`
	ReportMaxMs     float64 `json:"report_max_ms"`
	Lists           int64   `json:"lists"`
	ListErrors      int64   `json:"list_errors"`
	ListP50Ms       float64 `json:"list_p50_ms"`
	ListP99Ms       float64 `json:"list_p99_ms"`
	RequestRate     float64 `json:"requests_per_s"`
	ServerCPUPct    float64 `json:"server_cpu_pct"`
	ServerRSSMiB    float64 `json:"server_rss_mib"`
	ServerPeakMiB   float64 `json:"server_peak_rss_mib"`
	LoadGenCPUPct   float64 `json:"loadgen_cpu_pct"`
	ListBytes       int     `json:"list_bytes"`
	DurationSeconds float64 `json:"duration_s"`
	// LoadAvg is the host's 1-minute load average at the end of the run:
	// other work on the machine competes with both servers for 2 cores.
	LoadAvg float64 `json:"host_load_avg_1m"`
}

type options struct {
	agents, listers int
	duration        time.Duration
	bin, jsonOut    string
	// profile, when set, is a file to write the esir server's CPU profile
	// of the measured period to (through its debug_listen).
	profile string
}

func main() {
	if len(os.Args) == 3 && os.Args[1] == "--floor-server" {
		floorServer(os.Args[2])
		return
	}
	var o options
	flag.IntVar(&o.agents, "agents", 1000, "simulated agents, each reporting once a second")
	flag.IntVar(&o.listers, "listers", 10, "CLI clients listing nodes once a second")
	flag.DurationVar(&o.duration, "duration", 30*time.Second, "measured load duration")
	flag.StringVar(&o.bin, "bin", "", "esir binary (built from this module when empty)")
	flag.StringVar(&o.jsonOut, "json", "", "write the results as JSON to this file")
	flag.StringVar(&o.profile, "cpuprofile", "", "write the esir server's CPU profile of the measured period to this file")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "benchmark:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil {
		lim.Cur = lim.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	work, err := os.MkdirTemp("", "esir-bench-server-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	if o.bin == "" {
		o.bin = filepath.Join(work, "esir")
		fmt.Fprintln(os.Stderr, "building esir ...")
		b := exec.Command("go", "build", "-o", o.bin, "github.com/esir-project/esir/cmd/esir")
		b.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := b.CombinedOutput(); err != nil {
			return fmt.Errorf("go build: %v\n%s", err, out)
		}
	}
	storeDir, err := buildImage(work)
	if err != nil {
		return err
	}
	ctx := context.Background()
	hc := &http.Client{Transport: &http.Transport{MaxIdleConns: o.agents + o.listers + 16, MaxIdleConnsPerHost: o.agents + o.listers + 16, IdleConnTimeout: time.Minute}, Timeout: 30 * time.Second}

	// ESIR.
	addr := freeAddr()
	conf := filepath.Join(work, "server.yaml")
	cfgText := fmt.Sprintf("listen: %s\ndata_dir: %s\nimage_store: %s\nswarm_listen: \"\"\nadmin_token_file: %s\n",
		addr, filepath.Join(work, "data"), storeDir, filepath.Join(work, "token"))
	debugAddr := ""
	if o.profile != "" {
		debugAddr = freeAddr()
		cfgText += "debug_listen: " + debugAddr + "\n"
	}
	os.WriteFile(conf, []byte(cfgText), 0o600)
	srv := exec.Command(o.bin, "server", "-c", conf, "--log-level", "warn")
	var srvOut bytes.Buffer
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	if err := srv.Start(); err != nil {
		return err
	}
	defer func() { srv.Process.Kill(); srv.Wait() }()
	base := "http://" + addr
	if err := waitHealthy(base); err != nil {
		return fmt.Errorf("%w\n%s", err, srvOut.String())
	}
	tok, _ := os.ReadFile(filepath.Join(work, "token"))
	admin := &client.Client{Server: base, Token: strings.TrimSpace(string(tok)), HTTP: hc}
	fmt.Fprintf(os.Stderr, "preparing %d agents ...\n", o.agents)
	agents, err := prepare(ctx, admin, base, hc, o.agents)
	if err != nil {
		return fmt.Errorf("%w\n%s", err, srvOut.String())
	}
	fmt.Fprintf(os.Stderr, "measuring esir for %s ...\n", o.duration)
	profDone := make(chan error, 1)
	if debugAddr != "" {
		go func() { profDone <- fetchProfile(hc, debugAddr, o.duration, o.profile) }()
	} else {
		profDone <- nil
	}
	esir, err := load(ctx, o, srv.Process.Pid, agents, func(ctx context.Context) (int, error) {
		nodes, err := admin.Nodes(ctx, "")
		return len(nodes), err
	}, func(ctx context.Context, a *fleet.Agent, seq int64) error {
		_, err := a.Progress(ctx, agentapi.PhaseFetching, seq<<20, 1<<30)
		return err
	})
	if err != nil {
		return err
	}
	if err := <-profDone; err != nil {
		fmt.Fprintln(os.Stderr, "cpu profile:", err)
	}
	esir.Target = "esir server"
	// The floor serves every node in one answer (ESIR's listers page
	// through them as esir node ls does).
	var listBytes []byte
	if err := admin.Do(ctx, "GET", fmt.Sprintf("/nodes?limit=%d", o.agents), nil, (*json.RawMessage)(&listBytes)); err == nil {
		esir.ListBytes = len(listBytes)
	}

	// The floor server.
	faddr := freeAddr()
	os.WriteFile(filepath.Join(work, "nodes.json"), listBytes, 0o600)
	self, _ := os.Executable()
	fl := exec.Command(self, "--floor-server", faddr+","+filepath.Join(work, "nodes.json"))
	fl.Stderr = os.Stderr
	if err := fl.Start(); err != nil {
		return err
	}
	defer func() { fl.Process.Kill(); fl.Wait() }()
	fbase := "http://" + faddr
	if err := waitHealthy(fbase); err != nil {
		return err
	}
	fagents := make([]*fleet.Agent, len(agents))
	for i, a := range agents {
		fagents[i] = fleet.New(fbase, a.Client.Token, a.MAC, hc)
		fagents[i].Assignment = a.Assignment
	}
	fmt.Fprintf(os.Stderr, "measuring the floor server for %s ...\n", o.duration)
	floor, err := load(ctx, o, fl.Process.Pid, fagents, func(ctx context.Context) (int, error) {
		resp, err := hc.Get(fbase + "/api/v1/nodes")
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		n, err := io.Copy(io.Discard, resp.Body)
		return int(n), err
	}, func(ctx context.Context, a *fleet.Agent, seq int64) error {
		_, err := a.Progress(ctx, agentapi.PhaseFetching, seq<<20, 1<<30)
		return err
	})
	if err != nil {
		return err
	}
	floor.Target = "floor (net/http, no auth, no db)"
	floor.ListBytes = len(listBytes)
	print(o, esir, floor)
	if o.jsonOut != "" {
		data, _ := json.MarshalIndent(map[string]any{"agents": o.agents, "listers": o.listers, "results": []result{esir, floor},
			"targets": map[string]any{"report_p99_ms": 50, "reports_per_s": o.agents, "server_rss_mib": 200}}, "", "  ")
		if err := os.WriteFile(o.jsonOut, data, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// fetchProfile writes the server's CPU profile over d to file.
func fetchProfile(hc *http.Client, addr string, d time.Duration, file string) error {
	secs := max(int(d.Seconds())-1, 1)
	resp, err := hc.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", addr, secs))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", addr, resp.Status)
	}
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	return os.WriteFile(file, data, 0o644)
}

func buildImage(work string) (string, error) {
	root := filepath.Join(work, "rootfs")
	os.MkdirAll(filepath.Join(root, "etc"), 0o755)
	os.WriteFile(filepath.Join(root, "etc", "hostname"), []byte("bench\n"), 0o644)
	dir := filepath.Join(work, "store")
	st, err := imaging.OpenStore(dir)
	if err != nil {
		return "", err
	}
	_, err = st.Build(context.Background(), root, imaging.BuildOptions{Name: "bench", Version: "1", Arch: "x86_64"})
	return dir, err
}

// prepare registers the agents, starts a rollout over all of them and
// registers each again to take its assignment (the node booted).
func prepare(ctx context.Context, admin *client.Client, base string, hc *http.Client, n int) ([]*fleet.Agent, error) {
	agents := make([]*fleet.Agent, n)
	var names []string
	err := parallel(n, 32, func(i int) error {
		mac := fleet.MAC(i + 1)
		tok, err := admin.BootToken(ctx, mac)
		if err != nil {
			return err
		}
		agents[i] = fleet.New(base, tok, mac, hc)
		_, err = agents[i].Register(ctx)
		return err
	})
	if err != nil {
		return nil, err
	}
	for _, a := range agents {
		names = append(names, a.MAC)
	}
	if _, err := admin.CreateRollout(ctx, deploy.Spec{Image: "bench", Selector: deploy.Selector{Names: names}, BatchSize: n,
		NodeTimeout: deploy.Duration(time.Hour)}); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(time.Minute)
	for {
		ns, err := admin.Nodes(ctx, string(deploy.Assigned))
		if err != nil {
			return nil, err
		}
		if len(ns) == n {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("only %d of %d nodes assigned after a minute", len(ns), n)
		}
		time.Sleep(200 * time.Millisecond)
	}
	err = parallel(n, 32, func(i int) error {
		r, err := agents[i].Register(ctx)
		if err == nil && r.Assignment == nil {
			err = fmt.Errorf("agent %s: no assignment", agents[i].MAC)
		}
		return err
	})
	return agents, err
}

func parallel(n, width int, fn func(int) error) error {
	var wg sync.WaitGroup
	var first atomic.Value
	sem := make(chan struct{}, width)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := fn(i); err != nil {
				first.CompareAndSwap(nil, err)
			}
		}()
	}
	wg.Wait()
	if err, ok := first.Load().(error); ok {
		return err
	}
	return nil
}

// load runs the agents and listers for o.duration and measures.
func load(ctx context.Context, o options, pid int, agents []*fleet.Agent,
	list func(context.Context) (int, error), report func(context.Context, *fleet.Agent, int64) error) (result, error) {
	ctx, cancel := context.WithTimeout(ctx, o.duration)
	defer cancel()
	var mu sync.Mutex
	var reps, lists []time.Duration
	var repErr, listErr atomic.Int64
	var wg sync.WaitGroup
	tick := func(offset time.Duration, fn func()) {
		defer wg.Done()
		select {
		case <-ctx.Done():
			return
		case <-time.After(offset):
		}
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			fn()
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}
	cpu0, self0, t0 := procCPU(pid), procCPU(os.Getpid()), time.Now()
	for _, a := range agents {
		wg.Add(1)
		seq := int64(0)
		go tick(time.Duration(rand.Int64N(int64(time.Second))), func() {
			seq++
			s := time.Now()
			err := report(context.Background(), a, seq)
			d := time.Since(s)
			if err != nil {
				if repErr.Add(1) == 1 {
					fmt.Fprintln(os.Stderr, "report:", err)
				}
				return
			}
			mu.Lock()
			reps = append(reps, d)
			mu.Unlock()
		})
	}
	for range o.listers {
		wg.Add(1)
		go tick(time.Duration(rand.Int64N(int64(time.Second))), func() {
			s := time.Now()
			_, err := list(context.Background())
			d := time.Since(s)
			if err != nil {
				if listErr.Add(1) == 1 {
					fmt.Fprintln(os.Stderr, "list:", err)
				}
				return
			}
			mu.Lock()
			lists = append(lists, d)
			mu.Unlock()
		})
	}
	wg.Wait()
	wall := time.Since(t0).Seconds()
	cpu1, self1 := procCPU(pid), procCPU(os.Getpid())
	rss, peak := procMem(pid)
	var load float64
	if data, err := os.ReadFile("/proc/loadavg"); err == nil {
		load, _ = strconv.ParseFloat(strings.Fields(string(data))[0], 64)
	}
	r := result{
		Reports: int64(len(reps)), ReportErrors: repErr.Load(), Lists: int64(len(lists)), ListErrors: listErr.Load(),
		ReportRate: float64(len(reps)) / wall, RequestRate: float64(len(reps)+len(lists)) / wall,
		ServerCPUPct: 100 * (cpu1 - cpu0) / wall, LoadGenCPUPct: 100 * (self1 - self0) / wall,
		ServerRSSMiB: rss, ServerPeakMiB: peak, DurationSeconds: wall, LoadAvg: load,
	}
	r.ReportP50Ms, r.ReportP99Ms, r.ReportMaxMs = pct(reps, 0.5), pct(reps, 0.99), pct(reps, 1)
	r.ListP50Ms, r.ListP99Ms = pct(lists, 0.5), pct(lists, 0.99)
	return r, nil
}

func pct(ds []time.Duration, p float64) float64 {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(p*float64(len(s))+0.5) - 1
	i = min(max(i, 0), len(s)-1)
	return float64(s[i]) / float64(time.Millisecond)
}

// procCPU returns a process's user+system CPU seconds.
func procCPU(pid int) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(data)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

// procMem returns a process's RSS and peak RSS in MiB.
func procMem(pid int) (rss, peak float64) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0
	}
	for _, l := range strings.Split(string(data), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "VmRSS:":
			rss = v / 1024
		case "VmHWM:":
			peak = v / 1024
		}
	}
	return rss, peak
}

func freeAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func waitHealthy(base string) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if r, err := http.Get(base + "/healthz"); err == nil {
			r.Body.Close()
			if r.StatusCode == 200 {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("%s did not become healthy within 30 s", base)
}

// floorServer answers the same requests with the least work: decode the
// event batch, answer a fixed ack; serve the node list as fixed bytes.
func floorServer(arg string) {
	addr, file, _ := strings.Cut(arg, ",")
	list, err := os.ReadFile(file)
	if err != nil {
		fmt.Fprintln(os.Stderr, "floor server:", err)
		os.Exit(1)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, `{"status":"ok"}`) })
	mux.HandleFunc("POST /agent/v1/events", func(w http.ResponseWriter, r *http.Request) {
		var b agentapi.EventBatch
		if err := json.NewDecoder(r.Body).Decode(&b); err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(agentapi.Ack{Applied: true, State: "fetching"})
	})
	mux.HandleFunc("GET /api/v1/nodes", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(list)
	})
	if err := http.ListenAndServe(addr, mux); err != nil {
		fmt.Fprintln(os.Stderr, "floor server:", err)
		os.Exit(1)
	}
}

func ratio(a, b float64) string {
	if b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", a/b)
}

func print(o options, e, f result) {
	fmt.Printf("Deployment server under load: %d agents reporting every second, %d listers every second, %.0f s each, loopback\n",
		o.agents, o.listers, e.DurationSeconds)
	fmt.Printf("%-28s %14s %14s %8s  %s\n", "metric", "esir", "floor", "ratio", "target")
	row := func(name string, a, b float64, format, target string) {
		fmt.Printf("%-28s %14s %14s %8s  %s\n", name, fmt.Sprintf(format, a), fmt.Sprintf(format, b), ratio(a, b), target)
	}
	row("reports/s", e.ReportRate, f.ReportRate, "%.1f", fmt.Sprintf(">= %d (1 per agent per s)", o.agents))
	row("report errors", float64(e.ReportErrors), float64(f.ReportErrors), "%.0f", "0")
	row("report p50 latency ms", e.ReportP50Ms, f.ReportP50Ms, "%.2f", "")
	row("report p99 latency ms", e.ReportP99Ms, f.ReportP99Ms, "%.2f", "< 50")
	row("report max latency ms", e.ReportMaxMs, f.ReportMaxMs, "%.2f", "")
	row("node lists", float64(e.Lists), float64(f.Lists), "%.0f", "")
	row("list p50 latency ms", e.ListP50Ms, f.ListP50Ms, "%.2f", fmt.Sprintf("(%d KiB per list)", e.ListBytes/1024))
	row("list p99 latency ms", e.ListP99Ms, f.ListP99Ms, "%.2f", "")
	row("requests/s", e.RequestRate, f.RequestRate, "%.1f", "")
	row("server CPU %", e.ServerCPUPct, f.ServerCPUPct, "%.1f", "(of one core)")
	row("server RSS MiB", e.ServerRSSMiB, f.ServerRSSMiB, "%.1f", "")
	row("server peak RSS MiB", e.ServerPeakMiB, f.ServerPeakMiB, "%.1f", "< 200")
	row("load generator CPU %", e.LoadGenCPUPct, f.LoadGenCPUPct, "%.1f", "(same machine, 2 cores)")
	row("host load average (1 min)", e.LoadAvg, f.LoadAvg, "%.1f", "(other processes competing for the cores)")
}
