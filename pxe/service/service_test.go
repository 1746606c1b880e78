package service

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/esir-project/esir/netlab"
	"github.com/esir-project/esir/pxe"
	"github.com/esir-project/esir/pxe/dhcp"
	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/iana"
	"golang.org/x/sys/unix"
)

// helperEnv carries a helperConfig to the test binary re-run inside a
// network namespace as the PXE server (each TFTP transfer opens its own
// socket, so the server process must live in the namespace).
const helperEnv = "ESIR_PXE_TEST_SERVER"

type helperConfig struct {
	DHCPMode            string // "", full or proxy
	Iface, ServerIP     string
	PoolStart, PoolEnd  string
	MaskBits            int
	Router, DNS, Domain string
	NTP                 string
	MTU                 uint16
	LeaseFile           string
	Reserve             map[string]string // MAC -> IP/HOSTNAME
	TFTPRoot, BootDir   string
	HTTPPort            int
	Discovery           bool
	Nodes               map[string]string // MAC -> action
	Extra               string
}

func TestMain(m *testing.M) {
	if c := os.Getenv(helperEnv); c != "" {
		os.Exit(runHelper(c))
	}
	os.Exit(m.Run())
}

func runHelper(js string) int {
	var hc helperConfig
	if err := json.Unmarshal([]byte(js), &hc); err != nil {
		fmt.Fprintln(os.Stderr, "helper config:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	base := fmt.Sprintf("http://%s:%d", hc.ServerIP, hc.HTTPPort)
	pol := &pxe.StaticPolicy{Kernel: KernelURL(base), Initrd: InitrdURL(base), Server: base,
		Extra: hc.Extra, Discovery: hc.Discovery, Nodes: map[string]pxe.Action{}}
	for mac, a := range hc.Nodes {
		act, err := pxe.ParseAction(a)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		pol.Nodes[mac] = act
	}
	cfg := Config{TFTPListen: hc.ServerIP + ":69", TFTPRoot: hc.TFTPRoot, HTTPListen: fmt.Sprintf(":%d", hc.HTTPPort),
		HTTPURL: base, BootDir: hc.BootDir, Policy: pol,
		Log:   slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Ready: func() { fmt.Println("READY") }}
	if hc.DHCPMode != "" {
		mode, _ := dhcp.ParseMode(hc.DHCPMode)
		dc := &dhcp.Config{Mode: mode, Interface: hc.Iface, ServerIP: net.ParseIP(hc.ServerIP),
			LeaseFile: hc.LeaseFile, Domain: hc.Domain, MTU: hc.MTU, LeaseTime: 10 * time.Minute}
		if mode == dhcp.Full {
			dc.PoolStart, dc.PoolEnd = net.ParseIP(hc.PoolStart), net.ParseIP(hc.PoolEnd)
			dc.SubnetMask = net.CIDRMask(hc.MaskBits, 32)
			dc.Router = net.ParseIP(hc.Router)
			dc.DNS = []net.IP{net.ParseIP(hc.DNS)}
			dc.NTP = []net.IP{net.ParseIP(hc.NTP)}
			for mac, v := range hc.Reserve {
				ip, host, _ := strings.Cut(v, "/")
				hw, _ := net.ParseMAC(mac)
				dc.Reservations = append(dc.Reservations, dhcp.Reservation{MAC: hw, IP: net.ParseIP(ip), Hostname: host})
			}
		}
		cfg.DHCP = dc
	}
	if err := Run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "pxe service:", err)
		return 1
	}
	return 0
}

func needLab(t *testing.T) {
	t.Helper()
	if err := netlab.Available(); err != nil {
		t.Skip(err)
	}
}

func needBin(t *testing.T, bins ...string) {
	t.Helper()
	for _, b := range bins {
		if _, err := exec.LookPath(b); err != nil {
			t.Skipf("%s not installed (scripts/setup.sh installs it)", b)
		}
	}
}

// syncBuffer collects a process's output.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startServer runs the PXE service in h's namespace and waits until it
// listens. Its log is printed if the test fails.
func startServer(t *testing.T, ctx context.Context, h *netlab.Host, hc helperConfig) *syncBuffer {
	t.Helper()
	js, _ := json.Marshal(hc)
	cmd := h.Command(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+string(js))
	logs := &syncBuffer{}
	cmd.Stderr = logs
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			t.Logf("PXE server log:\n%s", logs.String())
			keep(t, "pxe-server.log", logs.String())
		}
	})
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if sc.Text() == "READY" {
				ready <- true
			}
		}
		ready <- false
		io.Copy(io.Discard, out)
	}()
	select {
	case ok := <-ready:
		if !ok {
			t.Fatalf("PXE server exited before listening:\n%s", logs.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("PXE server not ready after 15 s:\n%s", logs.String())
	}
	return logs
}

// keep writes an artifact into $ESIR_ARTIFACTS when set.
func keep(t *testing.T, name, content string) {
	dir := os.Getenv("ESIR_ARTIFACTS")
	if dir == "" {
		return
	}
	os.MkdirAll(dir, 0o755)
	os.WriteFile(filepath.Join(dir, strings.ReplaceAll(t.Name(), "/", "_")+"-"+name), []byte(content), 0o644)
}

// inNS runs fn on a thread inside network namespace ns; sockets fn opens
// stay in that namespace. The thread is discarded afterwards.
func inNS(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		f, err := os.Open("/run/netns/" + ns)
		if err != nil {
			errc <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func addr(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// bootDir makes a small fake netboot directory for HTTP tests.
func fakeBootDir(t *testing.T) string {
	d := t.TempDir()
	k := make([]byte, 300000)
	for i := range k {
		k[i] = byte(i * 7)
	}
	os.WriteFile(filepath.Join(d, "vmlinuz"), k, 0o644)
	os.WriteFile(filepath.Join(d, "initrd.img"), []byte("initrd"), 0o644)
	return d
}

// envOf parses KEY=VALUE lines a client hook script dumped.
func envOf(s string) map[string]string {
	m := map[string]string{}
	for _, l := range strings.Split(s, "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			m[k] = strings.Trim(v, "'")
		}
	}
	return m
}

func TestFullModeWithRealClients(t *testing.T) {
	needLab(t)
	needBin(t, "udhcpc", "dhclient", "curl")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	lab, err := netlab.New(ctx, "pxefull")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Close() })
	srv, err := lab.AddHost(ctx, "srv", addr("198.18.10.1/24"), netlab.Link{})
	if err != nil {
		t.Fatal(err)
	}
	leases := filepath.Join(t.TempDir(), "leases.json")
	hc := helperConfig{DHCPMode: "full", Iface: "eth0", ServerIP: "198.18.10.1",
		PoolStart: "198.18.10.100", PoolEnd: "198.18.10.110", MaskBits: 24,
		Router: "198.18.10.254", DNS: "198.18.10.53", Domain: "lab.test", NTP: "198.18.10.123", MTU: 1400,
		LeaseFile: leases, Reserve: map[string]string{"52:54:00:aa:00:02": "198.18.10.105/node05"},
		BootDir: fakeBootDir(t), HTTPPort: 8080, Discovery: true}
	startServer(t, ctx, srv, hc)

	dir := t.TempDir()
	dump := filepath.Join(dir, "dump.sh")
	os.WriteFile(dump, []byte("#!/bin/sh\nenv > \"$DUMP.$1\"\nexit 0\n"), 0o755)

	t.Run("udhcpc", func(t *testing.T) {
		cli, err := lab.AddHost(ctx, "udhcp", addr("198.18.10.201/24"), netlab.Link{})
		if err != nil {
			t.Fatal(err)
		}
		cli.Run(ctx, "ip", "addr", "flush", "dev", "eth0")
		cli.Run(ctx, "ip", "link", "set", "eth0", "address", "52:54:00:aa:00:01")
		cmd := cli.Command(ctx, "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1", "-s", dump,
			"-O", "ntpsrv", "-O", "mtu", "-O", "domain")
		cmd.Env = append(os.Environ(), "DUMP="+filepath.Join(dir, "udhcpc"))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("udhcpc: %v\n%s", err, out)
		}
		b, err := os.ReadFile(filepath.Join(dir, "udhcpc.bound"))
		if err != nil {
			t.Fatal(err)
		}
		e := envOf(string(b))
		want := map[string]string{"ip": "198.18.10.100", "subnet": "255.255.255.0", "router": "198.18.10.254",
			"dns": "198.18.10.53", "domain": "lab.test", "ntpsrv": "198.18.10.123", "mtu": "1400", "serverid": "198.18.10.1", "lease": "600"}
		for k, v := range want {
			if strings.TrimSpace(e[k]) != v {
				t.Errorf("udhcpc %s=%q, want %q", k, e[k], v)
			}
		}
	})

	t.Run("dhclient reservation", func(t *testing.T) {
		cli, err := lab.AddHost(ctx, "dhcl", addr("198.18.10.202/24"), netlab.Link{})
		if err != nil {
			t.Fatal(err)
		}
		cli.Run(ctx, "ip", "addr", "flush", "dev", "eth0")
		cli.Run(ctx, "ip", "link", "set", "eth0", "address", "52:54:00:aa:00:02")
		conf := filepath.Join(dir, "dhclient.conf")
		os.WriteFile(conf, []byte("request subnet-mask, routers, domain-name-servers, domain-name, ntp-servers, interface-mtu, host-name;\n"), 0o644)
		script := filepath.Join(dir, "dhclient-script")
		os.WriteFile(script, []byte("#!/bin/sh\nenv > "+filepath.Join(dir, "dhclient.$reason")+"\nexit 0\n"), 0o755)
		out, err := cli.Run(ctx, "dhclient", "-1", "-v", "-cf", conf, "-sf", script,
			"-lf", filepath.Join(dir, "dhclient.leases"), "-pf", filepath.Join(dir, "dhclient.pid"), "eth0")
		t.Cleanup(func() {
			if b, err := os.ReadFile(filepath.Join(dir, "dhclient.pid")); err == nil {
				var pid int
				fmt.Sscan(string(b), &pid)
				if pid > 1 {
					syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		})
		if err != nil {
			t.Fatalf("dhclient: %v\n%s", err, out)
		}
		b, err := os.ReadFile(filepath.Join(dir, "dhclient.BOUND"))
		if err != nil {
			t.Fatalf("no BOUND: %v\n%s", err, out)
		}
		e := envOf(string(b))
		want := map[string]string{"new_ip_address": "198.18.10.105", "new_host_name": "node05", "new_routers": "198.18.10.254",
			"new_domain_name_servers": "198.18.10.53", "new_domain_name": "lab.test", "new_ntp_servers": "198.18.10.123",
			"new_interface_mtu": "1400", "new_subnet_mask": "255.255.255.0"}
		for k, v := range want {
			if e[k] != v {
				t.Errorf("dhclient %s=%q, want %q", k, e[k], v)
			}
		}
	})

	t.Run("tftp and http from a namespace", func(t *testing.T) {
		cli := lab.Hosts()[len(lab.Hosts())-1]
		cli.Run(ctx, "ip", "addr", "replace", "198.18.10.105/24", "brd", "+", "dev", "eth0")
		got := filepath.Join(dir, "undionly.kpxe")
		if out, err := cli.Run(ctx, "curl", "-sS", "-o", got, "tftp://198.18.10.1/undionly.kpxe"); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		a, _ := os.ReadFile(got)
		b, _ := os.ReadFile("/usr/lib/ipxe/undionly.kpxe")
		if len(b) == 0 || !bytes.Equal(a, b) {
			t.Fatalf("TFTP copy differs (%d vs %d bytes)", len(a), len(b))
		}
		efi := filepath.Join(dir, "ipxe.efi")
		if out, err := cli.Run(ctx, "curl", "-sS", "-f", "-o", efi, "http://198.18.10.1:8080/pxe/ipxe/ipxe.efi"); err != nil {
			t.Fatalf("%v %s", err, out)
		}
		real, _ := filepath.EvalSymlinks("/usr/lib/ipxe/ipxe.efi")
		if a, b := mustRead(t, efi), mustRead(t, real); len(b) == 0 || !bytes.Equal(a, b) {
			t.Fatalf("ipxe.efi over HTTP differs (%d vs %d bytes)", len(a), len(b))
		}
		out, err := cli.Run(ctx, "curl", "-sS", "-r", "100-199", "http://198.18.10.1:8080/pxe/files/vmlinuz")
		k, _ := os.ReadFile(filepath.Join(hc.BootDir, "vmlinuz"))
		if err != nil || !bytes.Equal(out, k[100:200]) {
			t.Fatalf("HTTP range: %v, %d bytes", err, len(out))
		}
		out, err = cli.Run(ctx, "curl", "-sS", "http://198.18.10.1:8080/pxe/boot.ipxe?mac=52:54:00:aa:00:09")
		if err != nil || !strings.Contains(string(out), "kernel http://198.18.10.1:8080/pxe/files/vmlinuz initrd=initrd") ||
			!strings.Contains(string(out), "esir.mode=inventory") || !strings.Contains(string(out), "esir.mac=52:54:00:aa:00:09") {
			t.Fatalf("script: %v\n%s", err, out)
		}
	})

	// The leases survive in the lease file (flushed within a second).
	deadline := time.Now().Add(3 * time.Second)
	for {
		b, _ := os.ReadFile(leases)
		if bytes.Contains(b, []byte("198.18.10.100")) && bytes.Contains(b, []byte("198.18.10.105")) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("lease file lacks the leases:\n%s", b)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func pxeDiscover(t *testing.T, mac net.HardwareAddr, giaddr net.IP) *dhcpv4.DHCPv4 {
	t.Helper()
	mods := []dhcpv4.Modifier{
		dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient:Arch:00000:UNDI:002001")),
		dhcpv4.WithOption(dhcpv4.OptClientArch(iana.INTEL_X86PC)),
		dhcpv4.WithBroadcast(true),
	}
	if giaddr != nil {
		mods = append(mods, dhcpv4.WithRelay(giaddr))
	}
	d, err := dhcpv4.NewDiscovery(mac, mods...)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// collect reads DHCP replies for xid from c until d passes.
func collect(c *net.UDPConn, xid dhcpv4.TransactionID, d time.Duration) []*dhcpv4.DHCPv4 {
	var out []*dhcpv4.DHCPv4
	buf := make([]byte, 2048)
	c.SetReadDeadline(time.Now().Add(d))
	for {
		n, _, err := c.ReadFromUDP(buf)
		if err != nil {
			return out
		}
		if m, err := dhcpv4.FromBytes(buf[:n]); err == nil && m.TransactionID == xid && m.OpCode == dhcpv4.OpcodeBootReply {
			out = append(out, m)
		}
	}
}

func TestRelayedRequestGoesToRelay(t *testing.T) {
	needLab(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	lab, err := netlab.New(ctx, "pxerly")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Close() })
	srv, err := lab.AddHost(ctx, "srv", addr("198.18.11.1/24"), netlab.Link{})
	if err != nil {
		t.Fatal(err)
	}
	relay, err := lab.AddHost(ctx, "relay", addr("198.18.11.254/24"), netlab.Link{})
	if err != nil {
		t.Fatal(err)
	}
	// The pool is the relay's subnet (a remote segment in real life).
	startServer(t, ctx, srv, helperConfig{DHCPMode: "full", Iface: "eth0", ServerIP: "198.18.11.1",
		PoolStart: "198.18.11.100", PoolEnd: "198.18.11.110", MaskBits: 24, Router: "198.18.11.254",
		DNS: "198.18.11.1", NTP: "198.18.11.1", BootDir: fakeBootDir(t), HTTPPort: 8080, Discovery: true})
	var replies []*dhcpv4.DHCPv4
	d := pxeDiscover(t, net.HardwareAddr{0x52, 0x54, 0, 0xbb, 0, 1}, net.ParseIP("198.18.11.254"))
	d.HopCount = 1
	err = inNS(relay.NS, func() error {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP("198.18.11.254"), Port: 67})
		if err != nil {
			return err
		}
		defer c.Close()
		if _, err := c.WriteToUDP(d.ToBytes(), &net.UDPAddr{IP: net.ParseIP("198.18.11.1"), Port: 67}); err != nil {
			return err
		}
		replies = collect(c, d.TransactionID, 3*time.Second)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(replies) != 1 {
		t.Fatalf("relay got %d replies on port 67", len(replies))
	}
	r := replies[0]
	if r.MessageType() != dhcpv4.MessageTypeOffer || !r.GatewayIPAddr.Equal(net.ParseIP("198.18.11.254")) ||
		r.YourIPAddr.String() != "198.18.11.100" || r.BootFileNameOption() != "undionly.kpxe" {
		t.Fatalf("relay reply %s", r.Summary())
	}
}

func TestProxyBesideDnsmasq(t *testing.T) {
	needLab(t)
	needBin(t, "dnsmasq")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	lab, err := netlab.New(ctx, "pxeprx")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Close() })
	srv, err := lab.AddHost(ctx, "srv", addr("198.18.12.1/24"), netlab.Link{})
	if err != nil {
		t.Fatal(err)
	}
	site, err := lab.AddHost(ctx, "site", addr("198.18.12.2/24"), netlab.Link{})
	if err != nil {
		t.Fatal(err)
	}
	cli, err := lab.AddHost(ctx, "cli", addr("198.18.12.200/24"), netlab.Link{})
	if err != nil {
		t.Fatal(err)
	}
	cli.Run(ctx, "ip", "addr", "flush", "dev", "eth0")
	dir := t.TempDir()
	dm := site.Command(ctx, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--interface=eth0",
		"--bind-interfaces", "--no-ping", "--dhcp-range=198.18.12.150,198.18.12.160,255.255.255.0,10m",
		"--dhcp-leasefile="+filepath.Join(dir, "dnsmasq.leases"), "--pid-file="+filepath.Join(dir, "dnsmasq.pid"), "--log-dhcp")
	dmlog := &syncBuffer{}
	dm.Stdout, dm.Stderr = dmlog, dmlog
	if err := dm.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		dm.Process.Kill()
		dm.Wait()
		if t.Failed() {
			t.Logf("dnsmasq:\n%s", dmlog.String())
		}
	})
	startServer(t, ctx, srv, helperConfig{DHCPMode: "proxy", Iface: "eth0", ServerIP: "198.18.12.1",
		BootDir: fakeBootDir(t), HTTPPort: 8080, Discovery: true})
	time.Sleep(300 * time.Millisecond) // dnsmasq's socket

	mac := net.HardwareAddr{0x52, 0x54, 0, 0xcc, 0, 1}
	err = inNS(cli.NS, func() error {
		c, err := dhcp.Listen("eth0", 68)
		if err != nil {
			return err
		}
		defer c.Close()
		bcast := &net.UDPAddr{IP: net.IPv4bcast, Port: 67}
		d := pxeDiscover(t, mac, nil)
		if _, err := c.WriteToUDP(d.ToBytes(), bcast); err != nil {
			return err
		}
		offers := collect(c, d.TransactionID, 2*time.Second)
		var site, esir *dhcpv4.DHCPv4
		for _, o := range offers {
			switch o.ServerIdentifier().String() {
			case "198.18.12.2":
				site = o
			case "198.18.12.1":
				esir = o
			}
		}
		if site == nil || esir == nil {
			return fmt.Errorf("offers: site %v, ESIR %v (of %d)", site != nil, esir != nil, len(offers))
		}
		if !esir.YourIPAddr.IsUnspecified() || esir.BootFileNameOption() != "undionly.kpxe" || esir.ClassIdentifier() != "PXEClient" {
			return fmt.Errorf("ESIR proxy offer: %s", esir.Summary())
		}
		if !strings.HasPrefix(site.YourIPAddr.String(), "198.18.12.15") && site.YourIPAddr.String() != "198.18.12.160" {
			return fmt.Errorf("site offer address %s", site.YourIPAddr)
		}
		// Take the address from the site's server.
		req, err := dhcpv4.NewRequestFromOffer(site)
		if err != nil {
			return err
		}
		c.WriteToUDP(req.ToBytes(), bcast)
		acks := collect(c, req.TransactionID, 2*time.Second)
		var ack *dhcpv4.DHCPv4
		for _, a := range acks {
			if a.MessageType() == dhcpv4.MessageTypeAck && a.ServerIdentifier().String() == "198.18.12.2" {
				ack = a
			}
		}
		if ack == nil {
			return fmt.Errorf("no ACK from the site's server (%d replies)", len(acks))
		}
		if out, err := exec.Command("ip", "addr", "add", ack.YourIPAddr.String()+"/24", "brd", "+", "dev", "eth0").CombinedOutput(); err != nil {
			return fmt.Errorf("ip addr add: %v %s", err, out)
		}
		// Then ask ESIR for the boot file on 4011, as PXE clients do.
		br := pxeDiscover(t, mac, nil)
		br.UpdateOption(dhcpv4.OptMessageType(dhcpv4.MessageTypeRequest))
		br.ClientIPAddr = ack.YourIPAddr
		br.Flags = 0
		if _, err := c.WriteToUDP(br.ToBytes(), &net.UDPAddr{IP: net.ParseIP("198.18.12.1"), Port: 4011}); err != nil {
			return err
		}
		backs := collect(c, br.TransactionID, 2*time.Second)
		if len(backs) != 1 || backs[0].MessageType() != dhcpv4.MessageTypeAck || backs[0].BootFileNameOption() != "undionly.kpxe" {
			return fmt.Errorf("4011 boot-server ACK: %d replies", len(backs))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
