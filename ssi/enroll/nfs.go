package enroll

import (
	"bytes"
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// nfsdThreads is the kernel NFS server's thread count; the file exists only
// while the nfsd filesystem is mounted.
const nfsdThreads = "/proc/fs/nfsd/threads"

// nfsUp reports whether the kernel NFS server runs under Direct init: nfsd
// has threads and rpc.mountd runs (without it no client gets past the export
// check).
func (n *Node) nfsUp(ctx context.Context) bool {
	out, err := n.Run.Run(ctx, "cat", nfsdThreads)
	if err != nil {
		return false
	}
	threads, err := strconv.Atoi(strings.TrimSpace(string(out)))
	return err == nil && threads > 0 && n.running(ctx, "rpc.mountd")
}

// startNFS starts the kernel NFS server without systemd, in the order of
// Debian's units (proc-fs-nfsd.mount, nfs-mountd.service, nfs-server.service):
// the nfsd filesystem (mounting it loads the nfsd module), the exports from
// /etc/exports and /etc/exports.d, rpc.mountd unless it runs, then the
// kernel's threads (rpc.nfsd only sets the thread count of a server that
// runs already). Each step's error names it.
//
// The server speaks NFSv4 only, over TCP: NFSv3 needs rpcbind (and statd
// for locking), which Direct init does not run, and the bundle's fstab line
// mounts the home as nfs4. Without MOUNT v1-v3 (-N 2 -N 3) rpc.mountd opens
// no RPC listener and registers nothing with rpcbind: it only answers the
// kernel's export cache upcalls. rpc.nfsd of Debian 12's nfs-utils (2.6.2)
// refuses "-N 2" ("2: Unsupported version") and turns NFSv2 off itself. It
// finds the nfs port in /etc/services (netbase).
func (n *Node) startNFS(ctx context.Context) error {
	run := func(step string, name string, args ...string) error {
		if out, err := n.Run.Run(ctx, name, args...); err != nil {
			return fmt.Errorf("step %s: %w: %s", step, err, bytes.TrimSpace(out))
		}
		return nil
	}
	if _, err := n.Run.Run(ctx, "cat", nfsdThreads); err != nil {
		if err := run("nfsd filesystem", "mount", "-t", "nfsd", "nfsd", "/proc/fs/nfsd"); err != nil {
			return err
		}
	}
	if err := run("exports", "exportfs", "-ra"); err != nil {
		return err
	}
	if !n.running(ctx, "rpc.mountd") {
		if err := run("rpc.mountd", "rpc.mountd", "-N", "2", "-N", "3", "--no-udp"); err != nil {
			return err
		}
	}
	return run("rpc.nfsd", "rpc.nfsd", "-N", "3", "-V", "4", "--no-udp")
}

// stopNFS stops the kernel NFS server without systemd, as Debian's
// nfs-server.service does (rpc.nfsd 0, then the exports are withdrawn from
// the kernel), stops rpc.mountd and waits for it to exit. A server that does
// not run is not an error.
func (n *Node) stopNFS(ctx context.Context) error {
	if _, err := n.Run.Run(ctx, "cat", nfsdThreads); err == nil {
		for _, cmd := range [][]string{{"rpc.nfsd", "0"}, {"exportfs", "-au"}, {"exportfs", "-f"}} {
			if out, err := n.Run.Run(ctx, cmd[0], cmd[1:]...); err != nil {
				return fmt.Errorf("%w: %s", err, bytes.TrimSpace(out))
			}
		}
	}
	out, err := n.Run.Run(ctx, "pidof", "rpc.mountd")
	if err != nil {
		return nil
	}
	if out, err := n.Run.Run(ctx, "kill", append([]string{"-TERM"}, strings.Fields(string(out))...)...); err != nil {
		return fmt.Errorf("%w: %s", err, bytes.TrimSpace(out))
	}
	const limit = 10 * time.Second
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	for n.running(ctx, "rpc.mountd") {
		select {
		case <-ctx.Done():
			return fmt.Errorf("rpc.mountd still runs %v after SIGTERM", limit)
		case <-time.After(100 * time.Millisecond):
		}
	}
	return nil
}
