package havewire

import (
	"sync"
	"time"
)

// DefaultStealHold is how long a moved chunk request waits, at most, for the
// connection it was moved from to answer.
const DefaultStealHold = time.Second

// The library moves ("steals") a chunk request from one of a node's
// connections to another that has fewer requests: it cancels it on the
// first and requests it on the second. When the first peer had already sent
// the chunk, both peers send it, and on a busy swarm that was most of the
// bytes sent twice. Between ESIR peers the wire holds the new REQUEST back
// until the first connection answers: its PIECE for the chunk (the library
// then cancels the held request, and the remote gets the REQUEST and CANCEL
// together, so it answers with a REJECT and sends nothing) or its REJECT
// (the REQUEST goes out then). A hold ends after StealHold whatever happens,
// and when either connection closes.

type chunkKey struct {
	ih           [20]byte
	index, begin uint32
}

type heldRequest struct {
	from    *Conn // the connection the request was moved from
	to      *Conn // the connection holding the REQUEST back
	frame   []byte
	arrived bool // the chunk came on from
	timer   *time.Timer
}

// StealCounters count moved requests the wire held back.
type StealCounters struct {
	// Held counts REQUESTs held back because another connection had the
	// chunk requested.
	Held int64 `json:"held"`
	// Saved counts held requests whose chunk came on the first connection:
	// a chunk not sent twice.
	Saved int64 `json:"saved"`
	// Released counts held requests sent on after all (the first connection
	// rejected, closed or did not answer in time).
	Released int64 `json:"released"`
}

type steals struct {
	mu     sync.Mutex
	owner  map[chunkKey]*Conn // connection whose REQUEST is on the wire, unanswered
	held   map[chunkKey]*heldRequest
	counts StealCounters
}

func newSteals() steals {
	return steals{owner: map[chunkKey]*Conn{}, held: map[chunkKey]*heldRequest{}}
}

// stealHold returns how long requests are held, 0 when they are not.
func (w *Wire) stealHold() time.Duration {
	switch {
	case w.cfg.StealHold < 0:
		return 0
	case w.cfg.StealHold == 0:
		return DefaultStealHold
	}
	return w.cfg.StealHold
}

// outboundRequest decides on a REQUEST frame the library wrote on c: it
// returns the bytes to send now (nil: held back). The caller holds c.wmu.
func (c *Conn) outboundRequest(frame []byte, ev event) []byte {
	hold := c.w.stealHold()
	c.mu.Lock()
	k := chunkKey{c.infoHash, ev.index, ev.begin}
	esir, ok := c.esir && !c.unparsable, c.haveIH
	c.mu.Unlock()
	if !ok {
		return frame
	}
	s := &c.w.steals
	s.mu.Lock()
	defer s.mu.Unlock()
	from := s.owner[k]
	if hold == 0 || !esir || from == nil || from == c || s.held[k] != nil || !from.ESIR() {
		s.owner[k] = c
		return frame
	}
	h := &heldRequest{from: from, to: c, frame: append([]byte(nil), frame...)}
	h.timer = time.AfterFunc(hold, func() { c.w.releaseHeld(k, h) })
	s.held[k] = h
	s.counts.Held++
	return nil
}

// outboundCancel returns the bytes to send for a CANCEL the library wrote
// on c: for a request still held back, the REQUEST and the CANCEL together,
// which an ESIR remote answers with a REJECT, so the library's request
// bookkeeping ends as it expects. The caller holds c.wmu.
func (c *Conn) outboundCancel(frame []byte, ev event) []byte {
	c.mu.Lock()
	k := chunkKey{c.infoHash, ev.index, ev.begin}
	c.mu.Unlock()
	s := &c.w.steals
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.held[k]
	if h == nil || h.to != c {
		return frame
	}
	h.timer.Stop()
	delete(s.held, k)
	if h.arrived {
		s.counts.Saved++
	} else {
		s.counts.Released++
	}
	return append(h.frame, frame...)
}

// inboundAnswer notes that the remote of c answered a request for a chunk:
// with its data (piece) or with a REJECT.
func (c *Conn) inboundAnswer(ev event, piece bool) {
	c.mu.Lock()
	k := chunkKey{c.infoHash, ev.index, ev.begin}
	c.mu.Unlock()
	s := &c.w.steals
	s.mu.Lock()
	if s.owner[k] == c {
		delete(s.owner, k)
	}
	h := s.held[k]
	if h == nil || h.from != c {
		s.mu.Unlock()
		return
	}
	if piece {
		// The library now cancels the held request (outboundCancel).
		h.arrived = true
		s.mu.Unlock()
		return
	}
	s.mu.Unlock()
	c.w.releaseHeld(k, h)
}

// releaseHeld sends a held REQUEST on after all, unless it is gone.
func (w *Wire) releaseHeld(k chunkKey, h *heldRequest) {
	s := &w.steals
	s.mu.Lock()
	if s.held[k] != h {
		s.mu.Unlock()
		return
	}
	h.timer.Stop()
	delete(s.held, k)
	s.owner[k] = h.to
	s.counts.Released++
	s.mu.Unlock()
	h.to.inject(h.frame)
}

// stealsClosed forgets c's requests and ends the holds that involve it.
func (w *Wire) stealsClosed(c *Conn) {
	s := &w.steals
	s.mu.Lock()
	for k, o := range s.owner {
		if o == c {
			delete(s.owner, k)
		}
	}
	var release []chunkKey
	var hs []*heldRequest
	for k, h := range s.held {
		switch {
		case h.to == c:
			h.timer.Stop()
			delete(s.held, k)
		case h.from == c:
			release, hs = append(release, k), append(hs, h)
		}
	}
	s.mu.Unlock()
	for i, k := range release {
		w.releaseHeld(k, hs[i])
	}
}

// StealCounters returns the counts of held requests.
func (w *Wire) StealCounters() StealCounters {
	w.steals.mu.Lock()
	defer w.steals.mu.Unlock()
	return w.steals.counts
}

// inject queues whole frames to write on c at its next message boundary,
// and writes them now when no Write is under way.
func (c *Conn) inject(frame []byte) {
	c.mu.Lock()
	c.injectQ = append(c.injectQ, frame...)
	c.mu.Unlock()
	c.kickInject()
}

// kickInject writes queued frames if it can take the write lock at a
// message boundary; otherwise a Write under way sends them at its next
// boundary, and a retry makes sure one does.
func (c *Conn) kickInject() {
	select {
	case <-c.done:
		return
	default:
	}
	c.mu.Lock()
	empty := len(c.injectQ) == 0
	c.mu.Unlock()
	if empty {
		return
	}
	if !c.wmu.TryLock() {
		time.AfterFunc(10*time.Millisecond, c.kickInject)
		return
	}
	defer c.wmu.Unlock()
	if c.wErr != nil {
		return
	}
	if !c.wr.atBoundary() {
		time.AfterFunc(10*time.Millisecond, c.kickInject)
		return
	}
	if err := c.writeFrames(c.takeInjected()); err != nil {
		c.wErr = err
	}
}

// takeInjected returns and clears the queued frames. The caller holds wmu
// and writes them at a message boundary.
func (c *Conn) takeInjected() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.injectQ
	c.injectQ = nil
	return b
}
