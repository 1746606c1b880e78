package pipeline

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/esir-project/esir/server/agentapi"
)

// Backoff bounds the retries of a network step: waits start at Initial and
// double up to Max; Limit gives up after that long (0: only when the
// context ends).
type Backoff struct {
	Initial, Max, Limit time.Duration
}

func (b Backoff) withDefaults() Backoff {
	if b.Initial <= 0 {
		b.Initial = time.Second
	}
	if b.Max <= 0 {
		b.Max = 30 * time.Second
	}
	if b.Max < b.Initial {
		b.Max = b.Initial
	}
	return b
}

// capped returns b giving up after at most d.
func (b Backoff) capped(d time.Duration) Backoff {
	if b.Limit <= 0 || b.Limit > d {
		b.Limit = d
	}
	return b
}

// permanentErr marks an error that retrying cannot cure.
type permanentErr struct{ err error }

func (p permanentErr) Error() string { return p.err.Error() }
func (p permanentErr) Unwrap() error { return p.err }

// permanent marks the server's refusals (4xx but timeouts and rate limits)
// as permanent; other errors (unreachable, 5xx) stay worth retrying.
func permanent(err error) error {
	var se *agentapi.StatusError
	if errors.As(err, &se) && se.Status >= 400 && se.Status < 500 && se.Status != 408 && se.Status != 429 {
		return permanentErr{err}
	}
	return err
}

// retry runs fn until it succeeds, fails permanently, b's limit passes or
// ctx ends, logging each failed attempt with what it was doing.
func retry(ctx context.Context, log *slog.Logger, what string, fn func() error, b Backoff) error {
	b = b.withDefaults()
	start := time.Now()
	wait := b.Initial
	for attempt := 1; ; attempt++ {
		err := fn()
		if err == nil {
			return nil
		}
		var pe permanentErr
		if errors.As(err, &pe) {
			return pe.err
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w (last error: %v)", what, ctx.Err(), err)
		}
		if b.Limit > 0 && time.Since(start)+wait > b.Limit {
			return fmt.Errorf("%s: gave up after %d attempts in %s: %w", what, attempt, time.Since(start).Round(time.Second), err)
		}
		log.Warn(what+": failed, retrying", "attempt", attempt, "in", wait, "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last error: %v)", what, ctx.Err(), err)
		case <-time.After(wait):
		}
		wait = min(2*wait, b.Max)
	}
}
