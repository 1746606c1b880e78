package enroll

import (
	"context"
	"errors"
	"fmt"
	"maps"
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
	slow bool
}

func (e *engines) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	line := strings.Join(append([]string{name}, args...), " ")
	e.mu.Lock()
	defer e.mu.Unlock()
	if line == e.fail {
		e.acts = append(e.acts, line)
		return []byte("boom"), errors.New("exit status 1")
	}
	byDaemon := map[string]string{"chronyd": "chrony", "keepalived": "keepalived", "corosync": "corosync", "pacemakerd": "pacemaker",
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
		return []byte("43\n"), nil
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
		if svc := byDaemon[args[0]]; !e.running[svc] && e.coming[svc] == 0 {
			return nil, errors.New("exit status 1")
		}
		return []byte("42\n"), nil
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
	case line == "kill -TERM 43":
		e.running["rpc.mountd"] = false
	}
	return nil, nil
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
			e := &engines{running: map[string]bool{}, coming: map[string]int{}}
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
