// Package tracker is ESIR's private HTTP BitTorrent tracker: announce with
// compact peer lists and an in-memory peer store limited to the info hashes
// of published images. It answers with a bounded random subset of peers,
// preferring peers on the requester's rack (when labelled) and subnet.
package tracker

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"github.com/anacrolix/torrent/bencode"
)

// Config tunes a Tracker.
type Config struct {
	// Interval is the announce interval handed to peers (10 s when zero: a LAN swarm forms fast).
	Interval time.Duration
	// MaxPeers bounds the peers returned per announce (50 when zero).
	MaxPeers int
	// SubnetBits is the prefix length that counts as "same subnet" (24 when zero).
	SubnetBits int
	Log        *slog.Logger
}

// Tracker is an http.Handler answering BitTorrent announces.
type Tracker struct {
	cfg Config

	mu     sync.Mutex
	swarms map[[20]byte]map[string]*peer // info hash -> peer key -> peer
	self   map[[20]byte]uint16           // info hash -> port of the local seeder
}

type peer struct {
	addr     netip.AddrPort
	rack     string
	left     int64
	lastSeen time.Time
}

// New returns an empty Tracker that knows no info hash yet.
func New(cfg Config) *Tracker {
	if cfg.Interval <= 0 {
		cfg.Interval = 10 * time.Second
	}
	if cfg.MaxPeers <= 0 {
		cfg.MaxPeers = 50
	}
	if cfg.SubnetBits <= 0 {
		cfg.SubnetBits = 24
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	return &Tracker{cfg: cfg, swarms: map[[20]byte]map[string]*peer{}, self: map[[20]byte]uint16{}}
}

// Allow admits announces for infoHash (a published image). A non-zero
// seedPort says a seeder runs beside the tracker on that port: every
// leecher's answer then includes it, at the address the leecher reached the
// tracker on.
func (t *Tracker) Allow(infoHash [20]byte, seedPort uint16) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.swarms[infoHash] == nil {
		t.swarms[infoHash] = map[string]*peer{}
	}
	t.self[infoHash] = seedPort
}

// Forget refuses infoHash from now on and drops its peers.
func (t *Tracker) Forget(infoHash [20]byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.swarms, infoHash)
	delete(t.self, infoHash)
}

// Announce is one parsed announce request.
type Announce struct {
	InfoHash [20]byte
	PeerID   [20]byte
	Addr     netip.AddrPort
	Left     int64
	Event    string
	NumWant  int
	Rack     string
	// Local is the tracker's own address as the announcer reached it: where
	// the local seeder is found (invalid: not known).
	Local netip.Addr
}

// ServeHTTP answers GET /announce?info_hash=...&peer_id=...&port=... with a
// bencoded compact response, or a bencoded "failure reason".
func (t *Tracker) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a, err := parseAnnounce(r)
	if err != nil {
		t.cfg.Log.Warn("tracker: bad announce", "remote", r.RemoteAddr, "err", err)
		fail(w, err.Error())
		return
	}
	if la, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
		if ap, err := netip.ParseAddrPort(la.String()); err == nil {
			a.Local = ap.Addr().Unmap()
		}
	}
	peers, err := t.Announce(a)
	if err != nil {
		t.cfg.Log.Warn("tracker: announce refused", "remote", r.RemoteAddr, "info_hash", hex.EncodeToString(a.InfoHash[:]), "err", err)
		fail(w, err.Error())
		return
	}
	compact := make([]byte, 0, 6*len(peers))
	compact6 := []byte{}
	for _, p := range peers {
		if p.Addr().Is4() {
			compact = append(compact, p.Addr().AsSlice()...)
			compact = binary.BigEndian.AppendUint16(compact, p.Port())
		} else {
			compact6 = append(compact6, p.Addr().AsSlice()...)
			compact6 = binary.BigEndian.AppendUint16(compact6, p.Port())
		}
	}
	complete, incomplete := t.counts(a.InfoHash)
	t.mu.Lock()
	iv := t.cfg.Interval
	t.mu.Unlock()
	resp := map[string]any{
		"interval":     int(iv / time.Second),
		"min interval": int(iv / time.Second / 2),
		"complete":     complete,
		"incomplete":   incomplete,
		"peers":        compact,
	}
	if len(compact6) > 0 {
		resp["peers6"] = compact6
	}
	b, err := bencode.Marshal(resp)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/plain")
	w.Write(b)
}

func fail(w http.ResponseWriter, reason string) {
	b, _ := bencode.Marshal(map[string]any{"failure reason": reason})
	w.Header().Set("Content-Type", "text/plain")
	w.Write(b)
}

func parseAnnounce(r *http.Request) (Announce, error) {
	var a Announce
	q := r.URL.Query()
	ih := q.Get("info_hash")
	if len(ih) != 20 {
		return a, fmt.Errorf("info_hash: want 20 bytes, got %d", len(ih))
	}
	copy(a.InfoHash[:], ih)
	copy(a.PeerID[:], q.Get("peer_id"))
	port, err := strconv.ParseUint(q.Get("port"), 10, 16)
	if err != nil || port == 0 {
		return a, fmt.Errorf("port %q: want 1-65535", q.Get("port"))
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return a, fmt.Errorf("remote address %q: %w", r.RemoteAddr, err)
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return a, fmt.Errorf("remote address %q: %w", r.RemoteAddr, err)
	}
	a.Addr = netip.AddrPortFrom(ip.Unmap(), uint16(port))
	if s := q.Get("left"); s != "" {
		if a.Left, err = strconv.ParseInt(s, 10, 64); err != nil {
			return a, fmt.Errorf("left %q: %w", s, err)
		}
	}
	a.Event = q.Get("event")
	a.NumWant = -1
	if s := q.Get("numwant"); s != "" {
		if a.NumWant, err = strconv.Atoi(s); err != nil {
			return a, fmt.Errorf("numwant %q: %w", s, err)
		}
	}
	a.Rack = q.Get("rack")
	return a, nil
}

// Announce records a and returns the peers to hand back (never a itself).
func (t *Tracker) Announce(a Announce) ([]netip.AddrPort, error) {
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	sw, ok := t.swarms[a.InfoHash]
	if !ok {
		return nil, fmt.Errorf("unknown info hash %x: not a published image", a.InfoHash)
	}
	key := a.Addr.String()
	for k, p := range sw {
		if now.Sub(p.lastSeen) > 2*t.cfg.Interval+10*time.Second {
			delete(sw, k)
		}
	}
	if a.Event == "stopped" {
		delete(sw, key)
		return nil, nil
	}
	sw[key] = &peer{addr: a.Addr, rack: a.Rack, left: a.Left, lastSeen: now}
	want := t.cfg.MaxPeers
	if a.NumWant >= 0 && a.NumWant < want {
		want = a.NumWant
	}
	// Three tiers: same rack, same subnet, the rest; random within each.
	subnet, _ := a.Addr.Addr().Prefix(t.cfg.SubnetBits)
	var tiers [3][]netip.AddrPort
	for k, p := range sw {
		if k == key {
			continue
		}
		if a.Left == 0 && p.left == 0 {
			continue // seeders have no use for each other
		}
		tier := 2
		switch {
		case a.Rack != "" && p.rack == a.Rack:
			tier = 0
		case subnet.IsValid() && subnet.Contains(p.addr.Addr()):
			tier = 1
		}
		tiers[tier] = append(tiers[tier], p.addr)
	}
	out := make([]netip.AddrPort, 0, want)
	if port := t.self[a.InfoHash]; port != 0 && a.Left != 0 && a.Local.IsValid() && want > 0 {
		out = append(out, netip.AddrPortFrom(a.Local, port))
	}
	for _, tier := range tiers {
		rand.Shuffle(len(tier), func(i, j int) { tier[i], tier[j] = tier[j], tier[i] })
		for _, p := range tier {
			if len(out) == want {
				return out, nil
			}
			out = append(out, p)
		}
	}
	return out, nil
}

// Peers returns the peers that announced infoHash and have not gone stale
// or stopped: each had the image's metainfo when it announced.
func (t *Tracker) Peers(infoHash [20]byte) []netip.AddrPort {
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []netip.AddrPort
	for _, p := range t.swarms[infoHash] {
		if now.Sub(p.lastSeen) <= 2*t.cfg.Interval+10*time.Second {
			out = append(out, p.addr)
		}
	}
	return out
}

func (t *Tracker) counts(ih [20]byte) (complete, incomplete int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, p := range t.swarms[ih] {
		if p.left == 0 {
			complete++
		} else {
			incomplete++
		}
	}
	return complete, incomplete
}

// SetInterval changes the announce interval handed to peers.
func (t *Tracker) SetInterval(d time.Duration) {
	if d <= 0 {
		return
	}
	t.mu.Lock()
	t.cfg.Interval = d
	t.mu.Unlock()
}
