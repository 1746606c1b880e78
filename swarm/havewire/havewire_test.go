package havewire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"
)

func handshake(ih byte) []byte {
	b := []byte{19}
	b = append(b, "BitTorrent protocol"...)
	b = append(b, make([]byte, 8)...)
	b = append(b, bytes.Repeat([]byte{ih}, 20)...)
	return append(b, bytes.Repeat([]byte{'p'}, 20)...)
}

func msg(id byte, payload ...byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(1+len(payload)))
	return append(append(b, id), payload...)
}

func have(i uint32) []byte { return msg(msgHave, binary.BigEndian.AppendUint32(nil, i)...) }

// requestFrame encodes a REQUEST, CANCEL or REJECT frame (by id).
func requestFrame(id byte, index, begin, length uint32) []byte {
	f := binary.BigEndian.AppendUint32(nil, 13)
	f = append(f, id)
	f = binary.BigEndian.AppendUint32(f, index)
	f = binary.BigEndian.AppendUint32(f, begin)
	return binary.BigEndian.AppendUint32(f, length)
}

func extHandshake(names ...string) []byte {
	d := "d1:md"
	for i, n := range names {
		d += fmt.Sprintf("%d:%si%de", len(n), n, i+1)
	}
	d += "ee"
	return msg(msgExtended, append([]byte{0}, d...)...)
}

// frames splits a BitTorrent stream (after the handshake) into messages.
func frames(t *testing.T, b []byte) [][]byte {
	t.Helper()
	var out [][]byte
	for len(b) > 0 {
		if len(b) < 4 {
			t.Fatalf("truncated frame header: %x", b)
		}
		n := int(binary.BigEndian.Uint32(b))
		if len(b) < 4+n {
			t.Fatalf("truncated frame: want %d bytes, have %d", n, len(b)-4)
		}
		out = append(out, b[:4+n])
		b = b[4+n:]
	}
	return out
}

// pair wraps one end of a pipe and returns what the other end reads.
type pair struct {
	c    *Conn
	peer net.Conn
	mu   sync.Mutex
	got  bytes.Buffer
	done chan struct{}
}

func newPair(t *testing.T, w *Wire) *pair {
	a, b := net.Pipe()
	p := &pair{c: w.Wrap(a), peer: b, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		buf := make([]byte, 4096)
		for {
			n, err := b.Read(buf)
			p.mu.Lock()
			p.got.Write(buf[:n])
			p.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { p.c.Close(); b.Close() })
	return p
}

// remoteSends makes the Conn read b as if the remote sent it.
func (p *pair) remoteSends(t *testing.T, b []byte) {
	t.Helper()
	go p.peer.Write(b)
	buf := make([]byte, len(b))
	for n := 0; n < len(b); {
		m, err := p.c.Read(buf[n:])
		if err != nil {
			t.Fatal(err)
		}
		n += m
	}
}

func (p *pair) received() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]byte(nil), p.got.Bytes()...)
}

func TestParserSplitsAcrossWrites(t *testing.T) {
	stream := append(handshake(7), msg(msgBitfield, 0xf0)...)
	stream = append(stream, have(3)...)
	stream = append(stream, 0, 0, 0, 0)                                      // keep-alive
	piece := append([]byte{0, 0, 0, 2, 0, 0, 0x40, 0}, make([]byte, 100)...) // piece 2, begin 16384
	stream = append(stream, msg(msgPiece, piece...)...)
	stream = append(stream, have(9)...)
	stream = append(stream, requestFrame(msgRequest, 5, 32768, 16384)...)
	stream = append(stream, requestFrame(msgCancel, 5, 32768, 16384)...)
	stream = append(stream, requestFrame(msgReject, 6, 0, 16384)...)
	stream = append(stream, msg(msgHaveAll)...)
	for _, chunk := range []int{1, 2, 3, 5, 7, 9, 17, 64, len(stream)} {
		var p parser
		var got []byte
		var haves []uint32
		var ids []byte
		var chunks []string
		for b := stream; len(b) > 0; {
			n := min(chunk, len(b))
			p.split(b[:n], func(seg []byte, ev *event) {
				got = append(got, seg...)
				if ev != nil && ev.kind == evMessage {
					ids = append(ids, ev.id)
					switch ev.id {
					case msgHave:
						haves = append(haves, ev.index)
					case msgRequest, msgCancel, msgReject:
						// Handed over whole, so the wire may hold or replace it.
						if len(seg) != 17 {
							t.Errorf("chunk %d: message %d came in a segment of %d bytes", chunk, ev.id, len(seg))
						}
						chunks = append(chunks, fmt.Sprintf("%d:%d/%d", ev.id, ev.index, ev.begin))
					case msgPiece:
						chunks = append(chunks, fmt.Sprintf("%d:%d/%d", ev.id, ev.index, ev.begin))
					}
				}
			})
			b = b[n:]
		}
		if want := "[7:2/16384 6:5/32768 8:5/32768 16:6/0]"; fmt.Sprint(chunks) != want {
			t.Errorf("chunk %d: chunk messages %v, want %s", chunk, chunks, want)
		}
		if !bytes.Equal(got, stream) {
			t.Errorf("chunk %d: segments do not reassemble the stream", chunk)
		}
		if len(haves) != 2 || haves[0] != 3 || haves[1] != 9 {
			t.Errorf("chunk %d: HAVEs %v, want [3 9]", chunk, haves)
		}
		if !bytes.Equal(ids, []byte{msgBitfield, msgHave, msgPiece, msgHave, msgRequest, msgCancel, msgReject, msgHaveAll}) {
			t.Errorf("chunk %d: message ids %v", chunk, ids)
		}
	}
}

func TestParserGivesUpOnObfuscatedStream(t *testing.T) {
	var p parser
	var got []byte
	in := bytes.Repeat([]byte{0xde, 0xad}, 100)
	p.split(in, func(seg []byte, ev *event) { got = append(got, seg...) })
	if !p.bad || !bytes.Equal(got, in) {
		t.Fatal("a non-BitTorrent stream must pass through untouched")
	}
}

func TestSuppression(t *testing.T) {
	tests := []struct {
		name         string
		mode         Mode
		esir         bool
		remoteHas    []byte // remote BITFIELD payload
		fast         bool   // pieces complete 1 ms apart
		wantHaves    []uint32
		wantUpdate   bool // a BITFIELD update arrives
		wantCounters Counters
	}{
		{"off forwards everything", Off, true, []byte{0xff}, true,
			[]uint32{1, 2, 3}, false, Counters{Emitted: 3, Sent: 3}},
		{"redundant drops pieces the remote has", Redundant, true, []byte{0x40}, true,
			[]uint32{2, 3}, false, Counters{Emitted: 3, Sent: 2, Redundant: 1}},
		{"adaptive coalesces fast pieces for ESIR peers", Adaptive, true, []byte{0x40}, true,
			nil, true, Counters{Emitted: 3, Redundant: 1, Coalesced: 2, Updates: 1}},
		{"adaptive never holds for standard peers", Adaptive, false, []byte{0x40}, true,
			[]uint32{2, 3}, false, Counters{Emitted: 3, Sent: 2, Redundant: 1}},
		{"adaptive sends slow pieces at once", Adaptive, true, []byte{0x00}, false,
			[]uint32{1, 2, 3}, false, Counters{Emitted: 3, Sent: 3}},
		{"seeders get no HAVE at all", Adaptive, true, nil, true,
			nil, false, Counters{Emitted: 3, Redundant: 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := New(Config{Mode: tt.mode, MaxHold: 50 * time.Millisecond, Pieces: func([20]byte) int { return 8 }})
			p := newPair(t, w)
			if _, err := p.c.Write(handshake(1)); err != nil {
				t.Fatal(err)
			}
			in := handshake(1)
			if tt.esir {
				in = append(in, extHandshake("ut_pex", ExtensionName)...)
			} else {
				in = append(in, extHandshake("ut_pex")...)
			}
			if tt.remoteHas == nil {
				in = append(in, msg(msgHaveAll)...)
			} else {
				in = append(in, msg(msgBitfield, tt.remoteHas...)...)
			}
			p.remoteSends(t, in)
			if tt.fast {
				// Teach the Wire a fast completion rate first (other torrent).
				for i := range 4 {
					w.pieceEmitted(time.Now(), [20]byte{9}, uint32(i))
					time.Sleep(time.Millisecond)
				}
			}
			for _, i := range []uint32{1, 2, 3} {
				if _, err := p.c.Write(have(i)); err != nil {
					t.Fatal(err)
				}
				if !tt.fast {
					time.Sleep(60 * time.Millisecond)
				}
			}
			time.Sleep(120 * time.Millisecond) // past the hard cap
			got := p.received()[68:]
			var haves []uint32
			update := false
			for _, f := range frames(t, got) {
				switch f[4] {
				case msgHave:
					haves = append(haves, binary.BigEndian.Uint32(f[5:]))
				case msgBitfield:
					update = true
					if f[5] != 0x70 { // pieces 1, 2, 3 of 8
						t.Errorf("BITFIELD update %08b, want 01110000", f[5])
					}
				}
			}
			if !equalU32(haves, tt.wantHaves) || update != tt.wantUpdate {
				t.Errorf("wire got HAVEs %v update %v, want %v update %v", haves, update, tt.wantHaves, tt.wantUpdate)
			}
			if c := p.c.counters().Counters; c != tt.wantCounters {
				t.Errorf("counters %+v, want %+v", c, tt.wantCounters)
			}
			// The cap is a timer: on a loaded machine it fires late by
			// the scheduler's delay, which is no fault of the Wire's. A
			// HAVE held past the 120 ms wait above would have failed the
			// frame check already.
			s := w.Snapshot()
			if s.HoldMax > 50*time.Millisecond+60*time.Millisecond {
				t.Errorf("a HAVE was held %v, far longer than the 50 ms cap", s.HoldMax)
			}
		})
	}
}

func equalU32(a, b []uint32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestParseMode(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want Mode
		err  bool
	}{{"off", Off, false}, {"redundant", Redundant, false}, {"adaptive", Adaptive, false}, {"", Adaptive, false}, {"fast", Adaptive, true}} {
		got, err := ParseMode(tt.in)
		if (err != nil) != tt.err || (!tt.err && got != tt.want) {
			t.Errorf("ParseMode(%q) = %v, %v", tt.in, got, err)
		}
		if !tt.err && tt.in != "" && got.String() != tt.in {
			t.Errorf("%v.String() = %q", got, got.String())
		}
	}
}

// TestInitialSeeding checks the seeder's side of the wire: its opening
// claims are rewritten to "nothing", it reveals at most InFlight pieces to a
// peer and to at most Slots peers, gives each piece out once before
// repeating one, and reveals more to a peer once its pieces have spread.
func TestInitialSeeding(t *testing.T) {
	tests := []struct {
		name    string
		opening []byte // what the library writes after the handshake
		want    []byte // what the remote must read instead
	}{
		{"HAVE ALL becomes HAVE NONE", msg(msgHaveAll), msg(msgHaveNone)},
		{"BITFIELD goes out zeroed", msg(msgBitfield, 0xff, 0xff), msg(msgBitfield, 0, 0)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := New(Config{Mode: Adaptive, Pieces: func([20]byte) int { return 16 },
				Seed: &SeedConfig{Slots: 2, InFlight: 2, Stale: time.Hour, Alone: time.Hour, Every: 5 * time.Millisecond}})
			var peers []*pair
			for range 3 {
				p := newPair(t, w)
				p.remoteSends(t, append(handshake(1), extHandshake(ExtensionName)...))
				if _, err := p.c.Write(append(handshake(1), tt.opening...)); err != nil {
					t.Fatal(err)
				}
				peers = append(peers, p)
			}
			revealed := func(p *pair) []uint32 {
				got := p.received()[68:]
				fs := frames(t, got)
				if len(fs) == 0 || !bytes.Equal(fs[0], tt.want) {
					t.Fatalf("opening frames %x, want %x first", got, tt.want)
				}
				var out []uint32
				for _, f := range fs[1:] {
					if f[4] != msgHave {
						t.Fatalf("unexpected frame %x", f)
					}
					out = append(out, binary.BigEndian.Uint32(f[5:]))
				}
				return out
			}
			time.Sleep(100 * time.Millisecond)
			seen := map[uint32]int{}
			served := 0
			for _, p := range peers {
				r := revealed(p)
				if len(r) > 2 {
					t.Errorf("revealed %v to one peer, want at most 2 in flight", r)
				}
				if len(r) > 0 {
					served++
				}
				for _, i := range r {
					seen[i]++
				}
			}
			if served != 2 {
				t.Errorf("%d peers got pieces, want the 2 slots used", served)
			}
			for i, n := range seen {
				if n > 1 {
					t.Errorf("piece %d revealed %d times before every piece was given once", i, n)
				}
			}
			// The first served peer downloads its pieces, and another peer
			// gets them too: its slot is free again.
			var first *pair
			for _, p := range peers {
				if len(revealed(p)) > 0 {
					first = p
					break
				}
			}
			r := revealed(first)
			var bf [2]byte
			for _, i := range r {
				bf[i/8] |= 0x80 >> (i % 8)
			}
			first.remoteSends(t, msg(msgBitfield, bf[:]...))
			for _, p := range peers {
				if p != first {
					p.remoteSends(t, msg(msgBitfield, bf[:]...))
					break
				}
			}
			time.Sleep(100 * time.Millisecond)
			// The freed slot goes to a peer (the one with fewest pieces).
			total := 0
			for _, p := range peers {
				total += len(revealed(p))
			}
			if total <= len(seen) {
				t.Errorf("after the pieces spread the seeder revealed nothing more (%d reveals)", total)
			}
			if c := first.c.counters().Counters; c.Revealed == 0 {
				t.Errorf("Revealed counter is 0")
			}
		})
	}
}

// TestInitialSeedingByteBudget checks that small pieces raise a peer's
// in-flight allowance to InFlightBytes, and that without a piece length the
// allowance stays InFlight pieces.
func TestInitialSeedingByteBudget(t *testing.T) {
	for _, tt := range []struct {
		name     string
		pieceLen int64
		want     int
	}{
		{"64 KiB pieces, 512 KiB budget", 64 << 10, 8},
		{"1 MiB pieces, 512 KiB budget", 1 << 20, 2},
		{"unknown piece length", 0, 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			w := New(Config{Mode: Adaptive, Pieces: func([20]byte) int { return 64 },
				PieceLength: func([20]byte) int64 { return tt.pieceLen },
				Seed: &SeedConfig{Slots: 1, InFlight: 2, InFlightBytes: 512 << 10, Stale: time.Hour,
					Alone: time.Hour, Every: 5 * time.Millisecond}})
			var peers []*pair
			for range 2 {
				p := newPair(t, w)
				p.remoteSends(t, append(handshake(1), extHandshake(ExtensionName)...))
				if _, err := p.c.Write(append(handshake(1), msg(msgHaveAll)...)); err != nil {
					t.Fatal(err)
				}
				peers = append(peers, p)
			}
			time.Sleep(100 * time.Millisecond)
			var got []int
			for _, p := range peers {
				got = append(got, len(frames(t, p.received()[68:]))-1) // minus the opening HAVE NONE
			}
			slices.Sort(got)
			if got[0] != 0 || got[1] != tt.want {
				t.Errorf("pieces revealed per peer %v, want [0 %d] (one slot)", got, tt.want)
			}
		})
	}
}

// TestPieceLog checks the receiver-side record of piece information: a
// HAVE or BITFIELD update for a piece this node lacks is logged, the
// opening BITFIELD and pieces already complete are not.
func TestPieceLog(t *testing.T) {
	w := New(Config{Mode: Adaptive, Pieces: func([20]byte) int { return 16 }})
	p := newPair(t, w)
	var ih [20]byte
	for i := range ih {
		ih[i] = 1
	}
	w.PieceCompleted(ih, 3)
	p.remoteSends(t, append(handshake(1), msg(msgBitfield, 0x80, 0)...)) // opening: piece 0
	p.remoteSends(t, have(3))                                            // we have it
	p.remoteSends(t, have(5))
	p.remoteSends(t, msg(msgBitfield, 0x84, 0x40)) // update: 0 (known), 5 (known), 9 new
	l := w.PieceLog()
	h := fmt.Sprintf("%x", ih)
	var got []string
	for _, e := range l.Learned[h] {
		got = append(got, fmt.Sprintf("%d/%s", e.Piece, e.Via))
	}
	if want := []string{"5/have", "9/update"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("learned %v, want %v", got, want)
	}
	if _, ok := l.Completed[h][3]; !ok {
		t.Errorf("completion of piece 3 not logged: %v", l.Completed)
	}
}

// TestEarlyHave checks that a completed piece is announced at once (not
// behind what the library queued), that the library's own HAVE for it is
// then dropped, and that off mode leaves HAVEs to the library.
func TestEarlyHave(t *testing.T) {
	for _, tt := range []struct {
		mode      Mode
		wantEarly bool
	}{{Redundant, true}, {Adaptive, true}, {Off, false}} {
		t.Run(tt.mode.String(), func(t *testing.T) {
			w := New(Config{Mode: tt.mode, Pieces: func([20]byte) int { return 8 }})
			p := newPair(t, w)
			p.remoteSends(t, append(handshake(1), msg(msgHaveNone)...))
			if _, err := p.c.Write(append(handshake(1), msg(msgHaveNone)...)); err != nil {
				t.Fatal(err)
			}
			var ih [20]byte
			for i := range ih {
				ih[i] = 1
			}
			w.PieceCompleted(ih, 2)
			time.Sleep(20 * time.Millisecond)
			early := len(p.received()) > 68+5
			if early != tt.wantEarly {
				t.Fatalf("HAVE on the wire before the library wrote it: %v, want %v", early, tt.wantEarly)
			}
			if _, err := p.c.Write(have(2)); err != nil {
				t.Fatal(err)
			}
			time.Sleep(20 * time.Millisecond)
			fs := frames(t, p.received()[68:])
			if len(fs) != 2 || !bytes.Equal(fs[1], have(2)) {
				t.Errorf("frames %x, want HAVE NONE and one HAVE 2", fs)
			}
			if c := p.c.counters().Counters; c.Emitted != 1 || c.Sent != 1 {
				t.Errorf("counters %+v, want one emitted and sent", c)
			}
		})
	}
}

// TestInitialSeedingLonePeer checks that a downloader alone in the swarm
// for Alone gets every piece revealed: nobody could take pieces from it, so
// holding them back would only slow it down.
func TestInitialSeedingLonePeer(t *testing.T) {
	w := New(Config{Mode: Adaptive, Pieces: func([20]byte) int { return 16 },
		Seed: &SeedConfig{Slots: 2, InFlight: 2, Stale: time.Hour, Alone: 50 * time.Millisecond, Every: 5 * time.Millisecond}})
	p := newPair(t, w)
	p.remoteSends(t, append(handshake(1), extHandshake(ExtensionName)...))
	if _, err := p.c.Write(append(handshake(1), msg(msgHaveAll)...)); err != nil {
		t.Fatal(err)
	}
	count := func() int {
		fs := frames(t, p.received()[68:])
		n := 0
		for _, f := range fs[1:] {
			if f[4] == msgHave {
				n++
			}
		}
		return n
	}
	time.Sleep(20 * time.Millisecond)
	if n := count(); n > 2 {
		t.Errorf("%d pieces revealed before the peer was alone for Alone, want at most 2", n)
	}
	deadline := time.Now().Add(5 * time.Second)
	for count() < 16 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := count(); n != 16 {
		t.Errorf("lone peer got %d of 16 pieces revealed, want all", n)
	}
}

// TestUploadCap checks the node-wide upload cap: writes on two connections
// together do not exceed it, and closing a connection frees a write that
// waits on the cap.
func TestUploadCap(t *testing.T) {
	const perSecond = 256 << 10
	w := New(Config{Mode: Off, UploadRate: perSecond})
	a, b := newPair(t, w), newPair(t, w)
	for _, p := range []*pair{a, b} {
		p.c.Write(handshake(1))
	}
	// A piece message's worth of bytes per write, 512 KiB in all: at 256
	// KiB/s after a 25.6 KiB burst that takes at least 1.9 s.
	chunk := msg(7, make([]byte, 8+16<<10)...)
	start := time.Now()
	var wg sync.WaitGroup
	for _, p := range []*pair{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 16 {
				if _, err := p.c.Write(chunk); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if took, least := time.Since(start), 1500*time.Millisecond; took < least {
		t.Fatalf("512 KiB went out in %v under a %d B/s cap; want at least %v", took, perSecond, least)
	}
	if got := len(a.received()) + len(b.received()); got < 2*16*len(chunk) {
		// net.Pipe writes are synchronous, so everything written was read.
		t.Fatalf("peers received %d bytes, want %d", got, 2*16*len(chunk))
	}

	// A write that must wait about 4 s returns as soon as its Conn closes.
	errc := make(chan error, 1)
	go func() { _, err := a.c.Write(make([]byte, 1<<20)); errc <- err }()
	time.Sleep(100 * time.Millisecond)
	a.c.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("write on a closed capped connection: %v, want net.ErrClosed", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a write waiting on the upload cap did not return when its connection closed")
	}
}

// TestStealHold checks that a chunk request the library moves to a second
// connection waits for the first connection's answer: the chunk arriving
// there ends it with REQUEST and CANCEL together (the remote answers with a
// REJECT and sends nothing), a REJECT there, a timeout or the first
// connection closing sends the REQUEST on.
func TestStealHold(t *testing.T) {
	req := requestFrame(msgRequest, 5, 16384, 16384)
	cancel := requestFrame(msgCancel, 5, 16384, 16384)
	piece := msg(msgPiece, append([]byte{0, 0, 0, 5, 0, 0, 0x40, 0}, make([]byte, 16384)...)...)
	setup := func(t *testing.T, hold time.Duration, yESIR bool) (*Wire, *pair, *pair) {
		w := New(Config{Mode: Adaptive, Pieces: func([20]byte) int { return 8 }, StealHold: hold})
		var ps []*pair
		for i, esir := range []bool{true, yESIR} {
			p := newPair(t, w)
			if _, err := p.c.Write(handshake(1)); err != nil {
				t.Fatal(err)
			}
			ext := extHandshake("ut_pex")
			if esir {
				ext = extHandshake("ut_pex", ExtensionName)
			}
			p.remoteSends(t, append(append(handshake(1), ext...), msg(msgHaveAll)...))
			if !waitFor(func() bool { return len(p.received()) >= handshakeLen }) {
				t.Fatalf("connection %d: no handshake written", i)
			}
			ps = append(ps, p)
		}
		x, y := ps[0], ps[1]
		if _, err := x.c.Write(req); err != nil {
			t.Fatal(err)
		}
		if !waitFor(func() bool { return bytes.Equal(x.received()[handshakeLen:], req) }) {
			t.Fatalf("the first request was not sent: %x", x.received()[handshakeLen:])
		}
		if _, err := y.c.Write(req); err != nil { // the library moves it to y
			t.Fatal(err)
		}
		return w, x, y
	}
	afterHandshake := func(p *pair) []byte { return p.received()[handshakeLen:] }
	held := func(t *testing.T, y *pair) {
		t.Helper()
		time.Sleep(20 * time.Millisecond)
		if got := afterHandshake(y); len(got) != 0 {
			t.Fatalf("the moved request went out at once: %x", got)
		}
	}

	t.Run("chunk arrives on the first connection", func(t *testing.T) {
		w, x, y := setup(t, time.Minute, true)
		held(t, y)
		x.remoteSends(t, piece)
		if _, err := y.c.Write(cancel); err != nil { // the library cancels the moved request
			t.Fatal(err)
		}
		want := append(append([]byte(nil), req...), cancel...)
		if !waitFor(func() bool { return bytes.Equal(afterHandshake(y), want) }) {
			t.Fatalf("second connection sent %x, want REQUEST+CANCEL %x", afterHandshake(y), want)
		}
		if got := w.StealCounters(); got != (StealCounters{Held: 1, Saved: 1}) {
			t.Errorf("counters %+v", got)
		}
	})
	t.Run("first connection rejects", func(t *testing.T) {
		w, x, y := setup(t, time.Minute, true)
		held(t, y)
		x.remoteSends(t, requestFrame(msgReject, 5, 16384, 16384))
		if !waitFor(func() bool { return bytes.Equal(afterHandshake(y), req) }) {
			t.Fatalf("second connection sent %x after the reject, want the REQUEST", afterHandshake(y))
		}
		if got := w.StealCounters(); got != (StealCounters{Held: 1, Released: 1}) {
			t.Errorf("counters %+v", got)
		}
	})
	t.Run("no answer in time", func(t *testing.T) {
		_, _, y := setup(t, 100*time.Millisecond, true)
		held(t, y)
		if !waitFor(func() bool { return bytes.Equal(afterHandshake(y), req) }) {
			t.Fatalf("the held request never went out: %x", afterHandshake(y))
		}
	})
	t.Run("first connection closes", func(t *testing.T) {
		_, x, y := setup(t, time.Minute, true)
		held(t, y)
		x.c.Close()
		if !waitFor(func() bool { return bytes.Equal(afterHandshake(y), req) }) {
			t.Fatalf("the held request did not go out when the first connection closed: %x", afterHandshake(y))
		}
	})
	t.Run("standard peer", func(t *testing.T) {
		w, _, y := setup(t, time.Minute, false)
		if !waitFor(func() bool { return bytes.Equal(afterHandshake(y), req) }) {
			t.Fatalf("a request to a standard client was held: %x", afterHandshake(y))
		}
		if got := w.StealCounters(); got != (StealCounters{}) {
			t.Errorf("counters %+v", got)
		}
	})
	t.Run("switched off", func(t *testing.T) {
		_, _, y := setup(t, -1, true)
		if !waitFor(func() bool { return bytes.Equal(afterHandshake(y), req) }) {
			t.Fatalf("StealHold < 0 still held: %x", afterHandshake(y))
		}
	})
}

// waitFor polls cond for up to 5 s.
func waitFor(cond func() bool) bool {
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(2 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}

// writeCounter records the length of every Write on the wrapped connection.
type writeCounter struct {
	net.Conn
	mu     sync.Mutex
	writes []int
}

func (w *writeCounter) Write(b []byte) (int, error) {
	w.mu.Lock()
	w.writes = append(w.writes, len(b))
	w.mu.Unlock()
	return w.Conn.Write(b)
}

// TestWriteGathers: what the library writes leaves in few writes, a chunk
// message whole, not a write per parsed segment (with TCP_NODELAY a lone
// length or id could leave as a packet of its own), and arrives unchanged.
func TestWriteGathers(t *testing.T) {
	a, b := net.Pipe()
	wc := &writeCounter{Conn: a}
	c := New(Config{Mode: Adaptive}).Wrap(wc)
	t.Cleanup(func() { c.Close(); b.Close() })
	var got bytes.Buffer
	done := make(chan struct{})
	go func() {
		defer close(done)
		io.Copy(&got, b)
	}()
	chunk := append([]byte{0, 0, 0, 2, 0, 0, 0x20, 0}, make([]byte, 8<<10)...) // piece 2, begin 8192
	stream := append(handshake(1), msg(msgHaveNone)...)
	stream = append(stream, msg(msgPiece, chunk...)...)
	stream = append(stream, msg(msgPiece, chunk...)...)
	stream = append(stream, msg(1)...) // unchoke
	stream = append(stream, msg(2)...) // interested
	if _, err := c.Write(stream); err != nil {
		t.Fatal(err)
	}
	c.Close()
	<-done
	if !bytes.Equal(got.Bytes(), stream) {
		t.Fatalf("the remote read %d bytes, want the %d written unchanged", got.Len(), len(stream))
	}
	wc.mu.Lock()
	defer wc.mu.Unlock()
	if len(wc.writes) > 3 {
		t.Errorf("%d writes of %v bytes for two chunk messages and four small ones, want at most 3", len(wc.writes), wc.writes)
	}
}

// TestSeederHold checks that HAVEs to an ESIR initial seeder are gathered
// for SeederHold whatever the completion rate, while a peer that may
// download the pieces gets them at once, and that the gathered HAVEs stay
// out of the hold figures, which are about piece information.
func TestSeederHold(t *testing.T) {
	for _, tt := range []struct {
		name   string
		hold   time.Duration
		gather bool
	}{
		{"gathered for SeederHold", 300 * time.Millisecond, true},
		{"negative: like any peer", -1, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			w := New(Config{Mode: Adaptive, MaxHold: 50 * time.Millisecond, SeederHold: tt.hold,
				Pieces: func([20]byte) int { return 8 }})
			seeder, peer := newPair(t, w), newPair(t, w)
			for _, p := range []*pair{seeder, peer} {
				if _, err := p.c.Write(handshake(1)); err != nil {
					t.Fatal(err)
				}
			}
			seeder.remoteSends(t, append(append(handshake(1), extHandshake(ExtensionName, SeedExtensionName)...), msg(msgHaveNone)...))
			peer.remoteSends(t, append(append(handshake(1), extHandshake(ExtensionName)...), msg(msgBitfield, 0)...))
			// Pieces complete slowly (70 ms apart, past the cap): a peer
			// that may download them hears of each at once.
			for _, i := range []uint32{1, 2, 3} {
				for _, p := range []*pair{seeder, peer} {
					if _, err := p.c.Write(have(i)); err != nil {
						t.Fatal(err)
					}
				}
				time.Sleep(70 * time.Millisecond)
			}
			kinds := func(p *pair) (haves []uint32, updates [][]byte) {
				for _, f := range frames(t, p.received()[68:]) {
					switch f[4] {
					case msgHave:
						haves = append(haves, binary.BigEndian.Uint32(f[5:]))
					case msgBitfield:
						updates = append(updates, f[5:])
					}
				}
				return haves, updates
			}
			if h, u := kinds(peer); !equalU32(h, []uint32{1, 2, 3}) || len(u) != 0 {
				t.Errorf("the downloading peer got HAVEs %v and updates %x, want HAVEs [1 2 3] at once", h, u)
			}
			h, u := kinds(seeder)
			if tt.gather {
				if len(h) != 0 || len(u) != 0 {
					t.Fatalf("the seeder got HAVEs %v and updates %x within 210 ms, want nothing before 300 ms", h, u)
				}
				if !waitFor(func() bool { _, u := kinds(seeder); return len(u) > 0 }) {
					t.Fatal("the seeder never got the gathered pieces")
				}
				if h, u := kinds(seeder); len(h) != 0 || len(u) != 1 || u[0][0] != 0x70 {
					t.Errorf("the seeder got HAVEs %v and updates %x, want one update 70 (pieces 1, 2, 3)", h, u)
				}
			} else if !equalU32(h, []uint32{1, 2, 3}) || len(u) != 0 {
				t.Errorf("the seeder got HAVEs %v and updates %x, want HAVEs [1 2 3] at once", h, u)
			}
			if s := w.Snapshot(); s.HoldMax > 50*time.Millisecond+60*time.Millisecond {
				t.Errorf("hold figures show %v: HAVEs to a seeder must not count as held piece information", s.HoldMax)
			}
		})
	}
}

func TestWindowRule(t *testing.T) {
	w := New(Config{Mode: Adaptive, MaxHold: 50 * time.Millisecond, Pieces: func([20]byte) int { return 8 }})
	now := time.Now()
	for _, tt := range []struct {
		name     string
		interval time.Duration
		since    time.Duration // since the last completion
		want     time.Duration
	}{
		{"fast: eight intervals", 3 * time.Millisecond, 0, 24 * time.Millisecond},
		{"very fast: the minimum", 200 * time.Microsecond, 0, 5 * time.Millisecond},
		{"eight intervals past the cap: the cap less a tenth", 10 * time.Millisecond, 0, 45 * time.Millisecond},
		{"slower than the cap: at once", 60 * time.Millisecond, 0, 0},
		{"the last completion long past: at once", 3 * time.Millisecond, 80 * time.Millisecond, 0},
	} {
		w.mu.Lock()
		w.interval, w.last = tt.interval, now.Add(-tt.since)
		got := w.windowLocked(now)
		w.mu.Unlock()
		if got != tt.want {
			t.Errorf("%s: window %v, want %v", tt.name, got, tt.want)
		}
	}
	off := New(Config{Mode: Redundant, MaxHold: 50 * time.Millisecond})
	off.interval, off.last = 3*time.Millisecond, now
	if got := off.windowLocked(now); got != 0 {
		t.Errorf("redundant mode holds for %v, want never", got)
	}
}
