package enroll

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/esir-project/esir/ssi"
)

// corosyncLogPath is where the corosync.conf ESIR renders has corosync log.
const corosyncLogPath = "/var/log/corosync/corosync.log"

// corosyncStamp is the layout of corosync's log timestamps (no year).
const corosyncStamp = "Jan 02 15:04:05"

// authWindow is how recent, by the node's clock, a packet that failed
// authentication must be to count: knet logs one for every packet a peer
// with another key sends, several a second.
const authWindow = 10 * time.Second

// explainMembership adds to a failed membership check of node b.Member,
// whose corosync runs under its id with the view m, why core members are
// missing when the node can tell: their packets fail authentication (another
// authkey) or corosync's link to them is down (a partition). Other errors
// come back as they are.
func (n *Node) explainMembership(ctx context.Context, b *ssi.Bundle, m Membership, err error) error {
	var ce *CheckError
	if !errors.As(err, &ce) || ce.Check != CheckMembership || m.NodeID != b.Member.ID {
		return err
	}
	if cause := n.membershipCause(ctx, b, m); cause != "" {
		ce.Err = fmt.Errorf("%w; %s", ce.Err, cause)
	}
	return err
}

// membershipCause says why the core members of b that corosync's view m
// lacks are missing, from this node's corosync: knet logs every packet it
// cannot decrypt and authenticate ("rx: Unable to decrypt packet from
// 198.18.0.3:5405 (size 80)!", after "nsscrypto: Digest does not match"),
// which is what a peer with another authkey sends, and
// `corosync-cfgtool -s` shows each peer's link as connected or
// disconnected. knet's statistics count neither: a peer whose packets all
// fail looks like one that sends none. "" when it cannot tell.
func (n *Node) membershipCause(ctx context.Context, b *ssi.Bundle, m Membership) string {
	var missing []ssi.Member
	for _, c := range b.Core {
		if c.ID != b.Member.ID && !slices.Contains(m.Joined, c.ID) {
			missing = append(missing, c)
		}
	}
	if len(missing) == 0 {
		return ""
	}
	var bad map[netip.Addr]bool
	if out, err := n.Run.Run(ctx, "tail", "-n", "400", corosyncLogPath); err == nil {
		var now time.Time
		if d, err := n.Run.Run(ctx, "date", "+%b %d %H:%M:%S"); err == nil {
			now, _ = time.Parse(corosyncStamp, strings.TrimSpace(string(d)))
		}
		bad = authFailures(out, now)
	}
	var down map[int]bool
	links := "0"
	if out, err := n.Run.Run(ctx, "corosync-cfgtool", "-s"); err == nil {
		var ls []string
		down, ls = linkStatus(out)
		if len(ls) > 0 {
			links = strings.Join(ls, ", ")
		}
	}
	var auth, unreachable []string
	for _, c := range missing {
		switch {
		case bad[c.Addr]:
			auth = append(auth, fmt.Sprintf("%s (%s)", c.Addr, c.Name))
		case down[c.ID]:
			unreachable = append(unreachable, fmt.Sprintf("%s (%s)", c.Name, c.Addr))
		}
	}
	others := len(b.Core) - 1
	var causes []string
	switch {
	case len(auth) == 0:
	case len(auth) == others && others > 1:
		// Every other member's packets fail here: the odd key is most
		// likely this node's.
		causes = append(causes, fmt.Sprintf("packets from %s fail authentication (wrong authkey on this node?)", strings.Join(auth, ", ")))
	default:
		causes = append(causes, fmt.Sprintf("packets from %s fail authentication (wrong authkey?)", strings.Join(auth, ", ")))
	}
	switch {
	case len(unreachable) == 0:
	case len(unreachable) == others:
		causes = append(causes, fmt.Sprintf("no core member reachable on link %s (partition?)", links))
	default:
		causes = append(causes, fmt.Sprintf("%s not reachable on link %s (partition?)", strings.Join(unreachable, ", "), links))
	}
	return strings.Join(causes, "; ")
}

// authFailures reads corosync's log and returns the addresses whose
// packets the running corosync (the lines after its last start) could not
// decrypt in the authWindow before now (any time when now is zero).
func authFailures(log []byte, now time.Time) map[netip.Addr]bool {
	bad := map[netip.Addr]bool{}
	const mark = "Unable to decrypt packet from "
	sc := bufio.NewScanner(bytes.NewReader(log))
	for sc.Scan() {
		l := sc.Text()
		if strings.Contains(l, "Corosync Cluster Engine") && strings.Contains(l, "starting up") {
			clear(bad)
			continue
		}
		i := strings.Index(l, mark)
		if i < 0 {
			continue
		}
		if !now.IsZero() && len(l) >= len(corosyncStamp) {
			if ts, err := time.Parse(corosyncStamp, l[:len(corosyncStamp)]); err == nil && (now.Sub(ts) > authWindow || ts.Sub(now) > time.Minute) {
				continue
			}
		}
		from, _, _ := strings.Cut(l[i+len(mark):], " ")
		if j := strings.LastIndexByte(from, ':'); j > 0 {
			from = from[:j]
		}
		if a, err := netip.ParseAddr(strings.Trim(from, "[]")); err == nil {
			bad[a] = true
		}
	}
	return bad
}

// linkStatus reads `corosync-cfgtool -s` ("LINK ID 0 udp", then lines like
// "nodeid:          2:	disconnected") and returns the node ids that are
// disconnected on every link, and the link ids.
func linkStatus(out []byte) (down map[int]bool, links []string) {
	up := map[int]bool{}
	seen := map[int]bool{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if id, ok := strings.CutPrefix(l, "LINK ID "); ok {
			if f := strings.Fields(id); len(f) > 0 {
				links = append(links, f[0])
			}
			continue
		}
		rest, ok := strings.CutPrefix(l, "nodeid:")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) < 2 {
			continue
		}
		id, err := strconv.Atoi(strings.TrimSuffix(f[0], ":"))
		if err != nil {
			continue
		}
		seen[id] = true
		if f[1] != "disconnected" {
			up[id] = true
		}
	}
	down = map[int]bool{}
	for id := range seen {
		if !up[id] {
			down[id] = true
		}
	}
	return down, links
}
