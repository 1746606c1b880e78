package api

import (
	"sync"
	"time"

	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/deploy"
)

// Progress is the latest progress an agent reported. It lives in memory:
// the persistent record is the node's state and event log; byte counters
// are refreshed by the next report after a restart.
type Progress struct {
	Assignment string         `json:"assignment"`
	Seq        int64          `json:"seq"`
	Phase      string         `json:"phase"`
	Step       string         `json:"step,omitempty"`
	Bytes      int64          `json:"bytes"`
	Total      int64          `json:"total"`
	Rate       float64        `json:"rate"`
	Peers      int            `json:"peers"`
	Have       *agentapi.Have `json:"have,omitempty"`
	Updated    time.Time      `json:"updated"`
}

// Live holds every agent's latest progress, by MAC.
type Live struct {
	mu sync.Mutex
	m  map[string]Progress
}

// NewLive returns an empty Live.
func NewLive() *Live { return &Live{m: map[string]Progress{}} }

// Get returns a node's progress.
func (l *Live) Get(mac string) (Progress, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	p, ok := l.m[mac]
	return p, ok
}

// Snapshot copies all progress.
func (l *Live) Snapshot() map[string]Progress {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make(map[string]Progress, len(l.m))
	for k, v := range l.m {
		out[k] = v
	}
	return out
}

// apply records ev for the node's assignment and reports whether it was new
// (its sequence number not seen before for this assignment).
func (l *Live) apply(mac, assignment string, ev agentapi.Event, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	p := l.m[mac]
	if p.Assignment == assignment && ev.Seq != 0 && ev.Seq <= p.Seq {
		return false
	}
	if p.Assignment != assignment {
		p = Progress{Assignment: assignment}
	}
	p.Seq, p.Phase, p.Step, p.Updated = ev.Seq, ev.Phase, ev.Step, now
	if ev.Bytes != 0 || ev.Total != 0 {
		p.Bytes, p.Total = ev.Bytes, ev.Total
	}
	p.Rate, p.Peers = ev.Rate, ev.Peers
	if ev.Have != nil {
		h := *ev.Have
		p.Have = &h
	}
	l.m[mac] = p
	return true
}

func (l *Live) reset(mac string) {
	l.mu.Lock()
	delete(l.m, mac)
	l.mu.Unlock()
}

// fraction estimates how far a node is through its install, 0..1.
func fraction(st deploy.State, p *Progress) float64 {
	part := func(base, span float64) float64 {
		if p == nil || p.Total <= 0 {
			return base
		}
		f := float64(p.Bytes) / float64(p.Total)
		return base + span*min(max(f, 0), 1)
	}
	switch st {
	case deploy.Assigned:
		return 0
	case deploy.Booting:
		return 0.02
	case deploy.Fetching:
		return part(0.05, 0.6)
	case deploy.Installing:
		return part(0.65, 0.35)
	case deploy.Installed, deploy.Enrolled:
		return 1
	}
	return 0
}
