package enroll

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/esir-project/esir/ssi"
)

// engines is a Runner standing for a node's service manager and engines:
// it keeps which services run, answers the queries Start makes and records
// every command that acts (starts, stops, reloads).
type engines struct {
	mu      sync.Mutex
	running map[string]bool // by service name
	acts    []string
	fail    string // a command line that fails
	// coming counts, per service, the queries its daemon still leaves
	// unanswered: it runs (pidof finds it) but does not answer yet.
	coming map[string]int
	// slow makes a started corosync answer only after a few queries.
	slow   bool
	sysctl map[string]string // kernel settings; unset ones read 0
	lo     map[string]bool   // addresses on lo
}

// pids are the fake daemons' process ids.
var pids = map[string]string{"keepalived": "42", "pacemaker_remote": "43"}

func (e *engines) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	line := strings.Join(append([]string{name}, args...), " ")
	e.mu.Lock()
	defer e.mu.Unlock()
	if line == e.fail {
		e.acts = append(e.acts, line)
		return []byte("boom"), errors.New("exit status 1")
	}
	byDaemon := map[string]string{"chronyd": "chrony", "keepalived": "keepalived", "corosync": "corosync", "pacemakerd": "pacemaker", "pacemaker-remoted": "pacemaker_remote",
		"rpc.mountd": "rpc.mountd"}
	switch {
	case line == "cat "+nfsdThreads:
		// The kernel NFS server: "nfsd" is its mounted filesystem,
		// "nfs-server" its threads.
		if !e.running["nfsd"] {
			return nil, errors.New("no such file")
		}
		if e.running["nfs-server"] {
			return []byte("8\n"), nil
		}
		return []byte("0\n"), nil
	case line == "pidof rpc.mountd" && e.running["rpc.mountd"]:
		return []byte("44\n"), nil
	case line == "corosync-cfgtool -s":
		if e.coming["corosync"] > 0 {
			if e.coming["corosync"]--; e.coming["corosync"] == 0 {
				e.running["corosync"] = true
			}
			return nil, errors.New("exit status 1")
		}
		if !e.running["corosync"] {
			return nil, errors.New("exit status 1")
		}
		return nil, nil
	case strings.HasPrefix(line, "systemctl is-active --quiet "):
		if !e.running[args[2]] {
			return nil, errors.New("exit status 3")
		}
		return nil, nil
	case name == "pidof":
		svc := byDaemon[args[0]]
		if !e.running[svc] && e.coming[svc] == 0 {
			return nil, errors.New("exit status 1")
		}
		return []byte(cmp.Or(pids[svc], "41") + "\n"), nil
	case name == "sysctl" && args[0] == "-n":
		return []byte(cmp.Or(e.sysctl[args[1]], "0") + "\n"), nil
	case line == "cat "+keepalivedPID:
		if !e.running["keepalived"] {
			return nil, errors.New("no such file")
		}
		return []byte("42\n"), nil
	}
	e.acts = append(e.acts, line)
	switch {
	case name == "systemctl" && (args[0] == "start" || args[0] == "restart"):
		e.running[args[1]] = true
	case name == "chronyc" && args[0] == "shutdown":
		e.running["chrony"] = false
	case name == "chronyd":
		e.running["chrony"] = true
	case name == "corosync" && e.slow:
		e.coming[name] = 3
	case name == "keepalived" || name == "corosync":
		e.running[name] = true
	case line == "mount -t nfsd nfsd /proc/fs/nfsd":
		e.running["nfsd"] = true
	case name == "rpc.mountd":
		e.running[name] = true
	case name == "rpc.nfsd":
		e.running["nfs-server"] = args[0] != "0"
	case line == "kill -TERM 44":
		e.running["rpc.mountd"] = false
	case name == "systemctl" && args[0] == "stop":
		e.running[args[1]] = false
	case line == "corosync-cfgtool -H --force":
		e.running["corosync"] = false
	case line == "pacemakerd --shutdown":
		e.running["pacemaker"] = false
	case name == "kill" && args[0] == "-TERM":
		for svc, pid := range pids {
			if slices.Contains(args[1:], pid) {
				e.running[svc] = false
			}
		}
	case name == "sh" && strings.Contains(line, "setsid pacemaker-remoted"):
		e.running["pacemaker_remote"] = true
	case name == "sh" && strings.Contains(line, "setsid pacemakerd"):
		e.running["pacemaker"] = true
	case name == "sysctl" && args[0] == "-w":
		k, v, _ := strings.Cut(args[1], "=")
		e.sysctl[k] = v
	case name == "ip" && args[0] == "addr" && args[1] == "replace" && args[4] == "lo":
		e.lo[args[2]] = true
	case name == "ip" && args[0] == "addr" && args[1] == "del" && args[4] == "lo":
		if !e.lo[args[2]] {
			return []byte("RTNETLINK answers: Cannot assign requested address"), errors.New("exit status 2")
		}
		delete(e.lo, args[2])
	}
	return nil, nil
}

// newEngines returns engines where nothing runs yet.
func newEngines() *engines {
	return &engines{running: map[string]bool{}, coming: map[string]int{}, sysctl: map[string]string{}, lo: map[string]bool{}}
}

// take returns the commands that acted since the last take.
func (e *engines) take() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	a := e.acts
	e.acts = nil
	return a
}

// reloadBundle is a core node's bundle with a file for every engine Start
// can reload; edit changes one file's contents.
func reloadBundle(services ...string) *ssi.Bundle {
	b := bundle("p1", 1, ssi.Core, services...)
	b.Files = []ssi.File{
		{Path: "/etc/corosync/corosync.conf", Mode: 0o644, Data: []byte("totem { config_version: 1 }\n")},
		{Path: "/etc/corosync/authkey", Mode: 0o400, Data: []byte("key")},
		{Path: "/etc/pacemaker/authkey", Mode: 0o440, Data: []byte("pkey")},
		{Path: "/etc/chrony/chrony.conf", Mode: 0o644, Data: []byte("allow 198.18.0.0/24\n")},
		{Path: "/etc/keepalived/keepalived.conf", Mode: 0o644, Data: []byte("vrrp_instance web { priority 150 }\n")},
		{Path: "/etc/exports.d/esir-home.exports", Mode: 0o644, Data: []byte("/home 198.18.0.0/24(rw)\n")},
	}
	return b
}

func edit(b *ssi.Bundle, path, data string) *ssi.Bundle {
	nb := *b
	nb.Files = slices.Clone(b.Files)
	for i, f := range nb.Files {
		if f.Path == path {
			nb.Files[i].Data = []byte(data)
		}
	}
	nb.Version++
	return &nb
}

// TestStartReloadsChangedEngines runs Start under systemd and without it
// against engines that remember what runs: a first Start starts every
// engine, a second with the same files touches none, and a change to one
// engine's files reloads (or restarts) that engine alone, the way the engine
// supports. A failed reload is a reload check naming the node, and the next
// Start tries again.
func TestStartReloadsChangedEngines(t *testing.T) {
	ctx := context.Background()
	for _, tt := range []struct {
		init     Init
		services []string
		start    []string
		changes  map[string][]string // file changed -> commands that must act, alone
	}{
		{init: Systemd, services: []string{"corosync", "pacemaker", "chrony", "keepalived", "nfs-server"},
			start: []string{"systemctl start corosync", "systemctl start pacemaker", "systemctl start chrony", "systemctl start keepalived", "systemctl start nfs-server"},
			changes: map[string][]string{
				"/etc/corosync/corosync.conf":      {"corosync-cfgtool -R"},
				"/etc/chrony/chrony.conf":          {"systemctl restart chrony"},
				"/etc/keepalived/keepalived.conf":  {"systemctl reload keepalived"},
				"/etc/exports.d/esir-home.exports": {"systemctl reload nfs-server"},
				"/etc/pacemaker/authkey":           nil,
			}},
		{init: Direct, services: []string{"corosync", "chrony", "keepalived", "nfs-server"},
			start: []string{"corosync", "chronyd -f /etc/chrony/chrony.conf", "keepalived -f /etc/keepalived/keepalived.conf",
				"mount -t nfsd nfsd /proc/fs/nfsd", "exportfs -ra", "rpc.mountd -N 2 -N 3 --no-udp", "rpc.nfsd -N 3 -V 4 --no-udp"},
			changes: map[string][]string{
				"/etc/corosync/corosync.conf":      {"corosync-cfgtool -R"},
				"/etc/chrony/chrony.conf":          {"chronyc shutdown", "chronyd -f /etc/chrony/chrony.conf"},
				"/etc/keepalived/keepalived.conf":  {"kill -HUP 42"},
				"/etc/exports.d/esir-home.exports": {"exportfs -ra"},
			}},
	} {
		t.Run(map[Init]string{Systemd: "systemd", Direct: "direct"}[tt.init], func(t *testing.T) {
			e := newEngines()
			n := &Node{Root: t.TempDir(), Run: e, Init: tt.init}
			b := reloadBundle(tt.services...)
			if err := n.Start(ctx, b); err != nil {
				t.Fatal(err)
			}
			if got := e.take(); !slices.Equal(got, tt.start) {
				t.Fatalf("first Start ran %q, want %q", got, tt.start)
			}
			if err := n.Start(ctx, b); err != nil {
				t.Fatal(err)
			}
			if got := e.take(); len(got) != 0 {
				t.Fatalf("Start with unchanged files ran %q, want nothing", got)
			}
			for i, path := range slices.Sorted(maps.Keys(tt.changes)) {
				b = edit(b, path, fmt.Sprintf("changed %d\n", i))
				if err := n.Start(ctx, b); err != nil {
					t.Fatalf("%s changed: %v", path, err)
				}
				if got := e.take(); !slices.Equal(got, tt.changes[path]) {
					t.Errorf("%s changed: Start ran %q, want %q", path, got, tt.changes[path])
				}
				if err := n.Start(ctx, b); err != nil {
					t.Fatal(err)
				}
				if got := e.take(); len(got) != 0 {
					t.Errorf("%s changed, second Start ran %q, want nothing", path, got)
				}
			}
			// A failed reload is reported and tried again at the next Start.
			b = edit(b, "/etc/corosync/corosync.conf", "totem { config_version: 9 }\n")
			e.fail = "corosync-cfgtool -R"
			var ce *CheckError
			if err := n.Start(ctx, b); !errors.As(err, &ce) || ce.Check != CheckReload || ce.Node != "p1" ||
				!strings.Contains(err.Error(), "p1 not enrolled: check reload: reload corosync (nodelist version") {
				t.Fatalf("failed reload: %v", err)
			}
			e.take()
			e.fail = ""
			if err := n.Start(ctx, b); err != nil {
				t.Fatal(err)
			}
			if got := e.take(); !slices.Equal(got, []string{"corosync-cfgtool -R"}) {
				t.Errorf("Start after a failed reload ran %q, want the reload again", got)
			}
		})
	}
}

// TestStartWaitsForComingEngine covers a daemon that runs but does not answer
// yet: Start waits for a corosync it started until it answers, and when a
// corosync an earlier round started is still coming up, Start does not start
// a second one (which would die on the first one's lock, unseen) but waits
// for it and reloads it with the newer files.
func TestStartWaitsForComingEngine(t *testing.T) {
	ctx := context.Background()
	e := &engines{running: map[string]bool{}, coming: map[string]int{}, slow: true}
	n := &Node{Root: t.TempDir(), Run: e, Init: Direct}
	b := reloadBundle("corosync")
	if err := n.Start(ctx, b); err != nil {
		t.Fatal(err)
	}
	if got := e.take(); !slices.Equal(got, []string{"corosync"}) {
		t.Fatalf("first Start ran %q, want one corosync", got)
	}
	if !e.running["corosync"] {
		t.Fatal("Start returned before the corosync it started answered")
	}

	// Another node root: corosync was started with version 1's files by a
	// round that was interrupted; it still comes up when version 2 arrives.
	e = &engines{running: map[string]bool{}, coming: map[string]int{"corosync": 3}}
	n = &Node{Root: t.TempDir(), Run: e, Init: Direct}
	if err := n.Start(ctx, edit(b, "/etc/corosync/corosync.conf", "totem { config_version: 2 }\n")); err != nil {
		t.Fatal(err)
	}
	if got := e.take(); !slices.Equal(got, []string{"corosync-cfgtool -R"}) {
		t.Fatalf("Start with corosync coming up ran %q, want it waited for and reloaded", got)
	}
}

// TestStartStopsDroppedEngines runs Start under systemd and without it with
// bundles that drop services: an engine ESIR started for an earlier bundle
// and the new one no longer lists is stopped, in reverse start order, before
// the new bundle's engines start, and its record is forgotten (a later
// Start touches nothing); an engine ESIR did not start is left alone, and so
// is one an interrupted enrollment may have started (its record stays).
func TestStartStopsDroppedEngines(t *testing.T) {
	ctx := context.Background()
	for _, tt := range []struct {
		init                  Init
		demote, remote, again []string
	}{
		{init: Systemd,
			demote: []string{"systemctl stop keepalived"},
			remote: []string{"systemctl stop pacemaker", "systemctl stop corosync", "systemctl start pacemaker_remote"},
			again:  []string{"systemctl stop chrony"}},
		{init: Direct,
			demote: []string{"kill -TERM 42"},
			remote: []string{"pacemakerd --shutdown", "corosync-cfgtool -H --force", "sh -c setsid pacemaker-remoted </dev/null >/dev/null 2>&1 &"},
			again:  []string{"chronyc shutdown"}},
	} {
		t.Run(map[Init]string{Systemd: "systemd", Direct: "direct"}[tt.init], func(t *testing.T) {
			e := newEngines()
			n := &Node{Root: t.TempDir(), Run: e, Init: tt.init}
			b := reloadBundle("corosync", "pacemaker", "chrony", "keepalived")
			if err := n.Start(ctx, b); err != nil {
				t.Fatal(err)
			}
			e.take()
			for _, svc := range b.Services {
				if !n.recorded(svc) {
					t.Fatalf("no record that ESIR started %s", svc)
				}
			}

			// A director demoted: keepalived is no longer in its bundle.
			b.Services = []string{"corosync", "pacemaker", "chrony"}
			b.Version++
			if err := n.Start(ctx, b); err != nil {
				t.Fatal(err)
			}
			if got := e.take(); !slices.Equal(got, tt.demote) {
				t.Fatalf("demoted director: Start ran %q, want %q", got, tt.demote)
			}
			if e.running["keepalived"] || n.recorded("keepalived") {
				t.Fatalf("keepalived runs (%v) or is still on record (%v) after it left the bundle", e.running["keepalived"], n.recorded("keepalived"))
			}
			if err := n.Start(ctx, b); err != nil {
				t.Fatal(err)
			}
			if got := e.take(); len(got) != 0 {
				t.Fatalf("second Start after the demotion ran %q, want nothing", got)
			}

			// The core node becomes a remote one: pacemaker stops before
			// corosync, both before pacemaker-remote starts.
			b.Services = []string{"pacemaker_remote", "chrony"}
			b.Member.Role = ssi.Remote
			b.Version++
			if err := n.Start(ctx, b); err != nil {
				t.Fatal(err)
			}
			if got := e.take(); !slices.Equal(got, tt.remote) {
				t.Fatalf("core -> remote: Start ran %q, want %q", got, tt.remote)
			}
			if e.running["corosync"] || e.running["pacemaker"] || !e.running["pacemaker_remote"] {
				t.Fatalf("core -> remote: running %v", e.running)
			}

			// keepalived started by someone else is not ESIR's to stop.
			e.running["keepalived"] = true
			if err := n.Start(ctx, b); err != nil {
				t.Fatal(err)
			}
			if got := e.take(); len(got) != 0 || !e.running["keepalived"] {
				t.Fatalf("Start stopped an engine ESIR did not start: ran %q", got)
			}

			// An enrollment interrupted (a newer version arrived) keeps the
			// records: the next bundle without chrony still stops it.
			cctx, cancel := context.WithCancel(ctx)
			cancel()
			if _, err := n.Enroll(cctx, b); err == nil {
				t.Fatal("Enroll with its context ended: no error")
			}
			if !n.recorded("chrony") {
				t.Fatal("an interrupted enrollment forgot that ESIR started chrony")
			}
			e.take()
			b.Services = []string{"pacemaker_remote"}
			b.Version++
			if err := n.Start(ctx, b); err != nil {
				t.Fatal(err)
			}
			if got := e.take(); !slices.Equal(got, tt.again) {
				t.Fatalf("chrony dropped after an interrupted round: Start ran %q, want %q", got, tt.again)
			}
		})
	}
}

// TestStartStopFails: an engine that does not stop fails Start at check
// stop, naming the node and the engine, keeps its record and is stopped
// again at the next Start.
func TestStartStopFails(t *testing.T) {
	ctx := context.Background()
	e := newEngines()
	n := &Node{Root: t.TempDir(), Run: e, Init: Systemd}
	b := reloadBundle("chrony", "keepalived")
	if err := n.Start(ctx, b); err != nil {
		t.Fatal(err)
	}
	e.take()
	b.Services = []string{"chrony"}
	b.Version = 2
	e.fail = "systemctl stop keepalived"
	var ce *CheckError
	if err := n.Start(ctx, b); !errors.As(err, &ce) || ce.Check != CheckStop ||
		!strings.Contains(err.Error(), "p1 not enrolled: check stop: stop keepalived, no longer in nodelist version 2's bundle") {
		t.Fatalf("failed stop: %v", err)
	}
	if !n.recorded("keepalived") {
		t.Fatal("keepalived's record forgotten although it did not stop")
	}
	e.fail = ""
	e.take()
	if err := n.Start(ctx, b); err != nil {
		t.Fatal(err)
	}
	if got := e.take(); !slices.Equal(got, []string{"systemctl stop keepalived"}) {
		t.Fatalf("Start after a failed stop ran %q, want the stop again", got)
	}
}

// TestEnrollDropsLoopbackVIPs: a real server's VIPs go on lo after the ARP
// settings; a VIP its next bundle no longer lists is taken off lo, and once
// none remains the ARP settings go back to the values they had before ESIR
// set them (not the kernel's defaults) and their sysctl.d file is removed.
// Addresses and settings ESIR did not make are left alone. Leave undoes the
// same.
func TestEnrollDropsLoopbackVIPs(t *testing.T) {
	ctx := context.Background()
	e := newEngines()
	e.sysctl["net.ipv4.conf.all.arp_announce"] = "1" // the administrator's
	e.lo["127.0.0.2/32"] = true                      // not ESIR's
	root := t.TempDir()
	n := &Node{Root: root, Run: e, Init: Direct}
	a, c := netip.MustParseAddr("198.18.0.100"), netip.MustParseAddr("198.18.0.101")
	const conf = "/etc/sysctl.d/90-esir-ipvs-dr.conf"
	b := bundle("r1", 4, ssi.Remote)
	b.Files = []ssi.File{{Path: conf, Mode: 0o644, Data: []byte("# ESIR\nnet.ipv4.conf.all.arp_ignore = 1\nnet.ipv4.conf.all.arp_announce = 2\n")}}
	b.LoopbackVIPs = []netip.Addr{a, c}
	if _, err := n.Enroll(ctx, b); err != nil {
		t.Fatal(err)
	}
	if want := map[string]bool{"127.0.0.2/32": true, "198.18.0.100/32": true, "198.18.0.101/32": true}; !maps.Equal(e.lo, want) {
		t.Fatalf("lo has %v, want %v", e.lo, want)
	}
	if e.sysctl["net.ipv4.conf.all.arp_ignore"] != "1" || e.sysctl["net.ipv4.conf.all.arp_announce"] != "2" {
		t.Fatalf("ARP settings %v", e.sysctl)
	}
	e.take()

	b.LoopbackVIPs = []netip.Addr{a}
	if _, err := n.Enroll(ctx, b); err != nil {
		t.Fatal(err)
	}
	if got := e.take(); !slices.Contains(got, "ip addr del 198.18.0.101/32 dev lo") || e.lo["198.18.0.101/32"] || !e.lo["198.18.0.100/32"] {
		t.Fatalf("198.18.0.101 left the bundle: ran %q, lo has %v", got, e.lo)
	}
	if e.sysctl["net.ipv4.conf.all.arp_ignore"] != "1" {
		t.Fatalf("ARP settings restored while a VIP is still on lo: %v", e.sysctl)
	}

	// No VIP any more: lo and the ARP settings are as before ESIR.
	b.LoopbackVIPs, b.Files = nil, nil
	if _, err := n.Enroll(ctx, b); err != nil {
		t.Fatal(err)
	}
	if want := map[string]bool{"127.0.0.2/32": true}; !maps.Equal(e.lo, want) {
		t.Fatalf("lo has %v, want %v", e.lo, want)
	}
	if e.sysctl["net.ipv4.conf.all.arp_ignore"] != "0" || e.sysctl["net.ipv4.conf.all.arp_announce"] != "1" {
		t.Fatalf("ARP settings not restored: %v", e.sysctl)
	}
	if _, err := os.Stat(filepath.Join(root, conf)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s stays for the next boot: %v", conf, err)
	}
	e.take()
	if _, err := n.Enroll(ctx, b); err != nil {
		t.Fatal(err)
	}
	if got := e.take(); len(got) != 0 {
		t.Fatalf("Enroll with nothing to undo ran %q", got)
	}

	// A real server that leaves the cluster undoes the same.
	b.LoopbackVIPs = []netip.Addr{a}
	b.Files = []ssi.File{{Path: conf, Mode: 0o644, Data: []byte("net.ipv4.conf.all.arp_ignore = 1\nnet.ipv4.conf.all.arp_announce = 2\n")}}
	if _, err := n.Enroll(ctx, b); err != nil {
		t.Fatal(err)
	}
	if !e.lo["198.18.0.100/32"] || e.sysctl["net.ipv4.conf.all.arp_ignore"] != "1" {
		t.Fatalf("real server again: lo %v, settings %v", e.lo, e.sysctl)
	}
	if err := n.Leave(ctx, b); err != nil {
		t.Fatal(err)
	}
	if want := map[string]bool{"127.0.0.2/32": true}; !maps.Equal(e.lo, want) || e.sysctl["net.ipv4.conf.all.arp_ignore"] != "0" || e.sysctl["net.ipv4.conf.all.arp_announce"] != "1" {
		t.Fatalf("after Leave: lo %v, settings %v", e.lo, e.sysctl)
	}
	if _, err := os.Stat(filepath.Join(root, conf)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s stays after Leave: %v", conf, err)
	}
}
