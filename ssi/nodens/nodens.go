// Package nodens runs a cluster node's engines on one host: each node is a
// netlab host (network namespace) plus its own mount, UTS and PID namespaces.
// The engines' directories (/etc/corosync, /var/lib/corosync,
// /var/log/corosync, /etc/keepalived, /etc/pacemaker, /var/lib/pacemaker,
// /var/log/pacemaker, /etc/chrony, /var/lib/chrony) are bind
// mounts of directories under the node's Root, and /run and /dev/shm are
// private, so several corosyncs, pacemakers, pacemaker-remoteds and chronyds
// run side by side and ssi/enroll installs a node's files by writing under
// Root. The host's clock is shared by every node: run chronyd with -x
// (enroll.Node.SharedClock). Tests and benchmarks use it; the host needs root,
// util-linux (unshare, nsenter) and iproute2.
package nodens

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/esir-project/esir/netlab"
)

// Node is one running node.
type Node struct {
	Host *netlab.Host
	Root string // host directory whose Dirs the node sees at /
	// Env is added to the environment of every command Run starts in the
	// node (and so of the daemons those commands leave running), for
	// example "PATH=/opt/esir-test/pacemaker-remote/usr/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
	// for a daemon unpacked aside. Set it before the first Run.
	Env []string
	pid int // host pid of the node's PID-namespace init
	cmd *exec.Cmd
	out bytes.Buffer
}

// Start creates the node's namespaces inside h's network namespace; root must
// be an empty directory the node keeps its engine directories in. Close ends
// the node.
func Start(ctx context.Context, h *netlab.Host, root string) (*Node, error) {
	n := &Node{Host: h, Root: root}
	script := "set -e; hostname " + h.Name + "; mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /dev/shm; "
	// The engine directories each node keeps apart, relative to /.
	for _, d := range []string{"etc/corosync", "var/lib/corosync", "var/log/corosync", "etc/keepalived",
		"etc/pacemaker", "var/lib/pacemaker", "var/log/pacemaker", "etc/chrony", "var/lib/chrony"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return nil, fmt.Errorf("node %s: %w", h.Name, err)
		}
		// A directory the host lacks belongs to an engine it lacks.
		script += fmt.Sprintf("if [ -d /%s ]; then mount --bind '%s' /%s; fi; ", d, filepath.Join(root, d), d)
	}
	if err := engineDirs(root); err != nil {
		return nil, fmt.Errorf("node %s: %w", h.Name, err)
	}
	ready := filepath.Join(root, ".ready")
	// The shell stays PID 1 and reaps the daemons that fork into the background.
	script += "touch '" + ready + "'; while sleep 1; do :; done"
	n.cmd = h.Command(context.WithoutCancel(ctx), "unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc",
		"--propagation", "private", "sh", "-c", script)
	n.cmd.Stdout, n.cmd.Stderr = &n.out, &n.out
	if err := n.cmd.Start(); err != nil {
		return nil, fmt.Errorf("node %s: %w", h.Name, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(ready); err == nil {
			p := n.cmd.Process.Pid
			children, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", p, p))
			if f := strings.Fields(string(children)); len(f) == 1 {
				n.pid, _ = strconv.Atoi(f[0])
				return n, nil
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			n.Close()
			return nil, fmt.Errorf("node %s: namespaces not ready: %s", h.Name, n.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// engineDirs gives the node the state directories Debian's pacemaker and
// chrony packages create, owned by their users (hacluster, _chrony) when
// those exist.
func engineDirs(root string) error {
	for _, o := range []struct {
		user string
		dirs []string
	}{
		{"hacluster", []string{"var/lib/pacemaker/cib", "var/lib/pacemaker/pengine", "var/lib/pacemaker/blackbox",
			"var/lib/pacemaker/cores", "var/log/pacemaker"}},
		{"_chrony", []string{"var/lib/chrony"}},
	} {
		uid, gid := -1, -1
		if u, err := user.Lookup(o.user); err == nil {
			uid, _ = strconv.Atoi(u.Uid)
			gid, _ = strconv.Atoi(u.Gid)
		}
		for _, d := range o.dirs {
			p := filepath.Join(root, d)
			if err := os.MkdirAll(p, 0o770); err != nil {
				return err
			}
			if uid >= 0 {
				if err := os.Chown(p, uid, gid); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// Run runs a command inside the node's namespaces and returns its combined
// output (it implements enroll.Runner).
func (n *Node) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"-t", strconv.Itoa(n.pid), "-m", "-u", "-p", "-n", "--", name}, args...)...)
	if len(n.Env) > 0 {
		cmd.Env = append(os.Environ(), n.Env...)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// A daemon that forks may keep the pipes open: stop waiting for them.
	cmd.WaitDelay = 2 * time.Second
	if err := cmd.Run(); err != nil && !errors.Is(err, exec.ErrWaitDelay) {
		return out.Bytes(), fmt.Errorf("node %s: %s %s: %w", n.Host.Name, name, strings.Join(args, " "), err)
	}
	return out.Bytes(), nil
}

// PID returns the host pid of the node's PID-namespace init: every process
// of the node dies with it (Kill).
func (n *Node) PID() int { return n.pid }

// Kill ends the node's PID namespace: every process in it dies at once, as
// when the machine loses power.
func (n *Node) Kill() {
	if n.pid > 0 {
		syscall.Kill(n.pid, syscall.SIGKILL)
	}
}

// Close kills the node and waits for its namespace holder to exit.
func (n *Node) Close() error {
	n.Kill()
	if n.cmd.Process != nil {
		n.cmd.Process.Kill()
		n.cmd.Wait()
	}
	return nil
}

// Log returns the node's corosync log.
func (n *Node) Log() []byte {
	b, _ := os.ReadFile(filepath.Join(n.Root, "var/log/corosync/corosync.log"))
	return b
}

// PacemakerLog returns the node's pacemaker log (pacemakerd's daemons or
// pacemaker-remoted).
func (n *Node) PacemakerLog() []byte {
	b, _ := os.ReadFile(filepath.Join(n.Root, "var/log/pacemaker/pacemaker.log"))
	return b
}
