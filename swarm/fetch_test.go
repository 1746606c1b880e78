package swarm

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"io"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/esir-project/esir/swarm/tracker"
)

// rejectingSeeder is a minimal standard BitTorrent seeder (fast extension,
// no LTEP) on loopback: it announces every piece, unchokes, rejects the
// first request it gets and serves every later one, and says nothing else.
// That leaves the downloader's library in the state that stalled
// TestInteropAria2 in CI: its only connection to the peer that has the
// missing pieces is idle after a REJECT (there the REJECT acknowledged a
// CANCEL), and no HAVE, UNCHOKE or chunk will come to wake it.
type rejectingSeeder struct {
	ln       net.Listener
	ih       [20]byte
	data     []byte
	first    atomic.Bool // the first request was rejected
	rejected atomic.Int32
	served   atomic.Int32
}

func startRejectingSeeder(t *testing.T, addr string, ih [20]byte, data []byte) *rejectingSeeder {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &rejectingSeeder{ln: ln, ih: ih, data: data}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go s.serve(c)
		}
	}()
	return s
}

func (s *rejectingSeeder) serve(c net.Conn) {
	defer c.Close()
	hs := make([]byte, 68)
	if _, err := io.ReadFull(c, hs); err != nil || !bytes.Equal(hs[28:48], s.ih[:]) {
		return
	}
	out := append([]byte{19}, "BitTorrent protocol"...)
	out = append(out, 0, 0, 0, 0, 0, 0, 0, 0x04) // fast extension (BEP 6)
	out = append(out, s.ih[:]...)
	out = append(out, "-XX0000-rejectingpee"...)
	out = append(out, 0, 0, 0, 1, 14) // HAVE ALL
	out = append(out, 0, 0, 0, 1, 1)  // UNCHOKE
	if _, err := c.Write(out); err != nil {
		return
	}
	var hdr [4]byte
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		msg := make([]byte, binary.BigEndian.Uint32(hdr[:]))
		if _, err := io.ReadFull(c, msg); err != nil {
			return
		}
		if len(msg) != 13 || msg[0] != 6 { // only REQUESTs matter
			continue
		}
		req := msg[1:]
		if s.first.CompareAndSwap(false, true) {
			s.rejected.Add(1)
			if _, err := c.Write(append([]byte{0, 0, 0, 13, 16}, req...)); err != nil { // REJECT
				return
			}
			continue
		}
		index, begin, length := binary.BigEndian.Uint32(req), binary.BigEndian.Uint32(req[4:]), binary.BigEndian.Uint32(req[8:])
		const pieceLen = 64 << 10
		off := int(index)*pieceLen + int(begin)
		if off+int(length) > len(s.data) {
			return
		}
		m := binary.BigEndian.AppendUint32(nil, 9+length)
		m = append(m, 7)
		m = append(m, req[:8]...)
		m = append(m, s.data[off:off+int(length)]...)
		if _, err := c.Write(m); err != nil {
			return
		}
		s.served.Add(1)
	}
}

// TestFetchReplansAfterReject checks that a download whose only useful
// connection went idle after a REJECT re-plans its requests (RequestStall)
// instead of waiting for an event that never comes.
func TestFetchReplansAfterReject(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	img := testImage(t, 256<<10, 64<<10)
	s, url := limitedServer(t, 0, img)
	// The server neither seeds nor offers its web seed: the rejecting peer
	// is the only source.
	if err := s.StopSeeding("test:1"); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(img.Path)
	if err != nil {
		t.Fatal(err)
	}
	var ih [20]byte
	hex.Decode(ih[:], []byte(img.InfoHash))
	peer := startRejectingSeeder(t, "127.0.0.81:0", ih, data)
	addr := netip.MustParseAddrPort(peer.ln.Addr().String())
	if _, err := s.Tracker().Announce(tracker.Announce{InfoHash: ih, Addr: addr}); err != nil {
		t.Fatal(err)
	}
	n := nodeAt(t, "127.0.0.80")
	start := time.Now()
	r, err := fetchOn(t, ctx, n, url, "test:1", &events{}, -1).Wait(ctx)
	if err != nil {
		t.Fatalf("%v (requests rejected %d, served %d)", err, peer.rejected.Load(), peer.served.Load())
	}
	sameFile(t, img.Path, r.Path)
	if peer.rejected.Load() != 1 {
		t.Errorf("the peer rejected %d requests, want 1: the test lost its point", peer.rejected.Load())
	}
	t.Logf("complete after %v, %d chunks served", time.Since(start).Round(time.Millisecond), peer.served.Load())
}

// TestReaderSurvivesReplan reads the archive in order while requests are
// re-planned over and over: the library fails a reader that waits for data
// while download is switched off, and the re-plan switches it off for an
// instant, so without replanReader the install's unpack failed. A re-plan
// every 50 ms keeps the reader waiting through dozens of them; it is spaced
// wider than one block takes at the seeder's rate (16 ms), because a re-plan
// cancels the requests in flight and on a loaded host re-plans every 1 ms
// starved the download (CI: 48313 re-plans, stuck at 1.0 of 2 MiB).
// ESIR itself re-plans only after RequestStall without data.
func TestReaderSurvivesReplan(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	img := testImage(t, 2<<20, 64<<10)
	_, url := limitedServer(t, 512<<10, img) // about 4 s, so the reader waits often
	n := nodeAt(t, "127.0.0.82")
	d := fetchOn(t, ctx, n, url, "test:1", &events{}, -1)
	stop := make(chan struct{})
	replans := make(chan int)
	go func() {
		k := 0
		defer func() { replans <- k }()
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
				d.replan()
				k++
			}
		}
	}()
	r := d.Reader(ctx)
	got, err := io.ReadAll(r)
	r.Close()
	close(stop)
	k := <-replans
	if err != nil {
		t.Fatalf("reading through %d re-plans: %v (read %d, completed %d)", k, err, len(got), d.t.BytesCompleted())
	}
	want, err := os.ReadFile(img.Path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes through %d re-plans, not the archive's %d", len(got), k, len(want))
	}
}
