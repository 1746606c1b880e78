// Command pxe benchmarks ESIR's network-boot servers against the usual
// baselines, on the same network-namespace setup in the same run:
//
//   - DHCP: perfdhcp (Debian package kea-admin) runs full DORA exchanges with
//     1,000 simulated clients against ESIR's DHCP server and against dnsmasq:
//     4-way exchanges per second, drops and latency.
//   - TFTP: 50 concurrent clients (curl, blksize 1400) fetch ipxe.efi from
//     ESIR's TFTP server and from tftpd-hpa: wall time until all are done.
//
// It needs root (network namespaces), perfdhcp, dnsmasq, in.tftpd and curl.
// Addresses come from 198.18.0.0/15 inside the namespaces only.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/esir-project/esir/netlab"
	"github.com/esir-project/esir/pxe"
	"github.com/esir-project/esir/pxe/dhcp"
	"github.com/esir-project/esir/pxe/tftp"
)

const (
	serverIP  = "198.18.24.1"
	clientIP  = "198.18.24.2"
	prefixLen = 21
	poolStart = "198.18.25.0"
	poolEnd   = "198.18.29.255"
)

func main() {
	jsonOut := flag.String("json", "", "also write the results as JSON to this file")
	rates := flag.String("rates", "250,500,1000,2000,4000", "DORA exchange rates perfdhcp aims at, in turn (each server's best is reported)")
	clients := flag.Int("clients", 1000, "simulated DHCP clients")
	period := flag.Int("period", 5, "seconds of DHCP load per server and rate")
	tftpClients := flag.Int("tftp-clients", 50, "concurrent TFTP clients")
	rounds := flag.Int("rounds", 5, "TFTP rounds per server (the median is reported)")
	serve := flag.String("serve", "", "internal: run an ESIR server (dhcp or tftp) in this namespace")
	serveArg := flag.String("serve-arg", "", "internal: the server's directory or lease file")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *serve != "" {
		if err := runServer(ctx, *serve, *serveArg); err != nil {
			fmt.Fprintln(os.Stderr, "serve:", err)
			os.Exit(1)
		}
		return
	}
	var rateList []int
	for _, f := range strings.Split(*rates, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			fmt.Fprintf(os.Stderr, "benchmarks/pxe: --rates: %q is not a positive number\n", f)
			os.Exit(2)
		}
		rateList = append(rateList, n)
	}
	res, err := run(ctx, rateList, *clients, *period, *tftpClients, *rounds)
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchmarks/pxe:", err)
		os.Exit(1)
	}
	printTable(os.Stdout, res)
	if *jsonOut != "" {
		b, _ := json.MarshalIndent(res, "", "  ")
		if err := os.WriteFile(*jsonOut, append(b, '\n'), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "benchmarks/pxe:", err)
			os.Exit(1)
		}
	}
}

// DHCPResult is one server's perfdhcp figures.
type DHCPResult struct {
	Server        string  `json:"server"`
	TargetRate    int     `json:"target_rate"`
	ExchangesPerS float64 `json:"exchanges_per_s"`
	DOSent        int     `json:"discover_sent"`
	DODrops       float64 `json:"discover_offer_drop_pct"`
	RADrops       float64 `json:"request_ack_drop_pct"`
	DOAvgMs       float64 `json:"discover_offer_avg_ms"`
	RAAvgMs       float64 `json:"request_ack_avg_ms"`
}

// TFTPResult is one server's TFTP figures.
type TFTPResult struct {
	Server  string    `json:"server"`
	Seconds float64   `json:"median_seconds"`
	Rounds  []float64 `json:"rounds_seconds"`
	Bytes   int64     `json:"file_bytes"`
	Clients int       `json:"clients"`
}

// Results is the whole run.
type Results struct {
	Rates           []int
	Clients, Period int
	// DHCP holds each server's best run (ESIR first); DHCPSweep every run.
	DHCP      []DHCPResult
	DHCPSweep []DHCPResult
	TFTP      []TFTPResult
}

func run(ctx context.Context, rates []int, clients, period, tftpClients, rounds int) (*Results, error) {
	for _, b := range []string{"perfdhcp", "dnsmasq", "in.tftpd", "curl"} {
		if _, err := exec.LookPath(b); err != nil {
			return nil, fmt.Errorf("%s not installed (scripts/setup.sh test installs it)", b)
		}
	}
	lab, err := netlab.New(ctx, "pxebench")
	if err != nil {
		return nil, err
	}
	defer lab.Close()
	srv, err := lab.AddHost(ctx, "srv", netip.MustParsePrefix(fmt.Sprintf("%s/%d", serverIP, prefixLen)), netlab.Link{})
	if err != nil {
		return nil, err
	}
	cli, err := lab.AddHost(ctx, "cli", netip.MustParsePrefix(fmt.Sprintf("%s/%d", clientIP, prefixLen)), netlab.Link{})
	if err != nil {
		return nil, err
	}
	work, err := os.MkdirTemp("", "esir-pxe-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	res := &Results{Rates: rates, Clients: clients, Period: period}

	perfAt := func(name string, rate int) (DHCPResult, error) {
		out, err := cli.Run(ctx, "perfdhcp", "-4", "-l", "eth0", "-r", strconv.Itoa(rate), "-R", strconv.Itoa(clients),
			"-p", strconv.Itoa(period))
		if err != nil && !strings.Contains(string(out), "Rate:") {
			return DHCPResult{}, fmt.Errorf("perfdhcp against %s: %w", name, err)
		}
		r, perr := parsePerfdhcp(string(out))
		r.Server, r.TargetRate = name, rate
		if os.Getenv("PXEBENCH_DEBUG") != "" {
			fmt.Fprintf(os.Stderr, "--- perfdhcp %s %d:\n%s\n", name, rate, out)
		}
		return r, perr
	}
	// perf sweeps the rates and keeps the run with the most exchanges/s.
	perf := func(name string) (DHCPResult, error) {
		var best DHCPResult
		for _, rate := range rates {
			r, err := perfAt(name, rate)
			if err != nil {
				return best, err
			}
			res.DHCPSweep = append(res.DHCPSweep, r)
			if r.ExchangesPerS > best.ExchangesPerS || best.Server == "" {
				best = r
			}
			time.Sleep(time.Second)
		}
		return best, nil
	}

	// ESIR's DHCP server.
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	stopESIR, err := startReady(ctx, srv, self, "-serve", "dhcp", "-serve-arg", filepath.Join(work, "esir-leases.json"))
	if err != nil {
		return nil, err
	}
	r, err := perf("ESIR")
	stopESIR()
	if err != nil {
		return nil, err
	}
	res.DHCP = append(res.DHCP, r)

	// dnsmasq, same pool and lease time.
	dm := srv.Command(ctx, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--interface=eth0",
		"--bind-interfaces", "--no-ping", "--quiet-dhcp", "--dhcp-authoritative",
		fmt.Sprintf("--dhcp-range=%s,%s,%s,1h", poolStart, poolEnd, net.IP(net.CIDRMask(prefixLen, 32)).String()),
		"--dhcp-lease-max=10000", "--dhcp-leasefile="+filepath.Join(work, "dnsmasq.leases"),
		"--pid-file="+filepath.Join(work, "dnsmasq.pid"))
	dm.Stdout, dm.Stderr = io.Discard, io.Discard
	if err := dm.Start(); err != nil {
		return nil, err
	}
	time.Sleep(time.Second)
	r, err = perf("dnsmasq")
	dm.Process.Signal(syscall.SIGTERM)
	dm.Wait()
	if err != nil {
		return nil, err
	}
	res.DHCP = append(res.DHCP, r)

	// TFTP: the same file from both servers.
	efi, err := filepath.EvalSymlinks(filepath.Join(tftp.DefaultRoot, "ipxe.efi"))
	if err != nil {
		return nil, fmt.Errorf("ipxe.efi: %w", err)
	}
	data, err := os.ReadFile(efi)
	if err != nil {
		return nil, err
	}
	root := filepath.Join(work, "tftp")
	os.MkdirAll(root, 0o755)
	if err := os.WriteFile(filepath.Join(root, "ipxe.efi"), data, 0o644); err != nil {
		return nil, err
	}
	fetchAll := func(port int) (float64, error) {
		dir, _ := os.MkdirTemp(work, "fetch-")
		defer os.RemoveAll(dir)
		script := fmt.Sprintf(`for i in $(seq 1 %d); do curl -s --tftp-blksize 1400 -o %s/$i tftp://%s:%d/ipxe.efi & done; wait`,
			tftpClients, dir, serverIP, port)
		start := time.Now()
		if out, err := cli.Run(ctx, "sh", "-c", script); err != nil {
			return 0, fmt.Errorf("tftp clients: %w: %s", err, out)
		}
		secs := time.Since(start).Seconds()
		for i := 1; i <= tftpClients; i++ {
			st, err := os.Stat(filepath.Join(dir, strconv.Itoa(i)))
			if err != nil || st.Size() != int64(len(data)) {
				return 0, fmt.Errorf("tftp client %d on port %d did not get the whole file", i, port)
			}
		}
		return secs, nil
	}
	stopT, err := startReady(ctx, srv, self, "-serve", "tftp", "-serve-arg", root)
	if err != nil {
		return nil, err
	}
	hpa := srv.Command(ctx, "in.tftpd", "--foreground", "--listen", "--address", serverIP+":69", "--secure", root)
	hpa.Stdout, hpa.Stderr = io.Discard, io.Discard
	if err := hpa.Start(); err != nil {
		stopT()
		return nil, err
	}
	time.Sleep(500 * time.Millisecond)
	esirT := TFTPResult{Server: "ESIR", Bytes: int64(len(data)), Clients: tftpClients}
	hpaT := TFTPResult{Server: "tftpd-hpa", Bytes: int64(len(data)), Clients: tftpClients}
	var ferr error
	for i := 0; i < rounds && ferr == nil; i++ {
		var s float64
		if s, ferr = fetchAll(1069); ferr == nil {
			esirT.Rounds = append(esirT.Rounds, s)
			if s, ferr = fetchAll(69); ferr == nil {
				hpaT.Rounds = append(hpaT.Rounds, s)
			}
		}
	}
	stopT()
	hpa.Process.Signal(syscall.SIGTERM)
	hpa.Wait()
	if ferr != nil {
		return nil, ferr
	}
	esirT.Seconds, hpaT.Seconds = median(esirT.Rounds), median(hpaT.Rounds)
	res.TFTP = []TFTPResult{esirT, hpaT}
	return res, nil
}

// startReady starts this program as a server in h's namespace and waits for
// its READY line; the returned function stops it.
func startReady(ctx context.Context, h *netlab.Host, self string, args ...string) (func(), error) {
	cmd := h.Command(ctx, self, args...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	stop := func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if sc.Text() == "READY" {
				ready <- true
			}
		}
		ready <- false
	}()
	select {
	case ok := <-ready:
		if !ok {
			stop()
			return nil, errors.New("ESIR server exited before it was ready")
		}
	case <-time.After(10 * time.Second):
		stop()
		return nil, errors.New("ESIR server not ready after 10 s")
	}
	return stop, nil
}

// runServer is the -serve mode: ESIR's DHCP or TFTP server in the current
// network namespace until SIGTERM.
func runServer(ctx context.Context, what, arg string) error {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	switch what {
	case "dhcp":
		s, err := dhcp.New(dhcp.Config{Mode: dhcp.Full, Interface: "eth0", ServerIP: net.ParseIP(serverIP),
			PoolStart: net.ParseIP(poolStart), PoolEnd: net.ParseIP(poolEnd), SubnetMask: net.CIDRMask(prefixLen, 32),
			LeaseTime: time.Hour, LeaseFile: arg, Policy: &pxe.StaticPolicy{}, Log: log})
		if err != nil {
			return err
		}
		c, err := dhcp.Listen("eth0", 67)
		if err != nil {
			return err
		}
		fmt.Println("READY")
		err = s.ServeConns(ctx, c)
		st := s.Stats()
		fmt.Fprintf(os.Stderr, "ESIR DHCP: %d received, %d offers, %d acks, %d naks, %d rate-limited, %d exhausted\n",
			st.Received, st.Offers, st.Acks, st.Naks, st.RateLimited, st.PoolExhausted)
		return err
	case "tftp":
		s, err := tftp.New(arg, log)
		if err != nil {
			return err
		}
		defer s.Close()
		conn, err := net.ListenPacket("udp4", serverIP+":1069")
		if err != nil {
			return err
		}
		fmt.Println("READY")
		return s.Serve(ctx, conn)
	}
	return fmt.Errorf("unknown server %q", what)
}

var (
	reRate  = regexp.MustCompile(`Rate: ([0-9.]+) 4-way exchanges/second`)
	reBlock = regexp.MustCompile(`(?s)\*\*\*Statistics for: (DISCOVER-OFFER|REQUEST-ACK)\*\*\*(.*?)collected packets`)
	reSent  = regexp.MustCompile(`sent packets: ([0-9]+)`)
	reDrops = regexp.MustCompile(`drops ratio: ([0-9.]+) %`)
	reAvg   = regexp.MustCompile(`avg delay: ([0-9.]+) ms`)
)

func parsePerfdhcp(out string) (DHCPResult, error) {
	var r DHCPResult
	m := reRate.FindAllStringSubmatch(out, -1)
	if len(m) == 0 {
		return r, fmt.Errorf("perfdhcp output without a rate:\n%s", out)
	}
	r.ExchangesPerS, _ = strconv.ParseFloat(m[len(m)-1][1], 64)
	for _, b := range reBlock.FindAllStringSubmatch(out, -1) {
		var sent int
		var drops, avg float64
		if s := reSent.FindStringSubmatch(b[2]); s != nil {
			sent, _ = strconv.Atoi(s[1])
		}
		if s := reDrops.FindStringSubmatch(b[2]); s != nil {
			drops, _ = strconv.ParseFloat(s[1], 64)
		}
		if s := reAvg.FindStringSubmatch(b[2]); s != nil {
			avg, _ = strconv.ParseFloat(s[1], 64)
		}
		if b[1] == "DISCOVER-OFFER" {
			r.DOSent, r.DODrops, r.DOAvgMs = sent, drops, avg
		} else {
			r.RADrops, r.RAAvgMs = drops, avg
		}
	}
	return r, nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func ratio(a, b float64) string {
	if b == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2f", a/b)
}

func printTable(w io.Writer, r *Results) {
	e, d := r.DHCP[0], r.DHCP[1]
	fmt.Fprintf(w, "DHCP: perfdhcp DORA, %d clients, rates %v exchanges/s, %d s each; per-rate runs:\n", r.Clients, r.Rates, r.Period)
	fmt.Fprintf(w, "  %-10s %6s %12s %8s %8s %10s %10s\n", "server", "target", "exchanges/s", "DO-drop%", "RA-drop%", "DO-avg-ms", "RA-avg-ms")
	for _, s := range r.DHCPSweep {
		fmt.Fprintf(w, "  %-10s %6d %12.1f %8.2f %8.2f %10.3f %10.3f\n", s.Server, s.TargetRate, s.ExchangesPerS, s.DODrops, s.RADrops, s.DOAvgMs, s.RAAvgMs)
	}
	fmt.Fprintf(w, "Best run of each server (ESIR at target %d, dnsmasq at target %d):\n", e.TargetRate, d.TargetRate)
	fmt.Fprintf(w, "%-34s %12s %12s %8s\n", "metric", "ESIR", "dnsmasq", "ratio")
	fmt.Fprintf(w, "%-34s %12.1f %12.1f %8s\n", "4-way exchanges/s (higher better)", e.ExchangesPerS, d.ExchangesPerS, ratio(e.ExchangesPerS, d.ExchangesPerS))
	fmt.Fprintf(w, "%-34s %12.2f %12.2f %8s\n", "DISCOVER-OFFER drops %", e.DODrops, d.DODrops, ratio(e.DODrops, d.DODrops))
	fmt.Fprintf(w, "%-34s %12.2f %12.2f %8s\n", "REQUEST-ACK drops %", e.RADrops, d.RADrops, ratio(e.RADrops, d.RADrops))
	fmt.Fprintf(w, "%-34s %12.3f %12.3f %8s\n", "DISCOVER-OFFER avg latency ms", e.DOAvgMs, d.DOAvgMs, ratio(e.DOAvgMs, d.DOAvgMs))
	fmt.Fprintf(w, "%-34s %12.3f %12.3f %8s\n", "REQUEST-ACK avg latency ms", e.RAAvgMs, d.RAAvgMs, ratio(e.RAAvgMs, d.RAAvgMs))
	t, h := r.TFTP[0], r.TFTP[1]
	fmt.Fprintf(w, "\nTFTP: %d concurrent curl clients fetch ipxe.efi (%d bytes, blksize 1400), median of %d rounds\n", t.Clients, t.Bytes, len(t.Rounds))
	fmt.Fprintf(w, "%-34s %12s %12s %8s\n", "metric", "ESIR", "tftpd-hpa", "ratio")
	fmt.Fprintf(w, "%-34s %12.3f %12.3f %8s\n", "wall time s (lower better)", t.Seconds, h.Seconds, ratio(t.Seconds, h.Seconds))
}
