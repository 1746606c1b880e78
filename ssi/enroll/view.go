package enroll

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/esir-project/esir/ssi"
)

// Membership is a node's view of the cluster, as its engines report it: what
// Enroll returns and View reports periodically. The corosync fields are empty
// on a remote node.
type Membership struct {
	NodeID   int   `json:"node_id"`  // this node's corosync id
	Joined   []int `json:"joined"`   // node ids corosync lists as joined
	Nodelist []int `json:"nodelist"` // node ids in corosync's loaded nodelist
	Quorate  bool  `json:"quorate"`
	Expected int   `json:"expected"` // expected votes
	Total    int   `json:"total"`    // total votes present

	Online []string `json:"online"` // nodes pacemaker shows online, core and remote, sorted
	Role   string   `json:"role"`   // the node's role (ssi.Core or ssi.Remote)

	TimeSource   string  `json:"time_source"`    // what chrony tracks: an address, "local" or ""
	TimeOffsetMS float64 `json:"time_offset_ms"` // system clock minus NTP time, ms
	TimeSynced   bool    `json:"time_synced"`

	HomeMounted bool `json:"home_mounted"` // the NFS home is mounted (only meaningful with an NFS home, off its server)
	// HomeExported says the NFS home's server serves it: nfsd runs with
	// rpc.mountd and the home is in its export table (on that server only).
	HomeExported bool     `json:"home_exported"`
	VIPs         []string `json:"vips"` // VIPs this node holds as a VRRP director
	// IPVS is the director's IPVS table while it holds a VIP: the real
	// servers with their weight and connection counts.
	IPVS []IPVSEntry `json:"ipvs,omitempty"`

	FencingEnabled bool `json:"fencing_enabled"` // pacemaker's stonith-enabled
	FencingDevices int  `json:"fencing_devices"` // configured fencing resources: 0 with fencing enabled means none can run yet
}

// View returns the node's current view without waiting: one round of every
// check that applies to b's services (corosync membership and quorum,
// pacemaker, chrony, the NFS home, the VIPs). The view is filled as far as the
// engines answered; the checks that failed come back joined, each a
// *CheckError naming the node.
func (n *Node) View(ctx context.Context, b *ssi.Bundle) (Membership, error) {
	m := Membership{Role: string(b.Member.Role)}
	var errs []error
	if slices.Contains(b.Services, "corosync") {
		cs, err := n.Status(ctx)
		if err == nil {
			// A running member stays a member while it is joined in a
			// quorate partition: a dead peer shows in the view (Joined),
			// it does not make this node fail.
			err = memberVerdict(cs, b.Member.ID, 0)
		}
		m.NodeID, m.Joined, m.Nodelist, m.Quorate, m.Expected, m.Total = cs.NodeID, cs.Joined, cs.Nodelist, cs.Quorate, cs.Expected, cs.Total
		errs = append(errs, err)
	}
	if slices.Contains(b.Services, "pacemaker") || slices.Contains(b.Services, "pacemaker_remote") {
		ps, err := n.crmMon(ctx)
		if err == nil {
			m.Online = ps.online()
			if !slices.Contains(m.Online, b.Member.Name) {
				err = failed(CheckPacemaker, "%s is not online (online: %v)", b.Member.Name, m.Online)
			}
			m.FencingEnabled, m.FencingDevices = ps.StonithEnabled, ps.StonithDevices
		}
		errs = append(errs, err)
	}
	if slices.Contains(b.Services, "chrony") {
		ts, err := n.TimeSynced(ctx, b)
		m.TimeSource, m.TimeOffsetMS, m.TimeSynced = ts.Source, ts.OffsetMS, ts.Synced
		errs = append(errs, err)
	}
	if b.HomeMount != "" {
		ok, err := n.HomeMounted(ctx, b.HomeMount)
		if err == nil && !ok {
			err = failed(CheckHome, "%s is not mounted", b.HomeMount)
		}
		m.HomeMounted = ok
		errs = append(errs, err)
	}
	if b.HomeExport != "" {
		err := n.HomeExported(ctx, b.HomeExport)
		m.HomeExported = err == nil
		errs = append(errs, err)
	}
	if len(b.DirectorVIPs) > 0 || len(b.LoopbackVIPs) > 0 {
		addrs, err := n.addrs(ctx)
		if err == nil {
			m.VIPs = heldVIPs(addrs, b.DirectorVIPs)
			err = loopbackVerdict(addrs, b.LoopbackVIPs)
			if len(m.VIPs) > 0 {
				m.IPVS = n.IPVS(ctx)
			}
		}
		errs = append(errs, err)
	}
	for _, err := range errs {
		named(err, b.Member.Name)
	}
	return m, errors.Join(errs...)
}

// ifAddr is one address on one interface.
type ifAddr struct {
	Dev  string
	Addr netip.Addr
}

// addrs lists the node's interface addresses (`ip -o addr show`).
func (n *Node) addrs(ctx context.Context) ([]ifAddr, error) {
	out, err := n.Run.Run(ctx, "ip", "-o", "addr", "show")
	if err != nil {
		return nil, failed(CheckVIP, "ip addr: %w: %s", err, bytes.TrimSpace(out))
	}
	return parseAddrs(out), nil
}

// parseAddrs reads `ip -o addr show`: "2: eth0    inet 198.18.0.1/24 brd ...".
func parseAddrs(out []byte) []ifAddr {
	var as []ifAddr
	for l := range strings.Lines(string(out)) {
		f := strings.Fields(l)
		if len(f) < 4 {
			continue
		}
		if p, err := netip.ParsePrefix(f[3]); err == nil {
			as = append(as, ifAddr{Dev: strings.TrimSuffix(f[1], ":"), Addr: p.Addr()})
		}
	}
	return as
}

// heldVIPs returns the VIPs among vips that sit on an interface other than lo
// (a director holding them), as strings.
func heldVIPs(addrs []ifAddr, vips []netip.Addr) []string {
	var held []string
	for _, v := range vips {
		if slices.ContainsFunc(addrs, func(a ifAddr) bool { return a.Dev != "lo" && a.Addr == v }) {
			held = append(held, v.String())
		}
	}
	return held
}

// loopbackVerdict checks that a real server carries its VIPs on lo.
func loopbackVerdict(addrs []ifAddr, vips []netip.Addr) error {
	for _, v := range vips {
		if !slices.ContainsFunc(addrs, func(a ifAddr) bool { return a.Dev == "lo" && a.Addr == v }) {
			return failed(CheckVIP, "real-server VIP %s is not on lo", v)
		}
	}
	return nil
}

// HoldsVIP reports whether the node carries addr on one of its interfaces
// other than lo (a VRRP director that is master for it).
func (n *Node) HoldsVIP(ctx context.Context, addr netip.Addr) (bool, error) {
	as, err := n.addrs(ctx)
	if err != nil {
		return false, fmt.Errorf("check VIP %s: %w", addr, err)
	}
	return len(heldVIPs(as, []netip.Addr{addr})) == 1, nil
}

// HomeMounted reports whether an NFS file system is mounted at dir in the
// node's mount namespace (its /proc/self/mountinfo, read through the Runner).
func (n *Node) HomeMounted(ctx context.Context, dir string) (bool, error) {
	out, err := n.Run.Run(ctx, "cat", "/proc/self/mountinfo")
	if err != nil {
		return false, failed(CheckHome, "mountinfo: %w: %s", err, bytes.TrimSpace(out))
	}
	return nfsMounted(out, dir), nil
}

// HomeExported checks that the node serves dir as the NFS home: the kernel
// NFS server has threads, rpc.mountd runs (it answers the kernel's export
// upcalls) and dir is in the export table (exportfs -s). It returns a
// *CheckError (check home) saying which is missing.
func (n *Node) HomeExported(ctx context.Context, dir string) error {
	if !n.nfsUp(ctx) {
		return failed(CheckHome, "the NFS server is not running (no nfsd threads in %s, or no rpc.mountd)", nfsdThreads)
	}
	out, err := n.Run.Run(ctx, "exportfs", "-s")
	if err != nil {
		return failed(CheckHome, "exportfs -s: %w: %s", err, bytes.TrimSpace(out))
	}
	if !exported(out, dir) {
		return failed(CheckHome, "%s is not exported (exportfs -s lists %q)", dir, bytes.TrimSpace(out))
	}
	return nil
}

// exported reads exportfs -s lines ("/home  198.18.0.0/24(sync,...)") and
// reports whether dir is exported.
func exported(list []byte, dir string) bool {
	for l := range strings.Lines(string(list)) {
		if f := strings.Fields(l); len(f) > 0 && f[0] == dir {
			return true
		}
	}
	return false
}

// nfsMounted reads mountinfo lines ("36 35 98:0 / /home rw,noatime
// shared:1 - nfs4 198.18.0.1:/home rw,...") and reports whether an nfs or
// nfs4 file system is mounted at dir.
func nfsMounted(mountinfo []byte, dir string) bool {
	sc := bufio.NewScanner(bytes.NewReader(mountinfo))
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 5 || len(g) < 1 {
			continue
		}
		if f[4] == dir && (g[0] == "nfs" || g[0] == "nfs4") {
			return true
		}
	}
	return false
}
