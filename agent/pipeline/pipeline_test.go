package pipeline

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esir-project/esir/server/agentapi"
)

func TestLogBuffer(t *testing.T) {
	tests := []struct {
		name        string
		writes      []string
		wantPending []string
		wantTail    int
	}{
		{name: "whole lines", writes: []string{"a\n", "b\n"}, wantPending: []string{"a", "b"}, wantTail: 2},
		{name: "split line joined", writes: []string{"par", "tial\nnext\n"}, wantPending: []string{"partial", "next"}, wantTail: 2},
		{name: "no newline yet", writes: []string{"pending"}, wantPending: nil, wantTail: 0},
		{name: "blank lines skipped", writes: []string{"\n\nx\r\n"}, wantPending: []string{"x"}, wantTail: 1},
		{name: "tail bounded", writes: []string{strings.Repeat("l\n", tailLines+7)}, wantTail: tailLines},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := NewLogBuffer()
			for _, w := range tt.writes {
				if n, err := b.Write([]byte(w)); err != nil || n != len(w) {
					t.Fatalf("Write(%q) = %d, %v", w, n, err)
				}
			}
			got := b.take()
			if tt.wantPending != nil && strings.Join(got, "|") != strings.Join(tt.wantPending, "|") {
				t.Errorf("pending %q, want %q", got, tt.wantPending)
			}
			if len(b.take()) != 0 {
				t.Error("take did not empty the buffer")
			}
			if got := len(b.Tail()); got != tt.wantTail {
				t.Errorf("tail has %d lines, want %d", got, tt.wantTail)
			}
		})
	}
	t.Run("overflow noted", func(t *testing.T) {
		b := NewLogBuffer()
		b.Write([]byte(strings.Repeat("x\n", maxPendingLog+5)))
		got := b.take()
		if len(got) != maxPendingLog+1 || !strings.Contains(got[0], "5 earlier log lines dropped") {
			t.Fatalf("got %d lines starting %q", len(got), got[0])
		}
	})
}

// agentServer answers the agent protocol's events endpoint the way the
// server does (drops repeated sequence numbers), failing the first fail
// batches with status code.
type agentServer struct {
	mu       sync.Mutex
	fail     int
	code     int
	seen     map[int64]agentapi.Event
	batches  int
	logLines []string
}

func (s *agentServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != agentapi.Prefix+"events" || r.Header.Get("Authorization") != "Bearer tok" {
		http.Error(w, `{"message":"no"}`, http.StatusNotFound)
		return
	}
	var b agentapi.EventBatch
	if err := json.NewDecoder(r.Body).Decode(&b); err != nil {
		http.Error(w, err.Error(), 400)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.batches++
	if s.fail > 0 {
		s.fail--
		w.WriteHeader(s.code)
		fmt.Fprint(w, `{"message":"try later"}`)
		return
	}
	for _, e := range b.Events {
		if _, ok := s.seen[e.Seq]; !ok {
			s.seen[e.Seq] = e
			s.logLines = append(s.logLines, e.Log...)
		}
	}
	json.NewEncoder(w).Encode(agentapi.Ack{Applied: true, State: "installing"})
}

func TestReporter(t *testing.T) {
	tests := []struct {
		name       string
		fail, code int
		flushes    int
		wantEvents int  // distinct events the server applied
		wantGone   bool // the reporter stopped sending
	}{
		{name: "delivered", flushes: 1, wantEvents: 2},
		{name: "server error resent", fail: 2, code: 503, flushes: 3, wantEvents: 2},
		{name: "conflict stops", fail: 1, code: 409, flushes: 2, wantEvents: 0, wantGone: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := &agentServer{fail: tt.fail, code: tt.code, seen: map[int64]agentapi.Event{}}
			hs := httptest.NewServer(srv)
			defer hs.Close()
			logs := NewLogBuffer()
			r := newReporter(&agentapi.Client{Server: hs.URL, Token: "tok"}, "52:54:00:00:00:01", "a1", logs)
			r.mark(agentapi.PhaseFetching, "")
			r.set(func(p *progress) { p.Bytes, p.Total, p.Have = 10, 100, &agentapi.Have{Emitted: 3} })
			logs.Write([]byte("hello\n"))
			for i := 0; i < tt.flushes; i++ {
				_ = r.flush(context.Background())
			}
			srv.mu.Lock()
			defer srv.mu.Unlock()
			if len(srv.seen) != tt.wantEvents {
				t.Fatalf("server applied %d events, want %d", len(srv.seen), tt.wantEvents)
			}
			if r.gone != tt.wantGone {
				t.Errorf("gone = %v, want %v", r.gone, tt.wantGone)
			}
			if tt.wantEvents > 0 {
				if e := srv.seen[2]; e.Bytes != 10 || e.Total != 100 || e.Have == nil || e.Have.Emitted != 3 {
					t.Errorf("sampled event %+v", e)
				}
				if strings.Join(srv.logLines, "|") != "hello" {
					t.Errorf("log lines %q, want hello once", srv.logLines)
				}
			}
			// Nothing new: the next flush sends nothing.
			before := srv.batches
			srv.mu.Unlock()
			_ = r.flush(context.Background())
			srv.mu.Lock()
			if srv.batches != before {
				t.Errorf("an idle flush sent a batch")
			}
		})
	}
}

func TestRetry(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	b := Backoff{Initial: time.Millisecond, Max: 2 * time.Millisecond}
	tests := []struct {
		name      string
		errs      []error
		limit     time.Duration
		wantCalls int
		wantErr   bool
	}{
		{name: "succeeds after transient errors", errs: []error{errors.New("refused"), &agentapi.StatusError{Status: 503}, nil}, wantCalls: 3},
		{name: "refusal is permanent", errs: []error{permanent(&agentapi.StatusError{Status: 403})}, wantCalls: 1, wantErr: true},
		{name: "rate limit retried", errs: []error{permanent(&agentapi.StatusError{Status: 429}), nil}, wantCalls: 2},
		{name: "limit gives up", errs: []error{errors.New("down"), errors.New("down"), errors.New("down"), errors.New("down"), nil},
			limit: 2 * time.Millisecond, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			calls := 0
			bb := b
			bb.Limit = tt.limit
			err := retry(context.Background(), log, "step", func() error {
				e := tt.errs[min(calls, len(tt.errs)-1)]
				calls++
				return e
			}, bb)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if tt.wantCalls > 0 && calls != tt.wantCalls {
				t.Errorf("%d calls, want %d", calls, tt.wantCalls)
			}
			if err != nil && !strings.Contains(err.Error(), "step") && !agentapi.IsStatus(err, 403) {
				t.Errorf("error does not name the step: %v", err)
			}
		})
	}
}

func TestReadBootEntry(t *testing.T) {
	tests := []struct {
		name, conf string
		want       BootEntry
		wantErr    bool
	}{
		{name: "installer's entry", conf: "DEFAULT esir\nLABEL esir\n\tLINUX /boot/vmlinuz-6.1\n\tINITRD /boot/esir-initrd.img-6.1\n\tAPPEND root=PARTUUID=x ro -- initrd\n",
			want: BootEntry{Kernel: "/boot/vmlinuz-6.1", Initrd: "/boot/esir-initrd.img-6.1", Cmdline: "root=PARTUUID=x ro -- initrd"}},
		{name: "first of two", conf: "LABEL a\nKERNEL /a\nLABEL b\nLINUX /b\n", want: BootEntry{Kernel: "/a"}},
		{name: "no kernel", conf: "DEFAULT x\n", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "extlinux.conf")
			os.WriteFile(p, []byte(tt.conf), 0o644)
			got, err := ReadBootEntry(p)
			if (err != nil) != tt.wantErr || (!tt.wantErr && got != tt.want) {
				t.Fatalf("ReadBootEntry = %+v, %v; want %+v (error %v)", got, err, tt.want, tt.wantErr)
			}
		})
	}
}
