package pipeline

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/esir-project/esir/server/agentapi"
)

// Limits of what the reporter keeps in memory.
const (
	maxPendingLog    = 2000 // log lines not yet delivered
	maxPendingEvents = 500  // events not yet delivered
	tailLines        = 40   // lines of the final report's log tail
)

// LogBuffer collects the agent's log lines: it is the io.Writer its log
// handler writes to (next to the console). Lines wait there until the
// reporter sends them to the server with the next events; the last lines
// also make the failure report's log tail.
type LogBuffer struct {
	mu      sync.Mutex
	partial []byte
	pending []string
	dropped int
	tail    []string
}

// NewLogBuffer returns an empty buffer.
func NewLogBuffer() *LogBuffer { return &LogBuffer{} }

// Write splits p into lines and keeps them.
func (b *LogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.partial = append(b.partial, p...)
	for {
		i := strings.IndexByte(string(b.partial), '\n')
		if i < 0 {
			break
		}
		line := strings.TrimRight(string(b.partial[:i]), "\r")
		b.partial = b.partial[i+1:]
		if line == "" {
			continue
		}
		b.pending = append(b.pending, line)
		if len(b.pending) > maxPendingLog {
			b.dropped += len(b.pending) - maxPendingLog
			b.pending = append([]string(nil), b.pending[len(b.pending)-maxPendingLog:]...)
		}
		b.tail = append(b.tail, line)
		if len(b.tail) > tailLines {
			b.tail = append([]string(nil), b.tail[len(b.tail)-tailLines:]...)
		}
	}
	return len(p), nil
}

// take removes and returns the pending lines (a note first when some were
// dropped).
func (b *LogBuffer) take() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := b.pending
	if b.dropped > 0 {
		out = append([]string{"(" + strconv.Itoa(b.dropped) + " earlier log lines dropped)"}, out...)
		b.dropped = 0
	}
	b.pending = nil
	return out
}

// Tail returns the last lines logged.
func (b *LogBuffer) Tail() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.tail...)
}

// progress is the install's state the reporter samples every second.
type progress struct {
	Phase string
	Step  string
	Bytes int64
	Total int64
	Rate  float64
	Peers int
	Have  *agentapi.Have
}

// reporter sends one assignment's events to the server about once a
// second: every step change as its own event, the progress sampled at each
// tick, and the log lines written since the last batch. Batches that fail
// are kept and sent again (the server drops repeats by sequence number).
type reporter struct {
	cl   *agentapi.Client
	mac  string
	asg  string
	logs *LogBuffer

	sending sync.Mutex // one flush at a time: a batch leaves pending only once sent
	mu      sync.Mutex
	seq     int64
	pending []agentapi.Event
	cur     progress
	sent    progress // what the last sampled event carried
	gone    bool     // the server no longer knows the assignment: stop sending
}

func newReporter(cl *agentapi.Client, mac, asg string, logs *LogBuffer) *reporter {
	return &reporter{cl: cl, mac: mac, asg: asg, logs: logs}
}

// set updates the sampled progress with fn.
func (r *reporter) set(fn func(p *progress)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fn(&r.cur)
}

// mark records a step change as an event of its own (so a step shorter
// than a tick still shows), carrying the current progress.
func (r *reporter) mark(phase, step string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cur.Phase, r.cur.Step = phase, step
	r.queue(r.cur)
}

// queue appends an event from p; r.mu is held.
func (r *reporter) queue(p progress) {
	r.seq++
	ev := agentapi.Event{Seq: r.seq, Time: time.Now().UTC(), Phase: p.Phase, Step: p.Step, Bytes: p.Bytes,
		Total: p.Total, Rate: p.Rate, Peers: p.Peers}
	if p.Have != nil {
		h := *p.Have
		ev.Have = &h
	}
	r.pending = append(r.pending, ev)
	if len(r.pending) > maxPendingEvents {
		r.pending = append([]agentapi.Event(nil), r.pending[len(r.pending)-maxPendingEvents:]...)
	}
	r.sent = p
}

// run sends a batch every interval until ctx ends.
func (r *reporter) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			r.flush(ctx)
		}
	}
}

// flush samples the progress (when it changed) and sends what is pending,
// log lines attached to the last event. It returns the send error.
func (r *reporter) flush(ctx context.Context) error {
	r.sending.Lock()
	defer r.sending.Unlock()
	r.mu.Lock()
	if r.gone {
		r.mu.Unlock()
		return nil
	}
	if r.cur.Phase != "" && !sameProgress(r.cur, r.sent) {
		r.queue(r.cur)
	}
	lines := r.logs.take()
	if len(lines) > 0 {
		if len(r.pending) == 0 && r.cur.Phase != "" {
			r.queue(r.cur)
		}
		if len(r.pending) > 0 {
			last := &r.pending[len(r.pending)-1]
			last.Log = append(last.Log, lines...)
		}
	}
	batch := append([]agentapi.Event(nil), r.pending...)
	r.mu.Unlock()
	if len(batch) == 0 {
		return nil
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err := r.cl.Events(sctx, agentapi.EventBatch{MAC: r.mac, Assignment: r.asg, Events: batch})
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case err == nil:
		r.pending = r.pending[len(batch):]
	case agentapi.IsStatus(err, 409), agentapi.IsStatus(err, 400), agentapi.IsStatus(err, 403), agentapi.IsStatus(err, 401):
		// Not current any more (or refused for good): resending cannot help.
		r.gone = true
		r.pending = nil
	}
	return err
}

func sameProgress(a, b progress) bool {
	if a.Phase != b.Phase || a.Step != b.Step || a.Bytes != b.Bytes || a.Total != b.Total || a.Peers != b.Peers || a.Rate != b.Rate {
		return false
	}
	if (a.Have == nil) != (b.Have == nil) {
		return false
	}
	return a.Have == nil || *a.Have == *b.Have
}

// NewLogger returns a logger that writes to console (at the console's
// level) and, from Info up, to logs for the server.
func NewLogger(console slog.Handler, logs *LogBuffer) *slog.Logger {
	return slog.New(fanout{console, slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})})
}

// fanout is a slog.Handler that passes records to each handler that takes
// them.
type fanout []slog.Handler

func (f fanout) Enabled(ctx context.Context, l slog.Level) bool {
	for _, h := range f {
		if h.Enabled(ctx, l) {
			return true
		}
	}
	return false
}

func (f fanout) Handle(ctx context.Context, r slog.Record) error {
	var errs []error
	for _, h := range f {
		if h.Enabled(ctx, r.Level) {
			errs = append(errs, h.Handle(ctx, r.Clone()))
		}
	}
	return errors.Join(errs...)
}

func (f fanout) WithAttrs(as []slog.Attr) slog.Handler {
	out := make(fanout, len(f))
	for i, h := range f {
		out[i] = h.WithAttrs(as)
	}
	return out
}

func (f fanout) WithGroup(name string) slog.Handler {
	out := make(fanout, len(f))
	for i, h := range f {
		out[i] = h.WithGroup(name)
	}
	return out
}
