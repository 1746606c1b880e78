package enroll

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/esir-project/esir/ssi"
)

// loopbackRecord lists, under the node's root, the real-server VIPs ESIR
// put on lo, one address a line: the ones a later bundle no longer lists
// are taken off.
const loopbackRecord = "var/lib/esir/ssi/loopback-vips"

// startRank is svc's place in the order Render lists the services in (an
// engine ESIR does not know comes last).
func startRank(svc string) int {
	switch svc {
	case "corosync":
		return 0
	case "pacemaker", "pacemaker_remote":
		return 1
	case "chrony":
		return 2
	case "keepalived":
		return 3
	case "nfs-server":
		return 4
	}
	return 5
}

// started returns the services ESIR started or reloaded on the node and
// has not stopped since: the ones with a record in appliedDir.
func (n *Node) started() ([]string, error) {
	ents, err := os.ReadDir(filepath.Join(n.Root, appliedDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("engines started earlier: %w", err)
	}
	var svcs []string
	for _, e := range ents {
		if !e.IsDir() && !strings.HasSuffix(e.Name(), ".tmp") {
			svcs = append(svcs, e.Name())
		}
	}
	return svcs, nil
}

// stopDropped stops the engines ESIR started under an earlier bundle that
// b no longer lists (a director demoted loses keepalived, a core node made
// remote loses corosync and pacemaker, a profile part switched off), in
// reverse start order, and forgets their records. An engine ESIR did not
// start (no record) is left alone. Errors are *CheckError (stop).
func (n *Node) stopDropped(ctx context.Context, b *ssi.Bundle) error {
	svcs, err := n.started()
	if err != nil {
		return &CheckError{Node: b.Member.Name, Check: CheckStop, Err: err}
	}
	svcs = slices.DeleteFunc(svcs, func(s string) bool { return slices.Contains(b.Services, s) })
	slices.SortFunc(svcs, func(a, b string) int { return cmp.Or(cmp.Compare(startRank(b), startRank(a)), strings.Compare(a, b)) })
	for _, svc := range svcs {
		n.logger().Info("stopping: the node's bundle no longer lists it", "node", b.Member.Name, "service", svc, "version", b.Version)
		if err := n.stop(ctx, svc); err != nil {
			return &CheckError{Node: b.Member.Name, Check: CheckStop,
				Err: fmt.Errorf("stop %s, no longer in nodelist version %d's bundle: %w", svc, b.Version, err)}
		}
		if err := os.Remove(n.appliedPath(svc)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return &CheckError{Node: b.Member.Name, Check: CheckStop, Err: fmt.Errorf("forget %s's configuration: %w", svc, err)}
		}
	}
	return nil
}

// dropLoopbackVIPs takes off lo the real-server VIPs ESIR put there for an
// earlier bundle that b no longer lists, and records b's as the ones ESIR
// puts there (before they go on lo, so that a failure halfway leaves none
// unrecorded). Errors are *CheckError (vip).
func (n *Node) dropLoopbackVIPs(ctx context.Context, b *ssi.Bundle) error {
	path := filepath.Join(n.Root, loopbackRecord)
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return &CheckError{Node: b.Member.Name, Check: CheckVIP, Err: fmt.Errorf("real-server VIPs ESIR put on lo: %w", err)}
	}
	var had []netip.Addr
	for _, l := range strings.Fields(string(data)) {
		if a, err := netip.ParseAddr(l); err == nil {
			had = append(had, a)
		}
	}
	keep := slices.Clone(b.LoopbackVIPs)
	for i, a := range had {
		if slices.Contains(b.LoopbackVIPs, a) {
			continue
		}
		n.logger().Info("taking a real-server VIP off lo: the node's bundle no longer lists it", "node", b.Member.Name, "vip", a, "version", b.Version)
		out, err := n.Run.Run(ctx, "ip", "addr", "del", a.String()+"/32", "dev", "lo")
		if err != nil && !bytes.Contains(out, []byte("Cannot assign requested address")) { // not there: gone already
			// Keep the ones not taken off yet on record, to try again.
			for _, r := range had[i:] {
				if !slices.Contains(keep, r) {
					keep = append(keep, r)
				}
			}
			return errors.Join(&CheckError{Node: b.Member.Name, Check: CheckVIP,
				Err: fmt.Errorf("take real-server VIP %s off lo: %w: %s", a, err, bytes.TrimSpace(out))}, n.writeLoopbackRecord(keep))
		}
	}
	if err := n.writeLoopbackRecord(keep); err != nil {
		return &CheckError{Node: b.Member.Name, Check: CheckVIP, Err: err}
	}
	return nil
}

func (n *Node) writeLoopbackRecord(vips []netip.Addr) error {
	path := filepath.Join(n.Root, loopbackRecord)
	if len(vips) == 0 {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("real-server VIPs ESIR put on lo: %w", err)
		}
		return nil
	}
	var w strings.Builder
	for _, a := range vips {
		w.WriteString(a.String() + "\n")
	}
	if err := writeRecord(path, []byte(w.String())); err != nil {
		return fmt.Errorf("real-server VIPs ESIR put on lo: %w", err)
	}
	return nil
}
