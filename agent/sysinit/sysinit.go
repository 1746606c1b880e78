// Package sysinit does what the netboot environment's PID 1 needs before the
// agent can work: mount the kernel's filesystems (proc, sys, devtmpfs, devpts,
// /run and /tmp), put the console on standard input, output and error, read
// the esir.* keys of the kernel command line, reap orphaned children, and
// power off or reboot.
package sysinit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Mount is one filesystem PID 1 mounts.
type Mount struct {
	Source, Target, FSType string
	Flags                  uintptr
	Data                   string
}

// Mounts returns the filesystems the netboot environment needs, in order.
func Mounts() []Mount {
	const nodev = unix.MS_NOSUID | unix.MS_NODEV
	return []Mount{
		{Source: "proc", Target: "/proc", FSType: "proc", Flags: nodev | unix.MS_NOEXEC},
		{Source: "sysfs", Target: "/sys", FSType: "sysfs", Flags: nodev | unix.MS_NOEXEC},
		{Source: "devtmpfs", Target: "/dev", FSType: "devtmpfs", Flags: unix.MS_NOSUID, Data: "mode=0755"},
		{Source: "devpts", Target: "/dev/pts", FSType: "devpts", Flags: unix.MS_NOSUID | unix.MS_NOEXEC, Data: "gid=5,mode=620,ptmxmode=000"},
		{Source: "tmpfs", Target: "/run", FSType: "tmpfs", Flags: nodev, Data: "mode=0755"},
		{Source: "tmpfs", Target: "/tmp", FSType: "tmpfs", Flags: nodev, Data: "mode=1777"},
	}
}

// MountAll mounts ms under root ("/" for the real PID 1), creating the mount
// points. A filesystem already mounted there (EBUSY) counts as done.
func MountAll(root string, ms []Mount) error {
	for _, m := range ms {
		target := filepath.Join(root, m.Target)
		if err := os.MkdirAll(target, 0o755); err != nil {
			return fmt.Errorf("sysinit: mount point %s: %w", target, err)
		}
		if mounted(target, m.FSType) {
			continue
		}
		if err := unix.Mount(m.Source, target, m.FSType, m.Flags, m.Data); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("sysinit: mount %s on %s: %w", m.FSType, target, err)
		}
	}
	return nil
}

// mounted reports whether target is already a mount of fstype (the kernel
// mounts devtmpfs on /dev by itself when CONFIG_DEVTMPFS_MOUNT is set).
func mounted(target, fstype string) bool {
	var st unix.Statfs_t
	if err := unix.Statfs(target, &st); err != nil {
		return false
	}
	magic := map[string]int64{"proc": unix.PROC_SUPER_MAGIC, "sysfs": unix.SYSFS_MAGIC, "devpts": unix.DEVPTS_SUPER_MAGIC}
	want, ok := magic[fstype]
	if !ok {
		return false // tmpfs and devtmpfs share a magic with the initramfs: just try
	}
	return int64(st.Type) == want
}

// Console opens the console device (usually /dev/console) and makes it
// standard input, output and error.
func Console(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return fmt.Errorf("sysinit: console %s: %w", dev, err)
	}
	defer f.Close()
	for fd := 0; fd <= 2; fd++ {
		if err := unix.Dup3(int(f.Fd()), fd, 0); err != nil {
			return fmt.Errorf("sysinit: console %s onto fd %d: %w", dev, fd, err)
		}
	}
	return nil
}

// Cmdline is what the agent reads from the kernel command line.
type Cmdline struct {
	Server string           // esir.server: the deployment server's URL
	Token  string           // esir.token: the node's short-lived token
	MAC    net.HardwareAddr // esir.mac: the NIC the node booted from
	Mode   string           // esir.mode: install or inventory
	Debug  bool             // esir.debug (present, or =1/true)
	// Params holds every key=value of the command line (last one wins);
	// keys without a value map to "".
	Params map[string]string
}

// ParseCmdline parses a kernel command line. Values may be double-quoted
// ("key=\"a b\""). An invalid esir.mac or esir.mode is an error naming the key.
func ParseCmdline(s string) (Cmdline, error) {
	c := Cmdline{Params: map[string]string{}}
	for _, f := range splitCmdline(s) {
		k, v, _ := strings.Cut(f, "=")
		c.Params[k] = strings.Trim(v, `"`)
	}
	c.Server = c.Params["esir.server"]
	c.Token = c.Params["esir.token"]
	if m, ok := c.Params["esir.mac"]; ok && m != "" {
		mac, err := net.ParseMAC(m)
		if err != nil {
			return c, fmt.Errorf("kernel command line: esir.mac=%q: %w", m, err)
		}
		c.MAC = mac
	}
	if m, ok := c.Params["esir.mode"]; ok {
		switch m {
		case "install", "inventory":
			c.Mode = m
		default:
			return c, fmt.Errorf("kernel command line: esir.mode=%q: want install or inventory", m)
		}
	}
	if v, ok := c.Params["esir.debug"]; ok {
		c.Debug = v == "" || v == "1" || v == "true" || v == "yes"
	}
	return c, nil
}

// splitCmdline splits on spaces outside double quotes.
func splitCmdline(s string) []string {
	var out []string
	var cur strings.Builder
	quoted := false
	for _, r := range s {
		switch {
		case r == '"':
			quoted = !quoted
			cur.WriteRune(r)
		case (r == ' ' || r == '\t' || r == '\n') && !quoted:
			if cur.Len() > 0 {
				out = append(out, cur.String())
				cur.Reset()
			}
		default:
			cur.WriteRune(r)
		}
	}
	if cur.Len() > 0 {
		out = append(out, cur.String())
	}
	return out
}

// ReadCmdline reads and parses /proc/cmdline.
func ReadCmdline() (Cmdline, error) {
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return Cmdline{}, fmt.Errorf("sysinit: %w", err)
	}
	return ParseCmdline(string(b))
}

// KernelRelease returns the running kernel's release (uname -r).
func KernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// Reap waits for every child that exits (PID 1 inherits orphans) until ctx
// ends. Run it in its own goroutine.
func Reap(ctx context.Context, log *slog.Logger) {
	ch := make(chan os.Signal, 16)
	signal.Notify(ch, unix.SIGCHLD)
	defer signal.Stop(ch)
	for {
		reapAll(log)
		select {
		case <-ctx.Done():
			return
		case <-ch:
		}
	}
}

func reapAll(log *slog.Logger) {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
		if log != nil {
			log.Debug("reaped", "pid", pid, "status", ws.ExitStatus())
		}
	}
}

// PowerAction is what PID 1 does on the way out.
type PowerAction int

// Power actions.
const (
	PowerOff PowerAction = iota
	Reboot
)

// String names the action.
func (a PowerAction) String() string {
	if a == Reboot {
		return "reboot"
	}
	return "power off"
}

// Signals maps the signals PID 1 listens to onto power actions, following
// busybox init: SIGUSR2 and SIGPWR power off; SIGTERM and SIGINT (also sent
// for Ctrl-Alt-Del once the kernel hands it to init) reboot.
func Signals() map[os.Signal]PowerAction {
	return map[os.Signal]PowerAction{
		unix.SIGUSR2: PowerOff, unix.SIGPWR: PowerOff,
		unix.SIGTERM: Reboot, unix.SIGINT: Reboot,
	}
}

// WaitPowerSignal blocks until one of Signals arrives or ctx ends, and
// returns the action asked for (PowerOff when ctx ended).
func WaitPowerSignal(ctx context.Context) PowerAction {
	sigs := Signals()
	ch := make(chan os.Signal, 1)
	for s := range sigs {
		signal.Notify(ch, s)
	}
	defer signal.Stop(ch)
	// Let Ctrl-Alt-Del reach us as SIGINT instead of an immediate reboot.
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF)
	select {
	case s := <-ch:
		return sigs[s]
	case <-ctx.Done():
		return PowerOff
	}
}

// Power syncs the filesystems and powers off or reboots the machine. It
// returns only on failure (it needs CAP_SYS_BOOT).
func Power(a PowerAction) error {
	unix.Sync()
	cmd := unix.LINUX_REBOOT_CMD_POWER_OFF
	if a == Reboot {
		cmd = unix.LINUX_REBOOT_CMD_RESTART
	}
	if err := unix.Reboot(cmd); err != nil {
		return fmt.Errorf("sysinit: %s: %w", a, err)
	}
	return nil
}

// IsPID1 reports whether this process is the system's init.
func IsPID1() bool { return os.Getpid() == 1 }

// SetupPID1 is the whole start of the netboot environment's init: mounts,
// console, and a PATH for the helpers. It is only for PID 1.
func SetupPID1() error {
	if !IsPID1() {
		return errors.New("sysinit: not PID 1")
	}
	if err := MountAll("/", Mounts()); err != nil {
		return err
	}
	if err := Console("/dev/console"); err != nil {
		return err
	}
	os.Setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
	signal.Ignore(syscall.SIGHUP)
	return nil
}
