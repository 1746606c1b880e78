package web

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/store"
)

// staleAfter is how old a progress report may be and still count towards
// the transfer rate.
const staleAfter = 5 * time.Second

// nodeRow is one node as the tables show it; its JSON form is what the live
// updates carry (short keys: thousands of rows travel several times a second).
type nodeRow struct {
	MAC      string    `json:"-"`
	Hostname string    `json:"h"`
	Number   int       `json:"-"`
	State    string    `json:"s"`
	Reason   string    `json:"why,omitempty"`
	Image    string    `json:"img,omitempty"`
	Phase    string    `json:"ph,omitempty"`
	Labels   string    `json:"-"`
	HW       string    `json:"-"`
	Pct      float64   `json:"p"`
	Rate     float64   `json:"r,omitempty"`
	Peers    int       `json:"pe,omitempty"`
	Active   bool      `json:"a,omitempty"`
	Changed  time.Time `json:"-"`
}

// progressOf returns the live progress of n's current assignment, if any.
func progressOf(n *deploy.Node, live map[string]api.Progress) *api.Progress {
	p, ok := live[n.MAC]
	if !ok || n.Assignment == "" || p.Assignment != n.Assignment {
		return nil
	}
	return &p
}

// fraction places a node on its install, 0..1: booting is the first few
// per cent, fetching the next 60 (by bytes), installing the rest.
func fraction(st deploy.State, p *api.Progress) float64 {
	by := func(from, span float64) float64 {
		if p == nil || p.Total <= 0 {
			return from
		}
		return from + span*min(max(float64(p.Bytes)/float64(p.Total), 0), 1)
	}
	switch st {
	case deploy.Booting:
		return 0.02
	case deploy.Fetching:
		return by(0.05, 0.6)
	case deploy.Installing:
		return by(0.65, 0.35)
	case deploy.Installed, deploy.Enrolled:
		return 1
	}
	return 0
}

func rowOf(n *deploy.Node, live map[string]api.Progress) nodeRow {
	r := nodeRow{MAC: n.MAC, Hostname: n.Hostname, Number: n.Number, State: string(n.State), Reason: n.Reason,
		Image: n.Image, Active: n.State.Active(), Changed: n.Changed, HW: dash(n.Hardware), Labels: labelString(n.Labels)}
	var p *api.Progress
	if n.State.Active() {
		p = progressOf(n, live)
	}
	r.Pct = round1(100 * fraction(n.State, p))
	if p != nil {
		r.Phase = p.Phase
		if p.Step != "" {
			r.Phase += ": " + p.Step
		}
		r.Rate, r.Peers = p.Rate, p.Peers
	} else if n.State.Active() {
		r.Phase = n.Phase
	}
	return r
}

func round1(f float64) float64 { return float64(int64(f*10+0.5)) / 10 }

func labelString(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, k+"="+m[k])
	}
	return strings.Join(parts, " ")
}

// humanBytes prints a byte count in binary units.
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// humanRate prints bytes per second.
func humanRate(r float64) string {
	if r <= 0 {
		return "—"
	}
	return humanBytes(int64(r)) + "/s"
}

// humanDuration prints a duration for people ("3m 20s"); negative is unknown.
func humanDuration(secs float64) string {
	if secs < 0 {
		return "—"
	}
	d := time.Duration(secs) * time.Second
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm %02ds", int(d.Minutes()), int(d.Seconds())%60)
	}
	return fmt.Sprintf("%dh %02dm", int(d.Hours()), int(d.Minutes())%60)
}

// targetRow is one node of a rollout.
type targetRow struct {
	MAC      string  `json:"-"`
	Hostname string  `json:"h"`
	Batch    int     `json:"-"`
	Status   string  `json:"st"`
	State    string  `json:"s"`
	Reason   string  `json:"why,omitempty"`
	Phase    string  `json:"ph,omitempty"`
	Attempts int     `json:"n"`
	Pct      float64 `json:"p"`
	Rate     float64 `json:"r,omitempty"`
	Peers    int     `json:"pe,omitempty"`
}

// rolloutSummary is a rollout's totals, also sent live.
type rolloutSummary struct {
	ID        int64   `json:"id"`
	Image     string  `json:"img"`
	State     string  `json:"s"`
	Reason    string  `json:"why,omitempty"`
	Batch     int     `json:"b"`
	Batches   int     `json:"bs"`
	Total     int     `json:"t"`
	Pending   int     `json:"pen"`
	Active    int     `json:"act"`
	Retrying  int     `json:"ret"`
	Succeeded int     `json:"ok"`
	Failed    int     `json:"fail"`
	Cancelled int     `json:"can"`
	Pct       float64 `json:"p"`
	ETA       string  `json:"eta"`
	Rate      float64 `json:"r"`
	Peers     int     `json:"pe"`
}

// rolloutView is a rollout with its nodes.
type rolloutView struct {
	R       *deploy.Rollout
	Sum     rolloutSummary
	Targets []targetRow
}

// viewRollout joins a rollout's targets with their nodes and live progress.
// nodes may be nil: the nodes are then read one by one from tx.
func viewRollout(tx store.Tx, r *deploy.Rollout, nodes map[string]*deploy.Node, live map[string]api.Progress, now time.Time) (rolloutView, error) {
	v := rolloutView{R: r}
	s := &v.Sum
	s.ID, s.Image, s.State, s.Reason, s.Batch, s.Batches, s.Total = r.ID, r.Spec.Image, string(r.State), r.Reason, r.Batch+1, r.Batches, len(r.Targets)
	if s.Batch > s.Batches {
		s.Batch = s.Batches
	}
	var frac float64
	for _, t := range r.Targets {
		tr := targetRow{MAC: t.MAC, Batch: t.Batch, Status: string(t.Status), Attempts: t.Attempts, Reason: t.LastError}
		n := nodes[t.MAC]
		if nodes == nil {
			var err error
			n, err = tx.Node(t.MAC)
			if err != nil && !isNotFound(err) {
				return v, err
			}
		}
		if n == nil {
			tr.State, tr.Hostname = "removed", t.MAC
		} else {
			tr.Hostname, tr.State = n.Hostname, string(n.State)
			if n.Reason != "" {
				tr.Reason = n.Reason
			}
			if t.Status == deploy.TargetActive && n.Rollout == r.ID {
				p := progressOf(n, live)
				f := fraction(n.State, p)
				frac += f
				tr.Pct = round1(100 * f)
				if p != nil {
					tr.Phase, tr.Rate, tr.Peers = p.Phase, p.Rate, p.Peers
					if p.Step != "" {
						tr.Phase += ": " + p.Step
					}
					if now.Sub(p.Updated) < staleAfter {
						s.Rate += p.Rate
						s.Peers += p.Peers
					}
				} else {
					tr.Phase = n.Phase
				}
			}
		}
		switch t.Status {
		case deploy.TargetPending:
			s.Pending++
		case deploy.TargetActive:
			s.Active++
		case deploy.TargetRetrying:
			s.Retrying++
		case deploy.TargetSucceeded:
			s.Succeeded++
			tr.Pct, frac = 100, frac+1
		case deploy.TargetFailed:
			s.Failed++
			tr.Pct, frac = 100, frac+1
		case deploy.TargetCancelled:
			s.Cancelled++
			tr.Pct, frac = 100, frac+1
		}
		v.Targets = append(v.Targets, tr)
	}
	eta := -1.0
	if s.Total > 0 {
		f := frac / float64(s.Total)
		s.Pct = round1(100 * f)
		switch {
		case r.State.Final():
			eta = 0
		case f > 0.001 && r.State == deploy.RolloutRunning:
			eta = now.Sub(r.Created).Seconds() * (1 - f) / f
		}
	}
	s.ETA = humanDuration(eta)
	if r.State == deploy.RolloutPaused {
		s.ETA = "paused"
	}
	return v, nil
}

func isNotFound(err error) bool { return errors.Is(err, store.ErrNotFound) }

// dash stands in for an empty cell.
func dash(s string) string {
	if s == "" {
		return "—"
	}
	return s
}
