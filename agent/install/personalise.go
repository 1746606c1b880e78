package install

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// writebackMin is the size from which writeFile starts a file's writeback
// at once.
const writebackMin = 1 << 20

// writeFile writes name inside the mounted root atomically (temporary file
// and rename), creating its directory.
func (r *run) writeFile(name string, data []byte, mode os.FileMode) error {
	p := r.inRoot(name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(p), ".esir-*")
	if err != nil {
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", name, err)
	}
	if len(data) >= writebackMin {
		// Start writing it to the disk now, beside the install's other
		// work, rather than in the flush at the end.
		_ = unix.SyncFileRange(int(tmp.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	if err := os.Rename(tmp.Name(), p); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

// linkFile names f, a file without a name in the root's filesystem
// (O_TMPFILE), name inside the root, atomically replacing what is there.
func (r *run) linkFile(f *os.File, name string, mode os.FileMode) error {
	p := r.inRoot(name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	if err := f.Chmod(mode); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	tmp := filepath.Join(filepath.Dir(p), ".esir-"+filepath.Base(p))
	_ = os.Remove(tmp)
	if err := unix.Linkat(int(f.Fd()), "", unix.AT_FDCWD, tmp, unix.AT_EMPTY_PATH); err != nil {
		return fmt.Errorf("write %s: link: %w", name, err)
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

// personalise makes the unpacked image this node's system.
func (r *run) personalise() (string, error) {
	a := r.asg
	host := a.Hostname
	if host == "" {
		return "", fmt.Errorf("assignment has no hostname")
	}
	fqdn := host
	if a.Network.Domain != "" {
		fqdn = host + "." + a.Network.Domain
	}
	if err := r.writeFile("/etc/hostname", []byte(host+"\n"), 0o644); err != nil {
		return "", err
	}
	hostAddr := "127.0.1.1"
	if a.Network.Mode == "static" && a.Network.Address != "" {
		pfx, err := netip.ParsePrefix(a.Network.Address)
		if err != nil {
			return "", fmt.Errorf("network address %q: %w", a.Network.Address, err)
		}
		hostAddr = pfx.Addr().String()
	}
	hosts := fmt.Sprintf("127.0.0.1\tlocalhost\n%s\t%s %s\n::1\tlocalhost ip6-localhost ip6-loopback\n", hostAddr, fqdn, host)
	if fqdn == host {
		hosts = fmt.Sprintf("127.0.0.1\tlocalhost\n%s\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n", hostAddr, host)
	}
	if err := r.writeFile("/etc/hosts", []byte(hosts), 0o644); err != nil {
		return "", err
	}
	// An empty machine-id is regenerated at first boot (systemd, or the
	// image's init); a copied one would make every node the same machine.
	if err := r.writeFile("/etc/machine-id", nil, 0o444); err != nil {
		return "", err
	}
	_ = os.Remove(r.inRoot("/var/lib/dbus/machine-id"))
	keys, _ := filepath.Glob(r.inRoot("/etc/ssh/ssh_host_*"))
	for _, k := range keys {
		if err := os.Remove(k); err != nil {
			return "", err
		}
	}
	if err := r.writeHostKeyUnit(); err != nil {
		return "", err
	}
	if err := r.writeNetwork(); err != nil {
		return "", err
	}
	fstab := fmt.Sprintf("# Written by ESIR's installer.\nPARTUUID=%s\t/\text4\terrors=remount-ro\t0 1\nPARTUUID=%s\t/boot/efi\tvfat\tumask=0077,nofail\t0 2\n",
		r.res.RootPartUUID, r.res.ESPPartUUID)
	if r.asg.Disk.SwapMiB > 0 {
		fstab += fmt.Sprintf("PARTUUID=%s\tnone\tswap\tsw,nofail\t0 0\n", strings.ToLower(r.layout.swapUUID))
	}
	fstab += "proc\t/proc\tproc\tdefaults\t0 0\n"
	if err := r.writeFile("/etc/fstab", []byte(fstab), 0o644); err != nil {
		return "", err
	}
	if err := os.MkdirAll(r.inRoot("/boot/efi"), 0o755); err != nil {
		return "", err
	}
	if len(a.AuthorizedKeys) > 0 {
		if err := os.MkdirAll(r.inRoot("/root/.ssh"), 0o700); err != nil {
			return "", err
		}
		if err := r.writeFile("/root/.ssh/authorized_keys", []byte(strings.Join(a.AuthorizedKeys, "\n")+"\n"), 0o600); err != nil {
			return "", err
		}
	}
	return fmt.Sprintf("hostname %s, %d authorized keys, network %s", fqdn, len(a.AuthorizedKeys), netMode(a.Network.Mode)), nil
}

// Host key regeneration: the image's SSH host keys are removed (every node
// would share them), and Debian's OpenSSH regenerates them only when the
// package is configured, while ssh.service refuses to start without them
// (its ExecStartPre runs sshd -t). A oneshot unit ordered before ssh.service
// makes the node's own keys at first boot.
const (
	HostKeyUnit     = "/etc/systemd/system/esir-ssh-host-keys.service"
	hostKeyWants    = "/etc/systemd/system/ssh.service.wants/esir-ssh-host-keys.service"
	hostKeyUnitText = `# Written by ESIR's installer: this node's SSH host keys, made at first
# boot (the image's were removed: every node would have shared them).
[Unit]
Description=ESIR: generate this node's SSH host keys
Before=ssh.service
ConditionPathExists=/usr/bin/ssh-keygen

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=ssh.service
`
)

// writeHostKeyUnit installs the host key unit, enabled for ssh.service,
// when the image has an SSH server started by systemd.
func (r *run) writeHostKeyUnit() error {
	if _, err := os.Stat(r.inRoot("/usr/sbin/sshd")); err != nil {
		return nil
	}
	if _, err := os.Stat(r.inRoot("/lib/systemd/systemd")); err != nil {
		return nil
	}
	if err := r.writeFile(HostKeyUnit, []byte(hostKeyUnitText), 0o644); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(r.inRoot(hostKeyWants)), 0o755); err != nil {
		return fmt.Errorf("enable %s: %w", HostKeyUnit, err)
	}
	_ = os.Remove(r.inRoot(hostKeyWants))
	if err := os.Symlink(HostKeyUnit, r.inRoot(hostKeyWants)); err != nil {
		return fmt.Errorf("enable %s: %w", HostKeyUnit, err)
	}
	return nil
}

func netMode(m string) string {
	if m == "" {
		return "dhcp"
	}
	return m
}

// writeNetwork writes the node's network configuration in the forms the
// image's network stack reads: systemd-networkd (matched by MAC, which stays
// right whatever name the kernel gives the NIC) and ifupdown's
// /etc/network/interfaces (busybox ifup reads it too).
func (r *run) writeNetwork() error {
	n := r.asg.Network
	mode := netMode(n.Mode)
	if mode != "dhcp" && mode != "static" {
		return fmt.Errorf("network mode %q: want dhcp or static", n.Mode)
	}
	var gw netip.Addr
	if mode == "static" {
		if _, err := netip.ParsePrefix(n.Address); err != nil {
			return fmt.Errorf("network address %q: want ADDRESS/PREFIX: %w", n.Address, err)
		}
		if n.Gateway != "" {
			var err error
			if gw, err = netip.ParseAddr(n.Gateway); err != nil {
				return fmt.Errorf("network gateway %q: %w", n.Gateway, err)
			}
		}
	}
	for _, d := range n.DNS {
		if _, err := netip.ParseAddr(d); err != nil {
			return fmt.Errorf("network DNS server %q: %w", d, err)
		}
	}
	var nw strings.Builder
	nw.WriteString("# Written by ESIR's installer.\n[Match]\n")
	if r.opts.MAC != "" {
		fmt.Fprintf(&nw, "MACAddress=%s\n", r.opts.MAC)
	} else {
		fmt.Fprintf(&nw, "Name=%s\n", ifaceName(n.Interface))
	}
	nw.WriteString("\n[Network]\n")
	if mode == "dhcp" {
		nw.WriteString("DHCP=ipv4\n")
	} else {
		fmt.Fprintf(&nw, "Address=%s\n", n.Address)
		if gw.IsValid() {
			fmt.Fprintf(&nw, "Gateway=%s\n", gw)
		}
	}
	for _, d := range n.DNS {
		fmt.Fprintf(&nw, "DNS=%s\n", d)
	}
	if n.Domain != "" {
		fmt.Fprintf(&nw, "Domains=%s\n", n.Domain)
	}
	if err := r.writeFile("/etc/systemd/network/10-esir.network", []byte(nw.String()), 0o644); err != nil {
		return err
	}

	iface := ifaceName(n.Interface)
	var ifs strings.Builder
	fmt.Fprintf(&ifs, "# Written by ESIR's installer (node MAC %s).\nauto lo\niface lo inet loopback\n\nauto %s\n", r.opts.MAC, iface)
	if mode == "dhcp" {
		fmt.Fprintf(&ifs, "iface %s inet dhcp\n", iface)
	} else {
		pfx, _ := netip.ParsePrefix(n.Address)
		fmt.Fprintf(&ifs, "iface %s inet static\n\taddress %s\n", iface, pfx)
		if gw.IsValid() {
			fmt.Fprintf(&ifs, "\tgateway %s\n", gw)
		}
	}
	if err := r.writeFile("/etc/network/interfaces", []byte(ifs.String()), 0o644); err != nil {
		return err
	}
	if len(n.DNS) > 0 {
		var rc strings.Builder
		if n.Domain != "" {
			fmt.Fprintf(&rc, "search %s\n", n.Domain)
		}
		for _, d := range n.DNS {
			fmt.Fprintf(&rc, "nameserver %s\n", d)
		}
		// resolv.conf may be a symlink into /run (systemd-resolved): keep it.
		if fi, err := os.Lstat(r.inRoot("/etc/resolv.conf")); err != nil || fi.Mode().IsRegular() {
			if err := r.writeFile("/etc/resolv.conf", []byte(rc.String()), 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

func ifaceName(s string) string {
	if s == "" {
		return "eth0"
	}
	return s
}
