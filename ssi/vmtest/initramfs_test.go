package vmtest

import (
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/esir-project/esir/initramfs"
	"github.com/esir-project/esir/modules"
	"github.com/esir-project/esir/vm"
)

// ctlPort is the guest's control port: a shell per connection (busybox nc),
// reachable only inside the lab's namespaces. guestRunner talks to it.
const ctlPort = 7000

// guestInit is the guests' /init. It loads the modules of the load list,
// configures eth0 from the kernel command line (esir.name, esir.addr), starts
// syslogd on the console (keepalived logs to syslog), a TCP service answering
// with the host name on port esir.serve if given (busybox httpd), and the
// control shell; then it prints ESIR-VM-READY. Everything the node's role
// needs beyond that arrives through the control shell, as ESIR's enroll
// package would do it on the node.
const guestInit = `#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mkdir -p /tmp /var/log
name= addr= serve=
for w in $(cat /proc/cmdline); do
	case "$w" in
	esir.name=*) name=${w#*=} ;;
	esir.addr=*) addr=${w#*=} ;;
	esir.serve=*) serve=${w#*=} ;;
	esac
done
echo "ESIR-VM-INIT $name $(cut -d' ' -f1 /proc/uptime)"
hostname "$name"
mods=/lib/modules/$(uname -r)
while read -r mod params; do
	case "$mod" in ''|'#'*) continue ;; esac
	insmod "$mods/$mod" $params || echo "ESIR-VM-FAIL insmod $mod"
done < "$mods/esir-boot.load"
ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ]; do
	n=$((n + 1))
	if [ $n -gt 300 ]; then echo "ESIR-VM-FAIL no eth0"; break; fi
	sleep 0.1
done
ip addr add "$addr" brd + dev eth0 || echo "ESIR-VM-FAIL address $addr"
ip link set eth0 up
syslogd -O /dev/console
if [ -n "$serve" ]; then
	mkdir -p /www
	echo "$name" > /www/index.html
	httpd -p "$serve" -h /www || echo "ESIR-VM-FAIL httpd"
fi
nc -ll -p @CTLPORT@ -e /bin/sh &
ip -o link show dev eth0
ip -o -4 addr show dev eth0
echo "ESIR-VM-READY $name $addr $(cut -d' ' -f1 /proc/uptime)"
while :; do sleep 3600; done
`

// busyboxApplets are linked to busybox in /bin: what /init and the test's
// commands use. ip is iproute2's own (ssi/enroll runs `ip addr replace`).
var busyboxApplets = []string{
	"sh", "mount", "cat", "cut", "echo", "hostname", "uname", "insmod", "lsmod", "sleep", "mkdir",
	"syslogd", "httpd", "nc", "sysctl", "kill", "killall", "pidof", "ps", "ls", "grep", "sed",
	"poweroff", "true", "false", "test", "[", "su", "stat", "chown", "chmod", "touch", "rm", "umount", "id",
}

// hostBinaries are copied from the host (Debian 12, like the guest kernel's
// userland) with their shared libraries. The NFS server's tools come from
// nfs-kernel-server; mount.nfs (also mount.nfs4) from nfs-common is the
// helper util-linux's mount runs for the home's nfs4 fstab line, as on a
// Debian node (guestPath).
var hostBinaries = []struct{ src, dst, pkg string }{
	{"/usr/sbin/keepalived", "usr/sbin/keepalived", "keepalived"},
	{"/usr/sbin/ipvsadm", "usr/sbin/ipvsadm", "ipvsadm"},
	{"/usr/bin/ip", "usr/bin/ip", "iproute2"},
	{"/usr/bin/mount", "usr/bin/mount", "mount"},
	{"/usr/sbin/rpc.nfsd", "usr/sbin/rpc.nfsd", "nfs-kernel-server"},
	{"/usr/sbin/rpc.mountd", "usr/sbin/rpc.mountd", "nfs-kernel-server"},
	{"/usr/sbin/exportfs", "usr/sbin/exportfs", "nfs-kernel-server"},
	{"/usr/sbin/mount.nfs", "sbin/mount.nfs", "nfs-common"},
}

// libDirs are searched for DT_NEEDED libraries, as Debian's ld.so does.
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"}

// baseInitramfs builds the initramfs every guest shares: busybox, keepalived,
// ipvsadm, ip, mount and the NFS tools with their libraries, the kernel
// modules named (with their dependencies, resolved by package modules) and
// the load list /init reads, and /init. It returns the uncompressed cpio (a
// plain cpio unpacks much faster under TCG than a compressed one) and the
// plan's module names.
func baseInitramfs(k vm.Kernel, busybox string, mods []string) ([]byte, []string, error) {
	a := initramfs.New()
	if err := a.File("bin/busybox", busybox, 0o755); err != nil {
		return nil, nil, err
	}
	for _, app := range busyboxApplets {
		if err := a.Symlink("bin/"+app, "busybox"); err != nil {
			return nil, nil, err
		}
	}
	var bins []string
	for _, b := range hostBinaries {
		if err := a.File(b.dst, b.src, 0o755); err != nil {
			return nil, nil, err
		}
		bins = append(bins, b.src)
	}
	libs, interp, err := sharedLibs(bins)
	if err != nil {
		return nil, nil, err
	}
	for name, src := range libs {
		if err := a.File(path.Join("lib/x86_64-linux-gnu", name), src, 0o755); err != nil {
			return nil, nil, err
		}
	}
	// The interpreter at the path the binaries name (/lib64/ld-linux-x86-64.so.2).
	if interp != "" {
		base := path.Base(interp)
		if _, ok := libs[base]; ok {
			err = a.Symlink(strings.TrimPrefix(interp, "/"), "/lib/x86_64-linux-gnu/"+base)
		} else {
			err = a.File(strings.TrimPrefix(interp, "/"), interp, 0o755)
		}
		if err != nil {
			return nil, nil, err
		}
	}
	tree, err := modules.Open(k.ModulesDir, modules.Options{ConfigDirs: []string{}})
	if err != nil {
		return nil, nil, err
	}
	plan, err := tree.PlanNames(mods...)
	if err != nil {
		return nil, nil, fmt.Errorf("modules for kernel %s: %w", k.Version, err)
	}
	if err := modules.AddToInitramfs(a, tree, plan); err != nil {
		return nil, nil, err
	}
	for _, d := range []string{"proc", "sys", "dev", "run", "tmp", "etc", "var", "home", "var/lib/nfs"} {
		if err := a.Dir(d, 0o755); err != nil {
			return nil, nil, err
		}
	}
	steps := []error{
		a.CharDev("dev/console", 0o600, 5, 1),
		a.Symlink("var/run", "/run"),
		// user is the home's user in the NFS check; nobody is whom the
		// export's root_squash maps root to.
		a.Bytes("etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\n"+
			"user:x:1000:1000:user:/home/user:/bin/sh\n"+
			"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"), 0o644),
		a.Bytes("etc/group", []byte("root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n"), 0o644),
		// What nfs-kernel-server, libtirpc-common and netbase install
		// beside the binaries (rpc.nfsd finds its port in /etc/services).
		a.Bytes("etc/exports", nil, 0o644),
		a.File("etc/netconfig", "/etc/netconfig", 0o644),
		a.File("etc/services", "/etc/services", 0o644),
		a.Symlink("sbin/mount.nfs4", "mount.nfs"),
		a.Bytes("init", []byte(strings.ReplaceAll(guestInit, "@CTLPORT@", strconv.Itoa(ctlPort))), 0o755),
	}
	for _, err := range steps {
		if err != nil {
			return nil, nil, err
		}
	}
	var buf bytes.Buffer
	if err := a.WriteCPIO(&buf); err != nil {
		return nil, nil, err
	}
	return buf.Bytes(), plan.Names(), nil
}

// sharedLibs follows the DT_NEEDED entries of bins (and of the libraries
// they need) and returns each library's host file by its soname, and the
// binaries' ELF interpreter.
func sharedLibs(bins []string) (map[string]string, string, error) {
	libs := map[string]string{}
	interp := ""
	queue := append([]string(nil), bins...)
	for len(queue) > 0 {
		file := queue[0]
		queue = queue[1:]
		f, err := elf.Open(file)
		if err != nil {
			return nil, "", fmt.Errorf("shared libraries: %w", err)
		}
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				b, err := io.ReadAll(p.Open())
				if err == nil {
					interp = strings.TrimRight(string(b), "\x00")
				}
			}
		}
		needed, err := f.ImportedLibraries()
		f.Close()
		if err != nil {
			return nil, "", fmt.Errorf("shared libraries of %s: %w", file, err)
		}
		for _, n := range needed {
			if _, ok := libs[n]; ok {
				continue
			}
			found := ""
			for _, d := range libDirs {
				p, err := filepath.EvalSymlinks(filepath.Join(d, n))
				if err == nil {
					found = p
					break
				}
			}
			if found == "" {
				return nil, "", fmt.Errorf("shared libraries of %s: %s not found in %v", file, n, libDirs)
			}
			libs[n] = found
			queue = append(queue, found)
		}
	}
	return libs, interp, nil
}

// nodeInitramfs appends to base a cpio of the staging directory root (the
// node's rendered files, as ssi/enroll installed them) and writes the result
// to dst: the kernel unpacks concatenated archives in order.
func nodeInitramfs(base []byte, root, dst string) error {
	a := initramfs.New()
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			return a.Dir(rel, info.Mode())
		case d.Type().IsRegular():
			return a.File(rel, p, info.Mode())
		}
		return fmt.Errorf("%s: only files and directories are staged", p)
	})
	if err != nil {
		return fmt.Errorf("node initramfs: %w", err)
	}
	f, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := f.Write(base); err != nil {
		f.Close()
		return err
	}
	if err := a.WriteCPIO(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
