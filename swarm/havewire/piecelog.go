package havewire

import (
	"encoding/binary"
	"encoding/hex"
	"net"
	"sync"
	"time"
)

// maxLearned bounds the learn events a Wire keeps.
const maxLearned = 1 << 20

// PieceLog is what a node's piece-information delay is computed from: when
// it completed each piece, and when it learned from a peer of a piece it
// lacked. Joined with the senders' logs (nodes share a clock), the delay
// from a piece's completion on one node until a peer lacking it learns of it
// is Learned.At minus the sender's Completed time.
type PieceLog struct {
	// Completed maps an info hash (hex) to piece index to the Unix time in
	// nanoseconds at which this node completed the piece.
	Completed map[string]map[uint32]int64 `json:"completed"`
	// Learned maps an info hash (hex) to learn events.
	Learned map[string][]Learned `json:"learned"`
	// Dropped counts learn events not kept (beyond the bound).
	Dropped int64 `json:"dropped,omitempty"`
}

// Learned is one piece this node lacked and learned a peer had, from a
// HAVE or a BITFIELD update (not the peer's opening BITFIELD).
type Learned struct {
	// From is the peer's IP address.
	From  string `json:"from"`
	Piece uint32 `json:"piece"`
	// At is the Unix time in nanoseconds the message was read.
	At int64 `json:"at"`
	// Via is "have" or "update" (a BITFIELD update of ESIR's extension).
	Via string `json:"via"`
}

type pieceLog struct {
	mu        sync.Mutex
	completed map[[20]byte]map[uint32]int64
	learnedEv map[[20]byte][]Learned
	n         int
	dropped   int64
}

func newPieceLog() pieceLog {
	return pieceLog{completed: map[[20]byte]map[uint32]int64{}, learnedEv: map[[20]byte][]Learned{}}
}

// PieceCompleted records that this node completed (verified) a piece; the
// node's storage calls it. The first call for a piece counts.
func (w *Wire) PieceCompleted(infoHash [20]byte, piece uint32) {
	l := &w.pieces
	now := time.Now().UnixNano()
	l.mu.Lock()
	m := l.completed[infoHash]
	if m == nil {
		m = map[uint32]int64{}
		l.completed[infoHash] = m
	}
	if _, ok := m[piece]; ok {
		l.mu.Unlock()
		return
	}
	m[piece] = now
	l.mu.Unlock()
	w.earlyHaves(infoHash, piece)
}

// learned records pieces a remote announced that this node has not
// completed.
func (l *pieceLog) learned(now time.Time, ih [20]byte, remote string, pieces []uint32, via string) {
	if host, _, err := net.SplitHostPort(remote); err == nil {
		remote = host
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	done := l.completed[ih]
	for _, p := range pieces {
		if _, ok := done[p]; ok {
			continue
		}
		if l.n >= maxLearned {
			l.dropped++
			continue
		}
		l.n++
		l.learnedEv[ih] = append(l.learnedEv[ih], Learned{From: remote, Piece: p, At: now.UnixNano(), Via: via})
	}
}

// PieceLog returns a copy of the node's piece log.
func (w *Wire) PieceLog() PieceLog {
	l := &w.pieces
	l.mu.Lock()
	defer l.mu.Unlock()
	out := PieceLog{Completed: map[string]map[uint32]int64{}, Learned: map[string][]Learned{}, Dropped: l.dropped}
	for ih, m := range l.completed {
		c := make(map[uint32]int64, len(m))
		for k, v := range m {
			c[k] = v
		}
		out.Completed[hex.EncodeToString(ih[:])] = c
	}
	for ih, ev := range l.learnedEv {
		out.Learned[hex.EncodeToString(ih[:])] = append([]Learned(nil), ev...)
	}
	return out
}

func (l *pieceLog) completedAt(ih [20]byte, piece uint32) (time.Time, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	at, ok := l.completed[ih][piece]
	return time.Unix(0, at), ok
}

// emitted records the lag from a piece's completion to a HAVE for it.
func (w *Wire) emitted(lag time.Duration) {
	b := min(max(int(lag/(100*holdBucket)), 0), holdBuckets-1)
	w.mu.Lock()
	w.emitLag[b]++
	w.mu.Unlock()
}

// earlyHaves announces a just-completed piece on every connection of its
// torrent at once (unless the mode is Off, which leaves HAVEs to the
// library): the library queues its HAVE behind the piece data already
// buffered for each connection, which on a busy link delays piece
// information by up to seconds. The library's own HAVE is dropped later.
func (w *Wire) earlyHaves(ih [20]byte, piece uint32) {
	if w.cfg.Mode == Off {
		return
	}
	w.mu.Lock()
	conns := make([]*Conn, 0, len(w.conns))
	for c := range w.conns {
		conns = append(conns, c)
	}
	w.mu.Unlock()
	for _, c := range conns {
		c.mu.Lock()
		ok := c.haveIH && c.infoHash == ih && c.openSent && !c.unparsable
		if ok {
			c.pending = append(c.pending, piece)
		}
		c.mu.Unlock()
		if !ok {
			continue
		}
		// A Write in progress sends it at its next message boundary;
		// otherwise send it now, each connection on its own so one full
		// socket delays no other connection's HAVE (nor the caller, the
		// library's hasher).
		if c.wmu.TryLock() {
			go func() {
				defer c.wmu.Unlock()
				if c.wErr == nil && c.wr.atBoundary() {
					if err := c.writeFrames(c.earlyFrames()); err != nil {
						c.wErr = err
					}
				}
			}()
		}
	}
}

// earlyFrames returns the HAVE frames of pending completed pieces that the
// mode lets out now, and marks those pieces announced. The caller holds wmu
// and writes the frames at a message boundary.
func (c *Conn) earlyFrames() []byte {
	c.mu.Lock()
	ps := c.pending
	c.pending = nil
	for _, p := range ps {
		c.early.set(p)
	}
	c.mu.Unlock()
	var msg []byte
	for _, p := range ps {
		if c.announce(p) {
			msg = binary.BigEndian.AppendUint32(msg, 5)
			msg = append(msg, msgHave)
			msg = binary.BigEndian.AppendUint32(msg, p)
		}
	}
	return msg
}
