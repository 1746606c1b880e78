package progress

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestBytes(t *testing.T) {
	for _, c := range []struct {
		n    int64
		want string
	}{{0, "0 B"}, {1023, "1023 B"}, {1024, "1.0 KiB"}, {1536, "1.5 KiB"}, {5 << 20, "5.0 MiB"}, {3 << 30, "3.0 GiB"}} {
		if got := Bytes(c.n); got != c.want {
			t.Errorf("Bytes(%d) = %q, want %q", c.n, got, c.want)
		}
	}
}

func TestBarPlainOutput(t *testing.T) {
	var out bytes.Buffer
	b := New(&out, "unpack", 100, true)
	b.interval = 0
	b.Add(50)
	if !strings.Contains(out.String(), "50.0%") || !strings.Contains(out.String(), "ETA") {
		t.Fatalf("half-way line = %q", out.String())
	}
	b.start = time.Now().Add(-2 * time.Second)
	b.Add(50)
	b.Finish()
	b.Finish()
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	last := lines[len(lines)-1]
	if !strings.Contains(last, "100.0%") || !strings.Contains(last, " in ") {
		t.Fatalf("final line = %q", last)
	}
	if strings.Contains(out.String(), "\r") {
		t.Fatal("non-terminal output contains carriage returns")
	}
	if strings.Count(out.String(), " in ") != 1 {
		t.Fatalf("Finish drew twice: %q", out.String())
	}
}
