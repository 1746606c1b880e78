package api

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/store"
	"github.com/labstack/echo/v4"
)

// nBuckets is the number of request-duration histogram bounds.
const nBuckets = 11

// buckets returns the request-duration histogram bounds, in seconds.
func buckets() [nBuckets]float64 {
	return [nBuckets]float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5}
}

type histogram struct {
	counts [nBuckets + 1]int64
	sum    float64
	n      int64
}

type reqKey struct {
	route, method string
	code          int
}

// Metrics counts requests and agent events for /metrics (Prometheus text
// exposition format 0.0.4).
type Metrics struct {
	mu          sync.Mutex
	requests    map[reqKey]int64
	durations   map[string]*histogram
	agentEvents atomic.Int64
	start       time.Time
}

// NewMetrics returns empty metrics.
func NewMetrics() *Metrics {
	return &Metrics{requests: map[reqKey]int64{}, durations: map[string]*histogram{}, start: time.Now()}
}

// Middleware records each request's route, status and duration.
func (m *Metrics) Middleware(next echo.HandlerFunc) echo.HandlerFunc {
	return func(c echo.Context) error {
		t0 := time.Now()
		err := next(c)
		code := c.Response().Status
		if err != nil {
			if he, ok := err.(*echo.HTTPError); ok {
				code = he.Code
			} else if !c.Response().Committed {
				code = http.StatusInternalServerError
			}
		}
		route := c.Path()
		if route == "" {
			route = "unmatched"
		}
		d := time.Since(t0).Seconds()
		m.mu.Lock()
		m.requests[reqKey{route, c.Request().Method, code}]++
		h := m.durations[route]
		if h == nil {
			h = &histogram{}
			m.durations[route] = h
		}
		b := buckets()
		i := sort.SearchFloat64s(b[:], d)
		h.counts[i]++
		h.sum += d
		h.n++
		m.mu.Unlock()
		return err
	}
}

func esc(s string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s)
}

func (a *API) handleMetrics(c echo.Context) error {
	var counts map[deploy.State]int
	var rollouts []*deploy.Rollout
	if err := a.st.View(c.Request().Context(), func(tx store.Tx) error {
		var err error
		if counts, err = tx.CountNodes(); err != nil {
			return err
		}
		rollouts, err = tx.Rollouts()
		return err
	}); err != nil {
		return err
	}
	var b strings.Builder
	b.WriteString("# HELP esir_nodes Nodes by deployment state.\n# TYPE esir_nodes gauge\n")
	for _, s := range deploy.States {
		fmt.Fprintf(&b, "esir_nodes{state=%q} %d\n", s, counts[s])
	}
	rs := map[deploy.RolloutState]int{}
	for _, r := range rollouts {
		rs[r.State]++
	}
	b.WriteString("# HELP esir_rollouts Rollouts by state.\n# TYPE esir_rollouts gauge\n")
	for _, s := range []deploy.RolloutState{deploy.RolloutRunning, deploy.RolloutPaused, deploy.RolloutCancelled, deploy.RolloutCompleted} {
		fmt.Fprintf(&b, "esir_rollouts{state=%q} %d\n", s, rs[s])
	}
	live := a.live.Snapshot()
	var rate float64
	for _, p := range live {
		if time.Since(p.Updated) < 10*time.Second {
			rate += p.Rate
		}
	}
	b.WriteString("# HELP esir_agent_transfer_rate_bytes Sum of transfer rates agents reported in the last 10 s.\n# TYPE esir_agent_transfer_rate_bytes gauge\n")
	fmt.Fprintf(&b, "esir_agent_transfer_rate_bytes %g\n", rate)
	m := a.metrics
	b.WriteString("# HELP esir_agent_events_total Progress events received from agents.\n# TYPE esir_agent_events_total counter\n")
	fmt.Fprintf(&b, "esir_agent_events_total %d\n", m.agentEvents.Load())
	m.mu.Lock()
	keys := make([]reqKey, 0, len(m.requests))
	for k := range m.requests {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].route != keys[j].route {
			return keys[i].route < keys[j].route
		}
		if keys[i].method != keys[j].method {
			return keys[i].method < keys[j].method
		}
		return keys[i].code < keys[j].code
	})
	b.WriteString("# HELP esir_http_requests_total HTTP requests by route, method and status.\n# TYPE esir_http_requests_total counter\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "esir_http_requests_total{route=\"%s\",method=\"%s\",code=\"%d\"} %d\n", esc(k.route), k.method, k.code, m.requests[k])
	}
	routes := make([]string, 0, len(m.durations))
	for r := range m.durations {
		routes = append(routes, r)
	}
	sort.Strings(routes)
	b.WriteString("# HELP esir_http_request_duration_seconds HTTP request duration by route.\n# TYPE esir_http_request_duration_seconds histogram\n")
	for _, r := range routes {
		h := m.durations[r]
		var cum int64
		for i, le := range buckets() {
			cum += h.counts[i]
			fmt.Fprintf(&b, "esir_http_request_duration_seconds_bucket{route=\"%s\",le=\"%g\"} %d\n", esc(r), le, cum)
		}
		fmt.Fprintf(&b, "esir_http_request_duration_seconds_bucket{route=\"%s\",le=\"+Inf\"} %d\n", esc(r), h.n)
		fmt.Fprintf(&b, "esir_http_request_duration_seconds_sum{route=\"%s\"} %g\n", esc(r), h.sum)
		fmt.Fprintf(&b, "esir_http_request_duration_seconds_count{route=\"%s\"} %d\n", esc(r), h.n)
	}
	m.mu.Unlock()
	b.WriteString("# HELP esir_uptime_seconds Seconds since the server started.\n# TYPE esir_uptime_seconds gauge\n")
	fmt.Fprintf(&b, "esir_uptime_seconds %g\n", time.Since(m.start).Seconds())
	return c.Blob(http.StatusOK, "text/plain; version=0.0.4; charset=utf-8", []byte(b.String()))
}
