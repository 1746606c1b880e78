package swarm

import (
	"testing"
	"time"
)

func TestDepthFor(t *testing.T) {
	for _, c := range []struct {
		rate  float64
		chunk int
		limit int
		want  int
	}{
		{0, 16 << 10, 32, 1},     // nothing measured yet: one request
		{80e3, 16 << 10, 32, 1},  // a fifth of a 5 Mbit/s link: 8 KB per window
		{625e3, 16 << 10, 32, 4}, // all of a 5 Mbit/s link: 62.5 KB, 4 chunks
		{50e6, 16 << 10, 32, 32}, // 400 Mbit/s from one seeder: capped
		{625e3, 16 << 10, 3, 3},  // the node's bound wins
		{625e3, 16 << 10, 1, 1},
		{160e3, 16 << 10, 32, 1}, // 16 KB per window: one chunk
		{170e3, 16 << 10, 32, 2}, // a little over one chunk: two
		// The same window in 8 KiB requests takes twice as many.
		{625e3, 8 << 10, 32, 8},   // 62.5 KB: 8 chunks
		{160e3, 8 << 10, 32, 2},   // 16 KB: two chunks
		{312.5e3, 8 << 10, 32, 4}, // all of a 2.5 Mbit/s link: 31.25 KB, 4 chunks
	} {
		if got := depthFor(c.rate, c.chunk, c.limit); got != c.want {
			t.Errorf("depthFor(%v, %d, %d) = %d, want %d", c.rate, c.chunk, c.limit, got, c.want)
		}
	}
}

// TestPeerDepthFollowsRate feeds a peer's chunks at two rates and checks
// the depth follows each after a few samples, and that nothing is decided
// before the first sample completes.
func TestPeerDepthFollowsRate(t *testing.T) {
	var d peerDepth
	const chunkBytes = 16 << 10
	now := time.Unix(0, 0)
	feed := func(rate float64, dur time.Duration) int {
		step := time.Duration(float64(chunkBytes) / rate * float64(time.Second))
		got := 0
		for end := now.Add(dur); now.Before(end); now = now.Add(step) {
			got = d.add(chunkBytes, now, chunkBytes, 32)
		}
		return got
	}
	if got := d.add(chunkBytes, now, chunkBytes, 32); got != 0 {
		t.Fatalf("depth before any sample = %d, want 0 (keep the starting depth)", got)
	}
	if got := feed(20e6, 2*time.Second); got != 32 {
		t.Errorf("at 20 MB/s the depth is %d, want the bound 32", got)
	}
	if got := feed(300e3, 3*time.Second); got != 2 {
		t.Errorf("after dropping to 300 kB/s the depth is %d, want 2", got)
	}
	if got := feed(20e6, time.Second); got != 32 {
		t.Errorf("back at 20 MB/s the depth is %d, want 32", got)
	}
}

func TestDepthsForget(t *testing.T) {
	const chunkBytes = 16 << 10
	ds := depths{chunk: chunkBytes}
	now := time.Unix(0, 0)
	if got := ds.add("b", chunkBytes, now, 32); got != 0 || ds.m["b"] != nil {
		t.Errorf("an untracked connection got depth %d", got)
	}
	ds.track("a")
	ds.add("a", chunkBytes, now, 32)
	ds.add("a", chunkBytes, now.Add(200*time.Millisecond), 32)
	ds.remove("a")
	if len(ds.m) != 0 {
		t.Errorf("a removed connection is still tracked: %v", ds.m)
	}
	ds.track("a")
	if got := ds.add("a", chunkBytes, now.Add(time.Second), 32); got != 0 {
		t.Errorf("a new connection under the same key starts with depth %d, want 0", got)
	}
}
