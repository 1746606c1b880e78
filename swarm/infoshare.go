package swarm

import (
	"math/rand/v2"
	"net/netip"
	"sync"
	"time"
)

// InfoShareConfig tunes where nodes take an image's info dictionary from.
// Every node needs the dictionary (the piece hashes: about 20 bytes a piece,
// 8 KB for a 12 MiB image in 32 KiB pieces, 200 KB for 10 GB in 1 MiB
// pieces) before its first piece. Fetched from the server by every node, N
// copies cross the server's link just when it starts sending the first copy
// of every piece, which paces the whole swarm. Instead the server hands it
// to a few nodes and sends the others to nodes that have it (any node that
// announced at the tracker), a few at a time, so it spreads as a tree.
type InfoShareConfig struct {
	// Direct bounds the nodes taking the dictionary from the server at
	// once while no node has it yet (2 when zero).
	Direct int
	// PerPeer bounds the nodes sent to one peer at once (2 when zero).
	PerPeer int
	// Hold is how long a node sent to a peer (or to the server) counts
	// against it if it does not announce (2 s when zero).
	Hold time.Duration
	// Wait bounds how long a request waits for a peer with room before the
	// server serves the dictionary itself (1 s when zero; negative: the
	// server always serves it).
	Wait time.Duration
}

func (c *InfoShareConfig) defaults() {
	if c.Direct <= 0 {
		c.Direct = 2
	}
	if c.PerPeer <= 0 {
		c.PerPeer = 2
	}
	if c.Hold <= 0 {
		c.Hold = 2 * time.Second
	}
	if c.Wait == 0 {
		c.Wait = time.Second
	}
}

// infoShare keeps, per image, the nodes sent somewhere for the dictionary
// that have not announced yet.
type infoShare struct {
	cfg InfoShareConfig

	mu     sync.Mutex
	grants map[[20]byte]map[netip.AddrPort]grant // by info hash, by requesting node
}

type grant struct {
	from netip.AddrPort // invalid: the server
	at   time.Time
}

func newInfoShare(cfg InfoShareConfig) *infoShare {
	cfg.defaults()
	return &infoShare{cfg: cfg, grants: map[[20]byte]map[netip.AddrPort]grant{}}
}

// pick says where node req takes ih's dictionary from, given the peers that
// have it (holders): a peer, the server (invalid address), or nowhere yet
// (ok false: ask again shortly). force makes the server the answer when no
// peer has room.
func (s *infoShare) pick(ih [20]byte, req netip.AddrPort, holders []netip.AddrPort, now time.Time, force bool) (from netip.AddrPort, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	gs := s.grants[ih]
	if gs == nil {
		gs = map[netip.AddrPort]grant{}
		s.grants[ih] = gs
	}
	has := make(map[netip.AddrPort]bool, len(holders))
	for _, h := range holders {
		has[h] = true
	}
	delete(gs, req) // asking again: the earlier answer did not work out
	load := map[netip.AddrPort]int{}
	direct := 0
	for k, g := range gs {
		if has[k] || now.Sub(g.at) > s.cfg.Hold {
			delete(gs, k) // announced, so it has the dictionary; or gone
			continue
		}
		if g.from.IsValid() {
			load[g.from]++
		} else {
			direct++
		}
	}
	var best []netip.AddrPort
	others := 0
	for _, h := range holders {
		if h == req {
			continue
		}
		others++
		l := load[h]
		if l >= s.cfg.PerPeer {
			continue
		}
		switch {
		case len(best) == 0 || l < load[best[0]]:
			best = append(best[:0], h)
		case l == load[best[0]]:
			best = append(best, h)
		}
	}
	if len(best) > 0 {
		h := best[rand.IntN(len(best))]
		gs[req] = grant{from: h, at: now}
		return h, true
	}
	if force || (others == 0 && direct < s.cfg.Direct) {
		gs[req] = grant{at: now}
		return netip.AddrPort{}, true
	}
	return netip.AddrPort{}, false
}
