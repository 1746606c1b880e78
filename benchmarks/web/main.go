// Command web benchmarks the web console with 5,000 nodes: server render
// time of the dashboard and the node list (p50/p99) beside the JSON API's
// node listing (the baseline: the same data without HTML), and live-update
// fan-out: 50 browsers' worth of SSE connections while 1,000 simulated
// agents report progress every second through the agent protocol, with the
// server's CPU use compared to the same load with no browser watching.
//
//	go run ./benchmarks/web [--nodes 5000] [--agents 1000] [--clients 50] [--seconds 15] [--json FILE]
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/server"
	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/store"
	"github.com/esir-project/esir/web"
)

type renderResult struct {
	Page  string  `json:"page"`
	N     int     `json:"requests"`
	P50ms float64 `json:"p50_ms"`
	P99ms float64 `json:"p99_ms"`
	Bytes int     `json:"bytes"`
}

type fanoutResult struct {
	Clients          int     `json:"clients"`
	Agents           int     `json:"agents"`
	Seconds          float64 `json:"seconds"`
	ReportsPerSec    float64 `json:"agent_reports_per_s"`
	MsgsPerClientSec float64 `json:"messages_per_client_per_s"`
	MaxMsgsPerSec    int     `json:"max_messages_in_any_second_per_client"`
	KBPerClientSec   float64 `json:"kb_per_client_per_s"`
	CPUBaseline      float64 `json:"cpu_cores_agents_only"`
	CPUWithClients   float64 `json:"cpu_cores_agents_and_clients"`
}

func main() {
	nodes := flag.Int("nodes", 5000, "nodes in the inventory")
	agents := flag.Int("agents", 1000, "agents reporting every second")
	clients := flag.Int("clients", 50, "SSE connections (browsers)")
	secs := flag.Int("seconds", 15, "length of each fan-out phase")
	reqs := flag.Int("requests", 200, "requests per rendered page")
	jsonOut := flag.String("json", "", "write results as JSON to FILE")
	flag.Parse()
	if err := run(*nodes, *agents, *clients, *secs, *reqs, *jsonOut); err != nil {
		fmt.Fprintln(os.Stderr, "benchmark web:", err)
		os.Exit(1)
	}
}

func run(nNodes, nAgents, nClients, secs, nReq int, jsonOut string) error {
	if nNodes > api.MaxPageSize {
		return fmt.Errorf("--nodes %d: at most %d (the JSON baseline reads every node in one API page)", nNodes, api.MaxPageSize)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir, err := os.MkdirTemp("", "esir-bench-web-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	storeDir, err := tinyImage(ctx, dir)
	if err != nil {
		return err
	}
	cfg := server.DefaultConfig()
	cfg.Listen, cfg.DataDir, cfg.ImageStore, cfg.SwarmListen = "127.0.0.1:0", filepath.Join(dir, "data"), storeDir, ""
	cfg.AdminTokenFile = filepath.Join(dir, "data", "token")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := server.New(ctx, cfg, log)
	if err != nil {
		return err
	}
	cfg = srv.Config()
	base := "http://" + srv.Addr().String()
	go srv.Run(ctx)
	tok, err := os.ReadFile(cfg.AdminTokenFile)
	if err != nil {
		return err
	}
	pw, err := os.ReadFile(filepath.Join(cfg.DataDir, web.PasswordFile))
	if err != nil {
		return err
	}
	// The inventory: nNodes nodes with hardware, written straight to the store.
	if err := populate(ctx, srv.API().Store(), nNodes); err != nil {
		return err
	}
	hc, err := login(base, strings.TrimSpace(string(pw)))
	if err != nil {
		return err
	}
	var renders []renderResult
	for _, p := range []struct{ name, path string }{
		{"dashboard", "/ui/"},
		{"node list (100/page)", "/ui/nodes"},
		{"node list, sorted by state, filtered", "/ui/nodes?sort=state&q=rack"},
		{fmt.Sprintf("node list (all %d rows)", nNodes), fmt.Sprintf("/ui/nodes?per=%d", nNodes)},
		{fmt.Sprintf("baseline: JSON API, all %d nodes", nNodes), fmt.Sprintf("/api/v1/nodes?limit=%d", nNodes)},
	} {
		r, err := measure(hc, base+p.path, strings.TrimSpace(string(tok)), nReq)
		if err != nil {
			return fmt.Errorf("%s: %w", p.name, err)
		}
		r.Page = p.name
		renders = append(renders, r)
	}

	// Fan-out: agents report every second; first alone, then watched.
	fleet, err := startAgents(ctx, base, strings.TrimSpace(string(tok)), srv, nAgents)
	if err != nil {
		return err
	}
	cpu0, t0 := cpuTime(), time.Now()
	time.Sleep(time.Duration(secs) * time.Second)
	cpuBase := (cpuTime() - cpu0).Seconds() / time.Since(t0).Seconds()
	rep0 := fleet.reports.Load()
	cctx, ccancel := context.WithCancel(ctx)
	stats := make([]*clientStats, nClients)
	var wg sync.WaitGroup
	for i := range stats {
		stats[i] = &clientStats{perSec: map[int64]int{}}
		wg.Add(1)
		go func(cs *clientStats) { defer wg.Done(); cs.watch(cctx, hc, base+"/ui/events?topic=nodes") }(stats[i])
	}
	time.Sleep(2 * time.Second) // connect and take the first full message
	for _, cs := range stats {
		cs.reset()
	}
	cpu1, t1 := cpuTime(), time.Now()
	time.Sleep(time.Duration(secs) * time.Second)
	el := time.Since(t1).Seconds()
	cpuWith := (cpuTime() - cpu1).Seconds() / el
	rep := float64(fleet.reports.Load()-rep0) / (el + 2)
	ccancel()
	wg.Wait()
	fleet.stop()
	f := fanoutResult{Clients: nClients, Agents: nAgents, Seconds: el, ReportsPerSec: rep, CPUBaseline: cpuBase, CPUWithClients: cpuWith}
	var msgs, bytes int64
	for _, cs := range stats {
		m, b, mx := cs.totals()
		msgs += m
		bytes += b
		f.MaxMsgsPerSec = max(f.MaxMsgsPerSec, mx)
	}
	f.MsgsPerClientSec = float64(msgs) / float64(nClients) / el
	f.KBPerClientSec = float64(bytes) / 1024 / float64(nClients) / el

	fmt.Printf("ESIR web console, %d nodes (render: %d requests each; p99 target < 100 ms)\n", nNodes, nReq)
	fmt.Printf("%-40s %10s %10s %10s %10s\n", "page", "p50 ms", "p99 ms", "KiB", "p99/API")
	api := renders[len(renders)-1]
	for _, r := range renders {
		fmt.Printf("%-40s %10.2f %10.2f %10.1f %10.2f\n", r.Page, r.P50ms, r.P99ms, float64(r.Bytes)/1024, r.P99ms/api.P99ms)
	}
	fmt.Printf("\nSSE fan-out: %d clients on topic nodes, %d agents reporting (%.0f reports/s), %.0f s\n", nClients, nAgents, f.ReportsPerSec, el)
	fmt.Printf("%-40s %10.2f (cap 4)\n", "messages per client per second", f.MsgsPerClientSec)
	fmt.Printf("%-40s %10d (cap 4)\n", "most messages in one second, any client", f.MaxMsgsPerSec)
	fmt.Printf("%-40s %10.1f\n", "KiB per client per second", f.KBPerClientSec)
	fmt.Printf("%-40s %10.2f\n", "process CPU cores, agents only", f.CPUBaseline)
	fmt.Printf("%-40s %10.2f  (x%.2f; +%.2f cores for %d clients)\n", "process CPU cores, agents + clients", f.CPUWithClients, f.CPUWithClients/max(f.CPUBaseline, 0.001), f.CPUWithClients-f.CPUBaseline, nClients)
	fmt.Println("(server and load generator share this process: CPU figures include both; the difference is the console's cost)")
	if jsonOut != "" {
		b, _ := json.MarshalIndent(map[string]any{"nodes": nNodes, "render": renders, "fanout": f}, "", "  ")
		if err := os.WriteFile(jsonOut, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func tinyImage(ctx context.Context, dir string) (string, error) {
	root := filepath.Join(dir, "root")
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(root, "etc", "hostname"), []byte("x\n"), 0o644); err != nil {
		return "", err
	}
	sd := filepath.Join(dir, "store")
	st, err := imaging.OpenStore(sd)
	if err != nil {
		return "", err
	}
	_, err = st.Build(ctx, root, imaging.BuildOptions{Name: "bench", Version: "1", Arch: "x86_64"})
	return sd, err
}

func mac(i int) string { return fmt.Sprintf("02:00:00:%02x:%02x:%02x", i>>16&255, i>>8&255, i&255) }

func populate(ctx context.Context, st store.Store, n int) error {
	now := time.Now().UTC()
	return st.Update(ctx, func(tx store.Tx) error {
		for i := 1; i <= n; i++ {
			inv := &agentapi.Inventory{Arch: "x86_64", CPU: agentapi.CPU{Model: "EPYC", Cores: 32, Threads: 64}, MemoryBytes: 256 << 30,
				Disks: []agentapi.Disk{{Name: "nvme0n1", Model: "SAMSUNG", Serial: fmt.Sprint("S", i), SizeBytes: 2 << 40}},
				NICs:  []agentapi.NIC{{Name: "eth0", MAC: mac(i), Driver: "mlx5_core"}}, Modules: []string{"mlx5_core", "nvme"}}
			nd := &deploy.Node{MAC: mac(i), Hostname: fmt.Sprintf("node%05d", i), Number: i, State: deploy.Discovered,
				Labels: map[string]string{"rack": fmt.Sprint("rack", i/40)}, Inventory: inv, Created: now, Updated: now, Changed: now}
			if err := tx.PutNode(nd); err != nil {
				return err
			}
		}
		return nil
	})
}

func login(base, pw string) (*http.Client, error) {
	jar, _ := cookiejar.New(nil)
	hc := &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		Transport: &http.Transport{MaxIdleConnsPerHost: 200}}
	resp, err := hc.Get(base + "/ui/login")
	if err != nil {
		return nil, err
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	m := regexp.MustCompile(`name="csrf" value="([^"]+)"`).FindSubmatch(b)
	if m == nil {
		return nil, fmt.Errorf("login page without csrf")
	}
	resp, err = hc.PostForm(base+"/ui/login", url.Values{"csrf": {string(m[1])}, "user": {"admin"}, "password": {pw}})
	if err != nil {
		return nil, err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusSeeOther {
		return nil, fmt.Errorf("login: status %d", resp.StatusCode)
	}
	return hc, nil
}

func measure(hc *http.Client, u, token string, n int) (renderResult, error) {
	var ds []time.Duration
	var size int
	for i := 0; i < n+5; i++ {
		req, _ := http.NewRequest(http.MethodGet, u, nil)
		if strings.Contains(u, "/api/") {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		t := time.Now()
		resp, err := hc.Do(req)
		if err != nil {
			return renderResult{}, err
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		d := time.Since(t)
		if err != nil || resp.StatusCode != 200 {
			return renderResult{}, fmt.Errorf("GET %s: status %d %v", u, resp.StatusCode, err)
		}
		if i >= 5 { // warm-up
			ds = append(ds, d)
			size = len(b)
		}
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	q := func(p float64) float64 {
		return float64(ds[min(int(p*float64(len(ds))), len(ds)-1)].Microseconds()) / 1000
	}
	return renderResult{N: len(ds), P50ms: q(0.5), P99ms: q(0.99), Bytes: size}, nil
}

type fleet struct {
	reports atomic.Int64
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

func (f *fleet) stop() { f.cancel(); f.wg.Wait() }

// startAgents registers n agents, puts them in one rollout and has each
// report fetching progress once a second.
func startAgents(ctx context.Context, base, token string, srv *server.Server, n int) (*fleet, error) {
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: n}}
	cls := make([]*agentapi.Client, n)
	var names []string
	for i := range cls {
		m := mac(i + 1)
		req, _ := http.NewRequest(http.MethodPost, base+"/api/v1/nodes/"+m+"/boot-token", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := hc.Do(req)
		if err != nil {
			return nil, err
		}
		var out struct{ Token string }
		json.NewDecoder(resp.Body).Decode(&out)
		resp.Body.Close()
		cls[i] = &agentapi.Client{Server: base, Token: out.Token, HTTP: hc}
		names = append(names, m)
	}
	if _, err := srv.API().Scheduler().Create(ctx, deploy.Spec{Image: "bench:1", Selector: deploy.Selector{Names: names}, BatchSize: n, NodeTimeout: deploy.Duration(time.Hour)}); err != nil {
		return nil, err
	}
	fctx, cancel := context.WithCancel(ctx)
	f := &fleet{cancel: cancel}
	ready := make(chan error, n)
	for i, c := range cls {
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			m := mac(i + 1)
			var asg *agentapi.Assignment
			for asg == nil {
				r, err := c.Register(fctx, agentapi.RegisterRequest{MAC: m})
				if err != nil {
					ready <- err
					return
				}
				asg = r.Assignment
				if asg == nil {
					time.Sleep(200 * time.Millisecond)
				}
			}
			ready <- nil
			tick := time.NewTicker(time.Second)
			defer tick.Stop()
			const total = 1 << 30
			for seq := int64(1); ; seq++ {
				b := min(seq*(4<<20), total)
				_, err := c.Events(fctx, agentapi.EventBatch{MAC: m, Assignment: asg.ID, Events: []agentapi.Event{{Seq: seq, Phase: agentapi.PhaseFetching,
					Bytes: b, Total: total, Rate: 4 << 20, Peers: 6, Have: &agentapi.Have{Emitted: seq * 50, Sent: seq * 5}}}})
				if err == nil {
					f.reports.Add(1)
				}
				select {
				case <-fctx.Done():
					return
				case <-tick.C:
				}
			}
		}()
	}
	for range cls {
		if err := <-ready; err != nil {
			f.stop()
			return nil, fmt.Errorf("agent register: %w", err)
		}
	}
	time.Sleep(2 * time.Second)
	return f, nil
}

type clientStats struct {
	mu     sync.Mutex
	msgs   int64
	bytes  int64
	perSec map[int64]int
}

func (cs *clientStats) reset() {
	cs.mu.Lock()
	cs.msgs, cs.bytes, cs.perSec = 0, 0, map[int64]int{}
	cs.mu.Unlock()
}

func (cs *clientStats) totals() (int64, int64, int) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	mx := 0
	for _, v := range cs.perSec {
		mx = max(mx, v)
	}
	return cs.msgs, cs.bytes, mx
}

func (cs *clientStats) watch(ctx context.Context, hc *http.Client, u string) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := hc.Do(req)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) > 6 && string(line[:6]) == "data: " {
			cs.mu.Lock()
			cs.msgs++
			cs.bytes += int64(len(line))
			cs.perSec[time.Now().Unix()]++
			cs.mu.Unlock()
		}
	}
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
