// Package netlab builds small virtual networks out of Linux network
// namespaces: one "switch" namespace holding a bridge, and hosts, each a
// namespace with an eth0 cabled to the bridge by a veth pair, optionally
// shaped with netem to a link rate and delay. QEMU guests join the bridge
// through taps. Tests, benchmarks and the virtual cluster lab use it.
//
// Every namespace a Lab creates is named "esir-<lab>-<host>", so Purge can
// remove what a crashed run left behind. Close kills every process still
// running in the lab's namespaces and deletes them. A lab name is held by
// one Lab at a time on the machine (a lock file under /run/esir-netlab):
// a second run of the same test or benchmark waits for the first instead
// of purging its namespaces from under it.
//
// Addresses must come from 198.18.0.0/15 (RFC 2544, benchmarking networks):
// AddHost refuses anything else, so a test can never aim traffic at a real
// network.
package netlab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// BenchRange is the only address range netlab accepts: 198.18.0.0/15.
func BenchRange() netip.Prefix { return netip.MustParsePrefix("198.18.0.0/15") }

// Lab is one virtual network: a switch namespace with bridge br0, and hosts.
type Lab struct {
	name   string
	Switch string // the switch namespace's name

	lock *os.File // holds the lab's name (flock) until Close

	mu     sync.Mutex
	hosts  []*Host
	taps   []string
	closed bool
}

// Link describes the shaping of one host's link (both directions).
type Link struct {
	RateMbit float64       // 0: unshaped
	Delay    time.Duration // one-way delay on each side; needs netem in the kernel
	MTU      int           // 0: the kernel's default (1500); both ends of the cable
}

// Host is a network namespace with eth0 on the lab's bridge.
type Host struct {
	lab  *Lab
	Name string       // short name given to AddHost
	NS   string       // namespace name
	Dev  string       // interface inside the namespace ("eth0"; "br0" for the switch host)
	Addr netip.Prefix // address with prefix length
}

// Available reports why netlab cannot run here, or nil: it needs root and the
// ip command.
func Available() error {
	if os.Geteuid() != 0 {
		return errors.New("netlab: needs root (network namespaces)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return errors.New("netlab: the ip command (iproute2) is not installed")
	}
	return nil
}

// New creates the switch namespace and its bridge. name must be short (at
// most 8 characters of [a-z0-9]). While another Lab of the same name is
// open, on this machine, New waits for it to close (or ctx to end); a
// leftover lab of the same name (from a crashed run) is then purged.
func New(ctx context.Context, name string) (*Lab, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	if name == "" || len(name) > 8 || strings.Trim(name, "abcdefghijklmnopqrstuvwxyz0123456789") != "" {
		return nil, fmt.Errorf("netlab: lab name %q: want 1-8 characters of [a-z0-9]", name)
	}
	lock, err := lockName(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := Purge(ctx, name); err != nil {
		lock.Close()
		return nil, err
	}
	l := &Lab{name: name, Switch: "esir-" + name + "-sw", lock: lock}
	steps := [][]string{
		{"netns", "add", l.Switch},
		{"-n", l.Switch, "link", "set", "lo", "up"},
		{"-n", l.Switch, "link", "add", "br0", "type", "bridge", "forward_delay", "0", "stp_state", "0"},
		{"-n", l.Switch, "link", "set", "br0", "up"},
	}
	for _, s := range steps {
		if err := ip(ctx, s...); err != nil {
			_ = Purge(context.Background(), name)
			lock.Close()
			return nil, err
		}
	}
	return l, nil
}

// lockDir holds a lock file per lab name.
const lockDir = "/run/esir-netlab"

// lockName takes the machine-wide lock of lab name, waiting while another
// process (or Lab) holds it. The lock goes with the returned file: closing
// it, or the process ending, releases it.
func lockName(ctx context.Context, name string) (*os.File, error) {
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return nil, fmt.Errorf("netlab: lab %s: lock: %w", name, err)
	}
	path := filepath.Join(lockDir, name+".lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("netlab: lab %s: lock: %w", name, err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("netlab: lab %s: lock %s: %w", name, path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("netlab: lab %s is in use by another run (%s): %w", name, path, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Name returns the lab's name.
func (l *Lab) Name() string { return l.name }

func checkAddr(addr netip.Prefix) error {
	if !addr.IsValid() || !addr.Addr().Is4() || !BenchRange().Contains(addr.Addr()) || addr.Bits() < BenchRange().Bits() {
		return fmt.Errorf("netlab: address %s is outside 198.18.0.0/15, the only range netlab uses", addr)
	}
	return nil
}

// SwitchHost puts addr on the bridge itself, so processes in the switch
// namespace (for example a server next to QEMU taps) take part as a host.
func (l *Lab) SwitchHost(ctx context.Context, addr netip.Prefix) (*Host, error) {
	if err := checkAddr(addr); err != nil {
		return nil, err
	}
	if err := ip(ctx, "-n", l.Switch, "addr", "add", addr.String(), "brd", "+", "dev", "br0"); err != nil {
		return nil, err
	}
	h := &Host{lab: l, Name: "sw", NS: l.Switch, Dev: "br0", Addr: addr}
	return h, nil
}

// AddHost creates a host namespace named name (at most 6 characters) with
// eth0 carrying addr, cabled to the bridge and shaped as link says.
func (l *Lab) AddHost(ctx context.Context, name string, addr netip.Prefix, link Link) (*Host, error) {
	if err := checkAddr(addr); err != nil {
		return nil, err
	}
	if name == "" || len(name) > 6 || strings.Trim(name, "abcdefghijklmnopqrstuvwxyz0123456789") != "" {
		return nil, fmt.Errorf("netlab: host name %q: want 1-6 characters of [a-z0-9]", name)
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, errors.New("netlab: lab is closed")
	}
	l.mu.Unlock()
	h := &Host{lab: l, Name: name, NS: "esir-" + l.name + "-" + name, Dev: "eth0", Addr: addr}
	peer := "v" + l.name + name // switch-side end, at most 15 characters
	if len(peer) > 15 {
		peer = peer[:15]
	}
	steps := [][]string{
		{"netns", "add", h.NS},
		{"-n", h.NS, "link", "set", "lo", "up"},
		{"-n", h.NS, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", l.Switch},
		{"-n", l.Switch, "link", "set", peer, "master", "br0"},
		{"-n", l.Switch, "link", "set", peer, "up"},
		{"-n", h.NS, "addr", "add", addr.String(), "brd", "+", "dev", "eth0"},
		{"-n", h.NS, "link", "set", "eth0", "up"},
	}
	for _, s := range steps {
		if err := ip(ctx, s...); err != nil {
			_ = ip(context.Background(), "netns", "del", h.NS)
			return nil, fmt.Errorf("netlab: host %s: %w", name, err)
		}
	}
	if link.MTU != 0 {
		if link.MTU < 576 || link.MTU > 65535 {
			_ = ip(context.Background(), "netns", "del", h.NS)
			return nil, fmt.Errorf("netlab: host %s: MTU %d: want 576-65535", name, link.MTU)
		}
		for _, side := range [][2]string{{h.NS, "eth0"}, {l.Switch, peer}} {
			if err := ip(ctx, "-n", side[0], "link", "set", "dev", side[1], "mtu", strconv.Itoa(link.MTU)); err != nil {
				_ = ip(context.Background(), "netns", "del", h.NS)
				return nil, fmt.Errorf("netlab: host %s: %w", name, err)
			}
		}
	}
	if link.RateMbit > 0 || link.Delay > 0 {
		for _, side := range [][2]string{{h.NS, "eth0"}, {l.Switch, peer}} {
			if err := shape(ctx, side[0], side[1], link); err != nil {
				_ = ip(context.Background(), "netns", "del", h.NS)
				return nil, fmt.Errorf("netlab: host %s: %w", name, err)
			}
		}
	}
	l.mu.Lock()
	l.hosts = append(l.hosts, h)
	l.mu.Unlock()
	return h, nil
}

// shape limits dev's egress. A rate alone uses tbf (token bucket); a delay
// needs netem, which some kernels lack (this project's CI host has only tbf
// and htb): then shape fails with an error that says so.
func shape(ctx context.Context, ns, dev string, link Link) error {
	if link.Delay > 0 {
		args := []string{"netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "netem",
			"delay", fmt.Sprintf("%dus", link.Delay.Microseconds())}
		limit := 1000
		if link.RateMbit > 0 {
			args = append(args, "rate", strconv.FormatFloat(link.RateMbit, 'f', -1, 64)+"mbit")
			// About 100 ms worth of full-size packets, at least 100.
			limit = int(link.RateMbit*1e6/8/1500*0.1) + 100
		}
		args = append(args, "limit", strconv.Itoa(limit))
		if err := run(ctx, "ip", args...); err != nil {
			return fmt.Errorf("link delay needs the netem qdisc (is it in this kernel?): %w", err)
		}
		return nil
	}
	// Burst: at least 2 ms of traffic (and 16 KiB), so the bucket refills
	// smoothly at the kernel's timer granularity; a queue of 100 ms.
	bytesPerSec := link.RateMbit * 1e6 / 8
	burst := int(bytesPerSec / 500)
	if burst < 16<<10 {
		burst = 16 << 10
	}
	return run(ctx, "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
		"rate", strconv.FormatFloat(link.RateMbit, 'f', -1, 64)+"mbit",
		"burst", strconv.Itoa(burst), "latency", "100ms")
}

// AddTap creates a tap device in the switch namespace, attached to the bridge,
// for a QEMU guest started in that namespace. name must be at most 15
// characters.
func (l *Lab) AddTap(ctx context.Context, name string) error {
	if name == "" || len(name) > 15 {
		return fmt.Errorf("netlab: tap name %q: want 1-15 characters", name)
	}
	steps := [][]string{
		{"-n", l.Switch, "tuntap", "add", "dev", name, "mode", "tap"},
		{"-n", l.Switch, "link", "set", name, "master", "br0"},
		{"-n", l.Switch, "link", "set", name, "up"},
	}
	for _, s := range steps {
		if err := ip(ctx, s...); err != nil {
			return fmt.Errorf("netlab: tap %s: %w", name, err)
		}
	}
	l.mu.Lock()
	l.taps = append(l.taps, name)
	l.mu.Unlock()
	return nil
}

// Hosts returns the hosts added so far.
func (l *Lab) Hosts() []*Host {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*Host(nil), l.hosts...)
}

// Command returns a command that runs inside the host's namespace. The
// process dies with its parent (Pdeathsig) and gets its own process group.
func (h *Host) Command(ctx context.Context, name string, args ...string) *exec.Cmd {
	return NSCommand(ctx, h.NS, name, args...)
}

// NSCommand returns a command that runs inside namespace ns.
func NSCommand(ctx context.Context, ns, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// Run runs a command in the host's namespace and returns its combined output;
// the error names the host and the command.
func (h *Host) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	out, err := h.Command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("netlab: %s: %s %s: %w: %s", h.Name, name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return out, nil
}

// IP returns the host's address without prefix length.
func (h *Host) IP() netip.Addr { return h.Addr.Addr() }

// Close kills every process left in the lab's namespaces and deletes them
// (taps and veths go with them). It is safe to call more than once.
func (l *Lab) Close() error {
	l.mu.Lock()
	was := l.closed
	l.closed = true
	l.mu.Unlock()
	err := Purge(context.Background(), l.name)
	if !was && l.lock != nil {
		l.lock.Close()
	}
	return err
}

// Purge removes every namespace of lab name ("esir-<name>-*"), killing the
// processes inside first. It is idempotent: nothing to remove is no error.
func Purge(ctx context.Context, name string) error {
	out, err := exec.CommandContext(ctx, "ip", "netns", "list").Output()
	if err != nil {
		return fmt.Errorf("netlab: ip netns list: %w", err)
	}
	prefix := "esir-" + name + "-"
	var errs []error
	var nss []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], prefix) {
			nss = append(nss, f[0])
		}
	}
	for _, ns := range nss {
		killAll(ctx, ns)
	}
	for _, ns := range nss {
		if err := ip(ctx, "netns", "del", ns); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killAll kills the processes in namespace ns and waits briefly for them to go.
func killAll(ctx context.Context, ns string) {
	for i := 0; i < 50; i++ {
		out, _ := exec.CommandContext(ctx, "ip", "netns", "pids", ns).Output()
		pids := strings.Fields(string(out))
		if len(pids) == 0 {
			return
		}
		for _, p := range pids {
			if pid, err := strconv.Atoi(p); err == nil && pid > 1 && pid != os.Getpid() {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func ip(ctx context.Context, args ...string) error {
	return run(ctx, "ip", args...)
}

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}
