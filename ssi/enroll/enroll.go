// Package enroll is the node side of the SSI stack: it installs the files of a
// node's ssi.Bundle, starts the engines in order (or reloads corosync's
// nodelist when it already runs), and asks the engines whether the node is a
// member. A node is enrolled only when corosync lists it as joined and says the
// partition is quorate; otherwise Enroll names the check that failed.
package enroll

import (
	"bufio"
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/esir-project/esir/ssi"
)

// Runner runs a command on the node and returns its combined output.
type Runner interface {
	Run(ctx context.Context, name string, args ...string) ([]byte, error)
}

// Local runs commands on this machine.
type Local struct{}

// Run runs name with args and returns its combined output; the error carries
// the command line.
func (Local) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	// A daemon that forks may keep the pipes: stop waiting for them.
	cmd.WaitDelay = 2 * time.Second
	err := cmd.Run()
	if err != nil && !errors.Is(err, exec.ErrWaitDelay) {
		return out.Bytes(), fmt.Errorf("%s %s: %w", name, strings.Join(args, " "), err)
	}
	return out.Bytes(), nil
}

// Init says how services are started on the node.
type Init int

// Ways to start services.
const (
	Systemd Init = iota // systemctl start / stop
	Direct              // run the engine's daemon directly (nodes without systemd, such as busybox init)
)

// Node enrolls one node.
type Node struct {
	Root string // filesystem root the files are installed under: "/" on a live node
	Run  Runner
	Init Init
	Log  *slog.Logger
	// Timeout bounds the wait for membership and quorum after a start or a
	// reload; 0 means one minute.
	Timeout time.Duration
}

// Membership is corosync's view from one node.
type Membership struct {
	NodeID   int   // this node's id
	Joined   []int // node ids corosync lists as joined
	Nodelist []int // node ids in corosync's loaded nodelist
	Quorate  bool
	Expected int // expected votes
	Total    int // total votes present
}

// Enroll installs b's files, starts or reloads the engines, and verifies that
// corosync lists the node as joined in a quorate partition. It is idempotent:
// run it at every boot and whenever the nodelist version changes. A reload
// (corosync-cfgtool -R) acts on every member at once, so the new nodelist must
// be installed on every member (Install) before any of them reloads.
func (n *Node) Enroll(ctx context.Context, b *ssi.Bundle) (Membership, error) {
	if err := n.Install(b); err != nil {
		return Membership{}, err
	}
	for _, a := range b.LoopbackVIPs {
		if _, err := n.Run.Run(ctx, "ip", "addr", "replace", a.String()+"/32", "dev", "lo"); err != nil {
			return Membership{}, fmt.Errorf("enroll %s: step real-server VIP %s on lo: %w", b.Member.Name, a, err)
		}
	}
	if err := n.Start(ctx, b); err != nil {
		return Membership{}, err
	}
	if !slices.Contains(b.Services, "corosync") {
		return Membership{}, fmt.Errorf("enroll %s: role %s: only corosync members are verified so far", b.Member.Name, b.Member.Role)
	}
	m, err := n.WaitMember(ctx, b.Member.ID, len(b.Core))
	if err != nil || !slices.Contains(b.Services, "pacemaker") {
		return m, err
	}
	return m, n.WaitOnline(ctx, b.Member.Name)
}

// WaitOnline polls pacemaker (crm_mon) until it shows node name online, or
// the timeout.
func (n *Node) WaitOnline(ctx context.Context, name string) error {
	timeout := n.Timeout
	if timeout == 0 {
		timeout = time.Minute
	}
	deadline := time.Now().Add(timeout)
	for {
		online, err := n.Online(ctx)
		if err == nil {
			if slices.Contains(online, name) {
				return nil
			}
			err = fmt.Errorf("check pacemaker: %s is not online (online: %v)", name, online)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("node %s not enrolled after %v: %w", name, timeout, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// Online returns the nodes pacemaker shows online, from crm_mon's XML.
func (n *Node) Online(ctx context.Context) ([]string, error) {
	out, err := n.Run.Run(ctx, "crm_mon", "-1", "--output-as=xml")
	if err != nil {
		return nil, fmt.Errorf("check pacemaker: crm_mon: %w: %s", err, bytes.TrimSpace(out))
	}
	return parseOnline(out)
}

// parseOnline reads crm_mon's XML and returns the names of the online nodes.
func parseOnline(out []byte) ([]string, error) {
	var doc struct {
		Nodes []struct {
			Name   string `xml:"name,attr"`
			Online bool   `xml:"online,attr"`
		} `xml:"nodes>node"`
	}
	if err := xml.Unmarshal(out, &doc); err != nil {
		return nil, fmt.Errorf("check pacemaker: crm_mon XML: %w", err)
	}
	var names []string
	for _, nd := range doc.Nodes {
		if nd.Online {
			names = append(names, nd.Name)
		}
	}
	slices.Sort(names)
	return names, nil
}

// Start starts b's services in order; corosync, when it already runs, reloads
// its configuration instead (corosync-cfgtool -R, on every member at once).
func (n *Node) Start(ctx context.Context, b *ssi.Bundle) error {
	log := n.logger().With("node", b.Member.Name, "version", b.Version)
	for _, svc := range b.Services {
		if svc == "corosync" {
			if _, err := n.Run.Run(ctx, "corosync-cfgtool", "-s"); err == nil {
				log.Info("corosync runs: reloading the nodelist")
				if out, err := n.Run.Run(ctx, "corosync-cfgtool", "-R"); err != nil {
					return fmt.Errorf("enroll %s: step reload corosync (nodelist version %d): %w: %s", b.Member.Name, b.Version, err, out)
				}
				continue
			}
		}
		log.Info("starting", "service", svc)
		if err := n.start(ctx, svc); err != nil {
			return fmt.Errorf("enroll %s: step start %s: %w", b.Member.Name, svc, err)
		}
	}
	return nil
}

// HoldsVIP reports whether the node carries addr on one of its interfaces
// other than lo (a VRRP director that is master for it).
func (n *Node) HoldsVIP(ctx context.Context, addr netip.Addr) (bool, error) {
	out, err := n.Run.Run(ctx, "ip", "-o", "addr", "show")
	if err != nil {
		return false, fmt.Errorf("check VIP %s: %w", addr, err)
	}
	for l := range strings.Lines(string(out)) {
		f := strings.Fields(l)
		if len(f) < 4 || f[1] == "lo" {
			continue
		}
		if p, err := netip.ParsePrefix(f[3]); err == nil && p.Addr() == addr {
			return true, nil
		}
	}
	return false, nil
}

// WaitMember polls corosync until node id is joined in a quorate partition of
// want members (or the timeout); the error names the check that failed last.
func (n *Node) WaitMember(ctx context.Context, id, want int) (Membership, error) {
	timeout := n.Timeout
	if timeout == 0 {
		timeout = time.Minute
	}
	// The deadline is checked between polls, so that a check in flight is
	// not cut short and the last verdict is a real one.
	deadline := time.Now().Add(timeout)
	for {
		m, err := n.Status(ctx)
		if err == nil {
			switch {
			case m.NodeID != id:
				err = fmt.Errorf("check node id: corosync runs as node %d, want %d", m.NodeID, id)
			case !slices.Contains(m.Joined, id):
				err = fmt.Errorf("check membership: node %d is not joined (joined: %v)", id, m.Joined)
			case len(m.Joined) < want:
				err = fmt.Errorf("check membership: %d of %d core members joined (%v)", len(m.Joined), want, m.Joined)
			case !m.Quorate:
				err = fmt.Errorf("check quorum: partition is not quorate (%d of %d votes)", m.Total, m.Expected)
			default:
				return m, nil
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return m, fmt.Errorf("node %d not enrolled after %v: %w", id, timeout, err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// Status asks corosync for its membership and quorum.
func (n *Node) Status(ctx context.Context) (Membership, error) {
	var m Membership
	out, err := n.Run.Run(ctx, "corosync-cmapctl", "-b", "runtime.members")
	if err != nil {
		return m, fmt.Errorf("check membership: corosync-cmapctl: %w: %s", err, bytes.TrimSpace(out))
	}
	m.Joined = parseMembers(out)
	out, err = n.Run.Run(ctx, "corosync-cmapctl", "-b", "nodelist.node")
	if err != nil {
		return m, fmt.Errorf("check nodelist: corosync-cmapctl: %w: %s", err, bytes.TrimSpace(out))
	}
	m.Nodelist = parseNodelist(out)
	out, err = n.Run.Run(ctx, "corosync-quorumtool", "-s", "-p")
	// corosync-quorumtool exits non-zero when the partition is not quorate.
	if len(out) == 0 && err != nil {
		return m, fmt.Errorf("check quorum: corosync-quorumtool: %w", err)
	}
	if err := parseQuorum(out, &m); err != nil {
		return m, fmt.Errorf("check quorum: %w", err)
	}
	return m, nil
}

// parseMembers reads corosync-cmapctl's runtime.members listing, lines like
// "runtime.members.3.status (str) = joined", and returns the joined ids.
func parseMembers(out []byte) []int {
	var ids []int
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), " = ")
		if !ok || val != "joined" || !strings.HasSuffix(key, ".status (str)") {
			continue
		}
		f := strings.Split(strings.TrimSuffix(key, ".status (str)"), ".")
		if len(f) != 3 {
			continue
		}
		if id, err := strconv.Atoi(f[2]); err == nil {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// parseNodelist reads corosync-cmapctl's nodelist.node listing, lines like
// "nodelist.node.0.nodeid (u32) = 1", and returns the ids.
func parseNodelist(out []byte) []int {
	var ids []int
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		key, val, ok := strings.Cut(sc.Text(), " = ")
		if !ok || !strings.HasSuffix(key, ".nodeid (u32)") {
			continue
		}
		if id, err := strconv.Atoi(val); err == nil {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// parseQuorum reads `corosync-quorumtool -s -p` output: "Node ID:",
// "Quorate:", "Expected votes:" and "Total votes:" lines.
func parseQuorum(out []byte, m *Membership) error {
	seen := 0
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if f := strings.Fields(v); len(f) > 0 {
			v = f[0]
		}
		switch k {
		case "Node ID":
			m.NodeID, _ = strconv.Atoi(v)
			seen++
		case "Quorate":
			m.Quorate = v == "Yes"
			seen++
		case "Expected votes":
			m.Expected, _ = strconv.Atoi(v)
		case "Total votes":
			m.Total, _ = strconv.Atoi(v)
		}
	}
	if seen < 2 {
		return fmt.Errorf("corosync-quorumtool printed no node id or quorum state: %q", out)
	}
	return nil
}

// Leave stops the node's engines in reverse start order. The server then
// removes the node from the nodelist and the remaining members reload it
// (Enroll with their new bundles).
func (n *Node) Leave(ctx context.Context, b *ssi.Bundle) error {
	for i := len(b.Services) - 1; i >= 0; i-- {
		svc := b.Services[i]
		if err := n.stop(ctx, svc); err != nil {
			return fmt.Errorf("leave %s: step stop %s: %w", b.Member.Name, svc, err)
		}
	}
	return nil
}

func (n *Node) start(ctx context.Context, svc string) error {
	if n.Init == Systemd {
		_, err := n.Run.Run(ctx, "systemctl", "start", svc)
		return err
	}
	switch svc {
	case "corosync":
		// corosync forks and returns once it runs.
		_, err := n.Run.Run(ctx, "corosync")
		return err
	case "chrony":
		_, err := n.Run.Run(ctx, "chronyd", "-f", "/etc/chrony/chrony.conf")
		return err
	case "keepalived":
		_, err := n.Run.Run(ctx, "keepalived", "-f", "/etc/keepalived/keepalived.conf")
		return err
	case "pacemaker":
		// pacemakerd always stays in the foreground: detach it.
		_, err := n.Run.Run(ctx, "sh", "-c", "setsid pacemakerd </dev/null >/dev/null 2>&1 &")
		return err
	}
	return fmt.Errorf("service %s cannot be started without systemd yet", svc)
}

func (n *Node) stop(ctx context.Context, svc string) error {
	if n.Init == Systemd {
		_, err := n.Run.Run(ctx, "systemctl", "stop", svc)
		return err
	}
	switch svc {
	case "corosync":
		// -H asks corosync to shut down cleanly, telling the others it leaves.
		out, err := n.Run.Run(ctx, "corosync-cfgtool", "-H", "--force")
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		// -H returns before the daemon exits; a new start meanwhile finds
		// its lock taken. Wait for the process to go.
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		for {
			if _, err := n.Run.Run(ctx, "pidof", "corosync"); err != nil {
				if ctx.Err() != nil {
					return fmt.Errorf("corosync still runs 30 s after corosync-cfgtool -H")
				}
				return nil
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("corosync still runs 30 s after corosync-cfgtool -H")
			case <-time.After(100 * time.Millisecond):
			}
		}
	case "chrony":
		_, err := n.Run.Run(ctx, "chronyc", "shutdown")
		return err
	case "pacemaker":
		out, err := n.Run.Run(ctx, "pacemakerd", "--shutdown")
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		return nil
	}
	return fmt.Errorf("service %s cannot be stopped without systemd yet", svc)
}

// Install writes b's files under the node's root atomically with their modes
// and owners, and adds b's fstab lines to etc/fstab once.
func (n *Node) Install(b *ssi.Bundle) error {
	for _, f := range b.Files {
		if err := n.writeFile(f); err != nil {
			return fmt.Errorf("enroll %s: step install: %w", b.Member.Name, err)
		}
	}
	if len(b.FstabLines) > 0 {
		if err := n.addFstab(b.FstabLines); err != nil {
			return fmt.Errorf("enroll %s: step fstab: %w", b.Member.Name, err)
		}
	}
	return nil
}

func (n *Node) writeFile(f ssi.File) error {
	path := filepath.Join(n.Root, f.Path)
	uid, gid, err := owner(f)
	if err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".esir*")
	if err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	defer os.Remove(tmp.Name())
	err = errors.Join(tmp.Chmod(f.Mode), tmp.Chown(uid, gid))
	if err == nil {
		_, err = tmp.Write(f.Data)
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", f.Path, err)
	}
	return nil
}

// owner resolves a file's owner and group names (empty: root).
func owner(f ssi.File) (uid, gid int, err error) {
	if f.Owner != "" {
		u, err := user.Lookup(f.Owner)
		if err != nil {
			return 0, 0, fmt.Errorf("owner: %w (is the engine's package installed?)", err)
		}
		uid, _ = strconv.Atoi(u.Uid)
	}
	if f.Group != "" {
		g, err := user.LookupGroup(f.Group)
		if err != nil {
			return 0, 0, fmt.Errorf("group: %w (is the engine's package installed?)", err)
		}
		gid, _ = strconv.Atoi(g.Gid)
	}
	return uid, gid, nil
}

// fstabMark ends the fstab lines ESIR adds.
const fstabMark = "# esir ssi"

// addFstab appends the lines /etc/fstab lacks, keeping the rest of the file.
func (n *Node) addFstab(lines []string) error {
	path := filepath.Join(n.Root, "etc", "fstab")
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	have := map[string]bool{}
	for l := range strings.Lines(string(old)) {
		l = strings.TrimSuffix(strings.TrimSpace(l), fstabMark)
		have[strings.Join(strings.Fields(l), " ")] = true
	}
	data := old
	if len(data) > 0 && data[len(data)-1] != '\n' {
		data = append(data, '\n')
	}
	added := false
	for _, l := range lines {
		if !have[strings.Join(strings.Fields(l), " ")] {
			data = append(data, l+" "+fstabMark+"\n"...)
			added = true
		}
	}
	if !added {
		return nil
	}
	return n.writeFile(ssi.File{Path: "/etc/fstab", Mode: 0o644, Data: data})
}

func (n *Node) logger() *slog.Logger {
	if n.Log != nil {
		return n.Log
	}
	return slog.New(slog.DiscardHandler)
}
