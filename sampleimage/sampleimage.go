// Package sampleimage builds the small root filesystem tree the virtual
// cluster lab and the end-to-end tests deploy: Debian's static busybox with
// its applet links, busybox init (/sbin/init with /etc/inittab and
// /etc/init.d/rcS), a Debian kernel with its modules, and the few files of
// /etc a system needs. The same inputs give the same tree, down to modes and
// modification times, so images built from it are reproducible.
//
// At boot, rcS mounts the pseudo filesystems, sets the hostname, regenerates
// an empty /etc/machine-id, starts /etc/init.d/S??* scripts (ESIR's node
// service installs one) and prints the line
//
//	esir-sample: up hostname=NAME kernel=VERSION modules=a,b,c
//
// on the console, which tests and the lab read.
package sampleimage

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/esir-project/esir/modules"
	"github.com/esir-project/esir/vm"
	"golang.org/x/sys/unix"
)

// Busybox is where Debian's busybox-static package installs its binary.
const Busybox = "/bin/busybox"

// UpMarker starts the line rcS prints on the console once the system is up.
const UpMarker = "esir-sample: up"

// Epoch is the modification time every file of the tree gets.
func Epoch() time.Time { return time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC) }

// Options adjust the tree.
type Options struct {
	Kernel   vm.Kernel // for example vm.HostDebianKernel()
	Busybox  string    // default Busybox
	Hostname string    // default "esir-sample"
	// Modules selects module files by their path relative to the module
	// tree (kernel/drivers/net/virtio_net.ko); the selection is closed over
	// modules.dep and the indices are regenerated with depmod. Nil copies
	// the whole tree as it is.
	Modules func(rel string) bool
}

// StorageNetFS selects the modules a machine needs to reach its disks, its
// network and its filesystems (block, ATA, NVMe, SCSI, virtio, network
// drivers, filesystems, crypto and library helpers): a tree a fraction of the
// full one's size that still boots every machine the lab builds.
func StorageNetFS(rel string) bool {
	for _, p := range []string{
		"kernel/drivers/block/", "kernel/drivers/ata/", "kernel/drivers/nvme/", "kernel/drivers/scsi/",
		"kernel/drivers/virtio/", "kernel/drivers/net/ethernet/intel/", "kernel/drivers/net/ethernet/realtek/",
		"kernel/drivers/net/virtio_net", "kernel/drivers/net/net_failover", "kernel/drivers/char/hw_random/virtio",
		"kernel/fs/ext4/", "kernel/fs/jbd2/", "kernel/fs/mbcache", "kernel/fs/fat/", "kernel/fs/nls/",
		"kernel/lib/", "kernel/crypto/",
	} {
		if strings.HasPrefix(rel, p) {
			return true
		}
	}
	return false
}

// Build writes the tree into dir, which must not exist or be empty.
func Build(ctx context.Context, dir string, opts Options) error {
	if opts.Kernel.Version == "" || opts.Kernel.Vmlinuz == "" || opts.Kernel.ModulesDir == "" {
		return fmt.Errorf("sample image: no kernel given")
	}
	if opts.Busybox == "" {
		opts.Busybox = Busybox
	}
	if opts.Hostname == "" {
		opts.Hostname = "esir-sample"
	}
	if ents, err := os.ReadDir(dir); err == nil && len(ents) > 0 {
		return fmt.Errorf("sample image: %s is not empty", dir)
	}
	b := &builder{root: dir}
	for _, d := range []struct {
		name string
		mode os.FileMode
	}{
		{"bin", 0o755}, {"sbin", 0o755}, {"usr/bin", 0o755}, {"usr/sbin", 0o755}, {"lib/modules", 0o755},
		{"etc/init.d", 0o755}, {"etc/network/if-up.d", 0o755}, {"etc/network/if-pre-up.d", 0o755},
		{"etc/network/if-down.d", 0o755}, {"etc/network/if-post-down.d", 0o755},
		{"root", 0o700}, {"home", 0o755}, {"tmp", 0o1777}, {"proc", 0o555}, {"sys", 0o555}, {"dev", 0o755},
		{"run", 0o755}, {"var/log", 0o755}, {"var/tmp", 0o1777}, {"mnt", 0o755}, {"boot", 0o755},
	} {
		b.dir(d.name, d.mode)
	}
	b.copyFile(opts.Busybox, "bin/busybox", 0o755)
	if b.err != nil {
		return b.err
	}
	applets, err := exec.CommandContext(ctx, opts.Busybox, "--list-full").Output()
	if err != nil {
		return fmt.Errorf("sample image: %s --list-full: %w", opts.Busybox, err)
	}
	for _, a := range strings.Fields(string(applets)) {
		if a == "bin/busybox" {
			continue
		}
		b.symlink(a, "/bin/busybox")
	}
	for name, content := range etcFiles(opts.Hostname) {
		mode := os.FileMode(0o644)
		switch {
		case strings.HasPrefix(name, "etc/init.d/"), name == "usr/share/udhcpc/default.script":
			mode = 0o755
		case name == "etc/shadow":
			mode = 0o640
		}
		b.write(name, content, mode)
	}
	// Debian's busybox udhcpc (run by ifup) looks for its event script here.
	b.symlink("etc/udhcpc/default.script", "/usr/share/udhcpc/default.script")
	b.write("etc/machine-id", "", 0o444)
	b.copyFile(opts.Kernel.Vmlinuz, "boot/vmlinuz-"+opts.Kernel.Version, 0o644)
	if b.err != nil {
		return b.err
	}
	if err := copyModules(ctx, b, opts.Kernel, opts.Modules); err != nil {
		return fmt.Errorf("sample image: modules of %s: %w", opts.Kernel.Version, err)
	}
	return stamp(dir)
}

func etcFiles(hostname string) map[string]string {
	return map[string]string{
		"etc/hostname": hostname + "\n",
		"etc/hosts":    "127.0.0.1\tlocalhost\n127.0.1.1\t" + hostname + "\n::1\tlocalhost ip6-localhost ip6-loopback\n",
		"etc/passwd":   "root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/bin/false\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
		"etc/shadow":   "root:*:19723:0:99999:7:::\ndaemon:*:19723:0:99999:7:::\nnobody:*:19723:0:99999:7:::\n",
		"etc/group":    "root:x:0:\ndaemon:x:1:\ntty:x:5:\ndisk:x:6:\nnogroup:x:65534:\n",
		"etc/os-release": `PRETTY_NAME="ESIR sample (busybox)"
NAME="ESIR sample"
ID=esir-sample
VERSION_ID=1
HOME_URL="https://github.com/esir-project/esir"
`,
		"etc/fstab":              "proc /proc proc defaults 0 0\n",
		"etc/shells":             "/bin/sh\n/bin/ash\n",
		"etc/profile":            "export PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PS1='\\h:\\w\\$ '\n",
		"etc/network/interfaces": "auto lo\niface lo inet loopback\n",
		"etc/inittab": `# busybox init: rcS once, a root shell on the serial console.
::sysinit:/etc/init.d/rcS
ttyS0::respawn:/sbin/getty -n -l /bin/sh -L 115200 ttyS0 vt100
::ctrlaltdel:/sbin/reboot
::shutdown:/etc/init.d/rcK
::shutdown:/bin/umount -a -r
`,
		"etc/init.d/rcS": `#!/bin/sh
# System start for the ESIR sample image (busybox init).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/network
mount -o remount,rw / 2>/dev/null
hostname -F /etc/hostname
[ -s /etc/machine-id ] || tr -d '-' < /proc/sys/kernel/random/uuid > /etc/machine-id
ifconfig lo 127.0.0.1 up
for s in /etc/init.d/S??*; do
	[ -x "$s" ] && "$s" start
done
mods=$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ',' | sed 's/,$//')
echo "` + UpMarker + ` hostname=$(hostname) kernel=$(uname -r) modules=$mods" > /dev/console
`,
		"usr/share/udhcpc/default.script": `#!/bin/sh
# busybox udhcpc event script: configure the interface from the lease.
case "$1" in
deconfig)
	ifconfig "$interface" 0.0.0.0
	;;
bound|renew)
	ifconfig "$interface" "$ip" ${subnet:+netmask $subnet} ${broadcast:+broadcast $broadcast}
	if [ -n "$router" ]; then
		while route del default gw 0.0.0.0 dev "$interface" 2>/dev/null; do :; done
		for r in $router; do route add default gw "$r" dev "$interface"; done
	fi
	if [ -n "$dns" ]; then
		: > /etc/resolv.conf
		[ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
		for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
	fi
	;;
esac
`,
		"etc/init.d/rcK": `#!/bin/sh
# System stop for the ESIR sample image: stop the S??* scripts in reverse.
for s in $(ls -r /etc/init.d/S??* 2>/dev/null); do
	[ -x "$s" ] && "$s" stop
done
`,
	}
}

// builder writes the tree, remembering the first error.
type builder struct {
	root string
	err  error
}

func (b *builder) path(name string) string { return filepath.Join(b.root, filepath.FromSlash(name)) }

func (b *builder) dir(name string, mode os.FileMode) {
	if b.err != nil {
		return
	}
	p := b.path(name)
	if err := os.MkdirAll(p, 0o755); err != nil {
		b.err = fmt.Errorf("sample image: %w", err)
		return
	}
	if err := os.Chmod(p, mode); err != nil {
		b.err = fmt.Errorf("sample image: %w", err)
	}
}

func (b *builder) write(name, content string, mode os.FileMode) {
	if b.err != nil {
		return
	}
	p := b.path(name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		b.err = fmt.Errorf("sample image: %w", err)
		return
	}
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		b.err = fmt.Errorf("sample image: %w", err)
		return
	}
	if err := os.Chmod(p, mode); err != nil {
		b.err = fmt.Errorf("sample image: %w", err)
	}
}

func (b *builder) symlink(name, target string) {
	if b.err != nil {
		return
	}
	p := b.path(name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		b.err = fmt.Errorf("sample image: %w", err)
		return
	}
	if err := os.Symlink(target, p); err != nil {
		b.err = fmt.Errorf("sample image: %w", err)
	}
}

func (b *builder) copyFile(src, name string, mode os.FileMode) {
	if b.err != nil {
		return
	}
	if err := copyFile(src, b.path(name), mode); err != nil {
		b.err = fmt.Errorf("sample image: %w", err)
	}
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copy %s: %w", src, err)
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Chmod(dst, mode)
}

// copyModules copies the kernel's module tree, or the part select chooses
// closed over modules.dep, into lib/modules/VERSION.
func copyModules(ctx context.Context, b *builder, k vm.Kernel, sel func(string) bool) error {
	dst := b.path("lib/modules/" + k.Version)
	if sel == nil {
		return filepath.WalkDir(k.ModulesDir, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(k.ModulesDir, p)
			out := filepath.Join(dst, rel)
			switch {
			case d.IsDir():
				return os.MkdirAll(out, 0o755)
			case d.Type()&fs.ModeSymlink != 0:
				return nil // build and source links point into the build host
			case d.Type().IsRegular():
				return copyFile(p, out, 0o644)
			}
			return nil
		})
	}
	dep, err := os.ReadFile(filepath.Join(k.ModulesDir, "modules.dep"))
	if err != nil {
		return err
	}
	_, want := modules.DepClosure(dep, sel)
	names := make([]string, 0, len(want))
	for m := range want {
		names = append(names, m)
	}
	sort.Strings(names)
	for _, m := range names {
		if err := copyFile(filepath.Join(k.ModulesDir, m), filepath.Join(dst, m), 0o644); err != nil {
			return err
		}
	}
	for _, f := range []string{"modules.order", "modules.builtin", "modules.builtin.modinfo"} {
		if err := copyFile(filepath.Join(k.ModulesDir, f), filepath.Join(dst, f), 0o644); err != nil {
			return err
		}
	}
	// depmod rebuilds modules.dep, modules.alias and the binary indices
	// for the files present; its output depends only on them.
	out, err := exec.CommandContext(ctx, "depmod", "-b", b.root, k.Version).CombinedOutput()
	if err != nil {
		return fmt.Errorf("depmod -b %s %s: %w: %s", b.root, k.Version, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// stamp gives every entry under root the same modification time.
func stamp(root string) error {
	ts := []unix.Timespec{unix.NsecToTimespec(Epoch().UnixNano()), unix.NsecToTimespec(Epoch().UnixNano())}
	var dirs []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, p)
			return nil
		}
		return unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW)
	})
	if err != nil {
		return fmt.Errorf("sample image: set times: %w", err)
	}
	// Directories last, deepest first, so writing into them changes nothing.
	sort.Slice(dirs, func(i, j int) bool { return strings.Count(dirs[i], "/") > strings.Count(dirs[j], "/") })
	for _, d := range dirs {
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, d, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("sample image: set times: %w", err)
		}
	}
	return nil
}
