package web

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/store"
	"github.com/labstack/echo/v4"
)

// Live updates. A hub recomputes the topics browsers subscribe to (the
// dashboard, the node list, one node, one rollout, the swarm) every
// UpdateInterval, but only while somebody watches them; each topic is a map
// of keys (a node's MAC, "counts", ...) to JSON values with the version at
// which each last changed. Every browser connection sends, at most once per
// interval, only the entries that changed since its last message: the
// updates are coalesced however fast agents report.

// historyLen is how many one-second transfer-rate samples the dashboard
// chart keeps.
const historyLen = 300

type entry struct {
	ver  uint64
	data []byte
}

type topic struct {
	entries map[string]entry
	gone    map[string]uint64
	subs    int
}

// hub computes topics and wakes the connections watching them.
type hub struct {
	c        *Console
	interval time.Duration

	mu     sync.Mutex
	ver    uint64
	topics map[string]*topic
	wake   chan struct{}

	histMu  sync.Mutex
	rate    []float64 // bytes/s of the whole cluster, one per second, oldest first
	histEnd time.Time
	refresh time.Duration // last refresh's duration
}

func newHub(c *Console, interval time.Duration) *hub {
	return &hub{c: c, interval: interval, topics: map[string]*topic{}, wake: make(chan struct{})}
}

// run refreshes watched topics every interval and samples the transfer rate
// every second, until ctx ends.
func (h *hub) run(ctx context.Context) {
	t := time.NewTicker(h.interval)
	defer t.Stop()
	var lastSample time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			if now.Sub(lastSample) >= time.Second {
				h.sample(now)
				lastSample = now
			}
			if err := h.refreshTopics(ctx); err != nil && ctx.Err() == nil {
				h.c.log.Warn("console live update failed", "err", err)
			}
		}
	}
}

// clusterRate sums the rate of every fresh progress report.
func clusterRate(live map[string]api.Progress, now time.Time) float64 {
	var r float64
	for _, p := range live {
		if now.Sub(p.Updated) < staleAfter {
			r += p.Rate
		}
	}
	return r
}

func (h *hub) sample(now time.Time) {
	r := clusterRate(h.c.api.Live().Snapshot(), now)
	h.histMu.Lock()
	defer h.histMu.Unlock()
	if h.rate == nil {
		h.rate = make([]float64, historyLen)
	}
	copy(h.rate, h.rate[1:])
	h.rate[len(h.rate)-1] = r
	h.histEnd = now
}

func (h *hub) history() ([]float64, time.Time) {
	h.histMu.Lock()
	defer h.histMu.Unlock()
	if h.rate == nil {
		return make([]float64, historyLen), time.Now()
	}
	return append([]float64(nil), h.rate...), h.histEnd
}

// subscribe registers a watcher of topic name and returns the hub version
// to start from.
func (h *hub) subscribe(name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	t := h.topics[name]
	if t == nil {
		t = &topic{entries: map[string]entry{}, gone: map[string]uint64{}}
		h.topics[name] = t
	}
	t.subs++
}

func (h *hub) unsubscribe(name string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if t := h.topics[name]; t != nil {
		t.subs--
		if t.subs <= 0 {
			delete(h.topics, name)
		}
	}
}

// changes returns the entries of topic name changed after version since,
// as one JSON message, and the version it brings the watcher to. The
// message is nil when nothing changed.
func (h *hub) changes(name string, since uint64) ([]byte, uint64, <-chan struct{}) {
	h.mu.Lock()
	defer h.mu.Unlock()
	wake := h.wake
	t := h.topics[name]
	if t == nil {
		return nil, since, wake
	}
	var b bytes.Buffer
	n := 0
	b.WriteString(`{"set":{`)
	keys := make([]string, 0)
	for k, e := range t.entries {
		if e.ver > since {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		if n > 0 {
			b.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		b.Write(kb)
		b.WriteByte(':')
		b.Write(t.entries[k].data)
		n++
	}
	b.WriteString(`},"del":[`)
	d := 0
	for k, v := range t.gone {
		if v > since && since > 0 {
			if d > 0 {
				b.WriteByte(',')
			}
			kb, _ := json.Marshal(k)
			b.Write(kb)
			d++
		}
	}
	b.WriteString("]}")
	if n == 0 && d == 0 {
		return nil, h.ver, wake
	}
	return b.Bytes(), h.ver, wake
}

// snapshot is what one refresh reads, shared by every topic.
type snapshot struct {
	now   time.Time
	live  map[string]api.Progress
	nodes []*deploy.Node
	byMAC map[string]*deploy.Node
}

func (h *hub) refreshTopics(ctx context.Context) error {
	h.mu.Lock()
	names := make([]string, 0, len(h.topics))
	for n := range h.topics {
		names = append(names, n)
	}
	h.mu.Unlock()
	if len(names) == 0 {
		return nil
	}
	t0 := time.Now()
	computed := map[string]map[string]any{}
	err := h.c.st.View(ctx, func(tx store.Tx) error {
		s, err := h.c.read(tx, t0)
		if err != nil {
			return err
		}
		for _, name := range names {
			m, err := h.c.compute(tx, s, name)
			if err != nil {
				return fmt.Errorf("topic %s: %w", name, err)
			}
			computed[name] = m
		}
		return nil
	})
	if err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.refresh = time.Since(t0)
	next := h.ver + 1
	changed := false
	for name, m := range computed {
		t := h.topics[name]
		if t == nil {
			continue // nobody watches any more
		}
		for k, v := range m {
			data, err := json.Marshal(v)
			if err != nil {
				return fmt.Errorf("topic %s key %s: %w", name, k, err)
			}
			if old, ok := t.entries[k]; ok && bytes.Equal(old.data, data) {
				continue
			}
			t.entries[k] = entry{ver: next, data: data}
			delete(t.gone, k)
			changed = true
		}
		for k := range t.entries {
			if _, ok := m[k]; !ok {
				delete(t.entries, k)
				t.gone[k] = next
				changed = true
			}
		}
	}
	if changed {
		h.ver = next
		close(h.wake)
		h.wake = make(chan struct{})
	}
	return nil
}

// read loads the nodes (brief: no inventory or log tail) and the live
// progress once per refresh.
func (c *Console) read(tx store.Tx, now time.Time) (*snapshot, error) {
	nodes, err := tx.Nodes(store.NodeFilter{Brief: true})
	if err != nil {
		return nil, err
	}
	s := &snapshot{now: now, live: c.api.Live().Snapshot(), nodes: nodes, byMAC: make(map[string]*deploy.Node, len(nodes))}
	for _, n := range nodes {
		s.byMAC[n.MAC] = n
	}
	return s, nil
}

// compute builds one topic's entries.
func (c *Console) compute(tx store.Tx, s *snapshot, name string) (map[string]any, error) {
	kind, arg, _ := strings.Cut(name, "/")
	switch kind {
	case "dash":
		return c.dashEntries(tx, s)
	case "nodes":
		m := make(map[string]any, len(s.nodes))
		for _, n := range s.nodes {
			m[n.MAC] = rowOf(n, s.live)
		}
		return m, nil
	case "node":
		return c.nodeEntries(tx, s, arg)
	case "rollout":
		id, _ := strconv.ParseInt(arg, 10, 64)
		r, err := tx.Rollout(id)
		if isNotFound(err) {
			return map[string]any{"gone": true}, nil
		}
		if err != nil {
			return nil, err
		}
		v, err := viewRollout(tx, r, s.byMAC, s.live, s.now)
		if err != nil {
			return nil, err
		}
		m := make(map[string]any, len(v.Targets)+1)
		m["summary"] = v.Sum
		for _, t := range v.Targets {
			m[t.MAC] = t
		}
		return m, nil
	case "swarm":
		return c.swarmEntries(s), nil
	case "cluster":
		return c.clusterEntries(), nil
	}
	return map[string]any{}, nil
}

// failure is a recently failed node.
type failure struct {
	MAC      string `json:"mac"`
	Hostname string `json:"h"`
	Reason   string `json:"why"`
	When     string `json:"when"`
}

// dashData is what the dashboard shows and updates.
type dashData struct {
	Counts   map[string]int
	Total    int
	Rollouts []rolloutSummary
	Failures []failure
	Rate     float64
	Chart    chartData
}

type chartData struct {
	Rate []float64 `json:"rate"`
	End  int64     `json:"end"`
	Max  float64   `json:"max"`
}

func (c *Console) dash(tx store.Tx, s *snapshot) (dashData, error) {
	d := dashData{Counts: map[string]int{}}
	for _, st := range deploy.States {
		d.Counts[string(st)] = 0
	}
	var failed []*deploy.Node
	if s.nodes == nil {
		// A light snapshot (the dashboard page): count in the database.
		counts, err := tx.CountNodes()
		if err != nil {
			return d, err
		}
		for st, n := range counts {
			d.Counts[string(st)] = n
			d.Total += n
		}
		if failed, err = tx.Nodes(store.NodeFilter{State: deploy.Failed, Brief: true}); err != nil {
			return d, err
		}
	} else {
		for _, n := range s.nodes {
			d.Counts[string(n.State)]++
			if n.State == deploy.Failed {
				failed = append(failed, n)
			}
		}
		d.Total = len(s.nodes)
	}
	sort.Slice(failed, func(i, j int) bool { return failed[i].Changed.After(failed[j].Changed) })
	for i, n := range failed {
		if i == 8 {
			break
		}
		d.Failures = append(d.Failures, failure{MAC: n.MAC, Hostname: n.Hostname, Reason: n.Reason, When: ago(s.now, n.Changed)})
	}
	rs, err := tx.Rollouts(deploy.RolloutRunning, deploy.RolloutPaused)
	if err != nil {
		return d, err
	}
	for _, r := range rs {
		full, err := tx.Rollout(r.ID)
		if err != nil {
			return d, err
		}
		v, err := viewRollout(tx, full, s.byMAC, s.live, s.now)
		if err != nil {
			return d, err
		}
		d.Rollouts = append(d.Rollouts, v.Sum)
	}
	d.Rate = clusterRate(s.live, s.now)
	rate, end := c.hub.history()
	d.Chart = chartData{Rate: rate, End: end.Unix()}
	for _, v := range rate {
		d.Chart.Max = max(d.Chart.Max, v)
	}
	return d, nil
}

func (c *Console) dashEntries(tx store.Tx, s *snapshot) (map[string]any, error) {
	d, err := c.dash(tx, s)
	if err != nil {
		return nil, err
	}
	if d.Rollouts == nil {
		d.Rollouts = []rolloutSummary{}
	}
	if d.Failures == nil {
		d.Failures = []failure{}
	}
	return map[string]any{"counts": d.Counts, "total": d.Total, "rollouts": d.Rollouts, "failures": d.Failures,
		"rate": humanRate(d.Rate), "chart": d.Chart}, nil
}

// eventRow is one line of a node's event log.
type eventRow struct {
	Time   string `json:"t"`
	From   string `json:"f"`
	To     string `json:"to"`
	Reason string `json:"why"`
}

func eventRows(evs []deploy.Event) []eventRow {
	out := make([]eventRow, 0, len(evs))
	for i := len(evs) - 1; i >= 0; i-- {
		e := evs[i]
		out = append(out, eventRow{Time: e.Time.Local().Format("2006-01-02 15:04:05"), From: string(e.From), To: string(e.To), Reason: e.Reason})
	}
	return out
}

func (c *Console) nodeEntries(tx store.Tx, s *snapshot, mac string) (map[string]any, error) {
	if s.byMAC[mac] == nil {
		return map[string]any{"gone": true}, nil
	}
	n, err := tx.Node(mac) // with its log tail
	if isNotFound(err) {
		return map[string]any{"gone": true}, nil
	}
	if err != nil {
		return nil, err
	}
	evs, err := tx.Events(mac, 30)
	if err != nil {
		return nil, err
	}
	tail := n.LogTail
	if tail == nil {
		tail = []string{}
	}
	return map[string]any{"node": rowOf(n, s.live), "events": eventRows(evs), "log": tail}, nil
}

// imageSwarm is one image's swarm as the agents report it.
type imageSwarm struct {
	Ref        string  `json:"ref"`
	Nodes      int     `json:"nodes"`
	Fetching   int     `json:"fetching"`
	Rate       float64 `json:"r"`
	RateText   string  `json:"rt"`
	Peers      int     `json:"pe"`
	Emitted    int64   `json:"em"`
	Sent       int64   `json:"se"`
	Suppressed int64   `json:"su"`
	Coalesced  int64   `json:"co"`
}

// swarms sums the agents' reports by image; the seeder's own HAVE counters
// come as the entry "seeder" when the server seeds.
func (c *Console) swarms(s *snapshot) map[string]*imageSwarm {
	out := map[string]*imageSwarm{}
	for _, n := range s.nodes {
		if n.Image == "" {
			continue
		}
		p := progressOf(n, s.live)
		if p == nil {
			continue
		}
		is := out[n.Image]
		if is == nil {
			is = &imageSwarm{Ref: n.Image}
			out[n.Image] = is
		}
		is.Nodes++
		fresh := s.now.Sub(p.Updated) < staleAfter
		if n.State == deploy.Fetching {
			is.Fetching++
		}
		if fresh {
			is.Rate += p.Rate
			is.Peers += p.Peers
		}
		if p.Have != nil {
			is.Emitted += p.Have.Emitted
			is.Sent += p.Have.Sent
			is.Suppressed += p.Have.Suppressed
			is.Coalesced += p.Have.Coalesced
		}
	}
	for _, is := range out {
		is.RateText = humanRate(is.Rate)
	}
	return out
}

func (c *Console) swarmEntries(s *snapshot) map[string]any {
	m := map[string]any{}
	for ref, is := range c.swarms(s) {
		m[ref] = is
	}
	if sd := c.seeder(); sd != nil {
		m["seeder"] = sd
	}
	return m
}

// seeder reports the server's own seeder, nil when it does not seed.
func (c *Console) seeder() *imageSwarm {
	if c.opts.Seeder == nil {
		return nil
	}
	snap := c.opts.Seeder.Node().Wire().Snapshot()
	return &imageSwarm{Ref: "server seeder", Peers: len(snap.Peers), Emitted: snap.Total.Emitted, Sent: snap.Total.Sent,
		Suppressed: snap.Total.Redundant, Coalesced: snap.Total.Coalesced}
}

// events streams a topic's changes as Server-Sent Events: the first message
// carries the whole topic, later ones what changed, at most one per
// UpdateInterval.
func (c *Console) events(ec echo.Context) error {
	name := ec.QueryParam("topic")
	kind, arg, _ := strings.Cut(name, "/")
	switch kind {
	case "dash", "nodes", "swarm", "cluster":
		if arg != "" {
			return echo.NewHTTPError(http.StatusBadRequest, "topic: "+kind+" takes no argument")
		}
	case "node", "rollout":
		if arg == "" {
			return echo.NewHTTPError(http.StatusBadRequest, "topic: "+kind+" needs an argument")
		}
	default:
		return echo.NewHTTPError(http.StatusBadRequest, "topic: want dash, nodes, node/MAC, rollout/ID, swarm or cluster")
	}
	w := ec.Response()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	w.Flush()
	c.hub.subscribe(name)
	defer c.hub.unsubscribe(name)
	ctx := ec.Request().Context()
	var since uint64
	var last time.Time
	ping := time.NewTicker(15 * time.Second)
	defer ping.Stop()
	for {
		msg, ver, wake := c.hub.changes(name, since)
		if msg != nil {
			if _, err := fmt.Fprintf(w, "data: %s\n\n", msg); err != nil {
				return nil
			}
			w.Flush()
			last = time.Now()
		}
		since = ver
		select {
		case <-ctx.Done():
			return nil
		case <-ping.C:
			if _, err := fmt.Fprint(w, ": ping\n\n"); err != nil {
				return nil
			}
			w.Flush()
			continue
		case <-wake:
		}
		// Coalesce: never more than one message per interval.
		if wait := c.hub.interval - time.Since(last); wait > 0 {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(wait):
			}
		}
	}
}

func ago(now, t time.Time) string {
	if t.IsZero() {
		return "—"
	}
	d := now.Sub(t)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds ago", max(int(d.Seconds()), 0))
	case d < time.Hour:
		return fmt.Sprintf("%dm ago", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh ago", int(d.Hours()))
	}
	return t.Local().Format("2006-01-02")
}
