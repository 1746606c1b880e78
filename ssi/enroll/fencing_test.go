package enroll

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/esir-project/esir/netlab"
	"github.com/esir-project/esir/ssi"
)

// bmcSim is one node's simulated BMC: OpenIPMI's ipmi_sim in a network
// namespace of its own, answering IPMI 2.0 (RMCP+) on UDP 623. Its
// chassis's power is a process it starts at power on (startcmd) and stops
// at power off; that process is the node's power supply: stopped, it kills
// the node's PID-namespace init, so every process of the node dies at once.
type bmcSim struct {
	host *netlab.Host
	dir  string
	cmd  *exec.Cmd
	out  bytes.Buffer
}

// startBMC starts the BMC of the node whose PID-namespace init is nodePID,
// at addr in a new lab host, with one administrator user.
func startBMC(ctx context.Context, t *testing.T, lab *netlab.Lab, name string, addr netip.Addr, user, password string, nodePID int) *bmcSim {
	t.Helper()
	h, err := lab.AddHost(ctx, name, netip.PrefixFrom(addr, 24), netlab.Link{})
	if err != nil {
		t.Fatal(err)
	}
	b := &bmcSim{host: h, dir: t.TempDir()}
	power := filepath.Join(b.dir, "power")
	// The power supply: SIGTERM from the BMC (power off) cuts the node.
	script := fmt.Sprintf("#!/bin/sh\necho on >> %[1]s.log\ntrap 'kill -KILL %[2]d; echo off >> %[1]s.log; exit 0' TERM INT\nwhile :; do sleep 1 & wait $!; done\n", power, nodePID)
	if err := os.WriteFile(power, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	// serial 15 (the system interface, VM codec, on loopback) is what
	// gives the simulated chassis power control through startcmd; nothing
	// connects to it, so a power off sends SIGTERM at once.
	conf := fmt.Sprintf(`name "%[1]s"
set_working_mc 0x20
  startlan 1
    addr %[2]s 623
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  serial 15 127.0.0.1 9002 codec VM
  startcmd "%[3]s"
  startnow true
  poweroff_wait 2
  kill_wait 2
  user 2 true "%[4]s" "%[5]s" admin 10 none md2 md5 straight
`, name, addr, power, user, password)
	emu := "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nsel_enable 0x20 1000 0x0a\nmc_enable 0x20\n"
	for f, data := range map[string]string{"lan.conf": conf, "bmc.emu": emu} {
		if err := os.WriteFile(filepath.Join(b.dir, f), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(b.dir, "state"), 0o700); err != nil {
		t.Fatal(err)
	}
	b.cmd = h.Command(context.WithoutCancel(ctx), "ipmi_sim", "-n", "-c", filepath.Join(b.dir, "lan.conf"),
		"-f", filepath.Join(b.dir, "bmc.emu"), "-s", filepath.Join(b.dir, "state"))
	b.cmd.Stdout, b.cmd.Stderr = &b.out, &b.out
	if err := b.cmd.Start(); err != nil {
		t.Fatalf("BMC %s: %v", name, err)
	}
	t.Cleanup(func() {
		syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
		b.cmd.Wait()
	})
	return b
}

// powerLog returns what the node's power supply recorded: "on" at each
// power on, "off" at each power off.
func (b *bmcSim) powerLog() []string {
	data, _ := os.ReadFile(filepath.Join(b.dir, "power.log"))
	return strings.Fields(string(data))
}

// chassisPower asks BMC addr for its chassis power state with ipmitool from
// node n, as fence_ipmilan does.
func chassisPower(ctx context.Context, n *node, addr netip.Addr, user, password string) (string, error) {
	out, err := n.Run(ctx, "ipmitool", "-I", "lanplus", "-C", "3", "-H", addr.String(), "-U", user, "-P", password, "chassis", "power", "status")
	return strings.TrimSpace(string(out)), err
}

// fenceHistory is `stonith_admin --history NODE --output-as=xml`.
type fenceEvent struct {
	Target   string `xml:"target,attr"`
	Action   string `xml:"action,attr"`
	Delegate string `xml:"delegate,attr"`
	Status   string `xml:"status,attr"`
}

func fenceHistory(ctx context.Context, n *node, target string) ([]fenceEvent, []byte, error) {
	out, err := n.Run(ctx, "stonith_admin", "--history", target, "--output-as=xml")
	if err != nil {
		return nil, out, err
	}
	var doc struct {
		Events []fenceEvent `xml:"list>fence_event"`
	}
	if err := xml.Unmarshal(out, &doc); err != nil {
		return nil, out, fmt.Errorf("stonith_admin XML: %w", err)
	}
	return doc.Events, out, nil
}

// deviceNodes returns, from crm_mon's XML on n, the node each fencing
// device runs on ("" when stopped).
func deviceNodes(ctx context.Context, n *node) (map[string]string, error) {
	out, err := n.Run(ctx, "crm_mon", "-1", "--inactive", "--output-as=xml")
	if err != nil {
		return nil, err
	}
	var doc struct {
		Resources []struct {
			ID    string `xml:"id,attr"`
			Agent string `xml:"resource_agent,attr"`
			Role  string `xml:"role,attr"`
			Nodes []struct {
				Name string `xml:"name,attr"`
			} `xml:"node"`
		} `xml:"resources>resource"`
	}
	if err := xml.Unmarshal(out, &doc); err != nil {
		return nil, err
	}
	on := map[string]string{}
	for _, r := range doc.Resources {
		if !strings.HasPrefix(r.Agent, "stonith:") {
			continue
		}
		on[r.ID] = ""
		if r.Role == "Started" && len(r.Nodes) == 1 {
			on[r.ID] = r.Nodes[0].Name
		}
	}
	return on, nil
}

// TestLevel1FencingNetns runs three core nodes (corosync, pacemaker) with
// fencing on, each in its own network, mount, UTS and PID namespaces, and
// each node's BMC simulated by ipmi_sim in a namespace of its own
// (198.18.0.101-103). The cluster definition names the BMCs with password
// files; the core nodes reconcile pacemaker every second as the node service
// does: every node gets a fence_ipmilan device, started on another node,
// and no password reaches the CIB. Then f3's corosync is killed (kill -9):
// the survivors fence f3 through its BMC with the real fence_ipmilan
// (ipmitool), fencing.action off: stonith_admin's history shows the fencing
// succeeded, the BMC reports power off, and the power-off killed every
// process of f3. Finally f3 leaves the definition's members and its device
// goes.
func TestLevel1FencingNetns(t *testing.T) {
	testFencing(t, "off", "its corosync died", func(ctx context.Context, victim *node) error {
		pid, err := victim.Run(ctx, "pidof", "corosync")
		if err != nil {
			return err
		}
		_, err = victim.Run(ctx, "kill", "-KILL", strings.TrimSpace(string(pid)))
		return err
	})
}

// TestLevel1FencingPartitionNetns is TestLevel1FencingNetns with f3 cut off
// the network (its link down: it alone loses quorum) and fencing.action
// reboot (the default): the survivors power f3 off and on again through its
// BMC; f3's processes died at the power-off.
func TestLevel1FencingPartitionNetns(t *testing.T) {
	testFencing(t, "reboot", "it was cut off", func(ctx context.Context, victim *node) error {
		_, err := victim.Host.Run(ctx, "ip", "link", "set", "eth0", "down")
		return err
	})
}

// testFencing runs the fencing test with fencing.action action; fail makes
// the victim f3 fail.
func testFencing(t *testing.T, action, failure string, fail func(ctx context.Context, victim *node) error) {
	if err := netlab.Available(); err != nil {
		t.Skipf("needs root and network namespaces: %v", err)
	}
	for _, bin := range []string{"/usr/sbin/corosync", "/usr/sbin/pacemakerd", "/usr/sbin/crm_mon", "/usr/sbin/cibadmin",
		"/usr/sbin/stonith_admin", "/usr/sbin/fence_ipmilan", "/usr/bin/ipmitool", "/usr/bin/ipmi_sim"} {
		if _, err := os.Stat(bin); err != nil {
			t.Skipf("%s is not installed (scripts/setup.sh test installs corosync, pacemaker, pacemaker-cli-utils, fence-agents, ipmitool and openipmi)", bin)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	names := []string{"f1", "f2", "f3"}
	bmcAddr := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, 0, byte(101 + i)}) }
	password := func(i int) string { return fmt.Sprintf("pw-%s-7Qx", names[i]) }
	// The definition, with the BMC passwords in files the server keeps
	// (0600). ipmi_sim does not answer "Get Channel Cipher Suites", which
	// ipmitool asks first (14 s of retries per call): the devices name
	// cipher suite 3 (RAKP-HMAC-SHA1, the usual one) through options.
	defDir := t.TempDir()
	yaml := "name: l1f\nprofile:\n  corosync: true\n  pacemaker: true\n  fencing: true\ncore_size: 3\ntoken_ms: 1000\nfencing:\n  action: " + action + "\n  bmcs:\n"
	for i, n := range names {
		if err := os.WriteFile(filepath.Join(defDir, n+".password"), []byte(password(i)+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		yaml += fmt.Sprintf("    - {node: %s, address: %s, username: admin, password_file: %s.password, options: {cipher: \"3\"}}\n", n, bmcAddr(i), n)
	}
	defPath := filepath.Join(defDir, "cluster.yaml")
	if err := os.WriteFile(defPath, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	def, warn, err := ssi.Load(defPath)
	if err != nil {
		t.Fatal(err)
	}
	if slices.ContainsFunc(warn, func(w string) bool { return strings.Contains(w, "fencing") }) {
		t.Errorf("fencing warnings for a definition with every BMC: %q", warn)
	}
	keys, err := ssi.LoadKeys(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{def: def, keys: keys, st: ssi.NewState(), nodes: map[string]*node{}}
	lab := newLab(ctx, t, "ssifn")
	var nodes []*node
	var bmcs []*bmcSim
	t.Cleanup(func() {
		keepLogs(t, nodes)
		keepPacemakerLogs(t, nodes)
		if t.Failed() {
			for i, b := range bmcs {
				t.Logf("BMC of %s: power %v; ipmi_sim said: %s", names[i], b.powerLog(), b.out.String())
			}
		}
	})
	for i, name := range names {
		n := joinNode(ctx, t, lab, c.st, def.CoreSize, i, name)
		n.enr.Timeout = 60 * time.Second
		nodes = append(nodes, n)
		c.nodes[name] = n
		bmcs = append(bmcs, startBMC(ctx, t, lab, "b"+name, bmcAddr(i), "admin", password(i), n.PID()))
	}
	if w := def.AllocationWarnings(c.st); slices.ContainsFunc(w, func(w string) bool { return strings.Contains(w, "fencing") }) {
		t.Errorf("fencing warnings once every member has a BMC: %q", w)
	}
	for i := range names {
		eventually(ctx, t, 10*time.Second, "BMC "+bmcAddr(i).String()+" answers", func() error {
			s, err := chassisPower(ctx, nodes[0], bmcAddr(i), "admin", password(i))
			if err == nil && s != "Chassis Power is on" {
				err = fmt.Errorf("power status %q", s)
			}
			return err
		})
	}
	stop := c.reconcile(ctx, t)
	defer func() { stop() }()

	t0 := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, len(nodes))
	for i, n := range nodes {
		b := c.bundle(t, n.Host.Name)
		wg.Go(func() { _, errs[i] = n.enr.Enroll(ctx, b) })
	}
	wg.Wait()
	for i, n := range nodes {
		if errs[i] != nil {
			t.Fatalf("%s: %v", n.Host.Name, errs[i])
		}
	}
	t.Logf("%v: all three enrolled", time.Since(t0).Round(time.Millisecond))

	// Every node's device runs, on another node; the views count three.
	eventually(ctx, t, 60*time.Second, "three fencing devices started, each off its node", func() error {
		on, err := deviceNodes(ctx, nodes[0])
		if err != nil {
			return err
		}
		if len(on) != 3 {
			return fmt.Errorf("fencing devices %v, want fence-f1, fence-f2, fence-f3", on)
		}
		for _, n := range names {
			if where := on[ssi.FenceDeviceID(n)]; where == "" || where == n {
				return fmt.Errorf("fencing devices run on %v; want each started, not on the node it fences", on)
			}
		}
		return nil
	})
	for i, n := range nodes {
		v, err := n.enr.View(ctx, c.bundle(t, names[i]))
		if err != nil || !v.FencingEnabled || v.FencingDevices != 3 {
			t.Errorf("%s's view: fencing enabled %v, %d devices, %v; want enabled with 3", names[i], v.FencingEnabled, v.FencingDevices, err)
		}
	}
	cib, err := nodes[1].Run(ctx, "cibadmin", "--query")
	if err != nil {
		t.Fatal(err)
	}
	for i := range names {
		if bytes.Contains(cib, []byte(password(i))) {
			t.Errorf("the CIB holds %s's BMC password", names[i])
		}
	}
	if fc, err := parseCIBFence(cib); err != nil || len(fc.devices) != 3 || len(fc.constraints) != 3 {
		t.Errorf("CIB fencing: %+v, %v; want 3 devices and 3 constraints", fc, err)
	}
	// Settled: a Reconcile round of the reconciling member changes nothing
	// (the CIB reads back as what ESIR wrote).
	rec := &recorder{r: nodes[0].Node}
	settled := *nodes[0].enr
	settled.Run = rec
	if err := settled.Reconcile(ctx, c.bundle(t, "f1")); err != nil {
		t.Fatalf("reconcile on f1, settled: %v", err)
	}
	if !slices.Contains(rec.ran, "cibadmin --query") {
		t.Errorf("f1 did not reconcile (not the reconciler?): it ran %q", rec.ran)
	}
	for _, l := range rec.ran {
		if f := strings.Fields(l); f[0] == "crm_attribute" || f[0] == "crm_resource" || f[0] == "crm_node" || f[0] == "cibadmin" && f[1] != "--query" {
			t.Errorf("settled cluster: Reconcile ran %s", l)
		}
	}
	t.Logf("%v: devices in place", time.Since(t0).Round(time.Millisecond))

	// f3's BMC changes in the definition: its device is replaced (its
	// constraint goes first and comes back), and it is the one that fences
	// f3 below.
	c.mu.Lock()
	c.def.Fencing.BMCs[2].Options["power_timeout"] = "25"
	c.mu.Unlock()
	eventually(ctx, t, 30*time.Second, "fence-f3 replaced", func() error {
		cib, err := nodes[0].Run(ctx, "cibadmin", "--query")
		if err != nil {
			return err
		}
		fc, err := parseCIBFence(cib)
		if err != nil {
			return err
		}
		if d := fc.devices["fence-f3"]; d.params["power_timeout"] != "25" || len(fc.constraints) != 3 {
			return fmt.Errorf("fence-f3 %v, constraints %v; want power_timeout 25 and 3 constraints", d, fc.constraints)
		}
		on, err := deviceNodes(ctx, nodes[0])
		if err != nil {
			return err
		}
		if where := on["fence-f3"]; where == "" || where == "f3" {
			return fmt.Errorf("fence-f3 runs on %q", where)
		}
		return nil
	})
	t.Logf("%v: fence-f3 replaced", time.Since(t0).Round(time.Millisecond))

	// f3 fails. The survivors keep quorum and fence it through its BMC.
	victim := nodes[2]
	if err := fail(ctx, victim); err != nil {
		t.Fatalf("f3's failure: %v", err)
	}
	tFail := time.Now()
	var events []fenceEvent
	eventually(ctx, t, 60*time.Second, "f3 fenced", func() error {
		var out []byte
		var err error
		events, out, err = fenceHistory(ctx, nodes[0], "f3")
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		if !slices.ContainsFunc(events, func(e fenceEvent) bool { return e.Target == "f3" && e.Status == "success" }) {
			return fmt.Errorf("no successful fencing of f3 in stonith_admin's history: %s", bytes.TrimSpace(out))
		}
		return nil
	})
	t.Logf("%v: f3 fenced %v after %s: %+v", time.Since(t0).Round(time.Millisecond), time.Since(tFail).Round(time.Millisecond), failure, events)
	// off: powered off; reboot: off, then on again.
	wantPower, wantLog := "Chassis Power is off", []string{"on", "off"}
	if action == "reboot" {
		wantPower, wantLog = "Chassis Power is on", []string{"on", "off", "on"}
	}
	if s, err := chassisPower(ctx, nodes[0], bmcAddr(2), "admin", password(2)); err != nil || s != wantPower {
		t.Errorf("f3's BMC says %q, %v; want %q", s, err, wantPower)
	}
	if got := bmcs[2].powerLog(); !slices.Equal(got, wantLog) {
		t.Errorf("f3's power supply recorded %v, want %v", got, wantLog)
	}
	eventually(ctx, t, 5*time.Second, "f3's processes gone", func() error {
		if err := syscall.Kill(victim.PID(), 0); !errors.Is(err, syscall.ESRCH) {
			return fmt.Errorf("f3's init (pid %d) still exists: %v", victim.PID(), err)
		}
		return nil
	})
	for i, b := range bmcs[:2] {
		if got := b.powerLog(); !slices.Equal(got, []string{"on"}) {
			t.Errorf("%s's power supply recorded %v, want [on]: only f3 is fenced", names[i], got)
		}
	}
	eventually(ctx, t, 20*time.Second, "pacemaker sees f3 offline and clean", func() error {
		online, err := nodes[0].enr.Online(ctx)
		if err != nil {
			return err
		}
		if !slices.Equal(online, []string{"f1", "f2"}) {
			return fmt.Errorf("online %v, want [f1 f2]", online)
		}
		return nil
	})

	// f3 leaves the cluster: the reconciler deletes its device and the
	// constraint. The reconciling loop stops meanwhile: it renders the
	// bundles of the core members it listed a moment before (a member that
	// left in between fails the render).
	stop()
	c.leave(t, "f3")
	stop = c.reconcile(ctx, t)
	eventually(ctx, t, 30*time.Second, "fence-f3 removed", func() error {
		cib, err := nodes[0].Run(ctx, "cibadmin", "--query")
		if err != nil {
			return err
		}
		fc, err := parseCIBFence(cib)
		if err != nil {
			return err
		}
		if _, ok := fc.devices["fence-f3"]; ok || len(fc.devices) != 2 || len(fc.constraints) != 2 {
			return fmt.Errorf("CIB fencing devices %v, constraints %v; want fence-f1 and fence-f2 only", fc.devices, fc.constraints)
		}
		return nil
	})
	t.Logf("%v: fence-f3 removed", time.Since(t0).Round(time.Millisecond))
	stop()
}

// TestPlanFencing checks the fencing changes Reconcile decides on.
func TestPlanFencing(t *testing.T) {
	dev := func(node string) ssi.FenceDevice {
		return ssi.FenceDevice{ID: ssi.FenceDeviceID(node), Agent: ssi.AgentIPMI, Node: node,
			Params: map[string]string{"ip": "198.18.1." + node[1:], "username": "admin", "lanplus": "1", "pcmk_host_list": node,
				"password_script": "cat /etc/pacemaker/esir-fence-" + node + ".password"}}
	}
	devices := []ssi.FenceDevice{dev("p1"), dev("p2"), dev("p3")}
	// cib returns the CIB's fencing part as Reconcile made it for ds.
	cib := func(ds ...ssi.FenceDevice) cibFence {
		var x strings.Builder
		x.WriteString("<cib><configuration><resources>")
		for _, d := range ds {
			x.WriteString(deviceXML(d))
		}
		x.WriteString(`<primitive id="admin-pdu" class="stonith" type="fence_apc"><instance_attributes id="a"><nvpair id="a1" name="ip" value="198.18.9.9"/></instance_attributes></primitive>`)
		x.WriteString("</resources><constraints>")
		for _, d := range ds {
			x.WriteString(avoidXML(d))
		}
		x.WriteString("</constraints></configuration></cib>")
		f, err := parseCIBFence([]byte(x.String()))
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	create := func(d ssi.FenceDevice) []string {
		return []string{"cibadmin --create --scope resources --xml-text " + deviceXML(d),
			"cibadmin --create --scope constraints --xml-text " + avoidXML(d)}
	}
	changed := dev("p2")
	changed.Params = maps.Clone(changed.Params)
	changed.Params["ip"] = "198.18.1.22"
	tests := []struct {
		name    string
		fencing bool
		devices []ssi.FenceDevice
		wd      string
		cib     cibFence
		want    []string
	}{
		{name: "settled", fencing: true, devices: devices, cib: cib(devices...)},
		{name: "new cluster", fencing: true, devices: devices, cib: cib(),
			want: slices.Concat(create(devices[0]), create(devices[1]), create(devices[2]))},
		{name: "BMC changed", fencing: true, devices: []ssi.FenceDevice{devices[0], changed, devices[2]}, cib: cib(devices...),
			want: []string{`cibadmin --delete --scope constraints --xml-text <rsc_location id="fence-p2-avoids-p2"/>`,
				`cibadmin --delete --scope resources --xml-text <primitive id="fence-p2"/>`,
				"cibadmin --create --scope resources --xml-text " + deviceXML(changed),
				"cibadmin --create --scope constraints --xml-text " + avoidXML(changed)}},
		{name: "node left", fencing: true, devices: devices[:2], cib: cib(devices...),
			want: []string{`cibadmin --delete --scope constraints --xml-text <rsc_location id="fence-p3-avoids-p3"/>`,
				`cibadmin --delete --scope resources --xml-text <primitive id="fence-p3"/>`}},
		{name: "fencing off", fencing: false, devices: devices, cib: cib(devices[:1]...),
			want: []string{`cibadmin --delete --scope constraints --xml-text <rsc_location id="fence-p1-avoids-p1"/>`,
				`cibadmin --delete --scope resources --xml-text <primitive id="fence-p1"/>`}},
		{name: "watchdog-only sbd", fencing: true, wd: "10s", cib: cib(),
			want: []string{"crm_attribute --type crm_config --name stonith-watchdog-timeout --update 10s"}},
		{name: "sbd gone", fencing: true, cib: cibFence{watchdog: "10s"},
			want: []string{"crm_attribute --type crm_config --name stonith-watchdog-timeout --delete"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := bundle("p1", 1, ssi.Core, "corosync", "pacemaker")
			b.Fencing, b.FenceDevices, b.StonithWatchdogTimeout = tt.fencing, tt.devices, tt.wd
			var got []string
			for _, a := range planFencing(b, tt.cib) {
				got = append(got, strings.Join(a.args, " "))
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("planFencing:\n got %q\nwant %q", got, tt.want)
			}
		})
	}
}

// TestDeviceXML checks a device's primitive: class stonith, ESIR's mark,
// the parameters as instance attributes with ids, a monitor; and its
// constraint.
func TestDeviceXML(t *testing.T) {
	d := ssi.FenceDevice{ID: "fence-n1", Agent: ssi.AgentIPMI, Node: "n1", Params: map[string]string{"ip": "198.18.1.1", "pcmk_host_list": "n1"}}
	x := deviceXML(d)
	want := `<primitive id="fence-n1" class="stonith" type="fence_ipmilan" description="ESIR: fences n1">` +
		`<instance_attributes id="fence-n1-instance_attributes">` +
		`<nvpair id="fence-n1-instance_attributes-ip" name="ip" value="198.18.1.1"></nvpair>` +
		`<nvpair id="fence-n1-instance_attributes-pcmk_host_list" name="pcmk_host_list" value="n1"></nvpair></instance_attributes>` +
		`<operations><op id="fence-n1-monitor-interval-60s" name="monitor" interval="60s"></op></operations></primitive>`
	if x != want {
		t.Errorf("deviceXML:\n got %s\nwant %s", x, want)
	}
	if a := avoidXML(d); a != `<rsc_location id="fence-n1-avoids-n1" rsc="fence-n1" node="n1" score="-INFINITY"></rsc_location>` {
		t.Errorf("avoidXML = %s", a)
	}
}

// TestStonithDeviceCount counts a cloned device once.
func TestStonithDeviceCount(t *testing.T) {
	s, err := parseCrmMon(fixture(t, "crm_mon-stonith.xml"))
	if err != nil || s.StonithDevices != 2 {
		t.Errorf("crm_mon-stonith.xml: %d devices, %v; want 2", s.StonithDevices, err)
	}
	out := `<pacemaker-result><nodes><node name="p1" id="1" online="true" type="member"/></nodes><resources>
<clone id="sbd-clone"><resource id="sbd:0" resource_agent="stonith:fence_sbd"/><resource id="sbd:1" resource_agent="stonith:fence_sbd"/></clone>
<resource id="fence-p1" resource_agent="stonith:fence_ipmilan"/><resource id="web" resource_agent="ocf:heartbeat:apache"/></resources></pacemaker-result>`
	if s, err := parseCrmMon([]byte(out)); err != nil || s.StonithDevices != 2 {
		t.Errorf("a cloned device and another: %d devices, %v; want 2", s.StonithDevices, err)
	}
}

// TestInstallRemovesStalePasswords: Install keeps the BMC password files its
// bundle gives and removes the others.
func TestInstallRemovesStalePasswords(t *testing.T) {
	root := t.TempDir()
	n := &Node{Root: root, Run: Local{}}
	pw := func(node string) ssi.File {
		return ssi.File{Path: "/etc/pacemaker/esir-fence-" + node + ".password", Mode: 0o600, Data: []byte("pw-" + node)}
	}
	b := bundle("p1", 1, ssi.Core, "corosync", "pacemaker")
	b.Files = []ssi.File{pw("p1"), pw("p2"), pw("p3"), {Path: "/etc/pacemaker/authkey", Mode: 0o400, Data: []byte("k")}}
	if err := n.Install(b); err != nil {
		t.Fatal(err)
	}
	b.Files = slices.Delete(b.Files, 2, 3) // p3 left
	if err := n.Install(b); err != nil {
		t.Fatal(err)
	}
	got, _ := filepath.Glob(filepath.Join(root, "etc/pacemaker/*"))
	for i := range got {
		got[i] = strings.TrimPrefix(got[i], root)
	}
	if want := []string{"/etc/pacemaker/authkey", "/etc/pacemaker/esir-fence-p1.password", "/etc/pacemaker/esir-fence-p2.password"}; !slices.Equal(got, want) {
		t.Errorf("after p3 left: %v, want %v", got, want)
	}
	b.Files = b.Files[2:] // fencing off
	if err := n.Install(b); err != nil {
		t.Fatal(err)
	}
	if got, _ := filepath.Glob(filepath.Join(root, "etc/pacemaker/esir-fence-*")); len(got) != 0 {
		t.Errorf("fencing off: %v remain", got)
	}
}
