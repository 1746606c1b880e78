// Package debianssi is the recipe of the lab's debian-ssi image: Debian 12
// (bookworm) debootstrapped with what a booting system needs (systemd, udev,
// kmod, iproute2, systemd-networkd, Debian's kernel) and the SSI node stack
// (corosync, pacemaker, chrony, keepalived, ipvsadm, clustershell, and
// openssh-server for clush, enabled at boot), plus a tiny
// HTTP service on port 80 that answers with the node's host name, so the
// cluster VIP's connection load leveling can be watched from outside.
//
// The stack's services are installed disabled: ESIR's node service starts
// them once it has installed their configuration. The network comes up with
// systemd-networkd from the file ESIR's installer writes (matched by MAC), and
// the kernel's own interface names are kept (eth0), which the cluster
// definition's VIP interface names.
//
// The debootstrapped and configured tree is cached (Tree); so are the
// downloaded packages, so a second build downloads nothing. Build turns the
// tree into a file-mode image with ESIR's own image builder.
package debianssi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/modules"
)

// The image this recipe makes.
const (
	Name = "debian-ssi"
	// Generation starts the image's version; the rest is the recipe's
	// digest, so a changed recipe makes a new tree and a new image.
	Generation = "1"
)

// ImageVersion is the version of the image this recipe makes:
// GENERATION-DIGEST, where DIGEST is the start of the recipe's digest.
func ImageVersion() string { return Generation + "-" + digest()[:8] }

// Ref is the image reference Build creates: NAME:ImageVersion().
func Ref() string { return Name + ":" + ImageVersion() }

// Defaults of Options.
const (
	DefaultCache  = "/var/cache/esir/lab/debian-ssi"
	DefaultMirror = "http://deb.debian.org/debian"
	Suite         = "bookworm"
)

// HelloPort is the port the hello service answers on.
const HelloPort = 80

// Packages are installed (without recommends) on top of debootstrap's
// minbase.
var Packages = []string{
	// A system that boots from disk and comes up on the network.
	"systemd-sysv", "udev", "dbus", "kmod", "iproute2", "e2fsprogs", "procps", "iputils-ping",
	"linux-image-amd64", "busybox-static",
	// The SSI node stack.
	"corosync", "pacemaker", "pacemaker-cli-utils", "chrony", "keepalived", "ipvsadm", "clustershell",
	// sshd, which clush logs in to with the cluster key; its host keys are
	// made at first boot by ESIR's installer unit (the image's are removed).
	"openssh-server",
}

// stackServices start unconfigured when enabled: the node service starts them.
var stackServices = []string{"corosync", "pacemaker", "keepalived", "chrony"}

// Options configure the build.
type Options struct {
	Cache  string // cache directory (DefaultCache): tree/ and debs/
	Mirror string // Debian mirror (DefaultMirror)
	// Rebuild makes a new tree even when the cache has one.
	Rebuild bool
	Log     *slog.Logger
	// Output receives the output of debootstrap and apt-get (nil: discarded;
	// it goes into the error when they fail).
	Output io.Writer
}

func (o *Options) fill() {
	if o.Cache == "" {
		o.Cache = DefaultCache
	}
	if o.Mirror == "" {
		o.Mirror = DefaultMirror
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
}

// stampFile marks a complete tree; it holds the recipe's digest (stamp).
const stampFile = ".esir-debian-ssi"

// stamp identifies the recipe a tree was made with: a tree made by another
// recipe is made again.
func stamp() string { return fmt.Sprintf("debian-ssi recipe %s sha256:%s\n", Generation, digest()) }

// digest is the recipe's SHA-256 in hex: suite, packages, files, the chroot
// script and the module selection's generation.
func digest() string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\n%s\n%q\n%s\n", Generation, Suite, Packages, chrootScript())
	fs := files()
	for _, name := range slices.Sorted(maps.Keys(fs)) {
		fmt.Fprintf(h, "%s %o %q\n", name, fs[name].mode, fs[name].data)
	}
	fmt.Fprintf(h, "modules %d\n", modulesRecipe)
	return fmt.Sprintf("%x", h.Sum(nil))
}

// modulesRecipe changes with keepModule (part of the recipe's digest).
const modulesRecipe = 3

// Tree returns the configured root filesystem tree, making it first unless
// the cache holds one made by this recipe version. It needs root,
// debootstrap, unshare and the mirror.
func Tree(ctx context.Context, opts Options) (string, error) {
	opts.fill()
	tree := filepath.Join(opts.Cache, "tree")
	if !opts.Rebuild {
		if b, err := os.ReadFile(filepath.Join(tree, stampFile)); err == nil && string(b) == stamp() {
			return tree, nil
		}
	}
	if os.Geteuid() != 0 {
		return "", errors.New("debian-ssi: building the tree needs root (debootstrap, chroot)")
	}
	for _, tool := range []string{"debootstrap", "unshare", "chroot"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "", fmt.Errorf("debian-ssi: %s not found (Debian packages debootstrap, util-linux, coreutils)", tool)
		}
	}
	debs := filepath.Join(opts.Cache, "debs")
	if err := os.MkdirAll(filepath.Join(debs, "partial"), 0o755); err != nil {
		return "", fmt.Errorf("debian-ssi: %w", err)
	}
	partial := tree + ".partial"
	if err := os.RemoveAll(partial); err != nil {
		return "", fmt.Errorf("debian-ssi: remove the last partial tree: %w", err)
	}
	start := time.Now()
	opts.Log.Info("debian-ssi: debootstrap", "suite", Suite, "mirror", opts.Mirror, "dir", partial)
	if err := opts.run(ctx, "debootstrap", "--variant=minbase", "--cache-dir="+debs, Suite, partial, opts.Mirror); err != nil {
		return "", fmt.Errorf("debian-ssi: debootstrap %s into %s: %w", Suite, partial, err)
	}
	opts.Log.Info("debian-ssi: installing the packages", "packages", len(Packages), "debootstrap", time.Since(start).Round(time.Second))
	for name, f := range files() {
		p := filepath.Join(partial, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return "", fmt.Errorf("debian-ssi: %w", err)
		}
		if err := os.WriteFile(p, []byte(f.data), f.mode); err != nil {
			return "", fmt.Errorf("debian-ssi: %w", err)
		}
		if err := os.Chmod(p, f.mode); err != nil {
			return "", fmt.Errorf("debian-ssi: %w", err)
		}
	}
	// The chroot runs in its own mount and PID namespaces: its /proc and
	// the package cache's bind mount vanish with it, whatever happens.
	if err := opts.run(ctx, "unshare", "--mount", "--pid", "--fork", "--mount-proc="+filepath.Join(partial, "proc"),
		"sh", "-ec", `mount --bind "$1" "$2/var/cache/apt/archives"; exec chroot "$2" /bin/sh -ec "$3"`, "sh",
		debs, partial, chrootScript()); err != nil {
		return "", fmt.Errorf("debian-ssi: configure the tree in %s: %w", partial, err)
	}
	// debootstrap's own copies of its packages (the cache has them).
	debsLeft, _ := filepath.Glob(filepath.Join(partial, "var/cache/apt/archives/*.deb"))
	for _, d := range debsLeft {
		if err := os.Remove(d); err != nil {
			return "", fmt.Errorf("debian-ssi: %w", err)
		}
	}
	if err := pruneModules(ctx, partial); err != nil {
		return "", fmt.Errorf("debian-ssi: %w", err)
	}
	if err := os.WriteFile(filepath.Join(partial, stampFile), []byte(stamp()), 0o644); err != nil {
		return "", fmt.Errorf("debian-ssi: %w", err)
	}
	if err := os.RemoveAll(tree); err != nil {
		return "", fmt.Errorf("debian-ssi: replace %s: %w", tree, err)
	}
	if err := os.Rename(partial, tree); err != nil {
		return "", fmt.Errorf("debian-ssi: %w", err)
	}
	opts.Log.Info("debian-ssi: tree ready", "dir", tree, "took", time.Since(start).Round(time.Second))
	return tree, nil
}

// Build makes the debian-ssi image (Ref) in store from the cached tree,
// making the tree first when needed. Images of other recipe versions stay.
func Build(ctx context.Context, store *imaging.Store, opts Options) (*imaging.Image, error) {
	opts.fill()
	tree, err := Tree(ctx, opts)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	img, err := store.Build(ctx, tree, imaging.BuildOptions{Name: Name, Version: ImageVersion(),
		ArchiveOptions: imaging.ArchiveOptions{Exclude: []string{stampFile}}})
	if err != nil {
		return nil, fmt.Errorf("debian-ssi: build the image from %s: %w", tree, err)
	}
	opts.Log.Info("debian-ssi: image built", "ref", img.Manifest.Ref(), "took", time.Since(start).Round(100*time.Millisecond))
	return img, nil
}

func (o *Options) run(ctx context.Context, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive")
	tail := &tailBuffer{max: 4 << 10}
	var w io.Writer = tail
	if o.Output != nil {
		w = io.MultiWriter(o.Output, tail)
	}
	cmd.Stdout, cmd.Stderr = w, w
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%w; output ends:\n%s", err, tail.String())
	}
	return nil
}

// chrootScript runs inside the new tree: it installs the packages (no
// documentation, no daemon started, no initramfs: ESIR writes its own early
// boot), disables the stack's services, enables the network, the hello
// service and the serial console login, and leaves no package lists behind.
func chrootScript() string {
	return `export PATH=/usr/sbin:/usr/bin:/sbin:/bin INITRD=No DEBIAN_FRONTEND=noninteractive LC_ALL=C
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
apt-get -q update
apt-get -q -y --no-install-recommends install ` + strings.Join(Packages, " ") + `
for s in ` + strings.Join(stackServices, " ") + `; do
	systemctl disable "$s.service"
done
# cluster-glue's logging daemon (nothing here logs through it), ipvsadm's
# rule loader (keepalived keeps IPVS), apt's timers (the lab has no mirror).
systemctl disable logd.service ipvsadm.service apt-daily.timer apt-daily-upgrade.timer
systemctl enable systemd-networkd.service esir-hello.service
# Keep the kernel's interface names (eth0), which the cluster definition's
# VIP interface names (Debian's documented way to turn predictable names off).
ln -sf /dev/null /etc/systemd/network/99-default.link
rm -f /usr/sbin/policy-rc.d /boot/initrd.img-* /initrd.img /initrd.img.old
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc/* /usr/share/man/* /usr/share/info/*
find /usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
: > /etc/resolv.conf
`
}

type file struct {
	data string
	mode os.FileMode
}

// files are written into the tree before the packages are installed.
func files() map[string]file {
	return map[string]file{
		"etc/hostname": {"debian-ssi\n", 0o644},
		// No documentation, manual pages or translations from the packages.
		"etc/dpkg/dpkg.cfg.d/esir-nodoc": {`path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
`, 0o644},
		// The hello service: the node's host name over HTTP on port 80.
		"etc/systemd/system/esir-hello.service": {fmt.Sprintf(`# Written by ESIR's debian-ssi recipe.
[Unit]
Description=ESIR lab: answer HTTP on port %d with this node's host name
After=network.target

[Service]
ExecStartPre=/bin/sh -c 'mkdir -p /run/esir-hello/cgi-bin && hostname > /run/esir-hello/index.html && ln -sf /usr/lib/esir-hello/status /run/esir-hello/cgi-bin/status'
ExecStart=/bin/busybox httpd -f -p %d -h /run/esir-hello
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
`, HelloPort, HelloPort), 0o644},
		// /cgi-bin/status: what the lab looks at when the VIP misbehaves
		// (read-only; works before the cluster's SSH key is installed).
		"usr/lib/esir-hello/status": {`#!/bin/sh
# Written by ESIR's debian-ssi recipe: the node's view of its stack, read-only.
printf 'Content-Type: text/plain\r\n\r\n'
echo "host $(hostname)"
for c in "ip -br addr" "ipvsadm -Ln --stats" "ipvsadm -Lnc" \
	"sysctl net.ipv4.conf.all.arp_ignore net.ipv4.conf.all.arp_announce net.ipv4.vs.backup_only" \
	"corosync-quorumtool -s" "crm_mon -1" "chronyc -n tracking" \
	"systemctl --no-pager --lines=0 status esir-node corosync pacemaker chrony keepalived"; do
	echo "== $c"
	$c 2>&1
done
`, 0o755},
		// The node service's output on the serial console too, where the lab
		// reads it (esir lab console NODE).
		"etc/systemd/system/esir-node.service.d/console.conf": {`# Written by ESIR's debian-ssi recipe.
[Service]
StandardOutput=journal+console
StandardError=journal+console
`, 0o644},
		// A lab image: root is logged in on the serial console.
		"etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf": {`# Written by ESIR's debian-ssi recipe: a lab image logs root in on the serial console.
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM
`, 0o644},
	}
}

// keepModule says whether a module (path relative to the module tree) stays
// in the image. It keeps what a lab node (a QEMU machine) and the stack use:
// outside drivers/ and fs/, everything but sound, wireless and the like; in
// fs/, the filesystems a cluster node mounts (ext4, FAT, NFS, overlay,
// FUSE...); in drivers/, storage (without the SCSI host adapters in scsi/'s
// subdirectories), virtio, Intel and Realtek Ethernet (what QEMU emulates) and
// the virtual network devices. The modules kept ones depend on stay too.
func keepModule(rel string) bool {
	for _, p := range []string{"kernel/sound/", "kernel/net/wireless/", "kernel/net/mac80211/", "kernel/net/bluetooth/",
		"kernel/net/nfc/", "kernel/net/can/", "kernel/net/6lowpan/", "kernel/net/ieee802154/", "kernel/net/mac802154/"} {
		if strings.HasPrefix(rel, p) {
			return false
		}
	}
	if rest, ok := strings.CutPrefix(rel, "kernel/drivers/scsi/"); ok {
		return !strings.Contains(rest, "/")
	}
	var keep []string
	switch {
	case strings.HasPrefix(rel, "kernel/fs/"):
		keep = []string{
			"kernel/fs/ext4/", "kernel/fs/jbd2/", "kernel/fs/mbcache", "kernel/fs/fat/", "kernel/fs/nls/",
			"kernel/fs/nfs/", "kernel/fs/nfs_common/", "kernel/fs/nfsd/", "kernel/fs/lockd/", "kernel/fs/fscache/",
			"kernel/fs/netfs/", "kernel/fs/overlayfs/", "kernel/fs/fuse/", "kernel/fs/squashfs/", "kernel/fs/isofs/",
			"kernel/fs/autofs/", "kernel/fs/efivarfs/", "kernel/fs/binfmt_misc",
		}
	case strings.HasPrefix(rel, "kernel/drivers/"):
		keep = []string{
			"kernel/drivers/block/", "kernel/drivers/ata/", "kernel/drivers/nvme/",
			"kernel/drivers/virtio/", "kernel/drivers/vhost/", "kernel/drivers/md/", "kernel/drivers/cdrom/",
			"kernel/drivers/char/", "kernel/drivers/acpi/", "kernel/drivers/pci/", "kernel/drivers/firmware/",
			"kernel/drivers/input/", "kernel/drivers/hid/", "kernel/drivers/watchdog/", "kernel/drivers/edac/",
			"kernel/drivers/net/ethernet/intel/", "kernel/drivers/net/ethernet/realtek/", "kernel/drivers/net/phy/",
			"kernel/drivers/net/mdio", "kernel/drivers/net/virtio_net", "kernel/drivers/net/net_failover",
			"kernel/drivers/net/bonding/", "kernel/drivers/net/team/", "kernel/drivers/net/dummy", "kernel/drivers/net/veth",
			"kernel/drivers/net/tun", "kernel/drivers/net/macvlan", "kernel/drivers/net/ipvlan/", "kernel/drivers/net/vxlan",
			"kernel/drivers/net/geneve", "kernel/drivers/net/wireguard/", "kernel/drivers/net/ifb",
		}
	default:
		return true
	}
	for _, p := range keep {
		if strings.HasPrefix(rel, p) {
			return true
		}
	}
	return false
}

// pruneModules removes the modules keepModule leaves out (but not ones a kept
// module depends on) from every module tree of root and rebuilds its
// indices.
func pruneModules(ctx context.Context, root string) error {
	dirs, _ := filepath.Glob(filepath.Join(root, "usr/lib/modules/*"))
	if len(dirs) == 0 {
		return fmt.Errorf("no kernel module tree in %s/usr/lib/modules", root)
	}
	for _, dir := range dirs {
		dep, err := os.ReadFile(filepath.Join(dir, "modules.dep"))
		if err != nil {
			return err
		}
		drop := modulesToDrop(dep, keepModule)
		for _, m := range drop {
			if err := os.Remove(filepath.Join(dir, m)); err != nil {
				return err
			}
		}
		version := filepath.Base(dir)
		if out, err := exec.CommandContext(ctx, "depmod", "-b", root, version).CombinedOutput(); err != nil {
			return fmt.Errorf("depmod -b %s %s: %w: %s", root, version, err, bytes.TrimSpace(out))
		}
	}
	return nil
}

// modulesToDrop reads modules.dep and returns the modules keep leaves out
// that no kept module needs, sorted.
func modulesToDrop(dep []byte, keep func(string) bool) []string {
	all, kept := modules.DepClosure(dep, keep)
	var drop []string
	for _, m := range all {
		if !kept[m] {
			drop = append(drop, m)
		}
	}
	slices.Sort(drop)
	return drop
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = append(t.b[:0], t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string { return string(t.b) }
