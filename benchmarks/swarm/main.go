// Command swarm benchmarks ESIR's image distribution: N nodes as network
// namespaces on a bridge, every link (the server's too) shaped to the same
// rate, the same image sent by (a) ESIR BitTorrent with adaptive HAVE
// suppression, (b) ESIR BitTorrent with suppression off, (c) HTTP unicast
// from the server (every node downloads the whole image with curl) and
// (d) udpcast reliable multicast, against (e) the bound F/B of one link.
// It prints a table per N, writes --json and a PNG plot of time against N.
//
// Run as root: go run ./benchmarks/swarm --n 8,16,32 --rate 10 --size 12
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/netlab"
	"github.com/esir-project/esir/swarm"
	"github.com/esir-project/esir/swarm/havewire"
)

type method struct {
	Name        string  `json:"method"`
	N           int     `json:"n"`
	LastSec     float64 `json:"last_node_s"`
	MedianSec   float64 `json:"median_node_s"`
	ServerBytes int64   `json:"server_bytes"`
	// InfoFromServer and InfoFromPeers count the nodes that took the info
	// dictionary from the server and from another node.
	InfoFromServer int   `json:"info_from_server,omitempty"`
	InfoFromPeers  int   `json:"info_from_peers,omitempty"`
	HaveMsgs       int64 `json:"have_messages"`
	HavePeak       int64 `json:"have_peak_per_s"`
	HaveEmitted    int64 `json:"have_emitted"`
	// DelayP50Ms and DelayP99Ms are receiver-side: from a piece's
	// completion on one node until a peer lacking it read a HAVE or BITFIELD
	// update for it from that node (nodes share the host clock).
	DelayP50Ms  float64 `json:"piece_info_delay_p50_ms"`
	DelayP99Ms  float64 `json:"piece_info_delay_p99_ms"`
	DelayMaxMs  float64 `json:"piece_info_delay_max_ms"`
	DelayEvents int     `json:"piece_info_events"`
	HoldP99Ms   float64 `json:"sender_hold_p99_ms"`
	// EmitP99Ms is the worst node's p99 from a piece's completion to the
	// library writing its HAVE (the sender library's share of the delay).
	EmitP99Ms float64 `json:"sender_emit_p99_ms"`
	HostCPU   float64 `json:"host_cpu_pct"`
	OwnCPUSec float64 `json:"own_cpu_s"`
	HostBound bool    `json:"host_bound"`
	// OwnCPUPct is the method's own processes' CPU time as a share of all
	// the host's CPUs over the run.
	OwnCPUPct float64 `json:"own_cpu_pct"`
	// Bottleneck names what limited the run: the host's CPUs (busy with
	// this method's processes, or over 85% busy with other work) or the links.
	Bottleneck    string  `json:"bottleneck,omitempty"`
	FromPeersFrac float64 `json:"bytes_from_peers_frac"`
	// NetOneWayP50Ms and NetOneWayP99Ms are the links' own delay during an
	// ESIR run: half the round-trip time of pings from node 1 to node 2
	// every 100 ms (through node 1's upload queue and node 2's download
	// queue, and back). A HAVE crosses the same two queues: this is the
	// floor under any piece-information delay on this test bed.
	NetOneWayP50Ms float64 `json:"net_one_way_p50_ms,omitempty"`
	NetOneWayP99Ms float64 `json:"net_one_way_p99_ms,omitempty"`
	NetPingLoss    float64 `json:"net_ping_loss,omitempty"`
	// NodeTCPSegs and NodeTCPRetrans are TCP segments the nodes sent and
	// how many of them were retransmissions; LinkDrops counts packets the
	// links' queues dropped, UplinkDrops those on the nodes' own uplinks.
	NodeTCPSegs    int64  `json:"node_tcp_segments,omitempty"`
	NodeTCPRetrans int64  `json:"node_tcp_retransmissions,omitempty"`
	LinkDrops      int64  `json:"link_drops,omitempty"`
	UplinkDrops    int64  `json:"uplink_drops,omitempty"`
	Err            string `json:"error,omitempty"`
}

type config struct {
	ns       []int
	rateMbit float64
	mtu      int
	size     int64
	bin      string
	work     string
	timeout  time.Duration
	// serverConns bounds the server seeder's peer connections (0: default).
	serverConns int
	// seeding is the server's seeding policy (initial or full).
	seeding string
	// profile, when set, is a directory for a CPU profile of node 0's agent.
	profile string
	// timeline prints, per ESIR run, each second's aggregate download rate
	// and the server's upload rate.
	timeline bool
	pieceLen int64
	// serverFlags and agentFlags are extra flags for esir swarm serve and
	// esir-agent fetch (experiments with their tuning).
	serverFlags, agentFlags []string
	// pace, when above 0, caps every ESIR process's upload at this share
	// of the link rate (--upload-rate), as udp-sender is told its rate.
	pace float64
}

// uploadRate is the --pace share of the link rate in bytes per second.
func (c config) uploadRate() int64 { return int64(c.pace * c.rateMbit * 1e6 / 8) }

// paceArgs is the --upload-rate flag for the server and every agent, or
// nothing when unpaced.
func (c config) paceArgs() []string {
	if c.pace <= 0 {
		return nil
	}
	return []string{"--upload-rate", strconv.FormatInt(c.uploadRate(), 10)}
}

func main() {
	var (
		nsFlag    = flag.String("n", "8,16,32", "node counts")
		rateMbit  = flag.Float64("rate", 10, "link rate B in Mbit/s (every link, the server's too)")
		mtu       = flag.Int("mtu", 1500, "MTU of every link (9000: jumbo frames)")
		sizeMiB   = flag.Int64("size", 12, "image size in MiB (incompressible)")
		jsonOut   = flag.String("json", "", "write the results as JSON to this file")
		pngOut    = flag.String("png", "benchmarks/swarm/time-vs-n.png", "write the plot here (needs gnuplot)")
		timeout   = flag.Duration("timeout", 7*time.Minute, "hard limit per method and N")
		methods   = flag.String("methods", "adaptive,off,http,udpcast", "methods to run (redundant: ESIR with --have-mode redundant, only redundant HAVEs dropped)")
		srvConns  = flag.Int("server-conns", 0, "bound the server seeder's peer connections (0: the default)")
		seeding   = flag.String("seeding", "initial", "server seeding policy: initial (BEP 16 style) or full")
		profile   = flag.String("profile", "", "write a CPU profile of node 0's agent per ESIR run into this directory")
		srvFlags  = flag.String("server-flags", "", "extra flags for esir swarm serve, space-separated")
		agtFlags  = flag.String("agent-flags", "", "extra flags for esir-agent fetch, space-separated")
		pieceFlag = flag.Int64("piece", 0, "piece size in KiB (0: what esir image build chooses)")
		plotFrom  = flag.String("plot-from", "", "only redraw --png from a --json file of an earlier run")
		haveFrom  = flag.String("have-vs-rate", "", "only compare HAVE modes across --json files of earlier runs at different --rate (comma-separated): print a table and draw --png")
		httpMaxN  = flag.Int("http-max-n", 0, "run HTTP unicast only up to this N (0: every N); it takes N x F/B")
		pace      = flag.Float64("pace", 0, "cap each ESIR process's upload at this share of B, in payload bytes (0: no cap; udp-sender runs at 0.95)")
		timeline  = flag.Bool("timeline", false, "print each ESIR run's per-second download and server upload rates")
	)
	flag.Parse()
	if *haveFrom != "" {
		runs, err := readRateRuns(strings.Split(*haveFrom, ","))
		if err != nil {
			fail(err)
		}
		pts := haveVsRate(runs, 0)
		printHaveVsRate(pts)
		if *pngOut != "" {
			if err := plotHaveVsRate(*pngOut, pts); err != nil {
				fail(err)
			}
			fmt.Println("plot:", *pngOut)
		}
		return
	}
	if *plotFrom != "" {
		b, err := os.ReadFile(*plotFrom)
		if err != nil {
			fail(err)
		}
		var r struct {
			Results []method `json:"results"`
		}
		if err := json.Unmarshal(b, &r); err != nil {
			fail(fmt.Errorf("%s: %w", *plotFrom, err))
		}
		if err := plot(*pngOut, r.Results); err != nil {
			fail(err)
		}
		return
	}
	if err := netlab.Available(); err != nil {
		fmt.Fprintln(os.Stderr, "swarm benchmark:", err)
		os.Exit(2)
	}
	cfg := config{rateMbit: *rateMbit, mtu: *mtu, size: *sizeMiB << 20, timeout: *timeout, serverConns: *srvConns,
		seeding: *seeding, profile: *profile, timeline: *timeline, pace: *pace,
		serverFlags: strings.Fields(*srvFlags), agentFlags: strings.Fields(*agtFlags)}
	for _, s := range strings.Split(*nsFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 || n > 200 {
			fmt.Fprintf(os.Stderr, "swarm benchmark: --n %q: want counts between 1 and 200\n", s)
			os.Exit(2)
		}
		cfg.ns = append(cfg.ns, n)
	}
	// On SIGINT/SIGTERM the running method's context ends and its lab is
	// torn down before exit.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	work, err := os.MkdirTemp("", "esir-swarm-bench-")
	if err != nil {
		fail(err)
	}
	defer os.RemoveAll(work)
	cfg.work = work
	cfg.bin = filepath.Join(work, "bin")
	for _, c := range []string{"esir", "esir-agent"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(cfg.bin, c), "./cmd/"+c)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			fail(fmt.Errorf("building %s (run from the repository root): %w: %s", c, err, out))
		}
	}
	img, archive := buildImage(ctx, work, cfg.size, *pieceFlag<<10)
	cfg.pieceLen = pieceKiB(archive) << 10
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		fmt.Printf("load average at start: %s", b)
	}
	fmt.Printf("image %s: %d bytes, piece %d KiB; links %g Mbit/s, MTU %d (tbf, no delay: this kernel has no netem); %d CPUs\n",
		img.Ref(), img.Size, pieceKiB(archive), cfg.rateMbit, cfg.mtu, cpus())
	bound := float64(img.Size) * 8 / (cfg.rateMbit * 1e6)
	var all []method
	for _, n := range cfg.ns {
		var rows []method
		for _, m := range strings.Split(*methods, ",") {
			if ctx.Err() != nil {
				break
			}
			if m == "http" && *httpMaxN > 0 && n > *httpMaxN {
				// Unicast from one link is N x F/B by construction; past
				// --http-max-n the run would take longer than it tells.
				rows = append(rows, method{Name: m, N: n,
					Err: fmt.Sprintf("not run (--http-max-n %d): would take at least N x F/B = %.0f s", *httpMaxN, float64(n)*bound)})
				continue
			}
			r := run(ctx, cfg, m, n, img, archive)
			rows = append(rows, r)
			fmt.Fprintf(os.Stderr, "N=%d %s: last %.1fs %s\n", n, m, r.LastSec, r.Err)
		}
		rows = append(rows, method{Name: "bound F/B", N: n, LastSec: bound, MedianSec: bound})
		printTable(n, rows, bound, img.Size)
		all = append(all, rows...)
	}
	printSummary(all, bound)
	if *jsonOut != "" {
		b, _ := json.MarshalIndent(map[string]any{"image_bytes": img.Size, "rate_mbit": cfg.rateMbit, "mtu": cfg.mtu, "bound_s": bound, "results": all}, "", "  ")
		if err := os.WriteFile(*jsonOut, b, 0o644); err != nil {
			fail(err)
		}
	}
	if *pngOut != "" {
		if err := plot(*pngOut, all); err != nil {
			fmt.Fprintln(os.Stderr, "swarm benchmark: plot:", err)
		} else {
			fmt.Println("plot:", *pngOut)
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "swarm benchmark:", err)
	os.Exit(1)
}

func cpus() int { return runtime.NumCPU() }

// childCPU returns the CPU time used by waited-for child processes.
func childCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func pieceKiB(archive string) int64 {
	st, err := imaging.OpenStore(filepath.Dir(filepath.Dir(filepath.Dir(filepath.Dir(archive)))))
	if err != nil {
		return 0
	}
	im, err := st.Get("bench:1")
	if err != nil {
		return 0
	}
	return im.Manifest.PieceLength >> 10
}

// buildImage builds an image of one incompressible file in a fresh store.
func buildImage(ctx context.Context, work string, size, pieceLen int64) (*swarm.Image, string) {
	root := filepath.Join(work, "root", "data")
	if err := os.MkdirAll(root, 0o755); err != nil {
		fail(err)
	}
	f, err := os.Create(filepath.Join(root, "blob"))
	if err != nil {
		fail(err)
	}
	buf := make([]byte, 1<<20)
	for left := size; left > 0; left -= int64(len(buf)) {
		rand.Read(buf)
		f.Write(buf[:min(int64(len(buf)), left)])
	}
	f.Close()
	st, err := imaging.OpenStore(filepath.Join(work, "store"))
	if err != nil {
		fail(err)
	}
	im, err := st.Build(ctx, filepath.Join(work, "root"), imaging.BuildOptions{Name: "bench", Version: "1", PieceLength: pieceLen})
	if err != nil {
		fail(err)
	}
	img, err := swarm.ImageFromStore(im)
	if err != nil {
		fail(err)
	}
	return img, im.ArchivePath()
}

// cpuTicks returns busy and total jiffies from /proc/stat.
func cpuTicks() (busy, total int64) {
	b, _ := os.ReadFile("/proc/stat")
	line, _, _ := strings.Cut(string(b), "\n")
	for i, f := range strings.Fields(line)[1:] {
		v, _ := strconv.ParseInt(f, 10, 64)
		total += v
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return busy, total
}

type lab struct {
	l      *netlab.Lab
	server *netlab.Host
	nodes  []*netlab.Host
}

func newLab(ctx context.Context, n int, rate float64, mtu int) (*lab, error) {
	l, err := netlab.New(ctx, "swbench")
	if err != nil {
		return nil, err
	}
	link := netlab.Link{RateMbit: rate}
	if mtu != 1500 {
		link.MTU = mtu
	}
	s, err := l.AddHost(ctx, "srv", netip.MustParsePrefix("198.18.0.1/16"), link)
	if err != nil {
		l.Close()
		return nil, err
	}
	lb := &lab{l: l, server: s}
	for i := range n {
		addr := netip.AddrFrom4([4]byte{198, 18, byte(1 + (i+10)/250), byte((i + 10) % 250)})
		h, err := l.AddHost(ctx, fmt.Sprintf("n%d", i), netip.PrefixFrom(addr, 16), link)
		if err != nil {
			l.Close()
			return nil, err
		}
		lb.nodes = append(lb.nodes, h)
	}
	return lb, nil
}

func run(ctx context.Context, cfg config, name string, n int, img *swarm.Image, archive string) method {
	m := method{Name: name, N: n}
	if name == "adaptive" || name == "redundant" || name == "off" {
		m.Name = "esir-bt " + name
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.timeout)
	defer cancel()
	lb, err := newLab(ctx, n, cfg.rateMbit, cfg.mtu)
	if err != nil {
		m.Err = err.Error()
		return m
	}
	defer lb.l.Close()
	dir := filepath.Join(cfg.work, fmt.Sprintf("%s-%d", name, n))
	os.MkdirAll(dir, 0o755)
	b0, t0 := cpuTicks()
	c0 := childCPU()
	var times []float64
	switch name {
	case "adaptive", "redundant", "off":
		times, err = runESIR(ctx, cfg, lb, name, dir, &m)
	case "http":
		times, err = runHTTP(ctx, cfg, lb, dir, img, &m)
	case "udpcast":
		times, err = runUDPCast(ctx, cfg, lb, dir, archive, &m)
	default:
		err = fmt.Errorf("unknown method %q", name)
	}
	b1, t1 := cpuTicks()
	m.OwnCPUSec = (childCPU() - c0).Seconds()
	if t1 > t0 {
		m.HostCPU = 100 * float64(b1-b0) / float64(t1-t0)
		m.HostBound = m.HostCPU > 85
		wall := float64(t1-t0) / float64(cpus()) / 100 // jiffies at 100 Hz
		if wall > 0 {
			m.OwnCPUPct = 100 * m.OwnCPUSec / (wall * float64(cpus()))
		}
		switch {
		case m.OwnCPUPct > 70:
			m.Bottleneck = "host (this method's processes)"
		case m.HostBound:
			m.Bottleneck = "host (other work on the machine)"
		default:
			m.Bottleneck = "links"
		}
	}
	if err != nil {
		m.Err = err.Error()
		return m
	}
	// Every node's copy must be byte-identical.
	want, _ := os.ReadFile(archive)
	for i := range n {
		got, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("out%d", i)))
		if err != nil || !bytes.Equal(got, want) {
			m.Err = fmt.Sprintf("node %d: copy differs from the image", i)
		}
	}
	slices.Sort(times)
	m.LastSec = times[len(times)-1]
	m.MedianSec = times[len(times)/2]
	return m
}

// waitFiles polls until every path exists, returning when each appeared.
func waitFiles(ctx context.Context, start time.Time, paths []string) ([]float64, error) {
	times := make([]float64, len(paths))
	left := len(paths)
	for left > 0 {
		for i, p := range paths {
			if times[i] == 0 {
				if _, err := os.Stat(p); err == nil {
					times[i] = time.Since(start).Seconds()
					left--
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%d of %d nodes unfinished: %w", left, len(paths), ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return times, nil
}

func runESIR(ctx context.Context, cfg config, lb *lab, mode, dir string, m *method) ([]float64, error) {
	srv := lb.server.Command(ctx, filepath.Join(cfg.bin, "esir"), "swarm", "serve", "--store", filepath.Join(cfg.work, "store"),
		"--listen", "198.18.0.1:8080", "--peer-listen", "198.18.0.1:6881", "--have-mode", mode, "--log-level", "warn",
		"--max-conns", strconv.Itoa(cfg.serverConns), "--seeding", cfg.seeding)
	srv.Args = append(srv.Args, cfg.paceArgs()...)
	srv.Args = append(srv.Args, cfg.serverFlags...)
	srvLog, _ := os.Create(filepath.Join(dir, "server.log"))
	srv.Stderr = srvLog
	if err := srv.Start(); err != nil {
		return nil, err
	}
	defer func() { srv.Process.Signal(syscall.SIGTERM); srv.Wait() }()
	if err := waitHTTP(ctx, lb.nodes[0], "http://198.18.0.1:8080/swarm/images"); err != nil {
		return nil, err
	}
	var agents []*exec.Cmd
	var results []string
	start := time.Now()
	for i, h := range lb.nodes {
		res := filepath.Join(dir, fmt.Sprintf("result%d.json", i))
		results = append(results, res)
		a := h.Command(ctx, filepath.Join(cfg.bin, "esir-agent"), "fetch", "--server", "http://198.18.0.1:8080",
			"--image", "bench:1", "--out", filepath.Join(dir, fmt.Sprintf("out%d", i)), "--listen", h.IP().String()+":6881",
			"--have-mode", mode, "--seed-for", "0", "--progress", "none", "--result", res, "--log-level", "warn",
			"--webseed-after", "-1s")
		a.Args = append(a.Args, cfg.paceArgs()...)
		a.Args = append(a.Args, cfg.agentFlags...)
		if i == 0 && cfg.profile != "" {
			os.MkdirAll(cfg.profile, 0o755)
			a.Args = append(a.Args, "--cpuprofile", filepath.Join(cfg.profile, fmt.Sprintf("%s-%d.pprof", mode, len(lb.nodes))))
		}
		lg, _ := os.Create(filepath.Join(dir, fmt.Sprintf("agent%d.log", i)))
		a.Stderr = lg
		if err := a.Start(); err != nil {
			return nil, err
		}
		agents = append(agents, a)
	}
	netBefore := nodesNet(ctx, lb)
	ping := startPing(ctx, lb)
	var srvTx, srvData []int64
	var nodeTx [][]int64 // per sample, per node
	stopSample := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		if !cfg.timeline {
			return
		}
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			row := txBytes(ctx, lb, append([]*netlab.Host{lb.server}, lb.nodes...))
			srvTx = append(srvTx, row[0])
			nodeTx = append(nodeTx, row[1:])
			srvData = append(srvData, serverDataSent(ctx, lb))
			select {
			case <-stopSample:
				return
			case <-tick.C:
			}
		}
	}()
	times, err := waitFiles(ctx, start, results)
	close(stopSample)
	<-sampled
	m.NetOneWayP50Ms, m.NetOneWayP99Ms, m.NetPingLoss = ping()
	if out, e := lb.server.Run(ctx, "cat", "/proc/net/snmp"); e == nil {
		seg := procNetCounters(string(out), "Tcp:")
		if n := seg["TcpOutSegs"]; n > 0 {
			fmt.Printf("server TCP: %d segments sent, %d of them retransmissions (%.1f%%)\n",
				n, seg["TcpRetransSegs"], 100*float64(seg["TcpRetransSegs"])/float64(n))
		}
	}
	if d := nodesNet(ctx, lb).minus(netBefore); d.tcp["TcpOutSegs"] > 0 {
		m.NodeTCPSegs, m.NodeTCPRetrans = d.tcp["TcpOutSegs"], d.tcp["TcpRetransSegs"]
		m.LinkDrops, m.UplinkDrops = d.drops+d.upDrops, d.upDrops
		fmt.Printf("nodes TCP: %d segments sent, %d of them retransmissions (%.2f%%: %d fast, %d after a timeout, %d SYNs, %d tail-loss probes; %d reported spurious by D-SACK); the links dropped %d packets, %d of them on the nodes' uplinks\n",
			m.NodeTCPSegs, m.NodeTCPRetrans, 100*float64(m.NodeTCPRetrans)/float64(m.NodeTCPSegs), d.tcp["TCPFastRetrans"],
			d.tcp["TCPTimeouts"], d.tcp["TCPSynRetrans"], d.tcp["TCPLossProbes"], d.tcp["TCPDSACKRecv"], m.LinkDrops, m.UplinkDrops)
	}
	// Server bytes before the agents stop.
	if sent := serverDataSent(ctx, lb); sent >= 0 {
		m.ServerBytes = sent
	}
	var wg sync.WaitGroup
	for _, a := range agents {
		a.Process.Signal(syscall.SIGTERM)
		wg.Add(1)
		go func() { defer wg.Done(); a.Wait() }()
	}
	wg.Wait()
	if err != nil {
		return nil, err
	}
	var perSec []int64
	var p99s []float64
	var fromPeers, total int64
	var logs []swarm.Result
	for _, res := range results {
		b, err := os.ReadFile(res)
		if err != nil {
			return nil, err
		}
		var r swarm.Result
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("%s: %w", res, err)
		}
		m.HaveMsgs += r.Have.Total.Messages()
		m.HaveEmitted += r.Have.Total.Emitted
		for i, v := range r.Have.PerSecond {
			for len(perSec) <= i {
				perSec = append(perSec, 0)
			}
			perSec[i] += v
		}
		p99s = append(p99s, r.Have.HoldP99.Seconds()*1000)
		m.EmitP99Ms = max(m.EmitP99Ms, r.Have.EmitP99.Seconds()*1000)
		logs = append(logs, r)
		if r.InfoFrom == "server" {
			m.InfoFromServer++
		} else {
			m.InfoFromPeers++
		}
		for ip, v := range r.From {
			total += v
			if ip != "198.18.0.1" {
				fromPeers += v
			}
		}
	}
	for _, v := range perSec {
		m.HavePeak = max(m.HavePeak, v)
	}
	slices.Sort(p99s)
	m.HoldP99Ms = p99s[len(p99s)-1]
	fmt.Printf("nodes: %d took the info dictionary from the server, %d from another node\n", m.InfoFromServer, m.InfoFromPeers)
	if cfg.timeline {
		printTimeline(mode, start, lb, logs, srvTx, srvData, nodeTx, cfg.rateMbit, cfg.pieceLen)
	}
	delays := pieceInfoDelays(lb, logs)
	m.DelayEvents = len(delays)
	if len(delays) > 0 {
		m.DelayP50Ms = delays[len(delays)/2]
		m.DelayP99Ms = delays[(len(delays)*99)/100]
		m.DelayMaxMs = delays[len(delays)-1]
	}
	if total > 0 {
		m.FromPeersFrac = float64(fromPeers) / float64(total)
	}
	return times, nil
}

var pingTime = regexp.MustCompile(`icmp_seq=(\d+) .*time=([0-9.]+) ms`)

// startPing pings node 2 from node 1 every 100 ms until the returned
// function is called; that returns half the round trip's p50 and p99 in
// milliseconds and the share of pings unanswered (zeros with fewer than two
// nodes or when ping fails).
func startPing(ctx context.Context, lb *lab) func() (p50, p99, loss float64) {
	none := func() (float64, float64, float64) { return 0, 0, 0 }
	if len(lb.nodes) < 2 {
		return none
	}
	cmd := lb.nodes[0].Command(ctx, "ping", "-n", "-i", "0.1", "-W", "5", lb.nodes[1].IP().String())
	var out bytes.Buffer
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		return none
	}
	return func() (float64, float64, float64) {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		var rtts []float64
		maxSeq := 0
		for _, m := range pingTime.FindAllStringSubmatch(out.String(), -1) {
			seq, _ := strconv.Atoi(m[1])
			maxSeq = max(maxSeq, seq)
			v, _ := strconv.ParseFloat(m[2], 64)
			rtts = append(rtts, v/2)
		}
		if len(rtts) == 0 {
			return none()
		}
		slices.Sort(rtts)
		return rtts[len(rtts)/2], rtts[len(rtts)*99/100], 1 - float64(len(rtts))/float64(maxSeq)
	}
}

// txBytes reads every host's transmit counter at once, as the receive
// counter of its link's switch-side end (one process per sample, however
// many hosts), in the order of hosts.
func txBytes(ctx context.Context, lb *lab, hosts []*netlab.Host) []int64 {
	out := make([]int64, len(hosts))
	b, err := exec.CommandContext(ctx, "ip", "netns", "exec", lb.l.Switch, "cat", "/proc/net/dev").Output()
	if err != nil {
		return out
	}
	rx := map[string]int64{}
	for _, line := range strings.Split(string(b), "\n") {
		name, rest, ok := strings.Cut(line, ":")
		if f := strings.Fields(rest); ok && len(f) > 0 {
			rx[strings.TrimSpace(name)], _ = strconv.ParseInt(f[0], 10, 64)
		}
	}
	for i, h := range hosts {
		peer := "v" + lb.l.Name() + h.Name
		out[i] = rx[peer[:min(len(peer), 15)]]
	}
	return out
}

// netCounts are the nodes' TCP counters (Tcp and TcpExt of
// /proc/net/snmp and /proc/net/netstat, summed) and their links' drops.
type netCounts struct {
	tcp            map[string]int64
	upDrops, drops int64
}

func (a netCounts) minus(b netCounts) netCounts {
	d := netCounts{tcp: map[string]int64{}, upDrops: a.upDrops - b.upDrops, drops: a.drops - b.drops}
	for k, v := range a.tcp {
		d.tcp[k] = v - b.tcp[k]
	}
	return d
}

// nodesNet sums the nodes' TCP counters, read in each node's namespace, and
// the packets their links' qdiscs dropped: uplinks in the nodes' namespaces,
// downlinks (the bridge side, the server's too) in the switch's.
func nodesNet(ctx context.Context, lb *lab) netCounts {
	c := netCounts{tcp: map[string]int64{}}
	for _, h := range lb.nodes {
		for _, f := range []string{"/proc/net/snmp", "/proc/net/netstat"} {
			if out, err := h.Run(ctx, "cat", f); err == nil {
				for k, v := range procNetCounters(string(out), "Tcp:", "TcpExt:") {
					c.tcp[k] += v
				}
			}
		}
		if out, err := h.Run(ctx, "tc", "-s", "qdisc", "show"); err == nil {
			c.upDrops += qdiscDrops(string(out))
		}
	}
	if out, err := exec.CommandContext(ctx, "ip", "netns", "exec", lb.l.Switch, "tc", "-s", "qdisc", "show").Output(); err == nil {
		c.drops += qdiscDrops(string(out))
	}
	return c
}

// procNetCounters parses /proc/net/snmp or /proc/net/netstat, where each
// group is a line of names and a line of values, for the groups named by
// prefixes ("Tcp:"); a TcpExt name is returned as is, a Tcp one prefixed
// "Tcp" (OutSegs: TcpOutSegs), as nstat names them.
func procNetCounters(out string, prefixes ...string) map[string]int64 {
	m := map[string]int64{}
	names := map[string][]string{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || !slices.Contains(prefixes, f[0]) {
			continue
		}
		n, ok := names[f[0]]
		if !ok {
			names[f[0]] = f
			continue
		}
		delete(names, f[0])
		for i := 1; i < len(f) && i < len(n); i++ {
			v, err := strconv.ParseInt(f[i], 10, 64)
			if err != nil {
				continue
			}
			k := n[i]
			if f[0] == "Tcp:" {
				k = "Tcp" + k
			}
			m[k] = v
		}
	}
	return m
}

// qdiscDrops sums the "dropped N" figures of tc -s qdisc show.
func qdiscDrops(out string) int64 {
	var n int64
	f := strings.Fields(out)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "(dropped" || f[i] == "dropped" {
			v, _ := strconv.ParseInt(strings.TrimSuffix(f[i+1], ","), 10, 64)
			n += v
		}
	}
	return n
}

// serverDataSent asks the server, from inside its own namespace (no shaped
// link crossed), how many piece bytes it has sent; -1 when it does not say.
func serverDataSent(ctx context.Context, lb *lab) int64 {
	out, err := lb.server.Run(ctx, "curl", "-sf", "http://198.18.0.1:8080/swarm/stats")
	var st swarm.Stats
	if err != nil || json.Unmarshal(out, &st) != nil {
		return -1
	}
	return st.BytesSent
}

// printTimeline prints, for each second of an ESIR run, the pieces the nodes
// completed (as a share of the swarm's upload capacity, (N+1) links) and
// the server's upload as a share of its link.
func printTimeline(mode string, start time.Time, lb *lab, logs []swarm.Result, srvTx, srvData []int64, nodeTx [][]int64, rateMbit float64, pieceLen int64) {
	var perSec, firstPerSec []int
	first := map[uint32]int64{} // each piece's first completion on any node
	sec := func(at int64) int { return max(int((at-start.UnixNano())/1e9), 0) }
	for _, r := range logs {
		for p, at := range r.Pieces.Completed[r.Image.InfoHash] {
			s := sec(at)
			for len(perSec) <= s {
				perSec = append(perSec, 0)
			}
			perSec[s]++
			if f, ok := first[p]; !ok || at < f {
				first[p] = at
			}
		}
	}
	firstPerSec = make([]int, len(perSec))
	var lastFirst int64
	for _, at := range first {
		firstPerSec[sec(at)]++
		lastFirst = max(lastFirst, at)
	}
	link := rateMbit * 1e6 / 8
	var up, useful, fromServer, tx, wasted int64
	var steals havewire.StealCounters
	lib := map[string]int64{}
	for _, r := range logs {
		up += r.Uploaded
		wasted += r.Wasted
		steals.Held += r.Have.Steals.Held
		steals.Saved += r.Have.Steals.Saved
		steals.Released += r.Have.Steals.Released
		for k, v := range r.Library {
			lib[k] += v
		}
		for ip, v := range r.From {
			if ip != "198.18.0.1" {
				useful += v
			} else {
				fromServer += v
			}
		}
	}
	if len(nodeTx) > 1 {
		for i := range nodeTx[0] {
			tx += nodeTx[len(nodeTx)-1][i] - nodeTx[0][i]
		}
	}
	fmt.Printf("nodes: %d piece bytes uploaded, %d useful bytes received from peers (%.2f), %d bytes on the wire (%.2f)\n",
		up, useful, float64(useful)/float64(max(up, 1)), tx, float64(useful)/float64(max(tx, 1)))
	if n := len(srvData); n > 0 && srvData[n-1] > 0 {
		wire := srvTx[len(srvTx)-1] - srvTx[0]
		fmt.Printf("server: %d piece bytes sent (at the last sample), %d useful at the nodes (%.2f), %d bytes on its link (piece bytes / link bytes %.2f)\n",
			srvData[n-1], fromServer, float64(fromServer)/float64(srvData[n-1]), wire, float64(srvData[n-1])/float64(max(wire, 1)))
	}
	fmt.Printf("nodes: %d piece bytes received and not needed; library: %d cancels written, %d cancels received for chunks already sent, %d rejects written\n",
		wasted, lib["messages written of type Cancel"], lib["unexpected cancels received"], lib["messages written of type Reject"])
	fmt.Printf("nodes: requests moved between connections and held for the first one's answer: %d, of which the chunk came there %d, sent on %d\n",
		steals.Held, steals.Saved, steals.Released)
	if len(first) > 0 {
		// Every piece leaves the server at least once, so the server's link
		// paces the whole swarm: no node can finish before a first copy of
		// every piece exists.
		at := float64(lastFirst-start.UnixNano()) / 1e9
		sent := ""
		if s := int(at) + 1; s < len(srvData) && srvData[s] >= 0 {
			sent = fmt.Sprintf("; by then the server had sent %.2f x F of piece data", float64(srvData[s])/float64(int64(len(first))*pieceLen))
		}
		fmt.Printf("nodes: a first copy of all %d pieces in the swarm after %.1f s (the server's link alone: F/B = %.1f s)%s\n",
			len(first), at, float64(int64(len(first))*pieceLen)/link, sent)
	}
	fmt.Printf("timeline %s N=%d (piece %d KiB): second, pieces completed, first copies of pieces, swarm download / (N+1) links, server upload / link, server piece data / link, node uploads / link (min median max)\n",
		mode, len(lb.nodes), pieceLen>>10)
	for s, c := range perSec {
		srv := ""
		if s+1 < len(srvTx) {
			srv = fmt.Sprintf("%5.0f%%", 100*float64(srvTx[s+1]-srvTx[s])/link)
			if s+1 < len(srvData) && srvData[s] >= 0 && srvData[s+1] >= 0 {
				srv += fmt.Sprintf(" %5.0f%%", 100*float64(srvData[s+1]-srvData[s])/link)
			}
		}
		nodes := ""
		if s+1 < len(nodeTx) {
			var u []float64
			for i := range nodeTx[s] {
				u = append(u, 100*float64(nodeTx[s+1][i]-nodeTx[s][i])/link)
			}
			slices.Sort(u)
			nodes = fmt.Sprintf("  %4.0f%% %4.0f%% %4.0f%%", u[0], u[len(u)/2], u[len(u)-1])
		}
		fmt.Printf("  %3d %5d %4d %5.0f%% %s%s\n", s, c, firstPerSec[s], 100*float64(int64(c)*pieceLen)/(link*float64(len(lb.nodes)+1)), srv, nodes)
	}
}

// pieceInfoDelays joins every node's log of pieces it learned of (from a
// HAVE or BITFIELD update while it lacked the piece) with the sending node's
// completion time of that piece, and returns the delays in ms, sorted.
// Opening BITFIELDs of new connections are not in the logs, and pieces
// revealed by the server have no completion time: neither counts.
func pieceInfoDelays(lb *lab, logs []swarm.Result) []float64 {
	completed := map[string]map[uint32]int64{} // by node IP
	for i, r := range logs {
		completed[lb.nodes[i].IP().String()] = r.Pieces.Completed[r.Image.InfoHash]
	}
	var out []float64
	for _, r := range logs {
		for _, ev := range r.Pieces.Learned[r.Image.InfoHash] {
			at, ok := completed[ev.From][ev.Piece]
			if !ok {
				continue
			}
			out = append(out, float64(ev.At-at)/1e6)
		}
	}
	slices.Sort(out)
	return out
}

func waitHTTP(ctx context.Context, h *netlab.Host, url string) error {
	for {
		if _, err := h.Run(ctx, "curl", "-sf", "-o", "/dev/null", url); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s never answered: %w", url, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func runHTTP(ctx context.Context, cfg config, lb *lab, dir string, img *swarm.Image, m *method) ([]float64, error) {
	srv := lb.server.Command(ctx, filepath.Join(cfg.bin, "esir"), "swarm", "serve", "--store", filepath.Join(cfg.work, "store"),
		"--listen", "198.18.0.1:8080", "--peer-listen", "198.18.0.1:6881", "--log-level", "warn")
	if err := srv.Start(); err != nil {
		return nil, err
	}
	defer func() { srv.Process.Signal(syscall.SIGTERM); srv.Wait() }()
	if err := waitHTTP(ctx, lb.nodes[0], "http://198.18.0.1:8080/swarm/images"); err != nil {
		return nil, err
	}
	info, _ := img.MetaInfo.UnmarshalInfo()
	url := "http://198.18.0.1:8080/swarm/webseed/" + img.InfoHash + "/" + info.Name
	times := make([]float64, len(lb.nodes))
	errs := make([]error, len(lb.nodes))
	start := time.Now()
	var wg sync.WaitGroup
	for i, h := range lb.nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = h.Run(ctx, "curl", "-sf", "-o", filepath.Join(dir, fmt.Sprintf("out%d", i)), url)
			times[i] = time.Since(start).Seconds()
		}()
	}
	wg.Wait()
	m.ServerBytes = img.Size * int64(len(lb.nodes))
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return times, nil
}

func runUDPCast(ctx context.Context, cfg config, lb *lab, dir, archive string, m *method) ([]float64, error) {
	// Receivers first; the sender starts once all have joined.
	var recv []*exec.Cmd
	times := make([]float64, len(lb.nodes))
	for i, h := range lb.nodes {
		r := h.Command(ctx, "udp-receiver", "--file", filepath.Join(dir, fmt.Sprintf("out%d", i)), "--interface", "eth0",
			"--nokbd", "--nosync")
		if err := r.Start(); err != nil {
			return nil, err
		}
		recv = append(recv, r)
	}
	// 95% of the link in kbit/s (a whole number of Mbit/s would round
	// 4.75 down to 4, a fifth below the link).
	rate := fmt.Sprintf("%dk", int(cfg.rateMbit*950))
	snd := lb.server.Command(ctx, "udp-sender", "--file", archive, "--interface", "eth0", "--nokbd",
		"--min-receivers", strconv.Itoa(len(lb.nodes)), "--max-bitrate", rate, "--max-wait", "60")
	var sndOut bytes.Buffer
	snd.Stderr = &sndOut
	start := time.Now()
	if err := snd.Start(); err != nil {
		return nil, err
	}
	var wg sync.WaitGroup
	errs := make([]error, len(recv))
	for i, r := range recv {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = r.Wait()
			times[i] = time.Since(start).Seconds()
		}()
	}
	wg.Wait()
	snd.Wait()
	// udpcast sends each block once to the group: the server's link carries F
	// plus retransmissions; it reports no byte count, so F is the floor.
	m.ServerBytes = -1
	for i, err := range errs {
		if err != nil {
			return nil, fmt.Errorf("udp-receiver on node %d: %w (sender: %s)", i, err, strings.TrimSpace(sndOut.String()))
		}
	}
	return times, nil
}

func printTable(n int, rows []method, bound float64, size int64) {
	fmt.Printf("\nN = %d   (F = %.1f MiB, bound F/B = %.1f s)\n", n, float64(size)/(1<<20), bound)
	fmt.Printf("%-18s %8s %8s %8s %9s %9s %9s %8s %8s %6s %s\n", "method", "last s", "median s", "x F/B",
		"server/F", "HAVE msgs", "HAVE pk/s", "d50 ms", "d99 ms", "CPU%", "own CPU s  bottleneck, notes")
	for _, r := range rows {
		srv := "-"
		if r.ServerBytes > 0 {
			srv = fmt.Sprintf("%.2f", float64(r.ServerBytes)/float64(size))
		}
		have, peak, d50, d99 := "-", "-", "-", "-"
		if strings.HasPrefix(r.Name, "esir") {
			have, peak = strconv.FormatInt(r.HaveMsgs, 10), strconv.FormatInt(r.HavePeak, 10)
			d50, d99 = fmt.Sprintf("%.1f", r.DelayP50Ms), fmt.Sprintf("%.1f", r.DelayP99Ms)
		}
		note := r.Bottleneck
		if r.HostCPU > 0 {
			note = fmt.Sprintf("%s (own CPU %.0f%% of the host)", note, r.OwnCPUPct)
		}
		note = strings.TrimSpace(note + " " + r.Err)
		if strings.HasPrefix(r.Name, "esir") && r.Err == "" {
			note = fmt.Sprintf("%s; %.0f%% of bytes from peers; delay over %d receiver events, max %.0f ms; sender: completion to library HAVE p99 %.0f ms, hold p99 %.1f ms",
				note, 100*r.FromPeersFrac, r.DelayEvents, r.DelayMaxMs, r.EmitP99Ms, r.HoldP99Ms)
			if r.NetOneWayP99Ms > 0 {
				note = fmt.Sprintf("%s; the links' own one-way delay (ping RTT/2, node 1 to 2) p50 %.0f ms, p99 %.0f ms, %.0f%% lost",
					note, r.NetOneWayP50Ms, r.NetOneWayP99Ms, 100*r.NetPingLoss)
			}
		}
		cpu := "-"
		if r.HostCPU > 0 {
			cpu = fmt.Sprintf("%.0f", r.HostCPU)
		}
		if r.LastSec == 0 && r.Err != "" {
			// Not run, or failed before any node finished: no figures.
			fmt.Printf("%-18s %8s %8s %8s %9s %9s %9s %8s %8s %6s %9s  %s\n", r.Name, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", note)
			continue
		}
		fmt.Printf("%-18s %8.1f %8.1f %8.2f %9s %9s %9s %8s %8s %6s %9.1f  %s\n", r.Name, r.LastSec, r.MedianSec, r.LastSec/bound,
			srv, have, peak, d50, d99, cpu, r.OwnCPUSec, note)
	}
}

func find(all []method, name string, n int) *method {
	for i := range all {
		if all[i].Name == name && all[i].N == n {
			return &all[i]
		}
	}
	return nil
}

func printSummary(all []method, bound float64) {
	fmt.Printf("\nratios (ESIR adaptive against each baseline, same run)\n")
	fmt.Printf("%4s %14s %14s %14s %14s %16s\n", "N", "adapt/off t", "adapt/http t", "adapt/udpcast t", "adapt/bound", "HAVE adapt/off")
	var ns []int
	for _, m := range all {
		if !slices.Contains(ns, m.N) {
			ns = append(ns, m.N)
		}
	}
	ratio := func(a, b *method, f func(*method) float64) string {
		if a == nil || b == nil || f(b) == 0 || a.Err != "" || b.Err != "" {
			return "-"
		}
		return fmt.Sprintf("%.2f", f(a)/f(b))
	}
	last := func(m *method) float64 { return m.LastSec }
	haves := func(m *method) float64 { return float64(m.HaveMsgs) }
	for _, n := range ns {
		a := find(all, "esir-bt adaptive", n)
		fmt.Printf("%4d %14s %14s %14s %14s %16s\n", n, ratio(a, find(all, "esir-bt off", n), last),
			ratio(a, find(all, "http", n), last), ratio(a, find(all, "udpcast", n), last),
			ratio(a, find(all, "bound F/B", n), last), ratio(a, find(all, "esir-bt off", n), haves))
	}
	if len(ns) > 1 {
		a0, a1 := find(all, "esir-bt adaptive", ns[0]), find(all, "esir-bt adaptive", ns[len(ns)-1])
		fmt.Printf("adaptive: N=%d time / N=%d time = %s\n", ns[len(ns)-1], ns[0], ratio(a1, a0, last))
	}
}

func plot(path string, all []method) error {
	if _, err := exec.LookPath("gnuplot"); err != nil {
		return fmt.Errorf("gnuplot is not installed (Debian gnuplot-nox)")
	}
	dir, err := os.MkdirTemp("", "esir-plot-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var script strings.Builder
	fmt.Fprintf(&script, "set terminal png size 900,560\nset output '%s'\nset xlabel 'nodes N'\nset ylabel 'time until the last node has the image (s, log scale)'\nset logscale y\nset xtics (8, 16, 32, 64)\nset key top left\nset grid\nplot ", path)
	var names []string
	for _, m := range all {
		if !slices.Contains(names, m.Name) {
			names = append(names, m.Name)
		}
	}
	for i, name := range names {
		f := filepath.Join(dir, fmt.Sprintf("m%d.dat", i))
		var b strings.Builder
		for _, m := range all {
			if m.Name == name && m.Err == "" {
				fmt.Fprintf(&b, "%d %f\n", m.N, m.LastSec)
			}
		}
		os.WriteFile(f, []byte(b.String()), 0o644)
		if i > 0 {
			script.WriteString(", ")
		}
		fmt.Fprintf(&script, "'%s' with linespoints lw 2 title '%s'", f, name)
	}
	script.WriteString("\n")
	sf := filepath.Join(dir, "plot.gp")
	if err := os.WriteFile(sf, []byte(script.String()), 0o644); err != nil {
		return err
	}
	out, err := exec.Command("gnuplot", sf).CombinedOutput()
	if err != nil {
		return fmt.Errorf("gnuplot: %w: %s", err, out)
	}
	return nil
}
