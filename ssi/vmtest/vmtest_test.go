package vmtest

import (
	"context"
	"debug/elf"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/netlab"
	"github.com/esir-project/esir/ssi"
	"github.com/esir-project/esir/ssi/enroll"
	"github.com/esir-project/esir/vm"
)

// clusterYAML is the level-2 cluster: keepalived, one VIP balanced by two
// directors over two real servers, and the NFS home exported by r1.
const clusterYAML = `name: lvs
profile:
  corosync: false
  pacemaker: false
  fencing: false
  keepalived: true
  chrony: false
  nfs_home: true
  clustershell: false
core_size: 1
vips:
  - name: web
    address: 198.18.0.100/24
    vrid: 61
    directors: [d1, d2]
    real_servers: [r1, r2]
    services:
      - port: 80
nfs:
  server: r1
  clients: 198.18.0.0/24
`

// Node addresses on the lab's bridge; the client is 198.18.0.2.
var nodeAddrs = []struct {
	name string
	addr netip.Addr
}{
	{"d1", netip.MustParseAddr("198.18.0.11")},
	{"d2", netip.MustParseAddr("198.18.0.12")},
	{"r1", netip.MustParseAddr("198.18.0.21")},
	{"r2", netip.MustParseAddr("198.18.0.22")},
}

// node is one guest: its bundle, its enroll.Node (files staged on the host
// under Root, commands run in the guest) and its VM.
type node struct {
	name   string
	addr   netip.Addr
	mac    string
	bundle *ssi.Bundle
	enr    *enroll.Node
	vm     *vm.VM
}

// TestLevel2IPVSQEMU is issue 10's level 2: in QEMU guests (TCG, Debian's
// kernel with its ip_vs modules) keepalived, configured by ssi.Render,
// spreads client connections to the VIP over both real servers; a real
// server whose service dies is taken out of IPVS; and when the master
// director dies the backup takes the VIP and the service answers again.
// The same guests check the NFS home, which the CI host's kernel cannot
// serve (no nfsd): r1 runs the kernel NFS server as ssi/enroll starts it
// without systemd, r2 and d2 enroll and mount /home with their rendered fstab
// line, and a file written on one is read on the others (startHome,
// checkHome).
func TestLevel2IPVSQEMU(t *testing.T) {
	if testing.Short() {
		t.Skip("QEMU guests under TCG are slow; skipped with -short")
	}
	if err := netlab.Available(); err != nil {
		t.Skipf("needs root for network namespaces: %v", err)
	}
	if err := vm.Available(vm.BIOS); err != nil {
		t.Skip(err)
	}
	k, err := vm.HostDebianKernel()
	if err != nil {
		t.Skip(err)
	}
	busybox := staticBusybox(t)
	for _, b := range hostBinaries {
		if _, err := os.Stat(b.src); err != nil {
			t.Skipf("%s is missing: install Debian package %s", b.src, b.pkg)
		}
	}
	t0 := time.Now()
	logf := func(format string, a ...any) {
		t.Helper()
		t.Logf("%6.1fs  %s", time.Since(t0).Seconds(), fmt.Sprintf(format, a...))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	dir := t.TempDir()

	// The cluster as ESIR's server holds it: definition, allocation, keys.
	c, warn, err := ssi.Parse([]byte(clusterYAML))
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range warn {
		logf("cluster definition: %s", w)
	}
	keys, err := ssi.LoadKeys(filepath.Join(dir, "secrets"))
	if err != nil {
		t.Fatal(err)
	}
	st := ssi.NewState()
	for _, n := range nodeAddrs {
		if _, _, err := st.Join(n.name, n.addr, c.CoreSize); err != nil {
			t.Fatal(err)
		}
	}
	vipDef := c.VIPs[0]
	svc := vipDef.Services[0]
	vip := netip.AddrPortFrom(vipDef.Address.Addr(), svc.Port)
	service := fmt.Sprintf("%s %s", strings.ToUpper(svc.Protocol), vip)

	base, mods, err := baseInitramfs(k, busybox, []string{"virtio_pci", "virtio_net", "ip_vs", "ip_vs_" + svc.Scheduler, "nfsd", "nfsv4"})
	if err != nil {
		t.Fatal(err)
	}
	logf("initramfs: %d MiB, kernel %s, modules %s", len(base)>>20, k.Version, strings.Join(mods, " "))

	// A name of this process's own: netlab.New purges a lab of the same
	// name, which would kill the guests of another run of this test (the
	// machine is shared).
	lab, err := netlab.New(ctx, "ssivm"+strconv.FormatInt(int64(os.Getpid()%(36*36*36)), 36))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := lab.Close(); err != nil {
			t.Errorf("netlab close: %v", err)
		}
	})
	cli, err := lab.AddHost(ctx, "cli", netip.MustParsePrefix("198.18.0.2/24"), netlab.Link{})
	if err != nil {
		t.Fatal(err)
	}
	var logDir string // where failed runs' serial logs go
	keepLogs := func(v *vm.VM) {
		if logDir == "" {
			if logDir = os.Getenv("ESIR_ARTIFACTS"); logDir == "" {
				d, err := os.MkdirTemp("", "esir-ssi-vmtest-")
				if err != nil {
					t.Log(err)
					return
				}
				logDir = d
			}
			t.Logf("serial logs kept in %s", logDir)
		}
		if err := v.KeepLog(logDir, "ssi-vmtest"); err != nil {
			t.Log(err)
		}
		t.Logf("%s console tail:\n%s", v.Name(), tail(v.Serial(), 30))
	}

	nodes := map[string]*node{}
	for _, na := range nodeAddrs {
		b, err := ssi.Render(c, st, keys, na.name)
		if err != nil {
			t.Fatal(err)
		}
		stage := filepath.Join(dir, na.name, "root")
		n := &node{name: na.name, addr: na.addr, bundle: b, enr: &enroll.Node{
			Root: stage,
			Run:  guestRunner{ns: cli.NS, addr: netip.AddrPortFrom(na.addr, ctlPort)},
			Init: enroll.Direct,
		}}
		if err := n.enr.Install(b); err != nil {
			t.Fatal(err)
		}
		if slices.Contains(b.Services, "nfs-server") {
			if err := os.WriteFile(filepath.Join(stage, "etc", "nfs.conf"), []byte(nfsConf), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		initrd := filepath.Join(dir, na.name, "initrd.cpio")
		if err := nodeInitramfs(base, stage, initrd); err != nil {
			t.Fatal(err)
		}
		tap := "tap" + na.name
		if err := lab.AddTap(ctx, tap); err != nil {
			t.Fatal(err)
		}
		cmdline := fmt.Sprintf("console=ttyS0 panic=-1 quiet esir.name=%s esir.addr=%s", na.name, netip.PrefixFrom(na.addr, vipDef.Address.Bits()))
		if len(b.LoopbackVIPs) > 0 {
			cmdline += fmt.Sprintf(" esir.serve=%d", svc.Port)
		}
		a4 := na.addr.As4()
		n.mac = fmt.Sprintf("52:54:00:e5:%02x:%02x", a4[2], a4[3])
		n.vm, err = vm.Start(ctx, vm.Config{
			Name:      "ssi-" + na.name,
			MemoryMiB: 256,
			CPUs:      1,
			NICs:      []vm.NIC{{Model: "virtio-net-pci", MAC: n.mac, Tap: tap}},
			Kernel:    k.Vmlinuz,
			Initrd:    initrd,
			Append:    cmdline,
			NoReboot:  true,
			NetNS:     lab.Switch,
			WorkDir:   dir,
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			n.vm.Kill()
			if t.Failed() {
				keepLogs(n.vm)
			}
		})
		nodes[na.name] = n
	}
	d1, d2, r1, r2 := nodes["d1"], nodes["d2"], nodes["r1"], nodes["r2"]
	logf("4 guests started (256 MiB, 1 vCPU, TCG)")

	ready := regexp.MustCompile(`ESIR-VM-READY `)
	bootCtx, bootCancel := context.WithTimeout(ctx, 3*time.Minute)
	defer bootCancel()
	for _, n := range []*node{d1, d2, r1, r2} {
		line, _, err := n.vm.WaitFor(bootCtx, ready, 0)
		if err != nil {
			t.Fatal(err)
		}
		logf("%s: %s", n.name, line[strings.Index(line, "ESIR-VM-READY"):])
		if s := n.vm.Serial(); strings.Contains(s, "ESIR-VM-FAIL") {
			t.Fatalf("%s: init failed:\n%s", n.name, tail(s, 30))
		}
	}
	// The control shells answer (the client's first ARP for a guest that
	// just brought eth0 up can go unanswered).
	for _, n := range []*node{d1, d2, r1, r2} {
		poll(ctx, t, n.name+"'s control shell", 60*time.Second, func() (bool, string) {
			_, err := n.enr.Run.Run(ctx, "true")
			if err == nil {
				return true, ""
			}
			neigh, _ := cli.Run(ctx, "ip", "neigh")
			fdb, _ := netlab.NSCommand(ctx, lab.Switch, "bridge", "fdb", "show", "br", "br0").CombinedOutput()
			return false, fmt.Sprintf("%v\nclient's neighbours:\n%s\nbridge fdb:\n%s", err, neigh, fdb)
		})
	}
	logf("control shells answer")

	// The NFS home's server starts first: its grace period, in which
	// clients cannot open files, runs out while keepalived is checked.
	export := c.NFS.Export
	startHome(ctx, t, r1, export)
	logf("nfs: %s exports %s (NFSv4 only)", r1.name, export)

	// Real servers: the ARP sysctls, then the VIP on lo, as ssi/enroll's
	// Enroll applies LoopbackVIPs.
	for _, n := range []*node{r1, r2} {
		if len(n.bundle.LoopbackVIPs) != 1 || n.bundle.LoopbackVIPs[0] != vip.Addr() {
			t.Fatalf("%s: rendered loopback VIPs %v, want [%s]", n.name, n.bundle.LoopbackVIPs, vip.Addr())
		}
		sysctl := ""
		for _, f := range n.bundle.Files {
			if strings.HasPrefix(f.Path, "/etc/sysctl.d/") {
				sysctl = f.Path
			}
		}
		if sysctl == "" {
			t.Fatalf("%s: no ARP sysctl file rendered: %v", n.name, n.bundle.Files)
		}
		if out, err := n.enr.Run.Run(ctx, "sysctl", "-p", sysctl); err != nil {
			t.Fatal(err)
		} else if !strings.Contains(string(out), "arp_ignore = 1") {
			t.Fatalf("%s: sysctl -p %s printed %q", n.name, sysctl, out)
		}
		for _, a := range n.bundle.LoopbackVIPs {
			if _, err := n.enr.Run.Run(ctx, "ip", "addr", "replace", a.String()+"/32", "dev", "lo"); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Directors: keepalived with the rendered file, unchanged, started the
	// way ssi/enroll starts services without systemd.
	for _, n := range []*node{d1, d2} {
		want := ""
		for _, f := range n.bundle.Files {
			if f.Path == "/etc/keepalived/keepalived.conf" {
				want = string(f.Data)
			}
		}
		if want == "" || !slices.Contains(n.bundle.Services, "keepalived") {
			t.Fatalf("%s: no keepalived in its bundle (services %v)", n.name, n.bundle.Services)
		}
		got, err := n.enr.Run.Run(ctx, "cat", "/etc/keepalived/keepalived.conf")
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != want {
			t.Fatalf("%s: keepalived.conf in the guest differs from the rendered one:\n%s", n.name, got)
		}
		if err := n.enr.Start(ctx, n.bundle); err != nil {
			t.Fatal(err)
		}
	}
	logf("real servers configured, keepalived started on d1 and d2")

	ipvs := func(n *node) ([]netip.AddrPort, error) {
		out, err := n.enr.Run.Run(ctx, "ipvsadm", "-Ln")
		if err != nil {
			return nil, err
		}
		vs := virtualServers(out)
		rs, ok := vs[service]
		if !ok {
			return nil, fmt.Errorf("%s: ipvsadm -Ln lists no %s:\n%s", n.name, service, out)
		}
		slices.SortFunc(rs, func(a, b netip.AddrPort) int { return a.Compare(b) })
		return rs, nil
	}
	rsAddr := func(ns ...*node) []netip.AddrPort {
		var out []netip.AddrPort
		for _, n := range ns {
			out = append(out, netip.AddrPortFrom(n.addr, svc.Port))
		}
		return out
	}
	holds := func(n *node) bool {
		ok, err := n.enr.HoldsVIP(ctx, vip.Addr())
		if err != nil {
			t.Logf("%s: %v", n.name, err)
		}
		return ok
	}

	// (1) d1 (priority 150) holds the VIP, d2 does not, and d1's IPVS
	// lists both real servers.
	el := poll(ctx, t, "d1 master with both real servers", 90*time.Second, func() (bool, string) {
		h1, h2 := holds(d1), holds(d2)
		rs, err := ipvs(d1)
		state := fmt.Sprintf("d1 holds VIP: %v, d2 holds VIP: %v, d1 real servers: %v (%v)", h1, h2, rs, err)
		return h1 && !h2 && slices.Equal(rs, rsAddr(r1, r2)), state
	})
	logf("(1) d1 holds %s, d2 does not; d1's IPVS lists %v (after %.1fs)", vip.Addr(), rsAddr(r1, r2), el.Seconds())
	if rs, err := ipvs(d2); err != nil || !slices.Equal(rs, rsAddr(r1, r2)) {
		t.Errorf("backup d2's IPVS: %v, %v; want %v", rs, err, rsAddr(r1, r2))
	}

	// (2) Connections to the VIP are spread over both real servers.
	cl := newClient(cli.NS, vip)
	const conns = 40
	start := time.Now()
	counts, err := cl.spread(ctx, conns)
	if err != nil {
		t.Fatalf("(2) %v (answers so far %v)", err, counts)
	}
	logf("(2) %d connections to %s (%s): %v in %.1fs", conns, vip, svc.Scheduler, fmtCounts(counts), time.Since(start).Seconds())
	checkSpread(t, counts, conns, "r1", "r2")

	// (3) r2's service dies: keepalived's TCP check takes it out of IPVS,
	// and every new connection goes to r1.
	delayLoop, connectTimeout := checkTimes(t, d1.bundle)
	if _, err := r2.enr.Run.Run(ctx, "killall", "httpd"); err != nil {
		t.Fatal(err)
	}
	el = poll(ctx, t, "r2 out of d1's IPVS", 60*time.Second, func() (bool, string) {
		rs, err := ipvs(d1)
		return err == nil && slices.Equal(rs, rsAddr(r1)), fmt.Sprintf("d1 real servers: %v (%v)", rs, err)
	})
	logf("(3) r2's service killed: out of d1's IPVS after %.1fs (delay_loop %v, connect_timeout %v)", el.Seconds(), delayLoop, connectTimeout)
	// One check interval, plus the check's own wait and a retry's, plus
	// scheduling slack on a loaded host.
	if bound := 2*delayLoop + connectTimeout + 5*time.Second; el > bound {
		t.Errorf("(3) r2 left IPVS after %v, want within %v", el.Round(100*time.Millisecond), bound)
	}
	counts, err = cl.spread(ctx, 20)
	if err != nil {
		t.Fatalf("(3) %v (answers so far %v)", err, counts)
	}
	logf("(3) 20 connections: %v", fmtCounts(counts))
	if counts["r1"] != 20 {
		t.Errorf("(3) with r2 dead, answers %v, want all 20 from r1", counts)
	}

	// r2's service comes back: the check puts it back in.
	if _, err := r2.enr.Run.Run(ctx, "httpd", "-p", strconv.Itoa(int(svc.Port)), "-h", "/www"); err != nil {
		t.Fatal(err)
	}
	el = poll(ctx, t, "r2 back in both directors' IPVS", 60*time.Second, func() (bool, string) {
		rs1, err1 := ipvs(d1)
		rs2, err2 := ipvs(d2)
		return err1 == nil && err2 == nil && slices.Equal(rs1, rsAddr(r1, r2)) && slices.Equal(rs2, rsAddr(r1, r2)),
			fmt.Sprintf("d1 real servers: %v (%v), d2 real servers: %v (%v)", rs1, err1, rs2, err2)
	})
	logf("r2's service restarted: back in both directors' IPVS after %.1fs", el.Seconds())

	// The NFS home, before d1 (another of its clients) dies.
	start = time.Now()
	checkHome(ctx, t, logf, r1, export, r2, d2)
	logf("nfs: home checked in %.1fs", time.Since(start).Seconds())

	// (4) The master director dies: d2 takes the VIP and connections to it
	// succeed again, through d2, spread over both real servers.
	d1.vm.Kill()
	killed := time.Now()
	el = poll(ctx, t, "d2 takes the VIP", 60*time.Second, func() (bool, string) {
		h := holds(d2)
		return h, fmt.Sprintf("d2 holds VIP: %v", h)
	})
	logf("(4) d1 powered off: d2 holds the VIP after %.1fs", el.Seconds())
	el = poll(ctx, t, "the VIP answers through d2", 60*time.Second, func() (bool, string) {
		name, err := cl.who(ctx)
		return err == nil, fmt.Sprintf("answer %q, %v", name, err)
	})
	logf("(4) the VIP answers again %.1fs after d1 died", time.Since(killed).Seconds())
	if rs, err := ipvs(d2); err != nil || !slices.Equal(rs, rsAddr(r1, r2)) {
		t.Errorf("(4) d2's IPVS: %v, %v; want %v", rs, err, rsAddr(r1, r2))
	}
	counts, err = cl.spread(ctx, 20)
	if err != nil {
		t.Fatalf("(4) %v (answers so far %v)", err, counts)
	}
	logf("(4) 20 connections through d2: %v", fmtCounts(counts))
	checkSpread(t, counts, 20, "r1", "r2")
	// The client reaches the VIP at d2's MAC now (keepalived's gratuitous
	// ARP, or the client's own ARP once d1 stopped answering).
	if out, err := cli.Run(ctx, "ip", "neigh", "show", vip.Addr().String()); err != nil {
		t.Error(err)
	} else if f := strings.Fields(string(out)); slices.Contains(f, "lladdr") && !slices.Contains(f, d2.mac) {
		t.Errorf("(4) the client's neighbour entry for the VIP is %q, want d2's MAC %s", strings.TrimSpace(string(out)), d2.mac)
	} else {
		logf("(4) client's neighbour entry for the VIP: %s", strings.TrimSpace(string(out)))
	}
	logf("done")
}

// staticBusybox returns the host's busybox, skipping the test unless it is
// the statically linked one.
func staticBusybox(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("busybox")
	if err != nil {
		t.Skip("busybox is missing: install Debian package busybox-static")
	}
	f, err := elf.Open(p)
	if err != nil {
		t.Skipf("busybox %s: %v", p, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			t.Skipf("%s is dynamically linked: install Debian package busybox-static", p)
		}
	}
	return p
}

// poll calls check every 500 ms until it reports true, and returns how long
// that took; at the timeout (or ctx's end) the test fails with the last
// state check described.
func poll(ctx context.Context, t *testing.T, what string, timeout time.Duration, check func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		ok, state := check()
		if ok {
			return time.Since(start)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting %v for %s: %v; last state: %s", time.Since(start).Round(100*time.Millisecond), what, ctx.Err(), state)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// checkSpread fails unless all n answers came from names, each with at least
// a quarter of them.
func checkSpread(t *testing.T, counts map[string]int, n int, names ...string) {
	t.Helper()
	total := 0
	for name, c := range counts {
		if !slices.Contains(names, name) {
			t.Errorf("answer from %q, which is not a real server", name)
		}
		total += c
	}
	if total != n {
		t.Errorf("%d answers, want %d", total, n)
	}
	for _, name := range names {
		if counts[name]*4 < n {
			t.Errorf("%s answered %d of %d connections, want at least a quarter (%v)", name, counts[name], n, fmtCounts(counts))
		}
	}
}

func fmtCounts(counts map[string]int) string {
	var parts []string
	for _, name := range slices.Sorted(maps.Keys(counts)) {
		parts = append(parts, fmt.Sprintf("%s=%d", name, counts[name]))
	}
	return strings.Join(parts, " ")
}

// checkTimes reads delay_loop and the TCP check's connect_timeout from a
// director's rendered keepalived.conf.
func checkTimes(t *testing.T, b *ssi.Bundle) (delayLoop, connectTimeout time.Duration) {
	t.Helper()
	for _, f := range b.Files {
		if f.Path != "/etc/keepalived/keepalived.conf" {
			continue
		}
		get := func(key string) time.Duration {
			m := regexp.MustCompile(`(?m)^\s*` + key + `\s+(\d+)`).FindSubmatch(f.Data)
			if m == nil {
				t.Fatalf("rendered keepalived.conf has no %s", key)
			}
			s, _ := strconv.Atoi(string(m[1]))
			return time.Duration(s) * time.Second
		}
		return get("delay_loop"), get("connect_timeout")
	}
	t.Fatal("no keepalived.conf rendered")
	return 0, 0
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(strings.ReplaceAll(s, "\r", ""), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
