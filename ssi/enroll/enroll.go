// Package enroll is the node side of the SSI stack: it installs the files of a
// node's ssi.Bundle, starts the engines in order (a running engine whose files
// changed reloads or restarts; one whose files did not is left alone), and
// asks the engines whether the node is a member. A node is enrolled only when
// its engines agree: corosync lists it as joined in a quorate partition (core
// nodes), pacemaker shows it online (core and remote nodes), chrony is
// synchronised and the NFS home is mounted; otherwise Enroll returns a
// *CheckError naming the check that failed. On core nodes, Reconcile keeps
// pacemaker's remote resources and node list in line with the members; View
// reports a node's current view for periodic reports.
package enroll

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/esir-project/esir/ssi"
)

// Runner runs a command on the node and returns its combined output.
type Runner interface {
	Run(ctx context.Context, name string, args ...string) ([]byte, error)
}

// Local runs commands on this machine.
type Local struct{}

// Run runs name with args and returns its combined output; the error carries
// the command line.
func (Local) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// A daemon that forks may keep the pipes: stop waiting for them.
	cmd.WaitDelay = 2 * time.Second
	err := cmd.Run()
	if err != nil && !errors.Is(err, exec.ErrWaitDelay) {
		return out.Bytes(), fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	return out.Bytes(), nil
}

// Init says how services are started on the node.
type Init int

// Ways to start services.
const (
	Systemd Init = iota // systemctl start / stop
	Direct              // run the engine's daemon directly (nodes without systemd, such as busybox init)
)

// Node enrolls one node.
type Node struct {
	Root string // filesystem root the files are installed under: "/" on a live node
	Run  Runner
	Init Init
	Log  *slog.Logger
	// Timeout bounds each wait of an enrollment (corosync membership and
	// quorum, pacemaker online, chrony synchronised) after a start or a
	// reload; 0 means one minute.
	Timeout time.Duration
	// SharedClock says the node does not own the system clock: it shares
	// the clock with others, as a network namespace or a container shares
	// its host's. chronyd then runs with -x: it still tracks and serves
	// time but never adjusts the clock. Applies to Direct init; under
	// systemd, chrony's unit decides (Debian's skips chronyd without
	// CAP_SYS_TIME).
	SharedClock bool
}

// Enroll installs b's files, starts or reloads the engines, and verifies that
// the node is a member, as its engines say, in this order: corosync lists it
// as joined in a quorate partition with every core member (core nodes);
// pacemaker shows it online (crm_mon; on a remote node through
// pacemaker-remoted, once a core node reconciled its connection resource);
// chrony is synchronised (TimeSynced); the NFS home is mounted (on its server:
// exported, HomeExported). It returns the
// node's view, or a *CheckError naming the node and the first check that did
// not pass within the node's timeout; a failed membership check says, when
// corosync tells, whether the missing members' packets fail authentication
// (another authkey) or their link is down (a partition). It is idempotent:
// run it at every boot and whenever the nodelist version changes. A reload
// (corosync-cfgtool -R) acts on every member at once, so the new nodelist
// must be installed on every member (Install) before any of them reloads.
func (n *Node) Enroll(ctx context.Context, b *ssi.Bundle) (Membership, error) {
	m, err := n.enroll(ctx, b)
	if err != nil && ctx.Err() != nil {
		// Interrupted (a newer nodelist version arrived): an engine this
		// round started may still be coming up with these files, unseen by
		// the next round, which would then start it again in vain and
		// believe it runs the newer files. Forgetting the digests makes
		// the next round reload whatever runs. The records stay: they
		// say what ESIR started, for stopDropped.
		for _, svc := range b.Services {
			n.forgetDigest(svc)
		}
	}
	return m, err
}

func (n *Node) enroll(ctx context.Context, b *ssi.Bundle) (Membership, error) {
	name := b.Member.Name
	m := Membership{Role: string(b.Member.Role)}
	if err := n.Install(b); err != nil {
		return m, err
	}
	// The kernel settings come first: a real server must never answer ARP
	// for the VIP it is about to carry on lo. The files stay for the next
	// boot (systemd-sysctl); here they are applied now.
	if err := n.applySysctls(ctx, b); err != nil {
		return m, &CheckError{Node: name, Check: CheckVIP, Err: err}
	}
	// VIPs an earlier bundle put on lo go first, then the ARP settings
	// that only a real server needs.
	if err := n.dropLoopbackVIPs(ctx, b); err != nil {
		return m, err
	}
	if err := n.restoreSysctls(ctx, b); err != nil {
		return m, &CheckError{Node: name, Check: CheckVIP, Err: err}
	}
	for _, a := range b.LoopbackVIPs {
		if out, err := n.Run.Run(ctx, "ip", "addr", "replace", a.String()+"/32", "dev", "lo"); err != nil {
			return m, &CheckError{Node: name, Check: CheckVIP, Err: fmt.Errorf("real-server VIP %s on lo: %w: %s", a, err, bytes.TrimSpace(out))}
		}
	}
	if err := n.Start(ctx, b); err != nil {
		return m, err
	}
	if slices.Contains(b.Services, "corosync") {
		cs, err := n.waitMember(ctx, name, b.Member.ID, len(b.Core))
		m.NodeID, m.Joined, m.Nodelist, m.Quorate, m.Expected, m.Total = cs.NodeID, cs.Joined, cs.Nodelist, cs.Quorate, cs.Expected, cs.Total
		if err != nil {
			return m, n.explainMembership(ctx, b, cs, err)
		}
	}
	if slices.Contains(b.Services, "pacemaker") || slices.Contains(b.Services, "pacemaker_remote") {
		ps, err := n.waitOnline(ctx, name)
		if err != nil {
			return m, err
		}
		m.Online, m.FencingEnabled, m.FencingDevices = ps.online(), ps.StonithEnabled, ps.StonithDevices
	}
	if slices.Contains(b.Services, "chrony") {
		ts, err := n.waitTime(ctx, b)
		m.TimeSource, m.TimeOffsetMS, m.TimeSynced = ts.Source, ts.OffsetMS, ts.Synced
		if err != nil {
			return m, err
		}
	}
	if b.HomeMount != "" {
		if err := n.mountHome(ctx, b.HomeMount); err != nil {
			return m, named(err, name)
		}
		m.HomeMounted = true
	}
	if b.HomeExport != "" {
		if err := n.HomeExported(ctx, b.HomeExport); err != nil {
			return m, named(err, name)
		}
		m.HomeExported = true
	}
	if len(b.DirectorVIPs) > 0 {
		if as, err := n.addrs(ctx); err == nil {
			m.VIPs = heldVIPs(as, b.DirectorVIPs)
		}
	}
	return m, nil
}

// mountHome mounts the NFS home at dir from its fstab line unless it is
// mounted already, and checks that it is.
func (n *Node) mountHome(ctx context.Context, dir string) error {
	ok, err := n.HomeMounted(ctx, dir)
	if err != nil || ok {
		return err
	}
	if out, err := n.Run.Run(ctx, "mount", dir); err != nil {
		return failed(CheckHome, "mount %s: %w: %s", dir, err, bytes.TrimSpace(out))
	}
	if ok, err = n.HomeMounted(ctx, dir); err == nil && !ok {
		err = failed(CheckHome, "%s is not an NFS mount after mount %s", dir, dir)
	}
	return err
}

// Start starts b's services in order. An engine that runs already is
// touched only when the files b gives it differ from those it last started
// or reloaded with (a digest kept under the node's root, in
// var/lib/esir/ssi/applied): corosync then reloads its nodelist
// (corosync-cfgtool -R, on every member at once), keepalived reloads
// (SIGHUP to its parent process; systemctl reload), chrony restarts (chronyd
// reads chrony.conf only at start) and the NFS server re-exports. An
// unchanged running engine is left alone. Engines ESIR started for an
// earlier bundle that b no longer lists are stopped first, in reverse start
// order (stopDropped). Errors are *CheckError (stop, start or reload).
func (n *Node) Start(ctx context.Context, b *ssi.Bundle) error {
	log := n.logger().With("node", b.Member.Name, "version", b.Version)
	if err := n.stopDropped(ctx, b); err != nil {
		return err
	}
	for _, svc := range b.Services {
		up := n.isRunning(ctx, svc)
		if !up && n.Init != Systemd && n.running(ctx, daemon(svc)) {
			// Its daemon runs but does not answer yet: an earlier round
			// started it moments ago. Starting it again would fail on its
			// lock, unseen (corosync forks first), and leave it running the
			// older files: wait for it, then reload it if they changed.
			up = n.waitRunning(ctx, svc)
		}
		switch changed := n.changed(b, svc); {
		case !up:
			log.Info("starting", "service", svc)
			if err := n.start(ctx, svc); err != nil {
				return &CheckError{Node: b.Member.Name, Check: CheckStart, Err: fmt.Errorf("start %s: %w", svc, err)}
			}
			if !n.waitRunning(ctx, svc) {
				return &CheckError{Node: b.Member.Name, Check: CheckStart,
					Err: fmt.Errorf("start %s: it does not run %v after starting", svc, startWait)}
			}
		case changed:
			log.Info("configuration changed: reloading", "service", svc)
			if err := n.reload(ctx, svc); err != nil {
				return &CheckError{Node: b.Member.Name, Check: CheckReload,
					Err: fmt.Errorf("reload %s (nodelist version %d): %w", svc, b.Version, err)}
			}
		default:
			log.Debug("runs already with this configuration", "service", svc)
			if n.recorded(svc) {
				continue
			}
		}
		if err := n.markApplied(b, svc); err != nil {
			// The next Start reloads once more: harmless.
			log.Warn("ssi: "+err.Error(), "service", svc)
		}
	}
	return nil
}

// startWait bounds how long a started engine may take to answer.
const startWait = 20 * time.Second

// waitRunning waits up to startWait for svc to run (isRunning) and reports
// whether it does.
func (n *Node) waitRunning(ctx context.Context, svc string) bool {
	ctx, cancel := context.WithTimeout(ctx, startWait)
	defer cancel()
	for !n.isRunning(ctx, svc) {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(100 * time.Millisecond):
		}
	}
	return true
}

// Leave stops the node's engines in reverse start order, waits for them to
// exit and forgets their records; the real-server VIPs leave lo and the ARP
// settings go back to their values before ESIR. The server then removes the node from the
// nodelist, the remaining members reload it (Enroll with their new bundles)
// and the reconciling core member purges the node from pacemaker
// (Reconcile). Stopping an engine that does not run is not an error.
func (n *Node) Leave(ctx context.Context, b *ssi.Bundle) error {
	for i := len(b.Services) - 1; i >= 0; i-- {
		svc := b.Services[i]
		n.logger().Info("stopping", "node", b.Member.Name, "service", svc)
		if err := n.stop(ctx, svc); err != nil {
			return fmt.Errorf("leave %s: step stop %s: %w", b.Member.Name, svc, err)
		}
		if err := os.Remove(n.appliedPath(svc)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("leave %s: step forget %s's configuration: %w", b.Member.Name, svc, err)
		}
	}
	// No VIP stays on lo, and the ARP settings go back as they were.
	none := &ssi.Bundle{Cluster: b.Cluster, Member: b.Member, Version: b.Version}
	if err := n.dropLoopbackVIPs(ctx, none); err != nil {
		return fmt.Errorf("leave %s: step real-server VIPs: %w", b.Member.Name, err)
	}
	if err := n.restoreSysctls(ctx, none); err != nil {
		return fmt.Errorf("leave %s: step kernel settings: %w", b.Member.Name, err)
	}
	return nil
}

// daemon is the process a service runs as, under Direct init.
func daemon(svc string) string {
	switch svc {
	case "pacemaker":
		return "pacemakerd"
	case "pacemaker_remote":
		return "pacemaker-remoted"
	case "chrony":
		return "chronyd"
	}
	return svc
}

// running reports whether a process called name runs on the node.
func (n *Node) running(ctx context.Context, name string) bool {
	_, err := n.Run.Run(ctx, "pidof", name)
	return err == nil
}

func (n *Node) start(ctx context.Context, svc string) error {
	if n.Init == Systemd {
		_, err := n.Run.Run(ctx, "systemctl", "start", svc)
		return err
	}
	run := func(name string, args ...string) error {
		out, err := n.Run.Run(ctx, name, args...)
		if err != nil {
			return fmt.Errorf("%w: %s", err, bytes.TrimSpace(out))
		}
		return nil
	}
	switch svc {
	case "corosync":
		// corosync forks and returns once it runs.
		return run("corosync")
	case "chrony":
		if n.SharedClock {
			return run("chronyd", "-x", "-f", "/etc/chrony/chrony.conf")
		}
		return run("chronyd", "-f", "/etc/chrony/chrony.conf")
	case "keepalived":
		return run("keepalived", "-f", "/etc/keepalived/keepalived.conf")
	case "pacemaker", "pacemaker_remote":
		// pacemakerd and pacemaker-remoted stay in the foreground: detach
		// them. pacemaker-remoted reads /etc/pacemaker/authkey and listens
		// on TCP 3121 for the core node holding its connection.
		return run("sh", "-c", "setsid "+daemon(svc)+" </dev/null >/dev/null 2>&1 &")
	case "nfs-server":
		return n.startNFS(ctx)
	}
	return fmt.Errorf("service %s cannot be started without systemd yet", svc)
}

func (n *Node) stop(ctx context.Context, svc string) error {
	if n.Init == Systemd {
		out, err := n.Run.Run(ctx, "systemctl", "stop", svc)
		if err != nil {
			return fmt.Errorf("%w: %s", err, bytes.TrimSpace(out))
		}
		return nil
	}
	if svc == "nfs-server" {
		return n.stopNFS(ctx)
	}
	proc := daemon(svc)
	if !n.running(ctx, proc) {
		return nil
	}
	var cmd []string
	limit := 30 * time.Second
	switch svc {
	case "corosync":
		// -H asks corosync to shut down cleanly, telling the others it
		// leaves. It returns before the daemon exits; a new start meanwhile
		// would find its lock taken.
		cmd = []string{"corosync-cfgtool", "-H", "--force"}
	case "chrony":
		cmd = []string{"chronyc", "shutdown"}
	case "pacemaker":
		// pacemakerd stops its daemons (and resources) before it exits.
		cmd, limit = []string{"pacemakerd", "--shutdown"}, 2*time.Minute
	case "pacemaker_remote", "keepalived":
		// SIGTERM: pacemaker-remoted asks the cluster to stop its
		// connection first; keepalived drops its VIPs.
		out, err := n.Run.Run(ctx, "pidof", proc)
		if err != nil {
			return nil
		}
		cmd = append([]string{"kill", "-TERM"}, strings.Fields(string(out))...)
	default:
		return fmt.Errorf("service %s cannot be stopped without systemd yet", svc)
	}
	if out, err := n.Run.Run(ctx, cmd[0], cmd[1:]...); err != nil {
		return fmt.Errorf("%w: %s", err, bytes.TrimSpace(out))
	}
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	for n.running(ctx, proc) {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s still runs %v after %s", proc, limit, strings.Join(cmd, " "))
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}

// Install writes b's files under the node's root atomically with their modes
// and owners, adds b's fstab lines to etc/fstab once and keeps the cluster's
// SSH key in root's authorized_keys (installSSH). Errors are *CheckError
// (install).
func (n *Node) Install(b *ssi.Bundle) error {
	if err := n.sshDir(b); err != nil {
		return &CheckError{Node: b.Member.Name, Check: CheckInstall, Err: err}
	}
	for _, f := range b.Files {
		if err := n.writeFile(f); err != nil {
			return &CheckError{Node: b.Member.Name, Check: CheckInstall, Err: err}
		}
	}
	if err := n.removeStaleFencePasswords(b); err != nil {
		return &CheckError{Node: b.Member.Name, Check: CheckInstall, Err: err}
	}
	if len(b.FstabLines) > 0 {
		if err := n.addFstab(b.FstabLines); err != nil {
			return &CheckError{Node: b.Member.Name, Check: CheckInstall, Err: fmt.Errorf("fstab: %w", err)}
		}
	}
	if err := n.installSSH(b); err != nil {
		return &CheckError{Node: b.Member.Name, Check: CheckInstall, Err: err}
	}
	return nil
}

func (n *Node) writeFile(f ssi.File) error {
	path := filepath.Join(n.Root, f.Path)
	uid, gid, err := owner(f)
	if err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".esir*")
	if err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	defer os.Remove(tmp.Name())
	err = errors.Join(tmp.Chmod(f.Mode), tmp.Chown(uid, gid))
	if err == nil {
		_, err = tmp.Write(f.Data)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	return nil
}

// owner resolves a file's owner and group names (empty: root).
func owner(f ssi.File) (uid, gid int, err error) {
	if f.Owner != "" {
		u, err := user.Lookup(f.Owner)
		if err != nil {
			return 0, 0, fmt.Errorf("owner: %w (is the engine's package installed?)", err)
		}
		uid, _ = strconv.Atoi(u.Uid)
	}
	if f.Group != "" {
		g, err := user.LookupGroup(f.Group)
		if err != nil {
			return 0, 0, fmt.Errorf("group: %w (is the engine's package installed?)", err)
		}
		gid, _ = strconv.Atoi(g.Gid)
	}
	return uid, gid, nil
}

// fstabMark ends the fstab lines ESIR adds.
const fstabMark = "# esir ssi"

// addFstab appends the lines /etc/fstab lacks, keeping the rest of the file.
func (n *Node) addFstab(lines []string) error {
	path := filepath.Join(n.Root, "etc", "fstab")
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	have := map[string]bool{}
	for l := range strings.Lines(string(old)) {
		l = strings.TrimSuffix(strings.TrimSpace(l), fstabMark)
		have[strings.Join(strings.Fields(l), " ")] = true
	}
	data := old
	if len(data) > 0 && data[len(data)-1] != '\n' {
		data = append(data, '\n')
	}
	added := false
	for _, l := range lines {
		if !have[strings.Join(strings.Fields(l), " ")] {
			data = append(data, l+" "+fstabMark+"\n"...)
			added = true
		}
	}
	if !added {
		return nil
	}
	return n.writeFile(ssi.File{Path: "/etc/fstab", Mode: 0o644, Data: data})
}

func (n *Node) logger() *slog.Logger {
	if n.Log != nil {
		return n.Log
	}
	return slog.New(slog.DiscardHandler)
}
