// Package vm runs QEMU virtual machines the way ESIR's tests, benchmarks and
// virtual cluster lab need them: SeaBIOS or OVMF firmware, a choice of NIC and
// disk models (so one image meets different hardware), taps on a netlab
// bridge, network-first boot order, and the serial console written to a file
// that callers wait on for marker lines.
//
// Guests always run under TCG with `-cpu max` (KVM guests hang on the hosts
// this project runs on; `-cpu max` also gives the guest RDRAND, so its
// entropy pool fills at once).
package vm

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Firmware selects the guest's firmware.
type Firmware string

// Firmware kinds.
const (
	BIOS Firmware = "bios" // SeaBIOS (QEMU's default)
	UEFI Firmware = "uefi" // OVMF from Debian's ovmf package
)

// Paths of Debian's OVMF build (package ovmf).
const (
	OVMFCode = "/usr/share/OVMF/OVMF_CODE_4M.fd"
	OVMFVars = "/usr/share/OVMF/OVMF_VARS_4M.fd"
)

// NIC is one network card.
type NIC struct {
	Model string // QEMU device: virtio-net-pci, e1000, e1000e, rtl8139 ...
	MAC   string // aa:bb:cc:dd:ee:ff
	Tap   string // tap device in Config.NetNS; empty: not connected
	// NoROM leaves the NIC without an option ROM, so UEFI firmware uses its
	// own driver and PXE client (OVMF has one for virtio-net).
	NoROM bool
	// ROMFile replaces QEMU's default option ROM (an iPXE build).
	ROMFile string
}

// Disk is one disk.
type Disk struct {
	Path   string // raw image file or block device
	Model  string // virtio-blk, ahci, nvme, ide
	Serial string // serial number the guest sees (nvme needs one; default derived from the index)
}

// Config describes a virtual machine.
type Config struct {
	Name      string
	Firmware  Firmware
	Machine   string // q35 (default) or pc
	MemoryMiB int    // default 1024
	CPUs      int    // default 1
	NICs      []NIC
	Disks     []Disk
	// Direct kernel boot instead of firmware boot devices.
	Kernel, Initrd, Append string
	// BootNetworkFirst gives the NICs boot priority over the disks (the
	// deployment case). Otherwise disks come first.
	BootNetworkFirst bool
	// NoReboot makes a guest reboot end QEMU instead.
	NoReboot bool
	// NoIPv6Boot sets OVMF's options for an IPv4-only network, as an
	// administrator would in firmware setup: no PXE and no HTTP boot over
	// IPv6, which would otherwise each wait out their timeouts before the
	// firmware reaches the disk.
	NoIPv6Boot bool
	// NetNS, when set, runs QEMU inside that network namespace (where taps are).
	NetNS string
	// WorkDir holds the serial log and the UEFI variable store copy.
	WorkDir string
	// Detached lets QEMU outlive the calling process (the lab's VMs keep
	// running after `esir lab up` returns): a session of its own, no death
	// signal, and ctx does not kill it.
	Detached bool
	// Extra QEMU arguments, appended last.
	Extra []string
}

// VM is a running QEMU process.
type VM struct {
	cfg    Config
	cmd    *exec.Cmd
	serial string
	done   chan struct{}
	mu     sync.Mutex
	err    error
}

// Available reports why QEMU guests cannot run here, or nil.
func Available(fw Firmware) error {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		return errors.New("vm: qemu-system-x86_64 not installed (Debian package qemu-system-x86)")
	}
	if fw == UEFI {
		if _, err := os.Stat(OVMFCode); err != nil {
			return fmt.Errorf("vm: OVMF firmware missing (Debian package ovmf): %w", err)
		}
	}
	return nil
}

// Args returns QEMU's command line for cfg (without the qemu binary). The
// UEFI variable store path is WorkDir/NAME-vars.fd.
func Args(cfg Config) ([]string, error) {
	if cfg.Name == "" {
		return nil, errors.New("vm: config has no name")
	}
	if cfg.WorkDir == "" {
		return nil, fmt.Errorf("vm %s: no work directory", cfg.Name)
	}
	machine := cfg.Machine
	if machine == "" {
		machine = "q35"
	}
	if machine != "q35" && machine != "pc" {
		return nil, fmt.Errorf("vm %s: machine %q: want q35 or pc", cfg.Name, machine)
	}
	mem := cfg.MemoryMiB
	if mem == 0 {
		mem = 1024
	}
	cpus := cfg.CPUs
	if cpus == 0 {
		cpus = 1
	}
	a := []string{
		"-name", cfg.Name,
		"-machine", machine, "-accel", "tcg", "-cpu", "max",
		"-m", strconv.Itoa(mem), "-smp", strconv.Itoa(cpus),
		"-nodefaults", "-display", "none", "-vga", "none",
		"-serial", "file:" + SerialPath(cfg),
		"-monitor", "none",
	}
	switch cfg.Firmware {
	case BIOS, "":
	case UEFI:
		a = append(a,
			"-drive", "if=pflash,format=raw,unit=0,readonly=on,file="+OVMFCode,
			"-drive", "if=pflash,format=raw,unit=1,file="+varsPath(cfg))
		if cfg.NoIPv6Boot {
			a = append(a, "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=no",
				"-fw_cfg", "name=opt/org.tianocore/IPv6Support,string=no")
		}
	default:
		return nil, fmt.Errorf("vm %s: firmware %q: want bios or uefi", cfg.Name, cfg.Firmware)
	}
	if cfg.NoReboot {
		a = append(a, "-no-reboot")
	}
	nicPrio, diskPrio := 1, 1+len(cfg.NICs)
	if !cfg.BootNetworkFirst {
		nicPrio, diskPrio = 1+len(cfg.Disks), 1
	}
	if len(cfg.NICs) == 0 {
		a = append(a, "-nic", "none")
	}
	for i, n := range cfg.NICs {
		id := fmt.Sprintf("net%d", i)
		if n.Tap != "" {
			a = append(a, "-netdev", "tap,id="+id+",ifname="+n.Tap+",script=no,downscript=no")
		} else {
			a = append(a, "-netdev", "user,id="+id+",restrict=on")
		}
		model := n.Model
		if model == "" {
			model = "virtio-net-pci"
		}
		dev := model + ",netdev=" + id
		if n.MAC != "" {
			dev += ",mac=" + n.MAC
		}
		switch {
		case n.NoROM:
			dev += ",romfile="
		case n.ROMFile != "":
			dev += ",romfile=" + n.ROMFile
		}
		if cfg.Kernel == "" {
			dev += ",bootindex=" + strconv.Itoa(nicPrio+i)
		}
		a = append(a, "-device", dev)
	}
	ahci := false
	for i, d := range cfg.Disks {
		id := fmt.Sprintf("disk%d", i)
		serial := d.Serial
		if serial == "" {
			serial = fmt.Sprintf("ESIR%s%02d", strings.ToUpper(strings.ReplaceAll(cfg.Name, "-", "")), i)
			if len(serial) > 20 {
				serial = serial[len(serial)-20:]
			}
		}
		a = append(a, "-drive", "file="+d.Path+",if=none,id="+id+",format=raw,cache=unsafe")
		boot := ""
		if cfg.Kernel == "" {
			boot = ",bootindex=" + strconv.Itoa(diskPrio+i)
		}
		switch d.Model {
		case "virtio-blk", "":
			a = append(a, "-device", "virtio-blk-pci,drive="+id+",serial="+serial+boot)
		case "nvme":
			a = append(a, "-device", "nvme,drive="+id+",serial="+serial+boot)
		case "ahci":
			if machine == "q35" {
				// q35 has an AHCI controller (ich9-ahci) with buses ide.0-5.
				a = append(a, "-device", "ide-hd,drive="+id+",bus=ide."+strconv.Itoa(i)+",serial="+serial+boot)
			} else {
				if !ahci {
					a = append(a, "-device", "ahci,id=ahci0")
					ahci = true
				}
				a = append(a, "-device", "ide-hd,drive="+id+",bus=ahci0."+strconv.Itoa(i)+",serial="+serial+boot)
			}
		case "ide":
			if machine != "pc" {
				return nil, fmt.Errorf("vm %s: disk %d: ide needs machine pc", cfg.Name, i)
			}
			a = append(a, "-device", "ide-hd,drive="+id+",bus=ide."+strconv.Itoa(i/2)+",serial="+serial+boot)
		default:
			return nil, fmt.Errorf("vm %s: disk %d: model %q: want virtio-blk, ahci, nvme or ide", cfg.Name, i, d.Model)
		}
	}
	if cfg.Kernel != "" {
		a = append(a, "-kernel", cfg.Kernel)
		if cfg.Initrd != "" {
			a = append(a, "-initrd", cfg.Initrd)
		}
		if cfg.Append != "" {
			a = append(a, "-append", cfg.Append)
		}
	}
	return append(a, cfg.Extra...), nil
}

// SerialPath is where a VM's serial console is written.
func SerialPath(cfg Config) string { return filepath.Join(cfg.WorkDir, cfg.Name+"-serial.log") }

func varsPath(cfg Config) string { return filepath.Join(cfg.WorkDir, cfg.Name+"-vars.fd") }

// Start launches the VM. It truncates the serial log; for UEFI it gives the
// VM a fresh copy of OVMF's variable store unless one exists (a reboot keeps
// its variables). The QEMU process is killed when ctx ends or the caller's
// process dies.
func Start(ctx context.Context, cfg Config) (*VM, error) {
	if err := Available(cfg.Firmware); err != nil {
		return nil, err
	}
	args, err := Args(cfg)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.WorkDir, 0o755); err != nil {
		return nil, fmt.Errorf("vm %s: %w", cfg.Name, err)
	}
	if cfg.Firmware == UEFI {
		if _, err := os.Stat(varsPath(cfg)); errors.Is(err, os.ErrNotExist) {
			if err := copyFile(OVMFVars, varsPath(cfg)); err != nil {
				return nil, fmt.Errorf("vm %s: UEFI variables: %w", cfg.Name, err)
			}
		}
	}
	if err := os.WriteFile(SerialPath(cfg), nil, 0o644); err != nil {
		return nil, fmt.Errorf("vm %s: serial log: %w", cfg.Name, err)
	}
	name, full := "qemu-system-x86_64", args
	if cfg.NetNS != "" {
		name, full = "ip", append([]string{"netns", "exec", cfg.NetNS, "qemu-system-x86_64"}, args...)
	}
	cmd := exec.Command(name, full...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if cfg.Detached {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	}
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stderr, &stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("vm %s: start qemu: %w", cfg.Name, err)
	}
	v := &VM{cfg: cfg, cmd: cmd, serial: SerialPath(cfg), done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		if err != nil {
			err = fmt.Errorf("vm %s: qemu: %w: %s", cfg.Name, err, strings.TrimSpace(stderr.String()))
		}
		v.mu.Lock()
		v.err = err
		v.mu.Unlock()
		close(v.done)
	}()
	if !cfg.Detached {
		go func() {
			select {
			case <-ctx.Done():
				v.Kill()
			case <-v.done:
			}
		}()
	}
	return v, nil
}

// PID returns the QEMU process id (with NetNS, the id of the `ip netns exec`
// process that became QEMU).
func (v *VM) PID() int { return v.cmd.Process.Pid }

// Name returns the VM's name.
func (v *VM) Name() string { return v.cfg.Name }

// SerialLog returns the path of the serial console log.
func (v *VM) SerialLog() string { return v.serial }

// Serial returns the serial console output so far.
func (v *VM) Serial() string {
	b, _ := os.ReadFile(v.serial)
	return string(b)
}

// Done is closed when QEMU has exited.
func (v *VM) Done() <-chan struct{} { return v.done }

// Err returns QEMU's exit error once Done is closed.
func (v *VM) Err() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.err
}

// Kill stops QEMU at once and waits for it to exit.
func (v *VM) Kill() {
	if v.cmd.Process != nil {
		_ = syscall.Kill(-v.cmd.Process.Pid, syscall.SIGKILL)
	}
	select {
	case <-v.done:
	case <-time.After(10 * time.Second):
	}
}

// WaitFor watches the serial console, from byte offset from, until a line
// matches re, and returns that line and the offset just past it. It fails when
// ctx ends or QEMU exits first; the error carries the console's tail.
func (v *VM) WaitFor(ctx context.Context, re *regexp.Regexp, from int64) (string, int64, error) {
	f, err := os.Open(v.serial)
	if err != nil {
		return "", from, fmt.Errorf("vm %s: %w", v.cfg.Name, err)
	}
	defer f.Close()
	if _, err := f.Seek(from, io.SeekStart); err != nil {
		return "", from, err
	}
	r := bufio.NewReader(f)
	off := from
	var partial []byte
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	exited := false
	for {
		b, err := r.ReadBytes('\n')
		if len(b) > 0 {
			partial = append(partial, b...)
		}
		if err == nil {
			off += int64(len(partial))
			line := strings.TrimRight(string(partial), "\r\n")
			partial = partial[:0]
			if re.MatchString(line) {
				return line, off, nil
			}
			continue
		}
		if exited {
			if len(partial) > 0 && re.Match(partial) {
				return string(partial), off + int64(len(partial)), nil
			}
			return "", off, fmt.Errorf("vm %s: QEMU exited before %q appeared (%v); console tail:\n%s", v.cfg.Name, re, v.Err(), tail(v.Serial(), 25))
		}
		select {
		case <-ctx.Done():
			return "", off, fmt.Errorf("vm %s: waiting for %q: %w; console tail:\n%s", v.cfg.Name, re, ctx.Err(), tail(v.Serial(), 25))
		case <-v.done:
			exited = true
		case <-tick.C:
		}
	}
}

// KeepLog copies the serial log into dir (for example $ESIR_ARTIFACTS) as
// PREFIX-NAME-serial.log. A missing dir is created; an empty dir does nothing.
func (v *VM) KeepLog(dir, prefix string) error {
	if dir == "" {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return copyFile(v.serial, filepath.Join(dir, prefix+"-"+filepath.Base(v.serial)))
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// Kernel is a Debian kernel installed on the host (package linux-image-amd64),
// the guest kernel tests boot.
type Kernel struct {
	Version    string // 6.1.0-27-amd64
	Vmlinuz    string // /boot/vmlinuz-VERSION
	ModulesDir string // /lib/modules/VERSION
}

// HostDebianKernel finds the newest Debian kernel with modules installed under
// /boot and /lib/modules.
func HostDebianKernel() (Kernel, error) {
	return findKernel("/")
}

func findKernel(root string) (Kernel, error) {
	matches, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	var ks []Kernel
	for _, m := range matches {
		ver := strings.TrimPrefix(filepath.Base(m), "vmlinuz-")
		mods := filepath.Join(root, "lib", "modules", ver)
		if _, err := os.Stat(filepath.Join(mods, "modules.dep")); err == nil {
			ks = append(ks, Kernel{Version: ver, Vmlinuz: m, ModulesDir: mods})
		}
	}
	if len(ks) == 0 {
		return Kernel{}, fmt.Errorf("vm: no kernel with modules under %s (install Debian's linux-image-amd64)", filepath.Join(root, "boot"))
	}
	sort.Slice(ks, func(i, j int) bool { return versionLess(ks[i].Version, ks[j].Version) })
	return ks[len(ks)-1], nil
}

// versionLess compares dotted/dashed versions numerically where it can.
func versionLess(a, b string) bool {
	split := func(s string) []string {
		return strings.FieldsFunc(s, func(r rune) bool { return r == '.' || r == '-' })
	}
	x, y := split(a), split(b)
	for i := 0; i < len(x) && i < len(y); i++ {
		n, e1 := strconv.Atoi(x[i])
		m, e2 := strconv.Atoi(y[i])
		if e1 == nil && e2 == nil {
			if n != m {
				return n < m
			}
			continue
		}
		if x[i] != y[i] {
			return x[i] < y[i]
		}
	}
	return len(x) < len(y)
}
