package enroll

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/esir-project/esir/ssi"
)

// TimeStatus is chrony's tracking state on a node (`chronyc -n tracking`).
type TimeStatus struct {
	// Source is the address of the source chronyd tracks, "local" when it
	// serves its own clock (local stratum, a core node without reachable
	// upstream), "" when it tracks nothing.
	Source   string  `json:"source"`
	Stratum  int     `json:"stratum"`
	OffsetMS float64 `json:"offset_ms"` // system clock minus NTP time (positive: the clock is fast)
	Leap     string  `json:"leap"`      // "Normal", "Not synchronised", ...
	Synced   bool    `json:"synced"`    // the verdict of TimeSynced
}

// localRefID is the reference id chronyd shows while serving its own clock
// (127.127.1.1).
const localRefID = "7F7F0101"

// TimeSynced asks chronyd once whether the node's time is synchronised: a core
// node counts as synchronised when it tracks any source or serves its local
// clock (local stratum: core nodes serve each other and the cluster without
// upstream); any other node must track one of the core members. A failed
// verdict is a *CheckError (time) beside the parsed status.
func (n *Node) TimeSynced(ctx context.Context, b *ssi.Bundle) (TimeStatus, error) {
	out, err := n.Run.Run(ctx, "chronyc", "-n", "tracking")
	if err != nil {
		return TimeStatus{}, failed(CheckTime, "chronyc tracking: %w: %s", err, bytes.TrimSpace(out))
	}
	ts, err := parseTracking(out)
	if err != nil {
		return ts, failed(CheckTime, "%w", err)
	}
	if err := timeVerdict(ts, b); err != nil {
		return ts, err
	}
	ts.Synced = true
	return ts, nil
}

// timeVerdict judges a tracking state for b's node.
func timeVerdict(ts TimeStatus, b *ssi.Bundle) error {
	if ts.Source == "" || ts.Leap == "Not synchronised" {
		return failed(CheckTime, "chronyd is not synchronised (leap status %q)", ts.Leap)
	}
	if b.Member.Role == ssi.Core {
		return nil
	}
	var core []string
	for _, m := range b.Core {
		if m.Addr.String() == ts.Source {
			return nil
		}
		core = append(core, m.Addr.String())
	}
	return failed(CheckTime, "chronyd tracks %s, not a core member (%s)", ts.Source, strings.Join(core, ", "))
}

// waitTime polls TimeSynced until it holds or the node's timeout.
func (n *Node) waitTime(ctx context.Context, b *ssi.Bundle) (TimeStatus, error) {
	var ts TimeStatus
	err := n.wait(ctx, 500*time.Millisecond, func() error {
		var err error
		ts, err = n.TimeSynced(ctx, b)
		return err
	})
	return ts, named(err, b.Member.Name)
}

// parseTracking reads `chronyc -n tracking`: the "Reference ID", "Stratum",
// "System time" and "Leap status" lines.
func parseTracking(out []byte) (TimeStatus, error) {
	var ts TimeStatus
	seen := 0
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		switch k {
		case "Reference ID":
			// "C6120001 (198.18.0.1)", "7F7F0101 ()", "00000000 ()"
			id, rest, _ := strings.Cut(v, " ")
			addr := strings.Trim(strings.TrimSpace(rest), "()")
			switch {
			case id == localRefID:
				ts.Source = "local"
			case strings.Trim(id, "0") == "":
				ts.Source = ""
			case addr != "":
				ts.Source = addr
			default:
				ts.Source = id // a reference clock
			}
			seen++
		case "Stratum":
			ts.Stratum, _ = strconv.Atoi(v)
		case "System time":
			// "0.000009562 seconds slow of NTP time"
			f := strings.Fields(v)
			if len(f) < 3 {
				return ts, fmt.Errorf("chronyc tracking: system time %q", v)
			}
			sec, err := strconv.ParseFloat(f[0], 64)
			if err != nil {
				return ts, fmt.Errorf("chronyc tracking: system time %q: %w", v, err)
			}
			if f[2] == "slow" {
				sec = -sec
			}
			ts.OffsetMS = sec * 1000
			seen++
		case "Leap status":
			ts.Leap = v
			seen++
		}
	}
	if seen < 3 {
		return ts, fmt.Errorf("chronyc tracking printed no reference, system time or leap status: %q", out)
	}
	return ts, nil
}
