// Package swarm distributes images peer-to-peer over BitTorrent inside an
// ESIR cluster. The server side (Server) seeds the store's images, runs a
// private HTTP tracker, hands out metainfo with the tracker and web seed
// filled in and serves each archive as a BEP 19 web seed. The agent side
// (Node.Fetch) downloads an image, verifies it, reports progress and keeps
// seeding until told to stop.
//
// Both sides run anacrolix/torrent tuned for a LAN (no header obfuscation,
// no uTP, no DHT, unlimited dial rate, hashing on all cores) behind
// havewire, ESIR's adaptive HAVE suppression.
package swarm

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/anacrolix/torrent"
	"github.com/anacrolix/torrent/bencode"
	"github.com/anacrolix/torrent/metainfo"
	pp "github.com/anacrolix/torrent/peer_protocol"
	"golang.org/x/time/rate"

	"github.com/esir-project/esir/swarm/havewire"
)

// Image is one image archive the swarm distributes.
type Image struct {
	Name    string `json:"name"`
	Version string `json:"version"`
	// Path is the archive file (read only, never written).
	Path string `json:"-"`
	// SHA256 is the archive's digest (hex), checked after download.
	SHA256 string `json:"sha256"`
	Size   int64  `json:"size"`
	// InfoHash is the metainfo's info hash (hex).
	InfoHash string             `json:"info_hash"`
	MetaInfo *metainfo.MetaInfo `json:"-"`
}

// Ref returns NAME:VERSION.
func (im *Image) Ref() string { return im.Name + ":" + im.Version }

// ImageFromFile describes the archive at path as an image: it hashes the
// file (SHA-256 and the BitTorrent pieces) and builds a private metainfo
// without announce URL. pieceLength 0 chooses 1 MiB.
func ImageFromFile(path, name, version string, pieceLength int64) (*Image, error) {
	if pieceLength <= 0 {
		pieceLength = 1 << 20
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("image %s:%s: %w", name, version, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("image %s:%s: %w", name, version, err)
	}
	private := true
	info := metainfo.Info{Name: filepath.Base(path), Length: st.Size(), PieceLength: pieceLength, Private: &private}
	h := sha256.New()
	info.Pieces, err = metainfo.GeneratePieces(io.TeeReader(f, h), pieceLength, nil)
	if err != nil {
		return nil, fmt.Errorf("image %s:%s: hashing %s: %w", name, version, path, err)
	}
	mi := &metainfo.MetaInfo{CreatedBy: "esir", CreationDate: st.ModTime().Unix()}
	if mi.InfoBytes, err = bencode.Marshal(info); err != nil {
		return nil, fmt.Errorf("image %s:%s: encoding metainfo: %w", name, version, err)
	}
	return &Image{Name: name, Version: version, Path: path, SHA256: hex.EncodeToString(h.Sum(nil)),
		Size: st.Size(), InfoHash: mi.HashInfoBytes().HexString(), MetaInfo: mi}, nil
}

// ImageFromTorrent describes the archive at path with an existing metainfo
// file (an image store's image.torrent) and the archive's known digest.
func ImageFromTorrent(path, torrentPath, name, version, sha string) (*Image, error) {
	mi, err := metainfo.LoadFromFile(torrentPath)
	if err != nil {
		return nil, fmt.Errorf("image %s:%s: reading %s: %w", name, version, torrentPath, err)
	}
	info, err := mi.UnmarshalInfo()
	if err != nil {
		return nil, fmt.Errorf("image %s:%s: %s: %w", name, version, torrentPath, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("image %s:%s: %w", name, version, err)
	}
	if st.Size() != info.TotalLength() {
		return nil, fmt.Errorf("image %s:%s: %s is %d bytes, its metainfo %s says %d", name, version, path, st.Size(), torrentPath, info.TotalLength())
	}
	return &Image{Name: name, Version: version, Path: path, SHA256: sha, Size: st.Size(),
		InfoHash: mi.HashInfoBytes().HexString(), MetaInfo: mi}, nil
}

// NodeConfig tunes a Node.
type NodeConfig struct {
	// Listen is the TCP address for peer connections (":0" for any port).
	Listen string
	// Mode is the HAVE suppression mode (adaptive by default).
	Mode havewire.Mode
	// MaxHold caps how long a HAVE is held (havewire.DefaultMaxHold when 0).
	MaxHold time.Duration
	// MaxConns bounds established peer connections per image
	// (DefaultMaxConns when 0; a seeder may want more).
	MaxConns int
	// MaxRequests bounds the chunk requests this node keeps outstanding
	// with one peer (DefaultMaxRequests when 0). The library would keep up
	// to the peer's advertised queue (250 or more); on a LAN a few chunks per
	// peer fill the pipe, and a long queue only makes the library steal
	// requests between peers and cancel chunks already on the wire. Below
	// this bound each peer's depth follows the rate it delivers (depth.go).
	MaxRequests int
	// StealHold bounds how long a chunk request the library moves between
	// two ESIR peers' connections waits for the first one's answer, so a
	// chunk already on its way is not sent twice (havewire.DefaultStealHold
	// when 0; negative: requests move at once).
	StealHold time.Duration
	// ChunkSize is the size of the blocks the node requests, in bytes
	// (DefaultChunkSize when 0).
	ChunkSize int
	// MaxUnverified bounds bytes received but not yet hashed (64 MiB when 0).
	MaxUnverified int64
	// UploadRate caps piece upload in bytes per second (0: unlimited).
	UploadRate int64
	// Seeder marks a node that only uploads (the server).
	Seeder bool
	// Seed, when set, makes the node an initial seeder (BEP 16 style): it
	// reveals pieces to a few peers at a time so they take most bytes from
	// each other. Nil: it advertises every piece to every peer.
	Seed *havewire.SeedConfig
	Log  *slog.Logger
}

// DefaultMaxConns is NodeConfig.MaxConns' default for a node that
// downloads. Every connection shares the node's link, and a piece's HAVE and
// a chunk's REQUEST wait behind what that connection has queued: with a few
// connections each runs fast and their queues are short. On a 32-node swarm
// of 10 Mbit/s links, 8 connections per node finished in 1.44 x F/B where 35
// took 1.66 x at half the rate, with half the CPU.
const DefaultMaxConns = 8

// DefaultChunkSize is NodeConfig.ChunkSize's default: half BitTorrent's
// usual 16 KiB request. A HAVE or REQUEST written to a connection waits for
// the block being sent on it, at that connection's share of the node's
// link. On a 32-node swarm of 2.5 Mbit/s links, 8 KiB blocks cut the p99
// piece-information delay from 1.01 s to about 0.53 s and the last node's time
// from 1.35 to 1.28 x F/B at the same CPU; 4 KiB blocks cut the delay to
// 0.21 s but made the nodes' CPU the bottleneck.
const DefaultChunkSize = 8 << 10

// DefaultMaxRequests is NodeConfig.MaxRequests' default.
const DefaultMaxRequests = 32

// Node is one BitTorrent participant: an anacrolix client behind havewire.
type Node struct {
	cfg  NodeConfig
	cl   *torrent.Client
	wire *havewire.Wire
	ln   net.Listener
	log  *slog.Logger

	mu       sync.Mutex
	torrents map[metainfo.Hash]*torrent.Torrent
	received map[string]int64 // useful bytes received by remote IP
	closed   map[string]int   // connections closed by remote IP
	depths   depths           // request depth per peer connection

	web        *http.Server // info dictionaries on the peer port (peerport.go)
	httpc      *http.Client // a fetch's default client: bound to the peer address, if one is set
	infoServed atomic.Int64 // info dictionaries served to peers
}

// NewNode starts a node listening on cfg.Listen.
func NewNode(cfg NodeConfig) (*Node, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.MaxRequests <= 0 {
		cfg.MaxRequests = DefaultMaxRequests
	}
	if cfg.MaxUnverified <= 0 {
		cfg.MaxUnverified = 64 << 20
	}
	if cfg.ChunkSize == 0 {
		cfg.ChunkSize = DefaultChunkSize
	}
	if cfg.ChunkSize < 1<<10 || cfg.ChunkSize > 16<<10 {
		// Standard clients refuse requests over 16 KiB.
		return nil, fmt.Errorf("swarm: chunk size %d bytes: want 1 KiB to 16 KiB", cfg.ChunkSize)
	}
	if cfg.Listen == "" {
		cfg.Listen = ":0"
	}
	n := &Node{cfg: cfg, log: cfg.Log, torrents: map[metainfo.Hash]*torrent.Torrent{},
		received: map[string]int64{}, closed: map[string]int{}, depths: depths{chunk: cfg.ChunkSize}}
	n.wire = havewire.New(havewire.Config{Mode: cfg.Mode, MaxHold: cfg.MaxHold, Pieces: n.pieces,
		PieceLength: n.pieceLength, Seed: cfg.Seed,
		UploadRate: cfg.UploadRate, StealHold: cfg.StealHold})

	tc := torrent.NewDefaultClientConfig()
	tc.Seed = true
	tc.NoDHT = true
	tc.DisablePEX = true
	tc.DisableUTP = true
	tc.DisableTCP = true // havewire's listener and dialer replace the built-in ones
	tc.DisableIPv6 = false
	tc.NoDefaultPortForwarding = true
	tc.DisableWebtorrent = true
	tc.HeaderObfuscationPolicy = torrent.HeaderObfuscationPolicy{Preferred: false, RequirePreferred: true}
	tc.DialRateLimiter = rate.NewLimiter(rate.Inf, 0)
	// The library refuses every connection from a /24 for up to 15 minutes
	// after one failed incoming handshake: on a LAN one slow handshake would
	// cut a whole rack off the server.
	tc.DisableAcceptRateLimiting = true
	tc.PieceHashersPerTorrent = runtime.NumCPU()
	tc.EstablishedConnsPerTorrent = cfg.MaxConns
	tc.HalfOpenConnsPerTorrent = cfg.MaxConns
	tc.TotalHalfOpenConns = 2 * cfg.MaxConns
	tc.MaxUnverifiedBytes = cfg.MaxUnverified
	tc.DropMutuallyCompletePeers = true
	tc.NominalDialTimeout = 5 * time.Second
	tc.MinDialTimeout = time.Second
	tc.HandshakesTimeout = 5 * time.Second
	tc.Slogger = cfg.Log.With("component", "bittorrent")
	tc.Bep20 = "-ES0100-"
	tc.ExtendedHandshakeClientVersion = "esir 0.1"
	tc.DefaultStorage = noStorage{} // every image gets its own storage; nothing else is written
	maxReq := cfg.MaxRequests
	startReq := min(maxReq, startingDepth)
	tc.Callbacks.ReadExtendedHandshake = func(pc *torrent.PeerConn, m *pp.ExtendedHandshakeMessage) {
		// The library takes Reqq as the peer's limit. An ESIR peer answers
		// requests as they come, so its depth can follow its rate; a
		// standard client may answer in bursts (Transmission every few
		// hundred milliseconds) and keeps the fixed bound.
		limit := maxReq
		if _, ok := m.M[pp.ExtensionName(havewire.ExtensionName)]; ok {
			limit = startReq
			n.depths.track(pc)
		}
		if m.Reqq <= 0 || m.Reqq > limit {
			m.Reqq = limit
		}
	}
	tc.Callbacks.PeerConnAdded = append(tc.Callbacks.PeerConnAdded, func(pc *torrent.PeerConn) {
		pc.PeerMaxRequests = min(pc.PeerMaxRequests, maxReq)
		pc.LocalLtepProtocolMap.AddUserProtocol(pp.ExtensionName(havewire.ExtensionName))
		if cfg.Seed != nil {
			pc.LocalLtepProtocolMap.AddUserProtocol(pp.ExtensionName(havewire.SeedExtensionName))
		}
	})
	tc.Callbacks.ReceivedUsefulData = append(tc.Callbacks.ReceivedUsefulData, func(ev torrent.ReceivedUsefulDataEvent) {
		ip := remoteIP(ev.Peer.RemoteAddr)
		n.mu.Lock()
		n.received[ip] += int64(len(ev.Message.Piece))
		n.mu.Unlock()
		// The library holds its lock here, as wherever it reads the limit.
		if pc, ok := ev.Peer.TryAsPeerConn(); ok {
			if d := n.depths.add(pc, len(ev.Message.Piece), time.Now(), maxReq); d > 0 {
				pc.PeerMaxRequests = d
			}
		}
	})
	tc.Callbacks.PeerConnClosed = func(pc *torrent.PeerConn) {
		if pc.Torrent() == nil {
			// The library calls this for connections that failed their
			// handshake too, such as a standard client's obfuscated first
			// attempt that this node's plaintext policy refuses (the
			// client retries in plaintext). Nothing was lost.
			return
		}
		ip := remoteIP(pc.RemoteAddr)
		n.mu.Lock()
		n.closed[ip]++
		n.mu.Unlock()
		n.depths.remove(pc)
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("swarm: listening for peers on %s: %w", cfg.Listen, err)
	}
	// A node bound to one address also dials peers and the tracker from it,
	// so the addresses others learn are the ones it listens on.
	dialer := &havewire.Dialer{W: n.wire}
	if ta, ok := ln.Addr().(*net.TCPAddr); ok && !ta.IP.IsUnspecified() {
		dialer.Dialer.LocalAddr = &net.TCPAddr{IP: ta.IP}
		local := &net.Dialer{LocalAddr: &net.TCPAddr{IP: ta.IP}}
		tc.TrackerDialContext = local.DialContext
		tc.HTTPDialContext = local.DialContext
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.DialContext = local.DialContext
		n.httpc = &http.Client{Transport: tr}
	}
	cl, err := torrent.NewClient(tc)
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("swarm: starting BitTorrent client: %w", err)
	}
	pl := newPeerListener(ln)
	n.cl, n.ln = cl, pl
	n.web = &http.Server{Handler: n.peerHandler(), ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: slog.NewLogLogger(cfg.Log.Handler(), slog.LevelWarn)}
	go n.web.Serve(webListener{pl})
	cl.AddListener(n.wire.Listener(pl))
	cl.AddDialer(dialer)
	return n, nil
}

func remoteIP(a interface{ String() string }) string {
	if a == nil {
		return ""
	}
	if host, _, err := net.SplitHostPort(a.String()); err == nil {
		return host
	}
	return a.String()
}

func (n *Node) pieces(ih [20]byte) int {
	n.mu.Lock()
	t := n.torrents[ih]
	n.mu.Unlock()
	if t == nil || t.Info() == nil {
		return 0
	}
	return t.NumPieces()
}

func (n *Node) pieceLength(ih [20]byte) int64 {
	n.mu.Lock()
	t := n.torrents[ih]
	n.mu.Unlock()
	if t == nil || t.Info() == nil {
		return 0
	}
	return t.Info().PieceLength
}

// Addr returns the address peers connect to.
func (n *Node) Addr() net.Addr { return n.ln.Addr() }

// Port returns the peer listening port.
func (n *Node) Port() uint16 { return uint16(n.ln.Addr().(*net.TCPAddr).Port) }

// Wire returns the node's HAVE counters and settings.
func (n *Node) Wire() *havewire.Wire { return n.wire }

// ReceivedBy returns the useful bytes received from each remote IP.
func (n *Node) ReceivedBy() map[string]int64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make(map[string]int64, len(n.received))
	for k, v := range n.received {
		out[k] = v
	}
	return out
}

// Disconnects returns how many peer connections closed, by remote IP.
func (n *Node) Disconnects() map[string]int {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make(map[string]int, len(n.closed))
	for k, v := range n.closed {
		out[k] = v
	}
	return out
}

// BannedPeers returns the IPs banned for serving corrupt data.
func (n *Node) BannedPeers() []string {
	var out []string
	for _, s := range n.cl.BadPeerIPs() {
		if a, err := netip.ParseAddr(s); err == nil {
			s = a.Unmap().String()
		}
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	return out
}

// Close stops the node: every connection and torrent ends.
func (n *Node) Close() error {
	errs := n.cl.Close()
	errs = append(errs, n.ln.Close())
	n.web.Close()
	if n.httpc != nil {
		n.httpc.CloseIdleConnections()
	}
	return errors.Join(errs...)
}

// addTorrent adds mi with storage st, registering it for havewire.
func (n *Node) addTorrent(mi *metainfo.MetaInfo, st *fileStorage, trackers [][]string) (*torrent.Torrent, error) {
	spec, err := torrent.TorrentSpecFromMetaInfoErr(mi)
	if err != nil {
		return nil, fmt.Errorf("metainfo: %w", err)
	}
	spec.Storage = st
	st.completed = n.wire.PieceCompleted
	spec.Trackers = trackers // the server's seeder has none: it is the tracker
	spec.Webseeds = nil
	spec.ChunkSize = pp.Integer(n.cfg.ChunkSize)
	t, _, err := n.cl.AddTorrentSpec(spec)
	if err != nil {
		return nil, fmt.Errorf("adding torrent %s: %w", spec.InfoHash.HexString(), err)
	}
	n.mu.Lock()
	n.torrents[spec.InfoHash] = t
	n.mu.Unlock()
	return t, nil
}

func (n *Node) dropTorrent(ih metainfo.Hash) {
	n.mu.Lock()
	t := n.torrents[ih]
	delete(n.torrents, ih)
	n.mu.Unlock()
	if t != nil {
		t.Drop()
	}
}
