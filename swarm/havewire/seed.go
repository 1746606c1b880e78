package havewire

import (
	"encoding/binary"
	"math/rand/v2"
	"slices"
	"time"
)

// SeedConfig makes a complete node an initial seeder in the manner of BEP 16
// (super-seeding): towards every peer it first claims to have nothing (the
// library's BITFIELD goes out zeroed, HAVE ALL as HAVE NONE) and then reveals
// pieces with HAVE messages, a few peers and a few pieces at a time. It gives
// each piece out once before repeating one, prefers the peers that have the
// fewest pieces, and reveals a new piece to a peer only once what it revealed
// before has reached another peer, so peers take most bytes from each other
// and the seeder's upload stays near one copy of the image.
type SeedConfig struct {
	// Slots bounds the peers that have revealed pieces in flight at once
	// (4 when zero).
	Slots int
	// InFlight bounds, per peer, the revealed pieces it has not downloaded
	// yet plus those it downloaded that no other peer has yet (2 when zero).
	InFlight int
	// InFlightBytes raises InFlight for small pieces: a peer may hold this
	// many bytes of such pieces (1 MiB when zero), so the seeder's link
	// stays busy while pieces travel on whatever the piece size.
	InFlightBytes int64
	// Stale is how long a peer may hold a slot without progress before its
	// undistributed pieces stop counting against it (2 s when zero), so the
	// seeder never stalls on a peer that cannot pass pieces on.
	Stale time.Duration
	// Alone is how long a peer must be the only one lacking pieces before
	// it gets every piece revealed at once (250 ms when zero): nobody could
	// take pieces from it, so holding them back would only slow it down.
	Alone time.Duration
	// Every is the period at which reveals are re-examined besides every
	// inbound HAVE (50 ms when zero).
	Every time.Duration
}

func (c *SeedConfig) defaults() {
	if c.Slots <= 0 {
		c.Slots = 4
	}
	if c.InFlight <= 0 {
		c.InFlight = 2
	}
	if c.InFlightBytes <= 0 {
		c.InFlightBytes = 1 << 20
	}
	if c.Stale <= 0 {
		c.Stale = 2 * time.Second
	}
	if c.Alone <= 0 {
		c.Alone = 250 * time.Millisecond
	}
	if c.Every <= 0 {
		c.Every = 50 * time.Millisecond
	}
}

// seeder is a Wire's initial seeding state. Its fields are guarded by the
// Wire's mu.
type seeder struct {
	cfg     SeedConfig
	given   map[[20]byte][]int32   // how often each piece was revealed
	lone    map[[20]byte]time.Time // since when one peer alone lacks pieces
	kick    chan struct{}
	running bool
}

func newSeeder(cfg SeedConfig) *seeder {
	cfg.defaults()
	return &seeder{cfg: cfg, given: map[[20]byte][]int32{}, lone: map[[20]byte]time.Time{}, kick: make(chan struct{}, 1)}
}

// seedState is a connection's part of initial seeding, guarded by Conn.mu.
type seedState struct {
	ready    bool   // the library's opening BITFIELD / HAVE ALL went out rewritten
	revealed bitset // pieces revealed to the remote
	last     time.Time
}

// seedRewrite rewrites the library's opening claims of an initial seeder's
// connection: BITFIELD payload bytes become zeros, HAVE ALL becomes HAVE
// NONE. It reports false for frames it leaves to outbound. The caller holds
// wmu.
func (c *Conn) seedRewrite(seg []byte, ev event) ([]byte, bool) {
	if ev.kind != evMessage && ev.kind != evPayload {
		return nil, false
	}
	switch ev.id {
	case msgBitfield:
		if ev.kind == evMessage || ev.last {
			c.seedReadied()
		}
		return make([]byte, len(seg)), true
	case msgHaveAll:
		if ev.kind != evMessage {
			return nil, false
		}
		out := append([]byte(nil), seg...)
		out[len(out)-1] = msgHaveNone // the segment ends with the message id
		c.seedReadied()
		return out, true
	}
	return nil, false
}

// seedRewriteOK applies seedRewrite to *seg in place and reports whether
// it did.
func (c *Conn) seedRewriteOK(seg *[]byte, ev event) bool {
	s, ok := c.seedRewrite(*seg, ev)
	if ok {
		*seg = s
	}
	return ok
}

func (c *Conn) seedReadied() {
	c.mu.Lock()
	c.seed.ready = true
	c.seed.last = time.Now()
	c.mu.Unlock()
	c.w.seedKick()
}

// seedKick asks the seeding loop to look at the connections again.
func (w *Wire) seedKick() {
	if w.seed == nil {
		return
	}
	select {
	case w.seed.kick <- struct{}{}:
	default:
	}
}

// seedStart starts the seeding loop unless it runs. The caller holds w.mu.
func (w *Wire) seedStartLocked() {
	if w.seed == nil || w.seed.running {
		return
	}
	w.seed.running = true
	go w.seedLoop()
}

// seedLoop reveals pieces until the Wire has no connection left.
func (w *Wire) seedLoop() {
	tick := time.NewTicker(w.seed.cfg.Every)
	defer tick.Stop()
	for {
		select {
		case <-w.seed.kick:
		case <-tick.C:
		}
		if !w.seedRound(time.Now()) {
			return
		}
	}
}

// seedView is one connection as a seeding round sees it.
type seedView struct {
	c        *Conn
	ih       [20]byte
	n        int
	has      bitset
	all      bool
	revealed bitset
	last     time.Time
	count    int
	// tells says the peer sends this seeder every HAVE (an ESIR peer), so
	// a revealed piece it lacks is truly not downloaded yet.
	tells bool
}

// seedRound reveals pieces to the peers that may have more. It returns
// false, having stopped the loop, when no connection is left.
func (w *Wire) seedRound(now time.Time) bool {
	w.mu.Lock()
	if len(w.conns) == 0 {
		w.seed.running = false
		w.mu.Unlock()
		return false
	}
	conns := make([]*Conn, 0, len(w.conns))
	for c := range w.conns {
		conns = append(conns, c)
	}
	w.mu.Unlock()

	byIH := map[[20]byte][]*seedView{}
	for _, c := range conns {
		c.mu.Lock()
		if !c.seed.ready || c.unparsable || !c.haveIH {
			c.mu.Unlock()
			continue
		}
		v := &seedView{c: c, ih: c.infoHash, has: c.remoteHas.clone(), all: c.remoteAll,
			revealed: c.seed.revealed.clone(), last: c.seed.last, tells: c.esir}
		c.mu.Unlock()
		if v.n = w.cfg.Pieces(v.ih); v.n == 0 {
			continue
		}
		for i := range v.n {
			if v.all || v.has.has(uint32(i)) {
				v.count++
			}
		}
		byIH[v.ih] = append(byIH[v.ih], v)
	}
	cfg := w.seed.cfg
	reveals := map[*Conn][]uint32{}
	w.mu.Lock()
	for ih, views := range byIH {
		n := views[0].n
		budget := cfg.InFlight
		if w.cfg.PieceLength != nil {
			if pl := w.cfg.PieceLength(ih); pl > 0 {
				budget = max(budget, int(cfg.InFlightBytes/pl))
			}
		}
		given := w.seed.given[ih]
		if len(given) != n {
			given = make([]int32, n)
			w.seed.given[ih] = given
		}
		// copies: peers that have each piece; lacking: peers that do not.
		copies, lacking := make([]int, n), make([]int, n)
		incomplete := 0
		for _, v := range views {
			for i := range n {
				if v.all || v.has.has(uint32(i)) {
					copies[i]++
				} else {
					lacking[i]++
				}
			}
			if !v.all && v.count < n {
				incomplete++
			}
		}
		// A lone downloader has nobody to pass pieces on to: holding pieces
		// back would only slow it, so once it has been alone for Alone it
		// gets them all.
		lone := false
		if incomplete == 1 {
			since, ok := w.seed.lone[ih]
			if !ok {
				since = now
				w.seed.lone[ih] = now
			}
			lone = now.Sub(since) >= cfg.Alone
		} else {
			delete(w.seed.lone, ih)
		}
		// Peers with the fewest pieces first.
		slices.SortFunc(views, func(a, b *seedView) int { return a.count - b.count })
		inflight := make([]int, len(views))
		served := 0
		for k, v := range views {
			for i := range n {
				p := uint32(i)
				if !v.revealed.has(p) {
					continue
				}
				fresh := now.Sub(v.last) < cfg.Stale
				switch {
				case !v.all && !v.has.has(p) && (v.tells || fresh):
					// Not downloaded yet (a standard peer may not say, so
					// after Stale it stops counting).
					inflight[k]++
				case copies[i] <= 1 && lacking[i] > 0 && fresh:
					// Downloaded, not passed on yet to the peers that
					// lack it (none lacking: nothing to wait for).
					inflight[k]++
				}
			}
			if inflight[k] > 0 {
				served++
			}
		}
		for k, v := range views {
			if v.all || v.count >= n || (inflight[k] >= budget && !lone) {
				continue
			}
			if inflight[k] == 0 && served >= cfg.Slots {
				continue
			}
			var cand []uint32
			for i := range n {
				p := uint32(i)
				if !v.all && !v.has.has(p) && !v.revealed.has(p) {
					cand = append(cand, p)
				}
			}
			if len(cand) == 0 {
				continue
			}
			rand.Shuffle(len(cand), func(i, j int) { cand[i], cand[j] = cand[j], cand[i] })
			// Each piece given out once before any is repeated; among
			// equals, the one fewest peers have.
			slices.SortStableFunc(cand, func(a, b uint32) int {
				if d := int(given[a]) - int(given[b]); d != 0 {
					return d
				}
				return copies[a] - copies[b]
			})
			if !lone {
				cand = cand[:min(len(cand), budget-inflight[k])]
			}
			for _, p := range cand {
				given[p]++
			}
			if inflight[k] == 0 {
				served++
			}
			reveals[v.c] = cand
		}
	}
	w.mu.Unlock()
	for c, ps := range reveals {
		c.mu.Lock()
		for _, p := range ps {
			c.seed.revealed.set(p)
		}
		c.mu.Unlock()
		go c.reveal(now, ps)
	}
	return true
}

// reveal sends HAVEs for pieces, or gives them back when the stream is not
// at a message boundary or closed.
func (c *Conn) reveal(now time.Time, pieces []uint32) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.wErr != nil || !c.wr.atBoundary() {
		// Given back; the next round tries again.
		c.w.mu.Lock()
		c.mu.Lock()
		g := c.w.seed.given[c.infoHash]
		for _, p := range pieces {
			c.seed.revealed.clear(p)
			if int(p) < len(g) {
				g[p]--
			}
		}
		c.mu.Unlock()
		c.w.mu.Unlock()
		return
	}
	msg := make([]byte, 0, 9*len(pieces))
	c.mu.Lock()
	for _, p := range pieces {
		msg = binary.BigEndian.AppendUint32(msg, 5)
		msg = append(msg, msgHave)
		msg = binary.BigEndian.AppendUint32(msg, p)
	}
	c.seed.last = now
	c.counts.Revealed += int64(len(pieces))
	c.mu.Unlock()
	if _, err := c.Conn.Write(msg); err != nil {
		c.wErr = err
	}
}

func (s *bitset) clone() bitset { return bitset{b: append([]byte(nil), s.b...)} }

func (s *bitset) clear(i uint32) {
	if int(i/8) < len(s.b) {
		s.b[i/8] &^= 0x80 >> (i % 8)
	}
}
