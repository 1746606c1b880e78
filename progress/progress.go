// Package progress draws progress bars for long command-line work.
//
// On a terminal a Bar redraws one line in place (bytes done, rate, ETA); on
// anything else (a pipe, a CI log) it prints a plain line at most every few
// seconds, so logs stay readable.
package progress

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// Bar tracks the progress of one task measured in units (usually bytes).
type Bar struct {
	mu       sync.Mutex
	w        io.Writer
	tty      bool
	label    string
	total    int64
	done     int64
	bytes    bool
	start    time.Time
	last     time.Time
	interval time.Duration
	finished bool
}

// IsTerminal reports whether f is a character device (a terminal).
func IsTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// New returns a bar writing to w. total may be 0 when unknown. When bytes is
// true, amounts print as byte sizes.
func New(w io.Writer, label string, total int64, bytes bool) *Bar {
	tty := false
	if f, ok := w.(*os.File); ok {
		tty = IsTerminal(f)
	}
	iv := 5 * time.Second
	if tty {
		iv = 100 * time.Millisecond
	}
	now := time.Now()
	return &Bar{w: w, tty: tty, label: label, total: total, bytes: bytes, start: now, last: now, interval: iv}
}

// SetTotal changes the expected total.
func (b *Bar) SetTotal(total int64) {
	b.mu.Lock()
	b.total = total
	b.mu.Unlock()
}

// Add records n more units done.
func (b *Bar) Add(n int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.done += n
	b.maybeDraw()
}

// Set records the absolute amount done.
func (b *Bar) Set(done int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.done = done
	b.maybeDraw()
}

// Write lets a Bar count the bytes of an io.Writer chain (io.MultiWriter,
// io.TeeReader).
func (b *Bar) Write(p []byte) (int, error) {
	b.Add(int64(len(p)))
	return len(p), nil
}

func (b *Bar) maybeDraw() {
	if b.finished {
		return
	}
	now := time.Now()
	if now.Sub(b.last) < b.interval {
		return
	}
	b.last = now
	b.draw(now, false)
}

// Finish draws the final state and ends the line.
func (b *Bar) Finish() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.finished {
		return
	}
	b.finished = true
	b.draw(time.Now(), true)
}

func (b *Bar) amount(n int64) string {
	if b.bytes {
		return Bytes(n)
	}
	return fmt.Sprintf("%d", n)
}

// Line renders the bar's current text without writing it.
func (b *Bar) line(now time.Time, final bool) string {
	el := now.Sub(b.start).Seconds()
	rate := 0.0
	if el > 0 {
		rate = float64(b.done) / el
	}
	var s strings.Builder
	s.WriteString(b.label)
	s.WriteString(" ")
	if b.total > 0 {
		frac := float64(b.done) / float64(b.total)
		if frac > 1 {
			frac = 1
		}
		const width = 30
		fill := int(frac * width)
		s.WriteString("[" + strings.Repeat("=", fill) + strings.Repeat(" ", width-fill) + "] ")
		fmt.Fprintf(&s, "%5.1f%% %s/%s", frac*100, b.amount(b.done), b.amount(b.total))
	} else {
		s.WriteString(b.amount(b.done))
	}
	if b.bytes {
		fmt.Fprintf(&s, " %s/s", Bytes(int64(rate)))
	}
	switch {
	case final:
		fmt.Fprintf(&s, " in %s", time.Duration(el*float64(time.Second)).Round(10*time.Millisecond))
	case b.total > 0 && rate > 0 && b.done < b.total:
		eta := time.Duration(float64(b.total-b.done) / rate * float64(time.Second))
		fmt.Fprintf(&s, " ETA %s", eta.Round(time.Second))
	}
	return s.String()
}

func (b *Bar) draw(now time.Time, final bool) {
	text := b.line(now, final)
	switch {
	case b.tty && final:
		fmt.Fprintf(b.w, "\r\033[K%s\n", text)
	case b.tty:
		fmt.Fprintf(b.w, "\r\033[K%s", text)
	default:
		fmt.Fprintln(b.w, text)
	}
}

// Bytes formats n as a binary byte size (KiB, MiB, GiB).
func Bytes(n int64) string {
	const unit = 1024
	if n < unit && n > -unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit || m <= -unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
