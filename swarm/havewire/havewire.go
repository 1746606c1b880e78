// Package havewire implements ESIR's adaptive HAVE suppression at the seam
// between the BitTorrent library and the network: a net.Listener and dialer
// whose connections parse the plaintext BitTorrent message stream in both
// directions. Inbound, a connection learns which pieces the remote has
// (BITFIELD, HAVE, HAVE ALL, HAVE NONE) and whether it speaks ESIR's extension;
// outbound, it drops HAVE frames for pieces the remote already has, and towards
// ESIR peers it holds HAVEs for a short window that adapts to the local piece
// completion rate and sends the held set as one BITFIELD update. Standard
// BitTorrent clients only ever receive standard, non-redundant HAVEs.
//
// Every HAVE is counted on the wire, per connection and per second.
package havewire

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net"
	"slices"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// ExtensionName is the LTEP extension name ESIR peers advertise in their
// extended handshake. A peer that advertises it accepts BITFIELD messages
// after the first message and applies them as a diff (as anacrolix/torrent
// does), so held HAVEs may travel to it as one BITFIELD update.
const ExtensionName = "esir_have_v1"

// SeedExtensionName is the LTEP extension name an initial seeder (see
// SeedConfig) advertises. It claims fewer pieces than it has, so ESIR peers
// send it every HAVE (never dropping one as redundant): it needs to know
// what each peer has to decide what to reveal next.
const SeedExtensionName = "esir_seed_v1"

// Mode selects how much HAVE suppression a node applies.
type Mode int

const (
	// Adaptive drops redundant HAVEs and, towards ESIR peers, coalesces HAVEs
	// of quickly completing pieces for a window no longer than the hard cap.
	Adaptive Mode = iota
	// Redundant only drops HAVEs for pieces the remote already has.
	Redundant
	// Off forwards every HAVE the library emits.
	Off
)

// String returns the mode's flag spelling.
func (m Mode) String() string {
	switch m {
	case Off:
		return "off"
	case Redundant:
		return "redundant"
	default:
		return "adaptive"
	}
}

// ParseMode parses "off", "redundant" or "adaptive".
func ParseMode(s string) (Mode, error) {
	switch s {
	case "off":
		return Off, nil
	case "redundant":
		return Redundant, nil
	case "adaptive", "":
		return Adaptive, nil
	}
	return Adaptive, fmt.Errorf("HAVE suppression mode %q: want off, redundant or adaptive", s)
}

// DefaultMaxHold is the hard cap on how long a HAVE is ever held.
const DefaultMaxHold = 50 * time.Millisecond

// DefaultSeederHold is how long HAVEs to an ESIR initial seeder are
// gathered before they go out as one message.
const DefaultSeederHold = 500 * time.Millisecond

// Config tunes a Wire.
type Config struct {
	Mode Mode
	// MaxHold caps how long any HAVE to a peer that may download the piece
	// is held (DefaultMaxHold when zero).
	MaxHold time.Duration
	// SeederHold is how long, in adaptive mode, HAVEs to an ESIR initial
	// seeder are gathered (DefaultSeederHold when zero; negative: they are
	// treated like any other peer's). The seeder downloads nothing: these
	// HAVEs are not piece information anybody requests by, only feedback
	// for its choice of the next pieces to reveal. Its link is the one every
	// byte of the image crosses first, and each HAVE arriving alone costs
	// it a TCP acknowledgement on that link: one per piece per node (at
	// N=32, 2.5 Mbit/s, gathering them took the server from 18,400 to
	// 13,500 segments sent in one run, about 2% of its link's bytes).
	SeederHold time.Duration
	// MinHold is the shortest window worth holding for (MaxHold/10 when zero).
	MinHold time.Duration
	// Pieces returns the number of pieces of the torrent with the given info
	// hash, or 0 when unknown; it lets a connection size BITFIELD updates.
	Pieces func(infoHash [20]byte) int
	// PieceLength returns the torrent's piece length in bytes, or 0 when
	// unknown; initial seeding sizes its per-peer budget with it.
	PieceLength func(infoHash [20]byte) int64
	// Seed, when set, makes this (complete) node an initial seeder; see
	// SeedConfig. Nil: it advertises every piece it has to every peer.
	Seed *SeedConfig
	// UploadRate caps what the node writes to all its peers together, in
	// bytes per second (0: unlimited). The cap is applied here, as writes
	// block, rather than by the BitTorrent library's upload limiter: that
	// one re-arms the library's writer with a timer whose wake-up can be
	// lost, and a lost wake-up left a peer without data until it gave up
	// on the connection.
	UploadRate int64
	// StealHold bounds how long a chunk request the library moved from one
	// ESIR peer's connection to another's is held back while the first may
	// still deliver it (DefaultStealHold when 0; negative: never held).
	StealHold time.Duration
}

// Counters are HAVE counts as seen on the wire.
type Counters struct {
	// Emitted counts HAVE frames the library wrote.
	Emitted int64 `json:"emitted"`
	// Sent counts HAVE frames that went on the wire unchanged.
	Sent int64 `json:"sent"`
	// Redundant counts HAVEs dropped because the remote had the piece.
	Redundant int64 `json:"suppressed_redundant"`
	// Coalesced counts HAVEs folded into BITFIELD updates.
	Coalesced int64 `json:"coalesced"`
	// Updates counts BITFIELD update messages sent in place of held HAVEs.
	Updates int64 `json:"bitfield_updates"`
	// Revealed counts HAVEs an initial seeder sent to reveal pieces (not
	// piece completions, so not in Messages).
	Revealed int64 `json:"revealed"`
}

// Messages returns the HAVE-carrying messages put on the wire: plain HAVEs
// plus BITFIELD updates.
func (c Counters) Messages() int64 { return c.Sent + c.Updates }

func (c *Counters) add(o Counters) {
	c.Emitted += o.Emitted
	c.Sent += o.Sent
	c.Redundant += o.Redundant
	c.Coalesced += o.Coalesced
	c.Updates += o.Updates
	c.Revealed += o.Revealed
}

// PeerCounters are one connection's counters.
type PeerCounters struct {
	Remote   string   `json:"remote"`
	ESIR     bool     `json:"esir"`
	Counters Counters `json:"counters"`
}

// Snapshot is a Wire's counters at one moment.
type Snapshot struct {
	Mode  string   `json:"mode"`
	Total Counters `json:"total"`
	// PerSecond holds HAVE-carrying messages sent in each second since the
	// Wire started.
	PerSecond []int64 `json:"per_second"`
	// PeakPerSecond is the largest entry of PerSecond.
	PeakPerSecond int64 `json:"peak_per_second"`
	// HoldP50 and HoldP99 are quantiles of the time between the library
	// emitting a non-redundant HAVE and it leaving on the wire.
	HoldP50 time.Duration `json:"hold_p50_ns"`
	HoldP99 time.Duration `json:"hold_p99_ns"`
	HoldMax time.Duration `json:"hold_max_ns"`
	// EmitP50 and EmitP99 are quantiles of the time between a piece's
	// completion (its hash check passed) and the library writing its HAVE
	// to a connection: the library's own share of piece-information delay.
	EmitP50 time.Duration `json:"emit_p50_ns"`
	EmitP99 time.Duration `json:"emit_p99_ns"`
	// Window is the current adaptive hold window (0: send at once).
	Window time.Duration `json:"window_ns"`
	// Peers lists open connections and the most recently closed ones.
	Peers []PeerCounters `json:"peers"`
	// Steals counts chunk requests held back while another connection
	// could still deliver the chunk (steal.go).
	Steals StealCounters `json:"steals"`
}

// maxGone bounds the closed connections a Snapshot still lists.
const maxGone = 256

// holdBuckets has one bucket per 100 µs up to 200 ms.
const (
	holdBucket  = 100 * time.Microsecond
	holdBuckets = 2001
)

// Wire holds the state shared by one node's connections: the mode, the
// measured piece completion rate and the counters.
type Wire struct {
	cfg   Config
	start time.Time

	mu        sync.Mutex
	completed map[pieceKey]struct{}
	last      time.Time
	interval  time.Duration  // EWMA of the interval between piece completions
	closed    Counters       // counters of connections already closed
	gone      []PeerCounters // per-peer counters of closed connections (the last maxGone)
	conns     map[*Conn]struct{}
	perSecond []int64
	hold      [holdBuckets]int64
	holdMax   time.Duration
	emitLag   [holdBuckets]int64 // completion to the library's HAVE, 10 ms buckets
	seed      *seeder            // nil unless initial seeding
	pieces    pieceLog
	limit     *rate.Limiter // nil: upload unlimited
	steals    steals
}

type pieceKey struct {
	ih    [20]byte
	piece uint32
}

// New returns a Wire for one node.
func New(cfg Config) *Wire {
	if cfg.MaxHold <= 0 {
		cfg.MaxHold = DefaultMaxHold
	}
	if cfg.MinHold <= 0 {
		cfg.MinHold = cfg.MaxHold / 10
	}
	if cfg.SeederHold == 0 {
		cfg.SeederHold = DefaultSeederHold
	}
	w := &Wire{cfg: cfg, start: time.Now(), completed: map[pieceKey]struct{}{}, conns: map[*Conn]struct{}{},
		pieces: newPieceLog(), steals: newSteals()}
	if cfg.Seed != nil && cfg.Pieces != nil {
		w.seed = newSeeder(*cfg.Seed)
	}
	if cfg.UploadRate > 0 {
		w.limit = rate.NewLimiter(rate.Limit(cfg.UploadRate), uploadBurst(cfg.UploadRate))
	}
	return w
}

// Mode returns the Wire's mode.
func (w *Wire) Mode() Mode { return w.cfg.Mode }

// pieceEmitted records that the library announced piece completion and
// returns the hold window to use now (0: send at once).
func (w *Wire) pieceEmitted(now time.Time, ih [20]byte, piece uint32) time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	k := pieceKey{ih, piece}
	if _, seen := w.completed[k]; !seen {
		w.completed[k] = struct{}{}
		if !w.last.IsZero() {
			d := now.Sub(w.last)
			if w.interval == 0 {
				w.interval = d
			} else {
				w.interval = (7*w.interval + d) / 8
			}
		}
		w.last = now
	}
	return w.windowLocked(now)
}

// gatherPieces is how many completions a hold window aims to gather. About
// 0.6 of the HAVEs the library emits survive the redundancy check (a peer
// that has the piece gets none), so a message carrying eight pieces sends
// well under a tenth of the library's HAVEs.
const gatherPieces = 8

// windowLocked is the adaptive rule: when pieces complete faster than the
// cap, hold long enough to gather about gatherPieces of them (never less than
// MinHold nor more than MaxHold); when they complete slowly, or the last
// completion is long past, send at once.
func (w *Wire) windowLocked(now time.Time) time.Duration {
	if w.cfg.Mode != Adaptive || w.interval == 0 || w.interval >= w.cfg.MaxHold {
		return 0
	}
	if now.Sub(w.last) > w.cfg.MaxHold {
		return 0
	}
	win := gatherPieces * w.interval
	win = max(win, w.cfg.MinHold)
	// A tenth of the cap is left for timer and scheduling latency: a timer
	// a few ms late still keeps within the cap (on a host whose CPUs are
	// saturated it fires later: the README, under the swarm benchmark).
	return min(win, w.cfg.MaxHold*9/10)
}

func (w *Wire) wireSent(now time.Time, msgs int64, holds []time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	sec := int(now.Sub(w.start) / time.Second)
	for len(w.perSecond) <= sec {
		w.perSecond = append(w.perSecond, 0)
	}
	w.perSecond[sec] += msgs
	for _, h := range holds {
		b := int(h / holdBucket)
		if b >= holdBuckets {
			b = holdBuckets - 1
		}
		w.hold[b]++
		w.holdMax = max(w.holdMax, h)
	}
}

func (w *Wire) register(c *Conn) {
	w.mu.Lock()
	w.conns[c] = struct{}{}
	w.seedStartLocked()
	w.mu.Unlock()
}

func (w *Wire) unregister(c *Conn) {
	cs := c.counters()
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, ok := w.conns[c]; ok {
		delete(w.conns, c)
		w.closed.add(cs.Counters)
		if cs.Counters != (Counters{}) {
			w.gone = append(w.gone, cs)
			if len(w.gone) > maxGone {
				w.gone = w.gone[len(w.gone)-maxGone:]
			}
		}
	}
}

// Snapshot returns the current counters.
func (w *Wire) Snapshot() Snapshot {
	w.mu.Lock()
	conns := make([]*Conn, 0, len(w.conns))
	for c := range w.conns {
		conns = append(conns, c)
	}
	s := Snapshot{Mode: w.cfg.Mode.String(), Total: w.closed, PerSecond: append([]int64(nil), w.perSecond...),
		Window: w.windowLocked(time.Now()), HoldMax: w.holdMax, Peers: append([]PeerCounters(nil), w.gone...)}
	hold, lag := w.hold, w.emitLag
	w.mu.Unlock()
	for _, c := range conns {
		pc := c.counters()
		s.Total.add(pc.Counters)
		s.Peers = append(s.Peers, pc)
	}
	sort.Slice(s.Peers, func(i, j int) bool { return s.Peers[i].Remote < s.Peers[j].Remote })
	for _, v := range s.PerSecond {
		s.PeakPerSecond = max(s.PeakPerSecond, v)
	}
	s.Steals = w.StealCounters()
	s.HoldP50, s.HoldP99 = quantile(hold[:], 0.50), quantile(hold[:], 0.99)
	s.EmitP50, s.EmitP99 = 100*quantile(lag[:], 0.50), 100*quantile(lag[:], 0.99)
	return s
}

func quantile(h []int64, q float64) time.Duration {
	var n int64
	for _, v := range h {
		n += v
	}
	if n == 0 {
		return 0
	}
	want := int64(q*float64(n-1)) + 1
	var acc int64
	for i, v := range h {
		acc += v
		if acc >= want {
			return time.Duration(i) * holdBucket
		}
	}
	return time.Duration(len(h)-1) * holdBucket
}

// Listener wraps l so that accepted connections pass through w.
func (w *Wire) Listener(l net.Listener) net.Listener { return &listener{Listener: l, w: w} }

type listener struct {
	net.Listener
	w *Wire
}

func (l *listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return l.w.Wrap(c), nil
}

// Dialer dials TCP connections that pass through w; it satisfies the
// anacrolix/torrent Dialer interface.
type Dialer struct {
	W      *Wire
	Dialer net.Dialer
}

// Dial connects to addr over TCP.
func (d *Dialer) Dial(ctx context.Context, addr string) (net.Conn, error) {
	c, err := d.Dialer.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return d.W.Wrap(c), nil
}

// DialerNetwork returns "tcp".
func (d *Dialer) DialerNetwork() string { return "tcp" }

// BitTorrent message ids the wire looks at.
const (
	msgHave     = 4
	msgBitfield = 5
	msgRequest  = 6
	msgPiece    = 7
	msgCancel   = 8
	msgReject   = 16
	msgHaveAll  = 14
	msgHaveNone = 15
	msgExtended = 20

	handshakeLen = 68
	// maxParsedPayload bounds the payloads a connection buffers (BITFIELD,
	// extended handshake); larger ones pass through unparsed.
	maxParsedPayload = 1 << 20
)

// gatherBytes is how much Write gathers before writing at a message
// boundary: a chunk message (8 KiB and its header) goes out in one write,
// small messages together.
const gatherBytes = 8 << 10

// notSentLowat bounds the bytes a peer connection's socket holds unsent, so
// a HAVE written behind piece data waits for little more than what is in
// flight, not for a send buffer the kernel grew to megabytes.
const notSentLowat = 16 << 10

// Wrap returns c with HAVE parsing and suppression. On a TCP connection it
// also keeps the socket's unsent queue short (TCP_NOTSENT_LOWAT), so piece
// information is not stuck behind seconds of queued piece data.
func (w *Wire) Wrap(c net.Conn) *Conn {
	if tc, ok := c.(*net.TCPConn); ok {
		if rc, err := tc.SyscallConn(); err == nil {
			rc.Control(func(fd uintptr) {
				unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, notSentLowat)
			})
		}
	}
	x := &Conn{Conn: c, w: w, done: make(chan struct{})}
	x.remote = c.RemoteAddr().String()
	w.register(x)
	return x
}

// Conn is a net.Conn that parses the BitTorrent stream in both directions.
type Conn struct {
	net.Conn
	w      *Wire
	remote string

	rd parser // inbound parser, touched only by Read

	wmu   sync.Mutex // serialises writes to Conn and guards the fields below
	wr    parser     // outbound parser
	wbuf  []byte     // what Write gathers before writing
	held  []heldHave
	timer *time.Timer
	wErr  error

	mu          sync.Mutex // guards the remote's and our piece knowledge
	infoHash    [20]byte
	haveIH      bool
	remoteHas   bitset
	remoteAll   bool
	esir        bool
	local       bitset // pieces we announced or hold
	localAll    bool
	counts      Counters
	closeOnce   sync.Once
	unparsable  bool
	sawHaves    bool          // the remote sent a HAVE-related message already
	openSent    bool          // the library sent its opening BITFIELD / HAVE ALL / HAVE NONE / first HAVE
	early       bitset        // pieces announced at completion, before the library's HAVE
	pending     []uint32      // completed pieces to announce at the next message boundary
	injectQ     []byte        // whole frames to write at the next message boundary (steal.go)
	remoteSeeds bool          // the remote is an ESIR initial seeder: it needs every HAVE
	seed        seedState     // initial seeding (when the Wire seeds)
	done        chan struct{} // closed by Close: stops waiting on the upload cap
}

type heldHave struct {
	piece uint32
	at    time.Time
}

// Read reads from the connection and learns from what the remote sends.
func (c *Conn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.rd.feed(p[:n], c.inbound)
	}
	return n, err
}

// inbound handles one parsed inbound event.
func (c *Conn) inbound(ev event) {
	now := time.Now()
	c.mu.Lock()
	var fresh []uint32 // pieces the remote newly announced after its opening message
	haveMsg := false
	switch ev.kind {
	case evHandshake:
		if !c.haveIH {
			c.infoHash, c.haveIH = ev.infoHash, true
		}
	case evBad:
		c.unparsable = true
	case evMessage:
		switch ev.id {
		case msgHave:
			if c.sawHaves && !c.remoteAll && !c.remoteHas.has(ev.index) {
				fresh = append(fresh, ev.index)
			}
			c.remoteHas.set(ev.index)
			haveMsg = true
		case msgBitfield:
			if c.sawHaves && !c.remoteAll {
				fresh = c.remoteHas.newIn(ev.payload)
			}
			c.remoteHas.setBytes(ev.payload)
			haveMsg = true
		case msgHaveAll:
			c.remoteAll = true
			haveMsg = true
		case msgHaveNone:
			c.remoteHas = bitset{}
			c.remoteAll = false
			haveMsg = true
		case msgExtended:
			if len(ev.payload) > 0 && ev.payload[0] == 0 && advertises(ev.payload[1:], ExtensionName) {
				c.esir = true
			}
			if len(ev.payload) > 0 && ev.payload[0] == 0 && advertises(ev.payload[1:], SeedExtensionName) {
				c.remoteSeeds = true
			}
		}
	}
	if haveMsg {
		c.sawHaves = true
	}
	ih, remote := c.infoHash, c.remote
	c.mu.Unlock()
	if ev.kind == evMessage && (ev.id == msgPiece || ev.id == msgReject) {
		c.inboundAnswer(ev, ev.id == msgPiece)
	}
	if len(fresh) > 0 {
		via := "have"
		if ev.id == msgBitfield {
			via = "update"
		}
		c.w.pieces.learned(now, ih, remote, fresh, via)
	}
	if haveMsg {
		c.w.seedKick()
	}
}

// advertises reports whether a bencoded extended handshake's "m" dictionary
// names ext. The check is on the raw bytes: the name as a bencoded string
// followed by an integer, inside the payload.
func advertises(payload []byte, ext string) bool {
	key := fmt.Appendf(nil, "%d:%si", len(ext), ext)
	return bytes.Contains(payload, key) && bytes.Contains(payload, []byte("1:md"))
}

// Write parses what the library writes, dropping or holding HAVE frames.
func (c *Conn) Write(p []byte) (int, error) {
	if err := c.w.waitUpload(c.done, len(p)); err != nil {
		return 0, err
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.wErr != nil {
		return 0, c.wErr
	}
	// Each segment notes whether a message ends with it: early HAVEs (see
	// earlyHaves) may go out there, ahead of piece data still queued.
	type segment struct {
		b        []byte
		boundary bool
	}
	var out []segment
	c.wr.split(p, func(seg []byte, ev *event) {
		switch {
		case ev == nil:
		case c.w.seed != nil && c.seedRewriteOK(&seg, *ev):
		case ev.kind == evPayload:
		case ev.kind == evMessage && ev.id == msgRequest:
			seg = c.outboundRequest(seg, *ev)
		case ev.kind == evMessage && ev.id == msgCancel:
			seg = c.outboundCancel(seg, *ev)
		case !c.outbound(*ev):
			seg = nil
		}
		out = append(out, segment{seg, c.wr.atBoundary()})
	})
	// Segments go out gathered, one write per message or more, not one
	// write per segment: with TCP_NODELAY a lone 4-byte length or 1-byte id
	// on an idle socket would leave as a packet of its own, headers and all.
	send := func() error {
		_, err := c.Conn.Write(c.wbuf)
		if cap(c.wbuf) > 4*gatherBytes {
			c.wbuf = nil // a BITFIELD or a large extended message passed
		}
		c.wbuf = c.wbuf[:0]
		if err != nil {
			c.wErr = err
		}
		return err
	}
	for _, s := range out {
		c.wbuf = append(c.wbuf, s.b...)
		if !s.boundary {
			continue
		}
		c.wbuf = append(c.wbuf, c.earlyFrames()...)
		c.wbuf = append(c.wbuf, c.takeInjected()...)
		if len(c.wbuf) < gatherBytes {
			continue
		}
		if err := send(); err != nil {
			return 0, err
		}
	}
	if len(c.wbuf) > 0 {
		if err := send(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// outbound handles one outbound frame and reports whether to forward it.
// The caller holds wmu.
func (c *Conn) outbound(ev event) bool {
	switch ev.kind {
	case evHandshake:
		c.mu.Lock()
		if !c.haveIH {
			c.infoHash, c.haveIH = ev.infoHash, true
		}
		c.mu.Unlock()
		return true
	case evBad:
		c.mu.Lock()
		c.unparsable = true
		c.mu.Unlock()
		return true
	}
	switch ev.id {
	case msgBitfield:
		c.mu.Lock()
		c.local.setBytes(ev.payload)
		c.openSent = true
		c.mu.Unlock()
		return true
	case msgHaveAll:
		c.mu.Lock()
		c.localAll = true
		c.openSent = true
		c.mu.Unlock()
		return true
	case msgHaveNone:
		c.mu.Lock()
		c.openSent = true
		c.mu.Unlock()
		return true
	case msgHave:
	default:
		return true
	}
	c.mu.Lock()
	c.openSent = true
	if c.early.has(ev.index) {
		// Havewire announced it already, at the piece's completion.
		c.early.clear(ev.index)
		c.mu.Unlock()
		return false
	}
	c.pending = slices.DeleteFunc(c.pending, func(p uint32) bool { return p == ev.index })
	c.mu.Unlock()
	return c.announce(ev.index)
}

// writeFrames writes whole frames (early HAVEs, injected requests) outside
// a library Write. The caller holds wmu and the outbound stream is at a
// message boundary.
func (c *Conn) writeFrames(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	_, err := c.Conn.Write(b)
	return err
}

// announce applies the mode to a HAVE for piece and reports whether to put
// it on the wire now. The caller holds wmu.
func (c *Conn) announce(piece uint32) bool {
	ev := event{kind: evMessage, id: msgHave, index: piece}
	now := time.Now()
	c.mu.Lock()
	c.counts.Emitted++
	ih := c.infoHash
	redundant := !c.remoteSeeds && (c.remoteAll || c.remoteHas.has(ev.index))
	esir, unparsable, seeds := c.esir, c.unparsable, c.remoteSeeds
	c.mu.Unlock()
	win := c.w.pieceEmitted(now, ih, ev.index)
	if at, ok := c.w.pieces.completedAt(ih, ev.index); ok {
		c.w.emitted(now.Sub(at))
	}
	mode := c.w.cfg.Mode
	if mode == Adaptive && seeds && esir && !unparsable && c.w.cfg.SeederHold > 0 {
		win = c.w.cfg.SeederHold
	}
	if mode != Off && redundant && !unparsable {
		c.mu.Lock()
		c.counts.Redundant++
		c.local.set(ev.index)
		c.mu.Unlock()
		return false
	}
	if mode != Adaptive || !esir || unparsable || win == 0 || c.w.cfg.Pieces == nil || c.w.cfg.Pieces(ih) == 0 {
		c.mu.Lock()
		c.counts.Sent++
		c.local.set(ev.index)
		c.mu.Unlock()
		c.w.wireSent(now, 1, []time.Duration{0})
		return true
	}
	c.held = append(c.held, heldHave{ev.index, now})
	if len(c.held) == 1 {
		c.timer = time.AfterFunc(win, c.flushTimer)
	}
	return false
}

func (c *Conn) flushTimer() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.wErr != nil {
		return
	}
	if !c.wr.atBoundary() {
		// The library wrote part of a frame; anacrolix writes whole frames,
		// so this only happens mid-Write, which cannot hold wmu. Retry soon.
		c.timer = time.AfterFunc(time.Millisecond, c.flushTimer)
		return
	}
	if err := c.flushLocked(); err != nil {
		c.wErr = err
	}
}

// flushLocked sends the held HAVEs: one HAVE when one is held, else one
// BITFIELD with every piece announced or held. The caller holds wmu.
func (c *Conn) flushLocked() error {
	if len(c.held) == 0 {
		return nil
	}
	now := time.Now()
	holds := make([]time.Duration, 0, len(c.held))
	c.mu.Lock()
	var msg []byte
	var fresh []heldHave
	for _, h := range c.held {
		if !c.remoteSeeds && (c.remoteAll || c.remoteHas.has(h.piece)) {
			// The remote got it meanwhile: still redundant.
			c.counts.Redundant++
			c.local.set(h.piece)
			continue
		}
		fresh = append(fresh, h)
	}
	switch len(fresh) {
	case 0:
	case 1:
		msg = binary.BigEndian.AppendUint32(nil, 5)
		msg = append(msg, msgHave)
		msg = binary.BigEndian.AppendUint32(msg, fresh[0].piece)
		c.counts.Sent++
		c.local.set(fresh[0].piece)
	default:
		for _, h := range fresh {
			c.local.set(h.piece)
		}
		n := c.w.cfg.Pieces(c.infoHash)
		bf := c.local.bytes(n)
		if c.localAll {
			bf = allBits(n)
		}
		msg = binary.BigEndian.AppendUint32(nil, uint32(1+len(bf)))
		msg = append(msg, msgBitfield)
		msg = append(msg, bf...)
		c.counts.Coalesced += int64(len(fresh))
		c.counts.Updates++
	}
	c.mu.Unlock()
	c.held = c.held[:0]
	if msg == nil {
		return nil
	}
	if !c.remoteSeeds {
		// The hold figures are about piece information; HAVEs to a seeder
		// are not (see Config.SeederHold).
		for _, h := range fresh {
			holds = append(holds, now.Sub(h.at))
		}
	}
	c.w.wireSent(now, 1, holds)
	_, err := c.Conn.Write(msg)
	return err
}

// Close flushes held HAVEs and closes the connection.
func (c *Conn) Close() error {
	c.wmu.Lock()
	if c.timer != nil {
		c.timer.Stop()
	}
	c.held = nil
	c.wErr = errors.Join(c.wErr, net.ErrClosed)
	c.wmu.Unlock()
	c.closeOnce.Do(func() { close(c.done); c.w.unregister(c); c.w.stealsClosed(c) })
	return c.Conn.Close()
}

// ESIR reports whether the remote advertised ESIR's extension.
func (c *Conn) ESIR() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.esir
}

func (c *Conn) counters() PeerCounters {
	c.mu.Lock()
	defer c.mu.Unlock()
	return PeerCounters{Remote: c.remote, ESIR: c.esir, Counters: c.counts}
}

func allBits(n int) []byte {
	var b bitset
	for i := 0; i < n; i++ {
		b.set(uint32(i))
	}
	return b.bytes(n)
}

// bitset is a growable set of piece indexes in BitTorrent bit order.
type bitset struct{ b []byte }

func (s *bitset) set(i uint32) {
	for int(i/8) >= len(s.b) {
		s.b = append(s.b, 0)
	}
	s.b[i/8] |= 0x80 >> (i % 8)
}

func (s *bitset) has(i uint32) bool {
	return int(i/8) < len(s.b) && s.b[i/8]&(0x80>>(i%8)) != 0
}

// newIn returns the pieces set in the BITFIELD payload p but not in s.
func (s *bitset) newIn(p []byte) []uint32 {
	var out []uint32
	for i, v := range p {
		var old byte
		if i < len(s.b) {
			old = s.b[i]
		}
		for d := v &^ old; d != 0; {
			lz := bits.LeadingZeros8(d)
			out = append(out, uint32(i*8+lz))
			d &^= 0x80 >> lz
		}
	}
	return out
}

// setBytes ORs a BITFIELD payload into s.
func (s *bitset) setBytes(p []byte) {
	for len(s.b) < len(p) {
		s.b = append(s.b, 0)
	}
	for i, v := range p {
		s.b[i] |= v
	}
}

// bytes returns the BITFIELD payload for n pieces.
func (s *bitset) bytes(n int) []byte {
	out := make([]byte, (n+7)/8)
	copy(out, s.b)
	if n%8 != 0 && len(out) > 0 {
		out[len(out)-1] &= byte(0xff << (8 - n%8))
	}
	return out
}

type eventKind int

const (
	evHandshake eventKind = iota
	evMessage
	evBad
	// evPayload marks a segment of a BITFIELD's payload that comes without
	// the whole message (a part of it, or all of a payload too large to
	// gather); last says it ends the message.
	evPayload
)

type event struct {
	kind     eventKind
	infoHash [20]byte
	id       byte
	index    uint32
	begin    uint32 // REQUEST, CANCEL, REJECT and PIECE: the chunk's offset
	payload  []byte
	last     bool
}

// parser follows one direction of a BitTorrent stream across arbitrary read
// or write boundaries.
type parser struct {
	hs      []byte // handshake bytes gathered so far
	bad     bool   // not a plaintext BitTorrent stream: pass everything
	hdr     []byte // message header bytes gathered (length + id)
	left    int    // payload bytes left of the current message
	id      byte
	keep    bool   // gather the payload
	payload []byte // gathered payload
	frame   []byte // bytes of a held-back frame (HAVE, REQUEST, CANCEL, REJECT) being gathered
	pieceHd []byte // the index and begin of the PIECE message being read
}

func (p *parser) atBoundary() bool {
	return p.bad || (len(p.hs) == handshakeLen && len(p.hdr) == 0 && p.left == 0 && len(p.frame) == 0)
}

// feed parses b and calls on for handshakes and interesting messages.
func (p *parser) feed(b []byte, on func(event)) {
	p.split(b, func(_ []byte, ev *event) {
		if ev != nil {
			on(*ev)
		}
	})
}

// split walks b, calling emit with consecutive segments of b that together
// cover it exactly. A segment that is a complete HAVE frame comes with its
// event so the caller may drop it; other segments pass with nil or with an
// informational event. A HAVE frame split across calls is buffered and
// emitted whole (a fresh slice) when complete.
func (p *parser) split(b []byte, emit func(seg []byte, ev *event)) {
	for len(b) > 0 {
		if p.bad {
			emit(b, nil)
			return
		}
		if len(p.hs) < handshakeLen {
			n := min(handshakeLen-len(p.hs), len(b))
			p.hs = append(p.hs, b[:n]...)
			if p.hs[0] != 19 || (len(p.hs) >= 20 && string(p.hs[1:20]) != "BitTorrent protocol") {
				p.bad = true
				emit(b[:n], &event{kind: evBad})
				b = b[n:]
				continue
			}
			if len(p.hs) == handshakeLen {
				ev := &event{kind: evHandshake}
				copy(ev.infoHash[:], p.hs[28:48])
				emit(b[:n], ev)
			} else if len(p.hs) >= 48 && len(p.hs)-n < 48 {
				// The info hash is complete (the peer id may come later).
				ev := &event{kind: evHandshake}
				copy(ev.infoHash[:], p.hs[28:48])
				emit(b[:n], ev)
			} else {
				emit(b[:n], nil)
			}
			b = b[n:]
			continue
		}
		if p.left > 0 {
			n := min(p.left, len(b))
			if p.keep {
				p.payload = append(p.payload, b[:n]...)
			}
			p.left -= n
			var ev *event
			if p.id == msgPiece && len(p.pieceHd) < 8 {
				p.pieceHd = append(p.pieceHd, b[:min(n, 8-len(p.pieceHd))]...)
				if len(p.pieceHd) == 8 {
					ev = &event{kind: evMessage, id: msgPiece, index: binary.BigEndian.Uint32(p.pieceHd),
						begin: binary.BigEndian.Uint32(p.pieceHd[4:])}
				}
			}
			switch {
			case ev != nil:
			case p.left == 0 && p.keep:
				ev = &event{kind: evMessage, id: p.id, payload: p.payload}
				p.payload, p.keep = nil, false
			case p.id == msgBitfield:
				// BITFIELD payload bytes are marked so a seeder may rewrite them.
				ev = &event{kind: evPayload, id: p.id, last: p.left == 0}
			}
			emit(b[:n], ev)
			b = b[n:]
			continue
		}
		// Gathering a header. A HAVE, REQUEST, CANCEL or REJECT is held back
		// whole, so the caller may drop or replace it.
		if len(p.hdr) == 0 && len(p.frame) == 0 {
			if n := heldLen(b); n > 0 && len(b) >= n {
				emit(b[:n], frameEvent(b[:n]))
				b = b[n:]
				continue
			}
		}
		if len(p.frame) > 0 || (len(p.hdr) == 0 && heldLen(b) != 0) {
			for len(b) > 0 {
				want := 5
				if l := heldLen(p.frame); l > 0 {
					want = l
				}
				n := min(want-len(p.frame), len(b))
				p.frame = append(p.frame, b[:n]...)
				b = b[n:]
				if l := heldLen(p.frame); l == 0 || len(p.frame) == l {
					break
				}
			}
			l := heldLen(p.frame)
			if l < 0 || (l > 0 && len(p.frame) < l) {
				continue // b is used up: the frame completes in a later call
			}
			f := p.frame
			p.frame = nil
			if l > 0 {
				emit(f, frameEvent(f))
				continue
			}
			// Not a held frame: parse its bytes as ordinary input, then the rest.
			rest := b
			p.split(f, emit)
			b = rest
			continue
		}
		// The length first (a zero length is a keep-alive), then the id.
		want := 4
		if len(p.hdr) >= 4 {
			want = 5
		}
		n := min(want-len(p.hdr), len(b))
		p.hdr = append(p.hdr, b[:n]...)
		seg := b[:n]
		b = b[n:]
		if len(p.hdr) == 4 && binary.BigEndian.Uint32(p.hdr) == 0 {
			p.hdr = p.hdr[:0] // keep-alive
			emit(seg, nil)
			continue
		}
		if len(p.hdr) < 5 {
			emit(seg, nil)
			continue
		}
		length := int(binary.BigEndian.Uint32(p.hdr[:4]))
		p.id = p.hdr[4]
		p.pieceHd = p.pieceHd[:0]
		p.hdr = p.hdr[:0]
		p.left = length - 1
		switch p.id {
		case msgBitfield, msgExtended:
			p.keep = p.left <= maxParsedPayload
		default:
			p.keep = false
		}
		if p.left == 0 {
			emit(seg, &event{kind: evMessage, id: p.id})
			continue
		}
		emit(seg, nil)
	}
}

// heldFrames are the frames the parser hands over whole: their first five
// bytes (length and id) and their full length.
var heldFrames = [...]struct {
	head [5]byte
	n    int
}{
	{[5]byte{0, 0, 0, 5, msgHave}, 9},
	{[5]byte{0, 0, 0, 13, msgRequest}, 17},
	{[5]byte{0, 0, 0, 13, msgCancel}, 17},
	{[5]byte{0, 0, 0, 13, msgReject}, 17},
}

// heldLen returns the full length of the held frame b starts, 0 when b
// starts no such frame, or -1 when b is too short to tell.
func heldLen(b []byte) int {
	undecided := false
	for _, f := range heldFrames {
		k := min(len(b), 5)
		if !bytes.Equal(b[:k], f.head[:k]) {
			continue
		}
		if k == 5 {
			return f.n
		}
		undecided = true
	}
	if undecided {
		return -1
	}
	return 0
}

// frameEvent describes a complete held frame.
func frameEvent(f []byte) *event {
	ev := &event{kind: evMessage, id: f[4], index: binary.BigEndian.Uint32(f[5:9])}
	if len(f) >= 13 {
		ev.begin = binary.BigEndian.Uint32(f[9:13])
	}
	return ev
}

// uploadBurst is the upload cap's bucket: a tenth of a second's worth,
// at least one 16 KiB block and at most 1 MiB, so a capped node sends in
// short bursts rather than a second's worth at once.
func uploadBurst(perSecond int64) int {
	return int(min(max(perSecond/10, 16<<10), 1<<20))
}

// waitUpload blocks until the upload cap lets n more bytes out, or done is
// closed (net.ErrClosed). Without a cap it returns at once.
func (w *Wire) waitUpload(done <-chan struct{}, n int) error {
	if w.limit == nil {
		return nil
	}
	for n > 0 {
		k := min(n, w.limit.Burst())
		r := w.limit.ReserveN(time.Now(), k)
		if d := r.Delay(); d > 0 {
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-done:
				t.Stop()
				r.Cancel()
				return net.ErrClosed
			}
		}
		n -= k
	}
	return nil
}
