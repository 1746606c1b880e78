package enroll

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/esir-project/esir/ssi"
)

// appliedDir holds, under the node's root, one file per engine with the
// digest of the configuration files the engine last started or reloaded
// with: Start touches a running engine only when its files differ from
// them. It outlives a reboot on purpose: an engine that systemd starts at
// boot reads the files installed last, which the digest describes.
const appliedDir = "var/lib/esir/ssi/applied"

// keepalivedPID is where keepalived writes its parent process's pid.
const keepalivedPID = "/run/keepalived.pid"

// configDir is the directory whose bundle files service svc reads, or ""
// for a service Start never reloads: pacemaker and pacemaker-remote read
// only their authkey, which never changes for a cluster.
func configDir(svc string) string {
	switch svc {
	case "corosync":
		return "/etc/corosync/"
	case "chrony":
		return "/etc/chrony/"
	case "keepalived":
		return "/etc/keepalived/"
	case "nfs-server":
		return "/etc/exports.d/"
	}
	return ""
}

// digest returns the digest of the files b gives service svc (path, mode,
// owner and contents), or "" when svc has none.
func digest(b *ssi.Bundle, svc string) string {
	dir := configDir(svc)
	if dir == "" {
		return ""
	}
	h := sha256.New()
	n := 0
	for _, f := range b.Files {
		if !strings.HasPrefix(f.Path, dir) {
			continue
		}
		fmt.Fprintf(h, "%s\x00%o\x00%s\x00%s\x00%d\x00", f.Path, f.Mode, f.Owner, f.Group, len(f.Data))
		h.Write(f.Data)
		n++
	}
	if n == 0 {
		return ""
	}
	return hex.EncodeToString(h.Sum(nil))
}

// appliedPath is the file recording the digest svc last started or
// reloaded with.
func (n *Node) appliedPath(svc string) string {
	return filepath.Join(n.Root, appliedDir, svc)
}

// changed reports whether the files b gives svc differ from those svc last
// started or reloaded with (unknown counts as changed).
func (n *Node) changed(b *ssi.Bundle, svc string) bool {
	sum := digest(b, svc)
	if sum == "" {
		return false
	}
	old, err := os.ReadFile(n.appliedPath(svc))
	return err != nil || strings.TrimSpace(string(old)) != sum
}

// markApplied records that svc runs with the files b gives it. A service
// without files Start reloads gets an empty record: it says that ESIR
// started it (stopDropped).
func (n *Node) markApplied(b *ssi.Bundle, svc string) error {
	sum := digest(b, svc)
	path := n.appliedPath(svc)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("record %s's configuration: %w", svc, err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(sum+"\n"), 0o644); err != nil {
		return fmt.Errorf("record %s's configuration: %w", svc, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("record %s's configuration: %w", svc, err)
	}
	return nil
}

// recorded reports whether svc has a record in appliedDir.
func (n *Node) recorded(svc string) bool {
	_, err := os.Stat(n.appliedPath(svc))
	return err == nil
}

// forgetDigest replaces svc's record with one that matches no digest: the
// next Start reloads svc, and the record still says ESIR started it.
func (n *Node) forgetDigest(svc string) {
	if err := writeRecord(n.appliedPath(svc), []byte("unknown\n")); err != nil {
		n.logger().Warn("ssi: forget an engine's configuration", "service", svc, "err", err)
	}
}

// isRunning reports whether service svc runs: corosync answers
// corosync-cfgtool; under systemd the unit is active; the kernel NFS server
// has nfsd threads and rpc.mountd; otherwise its daemon runs.
func (n *Node) isRunning(ctx context.Context, svc string) bool {
	if svc == "corosync" {
		_, err := n.Run.Run(ctx, "corosync-cfgtool", "-s")
		return err == nil
	}
	if n.Init == Systemd {
		_, err := n.Run.Run(ctx, "systemctl", "is-active", "--quiet", svc)
		return err == nil
	}
	if svc == "nfs-server" {
		return n.nfsUp(ctx)
	}
	return n.running(ctx, daemon(svc))
}

// reload makes running service svc read its changed configuration, the way
// the engine supports: corosync reloads (corosync-cfgtool -R, which makes
// every member reload its own corosync.conf), keepalived reloads on SIGHUP
// (systemctl reload), chronyd reads chrony.conf only at start and restarts,
// the NFS server re-exports (exportfs -ra; systemctl reload).
func (n *Node) reload(ctx context.Context, svc string) error {
	run := func(name string, args ...string) error {
		out, err := n.Run.Run(ctx, name, args...)
		if err != nil {
			return fmt.Errorf("%w: %s", err, bytes.TrimSpace(out))
		}
		return nil
	}
	switch svc {
	case "corosync":
		return run("corosync-cfgtool", "-R")
	case "keepalived":
		if n.Init == Systemd {
			return run("systemctl", "reload", svc)
		}
		out, err := n.Run.Run(ctx, "cat", keepalivedPID)
		pid, perr := strconv.Atoi(strings.TrimSpace(string(out)))
		if err != nil || perr != nil || pid <= 1 {
			return fmt.Errorf("keepalived's pid from %s: %q, %v", keepalivedPID, bytes.TrimSpace(out), err)
		}
		return run("kill", "-HUP", strconv.Itoa(pid))
	case "chrony":
		if n.Init == Systemd {
			return run("systemctl", "restart", svc)
		}
		if err := n.stop(ctx, svc); err != nil {
			return fmt.Errorf("stop: %w", err)
		}
		return n.start(ctx, svc)
	case "nfs-server":
		if n.Init == Systemd {
			return run("systemctl", "reload", svc)
		}
		return run("exportfs", "-ra")
	}
	return fmt.Errorf("ESIR cannot reload %s", svc)
}
