package lab

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/esir-project/esir/lab/debianssi"
	"github.com/esir-project/esir/server/client"
	"github.com/esir-project/esir/server/cluster"
	"github.com/esir-project/esir/ssi"
	"golang.org/x/sys/unix"
	"gopkg.in/yaml.v3"
)

// The lab's SSI cluster (images with the stack: debian-ssi).
const (
	// VIPAddr is the cluster's virtual address, outside the DHCP pool.
	VIPAddr = "198.18.0.50/24"
	vipVRID = 51
	// vipIface is the nodes' NIC: the debian-ssi image keeps the kernel's
	// names, and a lab node has one NIC.
	vipIface = "eth0"
	// clusterTokenMS is corosync's token timeout: three TCG guests on two
	// host cores stall for seconds at a time, and corosync's default
	// (3 s) then loses the token.
	clusterTokenMS = 5000
	// clientAddrs are source addresses the lab's switch namespace gets on
	// br0 (beside the server's), so VIP probes come from several clients.
	clientAddrBase = "198.18.0.20"
	clientAddrN    = 12
)

// DefaultVIPScheduler is the IPVS scheduler of the lab cluster's VIP (see
// ClusterDefinition).
const DefaultVIPScheduler = "sh"

// clusterFile is the cluster definition `lab up` writes for the server.
const clusterFile = "cluster.yaml"

// ClusterDefinition is the SSI cluster lab up gives the server for an image
// with the stack: every node a member, the first three (or all, when fewer)
// corosync voters running pacemaker, fencing off (a test cluster: the server
// warns loudly), chrony served by the core nodes, and one VIP with HTTP on
// port 80 whose directors are the core nodes and whose real servers are all
// nodes.
//
// Every director runs IPVS, and every director is a real server too, so a
// connection a director forwards to another director meets that director's
// IPVS again. The scheduler is therefore sh (source hashing): with the same
// real servers every director picks the same one for a client, so a
// forwarded connection stays where it was sent and never bounces between
// directors; connections are leveled per client address. A scheduler that
// picks per connection (wlc, rr) would re-balance forwarded packets on the
// backup directors.
//
// scheduler overrides sh (empty: DefaultVIPScheduler).
func ClusterDefinition(labName string, nodes []Node, scheduler string) (*ssi.Cluster, error) {
	if len(nodes) == 0 {
		return nil, fmt.Errorf("lab: a cluster needs nodes")
	}
	if scheduler == "" {
		scheduler = DefaultVIPScheduler
	}
	core := min(3, len(nodes))
	var names []string
	for _, n := range nodes {
		names = append(names, n.Name)
	}
	vip := netip.MustParsePrefix(VIPAddr)
	c := &ssi.Cluster{
		Name: labName,
		Profile: ssi.Profile{Corosync: true, Pacemaker: true, Fencing: false, Keepalived: true, Chrony: true,
			ClusterShell: true},
		CoreSize: core,
		TokenMS:  clusterTokenMS,
		VIPs: []ssi.VIP{{
			Name: "web", Address: vip, VRID: vipVRID, Interface: vipIface,
			Directors: slices.Clone(names[:core]), RealServers: names,
			Services: []ssi.Service{{Port: debianssi.HelloPort, Protocol: "tcp", Scheduler: scheduler}},
		}},
		Time: ssi.Time{Allow: netip.MustParsePrefix(serverAddr).Masked()},
	}
	if _, err := c.Validate(); err != nil {
		return nil, fmt.Errorf("lab: cluster definition: %w", err)
	}
	return c, nil
}

// writeCluster writes the cluster definition for the server.
func (st *State) writeCluster(c *ssi.Cluster) error {
	b, err := yaml.Marshal(c)
	if err != nil {
		return fmt.Errorf("lab: cluster definition: %w", err)
	}
	b = append([]byte("# Written by esir lab up: the lab's SSI cluster.\n"), b...)
	st.ClusterDef = filepath.Join(st.Dir, clusterFile)
	st.Cluster = c.Name
	st.VIP = c.VIPs[0].Address.Addr().String()
	return writeAtomic(st.ClusterDef, b, 0o644)
}

// clientAddrs are the switch namespace's extra source addresses for probes.
func clientAddrs() []netip.Addr {
	a := netip.MustParseAddr(clientAddrBase)
	out := make([]netip.Addr, clientAddrN)
	for i := range out {
		out[i] = a
		a = a.Next()
	}
	return out
}

// addClientAddrs gives br0 in the switch namespace the probe addresses.
func (st *State) addClientAddrs(ctx context.Context) error {
	bits := netip.MustParsePrefix(serverAddr).Bits()
	for _, a := range clientAddrs() {
		out, err := exec.CommandContext(ctx, "ip", "-n", st.Switch, "addr", "replace", fmt.Sprintf("%s/%d", a, bits), "dev", "br0").CombinedOutput()
		if err != nil {
			return fmt.Errorf("lab: client address %s on br0: %w: %s", a, err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

// ClusterReady reports whether the cluster is what lab up waits for: every
// lab node a member in state enrolled and the core's view quorate.
func ClusterReady(s *cluster.Snapshot, nodes int) bool {
	if s == nil || !s.Quorate || len(s.Members) < nodes {
		return false
	}
	n := 0
	for _, m := range s.Members {
		if m.State == cluster.Enrolled {
			n++
		}
	}
	return n >= nodes
}

// WaitCluster polls the server until ClusterReady, calling progress with each
// new snapshot that differs from the last; it returns the last snapshot.
func (st *State) WaitCluster(ctx context.Context, c *client.Client, timeout time.Duration, progress func(*cluster.Snapshot)) (*cluster.Snapshot, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last *cluster.Snapshot
	lastKey := ""
	for {
		s, err := c.Cluster(ctx)
		if err == nil {
			last = s
			if k := snapshotKey(s); k != lastKey && progress != nil {
				lastKey = k
				progress(s)
			}
			if ClusterReady(s, len(st.Nodes)) {
				return s, nil
			}
		}
		select {
		case <-ctx.Done():
			if last == nil {
				return nil, fmt.Errorf("lab: cluster %s not ready within %v: %w (last error: %v)", st.Cluster, timeout, ctx.Err(), err)
			}
			return last, fmt.Errorf("lab: cluster %s not ready within %v: %s", st.Cluster, timeout, SnapshotLine(last))
		case <-time.After(2 * time.Second):
		}
	}
}

func snapshotKey(s *cluster.Snapshot) string {
	var b strings.Builder
	fmt.Fprint(&b, s.Version, s.Quorate, s.Joined, s.Online)
	for _, m := range s.Members {
		fmt.Fprint(&b, m.Name, m.State, m.Check)
	}
	return b.String()
}

// SnapshotLine says in one line where the cluster stands: quorum, members by
// state (with the failed check), VIP holders.
func SnapshotLine(s *cluster.Snapshot) string {
	q := "NOT quorate"
	switch {
	case s.ViewFrom == "":
		q = "quorum unknown"
	case s.Quorate:
		q = "quorate"
	}
	var ms []string
	for _, m := range s.Members {
		e := m.Name + " " + string(m.State)
		if m.Check != "" {
			e += " (" + m.Check + ")"
		}
		ms = append(ms, e)
	}
	line := fmt.Sprintf("cluster %s v%d: %s; members: %s", s.Name, s.Version, q, strings.Join(ms, ", "))
	for vip, h := range s.VIPHolders {
		line += fmt.Sprintf("; vip %s held by %s", vip, strings.Join(h, ","))
	}
	return line
}

// VIPProbe is the outcome of ProbeVIP.
type VIPProbe struct {
	VIP string `json:"vip"`
	// Answers counts the connections each node answered (by the host name
	// in the answer).
	Answers map[string]int `json:"answers"`
	// ByClient is the node that answered each client address.
	ByClient map[string][]string `json:"by_client"`
	Failed   int                 `json:"failed"`
	Errors   []string            `json:"errors,omitempty"`
}

// Nodes is the number of different nodes that answered.
func (p *VIPProbe) Nodes() int { return len(p.Answers) }

// ProbeVIP opens perClient HTTP connections to the VIP's port 80 from each of
// the switch namespace's client addresses (a new connection for every
// request) and counts which node answered each.
func (st *State) ProbeVIP(ctx context.Context, perClient int) (*VIPProbe, error) {
	if st.VIP == "" {
		return nil, fmt.Errorf("lab: this lab has no cluster VIP")
	}
	p := &VIPProbe{VIP: st.VIP, Answers: map[string]int{}, ByClient: map[string][]string{}}
	target := net.JoinHostPort(st.VIP, fmt.Sprint(debianssi.HelloPort))
	for _, src := range clientAddrs() {
		for range perClient {
			host, err := st.getFrom(ctx, src, target)
			if err != nil {
				p.Failed++
				if len(p.Errors) < 5 {
					p.Errors = append(p.Errors, fmt.Sprintf("from %s: %v", src, err))
				}
				continue
			}
			p.Answers[host]++
			p.ByClient[src.String()] = append(p.ByClient[src.String()], host)
		}
	}
	return p, nil
}

// getFrom makes one HTTP request to target over a new connection from
// source address src inside the switch namespace, and returns the body's
// first line.
func (st *State) getFrom(ctx context.Context, src netip.Addr, target string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := dialNSFrom(ctx, st.Switch, src, target)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(conn, "GET / HTTP/1.0\r\nHost: %s\r\n\r\n", target); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("HTTP %s", resp.Status)
	}
	host, _, _ := strings.Cut(strings.TrimSpace(string(body)), "\n")
	if host == "" {
		return "", fmt.Errorf("empty answer")
	}
	return host, nil
}

// dialNSFrom is DialNS from source address src (none when invalid).
func dialNSFrom(ctx context.Context, ns string, src netip.Addr, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // no Unlock: the thread dies with the goroutine
		f, err := os.Open(filepath.Join(netnsDir, ns))
		if err != nil {
			ch <- result{err: fmt.Errorf("network namespace %s: %w", ns, err)}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("enter network namespace %s: %w", ns, err)}
			return
		}
		var d net.Dialer
		if src.IsValid() {
			d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
		}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			err = fmt.Errorf("dial %s from %s in namespace %s: %w", addr, src, ns, err)
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}
