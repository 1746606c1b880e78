package swarm

import (
	"math"
	"sync"
	"time"
)

// Request depth: how many chunk requests a node keeps outstanding with one
// peer. A peer serves requests in order, so every request queued beyond what
// covers the connection's round trip only waits there; while it waits the
// library steals it for another peer and cancels it, and a cancel that
// arrives after the chunk was written costs a chunk sent twice. On 5 Mbit/s
// links a fixed depth of 32 left 11-15% of the swarm's upload carrying such
// duplicates. The depth follows the rate each peer delivers instead: enough
// requests for depthWindow of that rate, at least minDepth, at most the
// node's MaxRequests (a fast single source, such as the server seeding to
// one node, still gets the full depth). Only ESIR peers, which answer
// requests as they arrive, are followed: a client that answers in bursts
// delivers at the rate its depth allows per burst, and a depth sized to
// that rate would shrink it further.
//
// With d requests out and a round trip of rtt, a peer delivers d chunks per
// rtt, so the next depth is about d x depthWindow / rtt: it grows while the
// round trip is shorter than depthWindow and shrinks, down to one request,
// while queues make it longer. The depth thus keeps the round trip near
// depthWindow. Every request over that is data a peer's uplink queues for
// nobody's benefit: a spare request per connection (the rule before) kept at
// least two chunks per connection asked for, 128 KiB per node at 8
// connections, against 47 KB of queue on a 2.5 Mbit/s link. In the 32-node
// benchmark that overflowed the links' queues: 1.6-1.8% of the nodes' TCP
// segments were retransmissions and the last node came in after 50.4-52.1 s.
// Without the spare: 0.5% and 49.5-49.7 s.
const (
	depthWindow   = 100 * time.Millisecond // data in flight a peer's queue should cover
	depthSample   = 100 * time.Millisecond // rate sampling interval
	minDepth      = 1
	startingDepth = 4
)

// peerDepth estimates one connection's delivery rate from the useful bytes
// it brings.
type peerDepth struct {
	since time.Time // start of the current sample
	bytes int64     // useful bytes in the current sample
	rate  float64   // smoothed bytes per second; 0 before the first sample
}

// add counts n useful bytes at time now and returns the depth to allow in
// requests of chunk bytes, or 0 when no sample has completed yet.
func (d *peerDepth) add(n int, now time.Time, chunk, limit int) int {
	if d.since.IsZero() {
		d.since = now
	}
	d.bytes += int64(n)
	el := now.Sub(d.since)
	if el < depthSample {
		if d.rate == 0 {
			return 0
		}
		return depthFor(d.rate, chunk, limit)
	}
	r := float64(d.bytes) / el.Seconds()
	if d.rate == 0 {
		d.rate = r
	} else {
		d.rate = (d.rate + r) / 2
	}
	d.since, d.bytes = now, 0
	return depthFor(d.rate, chunk, limit)
}

// depthFor is the number of requests of chunk bytes that covers depthWindow
// at rate bytes per second, within [minDepth, limit].
func depthFor(rate float64, chunk, limit int) int {
	n := int(math.Ceil(rate * depthWindow.Seconds() / float64(chunk)))
	return min(limit, max(minDepth, n))
}

// depths tracks peerDepth per connection. chunk is the size of the node's
// requests: the depth counts requests, so it must count them in that size.
type depths struct {
	chunk int
	mu    sync.Mutex
	m     map[any]*peerDepth
}

// track starts following key's rate.
func (ds *depths) track(key any) {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	if ds.m == nil {
		ds.m = map[any]*peerDepth{}
	}
	if ds.m[key] == nil {
		ds.m[key] = &peerDepth{}
	}
}

// add counts n useful bytes from key and returns its depth, or 0 when key
// is not tracked or has no completed sample yet.
func (ds *depths) add(key any, n int, now time.Time, limit int) int {
	ds.mu.Lock()
	defer ds.mu.Unlock()
	d := ds.m[key]
	if d == nil {
		return 0
	}
	return d.add(n, now, ds.chunk, limit)
}

func (ds *depths) remove(key any) {
	ds.mu.Lock()
	delete(ds.m, key)
	ds.mu.Unlock()
}
