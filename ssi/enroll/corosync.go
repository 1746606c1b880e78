package enroll

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// WaitMember polls corosync until node id is joined in a quorate partition of
// want members (or the timeout); the error is a *CheckError naming the check
// that failed last (node-id, membership or quorum) and the node as "node ID".
func (n *Node) WaitMember(ctx context.Context, id, want int) (Membership, error) {
	return n.waitMember(ctx, fmt.Sprintf("node %d", id), id, want)
}

func (n *Node) waitMember(ctx context.Context, name string, id, want int) (Membership, error) {
	var m Membership
	err := n.wait(ctx, 250*time.Millisecond, func() error {
		var err error
		if m, err = n.Status(ctx); err != nil {
			return err
		}
		return memberVerdict(m, id, want)
	})
	return m, named(err, name)
}

// memberVerdict checks corosync's view m from node id in a cluster of want
// core members.
func memberVerdict(m Membership, id, want int) error {
	switch {
	case m.NodeID != id:
		return failed(CheckNodeID, "corosync runs as node %d, want %d", m.NodeID, id)
	case !slices.Contains(m.Joined, id):
		return failed(CheckMembership, "node %d is not joined (joined: %v)", id, m.Joined)
	case len(m.Joined) < want:
		return failed(CheckMembership, "%d of %d core members joined (%v)", len(m.Joined), want, m.Joined)
	case !m.Quorate:
		return failed(CheckQuorum, "partition is not quorate (%d of %d votes)", m.Total, m.Expected)
	}
	return nil
}

// Status asks corosync for its membership and quorum (the corosync fields of
// Membership). Errors are *CheckError (membership or quorum).
func (n *Node) Status(ctx context.Context) (Membership, error) {
	var m Membership
	out, err := n.Run.Run(ctx, "corosync-cmapctl", "-b", "runtime.members")
	if err != nil {
		return m, failed(CheckMembership, "corosync-cmapctl: %w: %s", err, bytes.TrimSpace(out))
	}
	m.Joined = parseMembers(out)
	out, err = n.Run.Run(ctx, "corosync-cmapctl", "-b", "nodelist.node")
	if err != nil {
		return m, failed(CheckMembership, "nodelist: corosync-cmapctl: %w: %s", err, bytes.TrimSpace(out))
	}
	m.Nodelist = parseNodelist(out)
	out, err = n.Run.Run(ctx, "corosync-quorumtool", "-s", "-p")
	// corosync-quorumtool exits non-zero when the partition is not quorate.
	if len(out) == 0 && err != nil {
		return m, failed(CheckQuorum, "corosync-quorumtool: %w", err)
	}
	if err := parseQuorum(out, &m); err != nil {
		return m, failed(CheckQuorum, "%w", err)
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
