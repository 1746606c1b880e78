package swarm

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/anacrolix/torrent"
	"github.com/anacrolix/torrent/metainfo"

	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/swarm/havewire"
	"github.com/esir-project/esir/swarm/tracker"
)

// ServerConfig tunes a Server.
type ServerConfig struct {
	// Node configures the seeder (its Listen address is the BitTorrent port).
	Node NodeConfig
	// Tracker configures the announce handler.
	Tracker tracker.Config
	// FullSeed turns initial seeding off: the seeder then advertises every
	// piece to every peer. By default (false) the seeder reveals pieces a
	// few peers and pieces at a time (Node.Seed, DefaultSeed when nil), so
	// its upload stays near one copy of each image whatever the swarm size.
	FullSeed bool
	// InfoShare tunes where nodes take an image's info dictionary from.
	InfoShare InfoShareConfig
	Log       *slog.Logger
}

// Server seeds published images, tracks their swarms and serves metainfo
// and web seeds over HTTP. Mount Handler under "/" (its paths start with
// /swarm/).
type Server struct {
	node    *Node
	tracker *tracker.Tracker
	share   *infoShare
	log     *slog.Logger

	infoDirect  atomic.Int64 // info dictionaries this server sent
	infoToPeers atomic.Int64 // nodes sent to a peer for one

	mu      sync.Mutex
	images  map[string]*published // by ref
	byHash  map[string]*published // by info hash hex
	stopped map[string]bool       // info hashes no longer seeded by this server
}

type published struct {
	img   *Image
	st    *fileStorage
	t     *torrent.Torrent
	added time.Time
}

// DefaultSeederConns bounds the server seeder's peer connections per image
// when ServerConfig.Node.MaxConns is 0: initial seeding serves a few peers at
// a time, but any node may need the seeder when the swarm lacks a piece.
const DefaultSeederConns = 64

// NewServer starts the seeder node and an empty tracker.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	cfg.Node.Seeder = true
	if cfg.Node.MaxConns <= 0 {
		cfg.Node.MaxConns = DefaultSeederConns
	}
	switch {
	case cfg.FullSeed:
		cfg.Node.Seed = nil
	case cfg.Node.Seed == nil:
		cfg.Node.Seed = &havewire.SeedConfig{}
	}
	if cfg.Node.Log == nil {
		cfg.Node.Log = cfg.Log
	}
	if cfg.Tracker.Log == nil {
		cfg.Tracker.Log = cfg.Log
	}
	n, err := NewNode(cfg.Node)
	if err != nil {
		return nil, err
	}
	return &Server{node: n, tracker: tracker.New(cfg.Tracker), share: newInfoShare(cfg.InfoShare), log: cfg.Log,
		images: map[string]*published{}, byHash: map[string]*published{}, stopped: map[string]bool{}}, nil
}

// Node returns the seeder node.
func (s *Server) Node() *Node { return s.node }

// Publish starts seeding img and admits its info hash at the tracker. The
// archive is opened read-only; nothing is written beside it.
func (s *Server) Publish(img *Image) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.images[img.Ref()]; ok {
		return fmt.Errorf("swarm: image %s already published", img.Ref())
	}
	st, err := openSeedStorage(img.Path)
	if err != nil {
		return fmt.Errorf("swarm: publishing %s: %w", img.Ref(), err)
	}
	t, err := s.node.addTorrent(img.MetaInfo, st, nil)
	if err != nil {
		st.Close()
		return fmt.Errorf("swarm: publishing %s: %w", img.Ref(), err)
	}
	p := &published{img: img, st: st, t: t, added: time.Now()}
	s.images[img.Ref()] = p
	s.byHash[img.InfoHash] = p
	var ih [20]byte
	hex.Decode(ih[:], []byte(img.InfoHash))
	s.tracker.Allow(ih, s.node.Port())
	s.log.Info("swarm: seeding image", "image", img.Ref(), "info_hash", img.InfoHash, "size", img.Size, "path", img.Path)
	return nil
}

// StopSeeding stops seeding ref over BitTorrent while its tracker swarm and
// web seed stay available (the rollout's nodes carry it on).
func (s *Server) StopSeeding(ref string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.images[ref]
	if !ok {
		return fmt.Errorf("swarm: image %s is not published", ref)
	}
	s.node.dropTorrent(p.t.InfoHash())
	var ih [20]byte
	hex.Decode(ih[:], []byte(p.img.InfoHash))
	s.tracker.Allow(ih, 0)
	s.stopped[p.img.InfoHash] = true
	s.log.Info("swarm: stopped seeding image", "image", ref)
	return nil
}

// Close stops seeding and closes the archives.
func (s *Server) Close() error {
	err := s.node.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.images {
		p.st.Close()
	}
	return err
}

func (s *Server) lookup(ref string) (*published, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if p, ok := s.images[ref]; ok {
		return p, nil
	}
	if !strings.Contains(ref, ":") {
		var best *published
		for _, p := range s.images {
			if p.img.Name == ref && (best == nil || p.added.After(best.added)) {
				best = p
			}
		}
		if best != nil {
			return best, nil
		}
	}
	return nil, fmt.Errorf("image %q is not published", ref)
}

// Handler serves:
//
//	GET /swarm/announce                  BitTorrent HTTP tracker
//	GET /swarm/images                    published images (JSON)
//	GET /swarm/images/{ref}              one image (JSON)
//	GET /swarm/images/{ref}/torrent      metainfo with announce and url-list filled in
//	GET /swarm/images/{ref}/source       where to take the info dictionary from, with announce and url-list (JSON)
//	GET /swarm/images/{ref}/info         the info dictionary
//	GET /swarm/webseed/{infohash}/{name} the archive (BEP 19 web seed, Range)
//	GET /swarm/stats                     seeder HAVE and peer counters (JSON)
//	GET /swarm/metrics                   the same as Prometheus text
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /swarm/announce", s.tracker)
	mux.HandleFunc("GET /swarm/images", s.listImages)
	mux.HandleFunc("GET /swarm/images/{ref}", s.getImage)
	mux.HandleFunc("GET /swarm/images/{ref}/torrent", s.getTorrent)
	mux.HandleFunc("GET /swarm/images/{ref}/source", s.getSource)
	mux.HandleFunc("GET /swarm/images/{ref}/info", s.getInfo)
	mux.HandleFunc("GET /swarm/webseed/{ih}/{name}", s.webSeed)
	mux.HandleFunc("GET /swarm/stats", s.stats)
	mux.HandleFunc("GET /swarm/metrics", s.metrics)
	return mux
}

func (s *Server) listImages(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	out := make([]*Image, 0, len(s.images))
	for _, p := range s.images {
		out = append(out, p.img)
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Ref() < out[j].Ref() })
	writeJSON(w, out)
}

func (s *Server) getImage(w http.ResponseWriter, r *http.Request) {
	p, err := s.lookup(r.PathValue("ref"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	writeJSON(w, p.img)
}

// base is this server's URL as the client reached it.
func base(r *http.Request) string {
	if r.TLS != nil {
		return "https://" + r.Host
	}
	return "http://" + r.Host
}

// urls returns the announce URL and web seed list for p, addressed the way
// the client reached the server. A "rack" query parameter is passed on to
// the tracker.
func (s *Server) urls(r *http.Request, p *published) (announce string, urlList []string) {
	base := base(r)
	announce = base + "/swarm/announce"
	if rack := r.URL.Query().Get("rack"); rack != "" {
		announce += "?rack=" + url.QueryEscape(rack)
	}
	return announce, []string{base + "/swarm/webseed/" + p.img.InfoHash + "/"}
}

// getTorrent hands out the image's metainfo with this server's tracker and
// web seed (see urls).
func (s *Server) getTorrent(w http.ResponseWriter, r *http.Request) {
	p, err := s.lookup(r.PathValue("ref"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	announce, urlList := s.urls(r, p)
	mi := *p.img.MetaInfo
	mi.Announce = announce
	mi.AnnounceList = metainfo.AnnounceList{{announce}}
	mi.UrlList = urlList
	s.infoDirect.Add(1)
	w.Header().Set("Content-Type", "application/x-bittorrent")
	w.Header().Set("Content-Disposition", fmt.Sprintf("attachment; filename=%q", p.img.Name+"-"+p.img.Version+".torrent"))
	if err := mi.Write(w); err != nil {
		s.log.Warn("swarm: writing metainfo", "image", p.img.Ref(), "err", err)
	}
}

// InfoSource is what GET /swarm/images/{ref}/source answers: the rest of the
// metainfo, and where the info dictionary is (its SHA-1 is the image's
// info hash).
type InfoSource struct {
	Announce string   `json:"announce"`
	URLList  []string `json:"url_list"`
	// Info is the dictionary's URL: at a peer (GET /swarm/info/{infohash}
	// on its peer port) or at this server.
	Info string `json:"info"`
	// Peer is the peer's address, empty for the server.
	Peer string `json:"peer,omitempty"`
}

// getSource tells a node where to take the image's info dictionary from
// (see InfoShareConfig). The node names its peer port ("port"), so that its
// own announce later shows it has the dictionary. While every peer that has
// it already serves others, the request waits, up to InfoShareConfig.Wait.
func (s *Server) getSource(w http.ResponseWriter, r *http.Request) {
	p, err := s.lookup(r.PathValue("ref"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		http.Error(w, "remote address "+r.RemoteAddr+": "+err.Error(), http.StatusBadRequest)
		return
	}
	req := netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	if ps := r.URL.Query().Get("port"); ps != "" {
		port, err := strconv.ParseUint(ps, 10, 16)
		if err != nil || port == 0 {
			http.Error(w, "port "+ps+": want 1-65535", http.StatusBadRequest)
			return
		}
		req = netip.AddrPortFrom(req.Addr(), uint16(port))
	}
	var ih [20]byte
	hex.Decode(ih[:], []byte(p.img.InfoHash))
	cfg := s.share.cfg
	deadline := time.Now().Add(cfg.Wait)
	var from netip.AddrPort
	for {
		now := time.Now()
		var ok bool
		if from, ok = s.share.pick(ih, req, s.tracker.Peers(ih), now, cfg.Wait < 0 || !now.Before(deadline)); ok {
			break
		}
		select {
		case <-r.Context().Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
	announce, urlList := s.urls(r, p)
	src := InfoSource{Announce: announce, URLList: urlList}
	if from.IsValid() {
		s.infoToPeers.Add(1)
		src.Peer = from.String()
		src.Info = "http://" + from.String() + "/swarm/info/" + p.img.InfoHash
	} else {
		src.Info = base(r) + "/swarm/images/" + url.PathEscape(p.img.Ref()) + "/info"
	}
	writeJSON(w, src)
}

// getInfo serves the image's info dictionary.
func (s *Server) getInfo(w http.ResponseWriter, r *http.Request) {
	p, err := s.lookup(r.PathValue("ref"))
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	s.infoDirect.Add(1)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Write(p.img.MetaInfo.InfoBytes)
}

// webSeed serves an archive for BEP 19 clients; http.ServeContent handles
// Range requests.
func (s *Server) webSeed(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	p := s.byHash[r.PathValue("ih")]
	s.mu.Unlock()
	if p == nil {
		http.Error(w, "unknown info hash "+r.PathValue("ih"), http.StatusNotFound)
		return
	}
	f, err := os.Open(p.img.Path)
	if err != nil {
		s.log.Error("swarm: web seed", "image", p.img.Ref(), "err", err)
		http.Error(w, "image archive unavailable", http.StatusInternalServerError)
		return
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		http.Error(w, "image archive unavailable", http.StatusInternalServerError)
		return
	}
	http.ServeContent(w, r, st.Name(), st.ModTime(), f)
}

// Stats is what /swarm/stats reports.
type Stats struct {
	Wire       any              `json:"have"`
	BytesSent  int64            `json:"bytes_sent"`
	Images     map[string]int64 `json:"bytes_sent_by_image"`
	PeerCount  int              `json:"peers"`
	BannedPeer []string         `json:"banned_peers"`
	// InfoServed counts info dictionaries (or whole .torrents) this server
	// sent; InfoToPeers the nodes it sent to a peer for one instead.
	InfoServed  int64 `json:"info_served"`
	InfoToPeers int64 `json:"info_to_peers"`
}

func (s *Server) collect() Stats {
	st := Stats{Wire: s.node.wire.Snapshot(), Images: map[string]int64{}, BannedPeer: s.node.BannedPeers(),
		InfoServed: s.infoDirect.Load(), InfoToPeers: s.infoToPeers.Load()}
	s.mu.Lock()
	defer s.mu.Unlock()
	for ref, p := range s.images {
		if s.stopped[p.img.InfoHash] {
			continue
		}
		ts := p.t.Stats()
		st.Images[ref] = ts.BytesWrittenData.Int64()
		st.BytesSent += ts.BytesWrittenData.Int64()
		st.PeerCount += ts.ActivePeers
	}
	return st
}

func (s *Server) stats(w http.ResponseWriter, r *http.Request) { writeJSON(w, s.collect()) }

func (s *Server) metrics(w http.ResponseWriter, r *http.Request) {
	st := s.collect()
	snap := s.node.wire.Snapshot()
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	fmt.Fprintf(w, "# HELP esir_swarm_have_total HAVE messages on the wire by outcome.\n# TYPE esir_swarm_have_total counter\n")
	for _, kv := range []struct {
		k string
		v int64
	}{{"emitted", snap.Total.Emitted}, {"sent", snap.Total.Sent}, {"suppressed_redundant", snap.Total.Redundant},
		{"coalesced", snap.Total.Coalesced}, {"bitfield_update", snap.Total.Updates}} {
		fmt.Fprintf(w, "esir_swarm_have_total{outcome=%q} %d\n", kv.k, kv.v)
	}
	fmt.Fprintf(w, "# HELP esir_swarm_seed_bytes_total Piece bytes uploaded by the server's seeder.\n# TYPE esir_swarm_seed_bytes_total counter\n")
	for ref, v := range st.Images {
		fmt.Fprintf(w, "esir_swarm_seed_bytes_total{image=%q} %d\n", ref, v)
	}
	fmt.Fprintf(w, "# HELP esir_swarm_info_total Nodes given an image's info dictionary, by where from.\n# TYPE esir_swarm_info_total counter\n")
	fmt.Fprintf(w, "esir_swarm_info_total{from=\"server\"} %d\nesir_swarm_info_total{from=\"peer\"} %d\n", st.InfoServed, st.InfoToPeers)
	fmt.Fprintf(w, "# HELP esir_swarm_peers Connected peers.\n# TYPE esir_swarm_peers gauge\nesir_swarm_peers %d\n", st.PeerCount)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// ImageFromStore describes a store image (its archive, stored metainfo and
// manifest digest) for seeding.
func ImageFromStore(im *imaging.Image) (*Image, error) {
	m := im.Manifest
	return ImageFromTorrent(im.ArchivePath(), im.TorrentPath(), m.Name, m.Version, m.SHA256)
}

// PublishStore publishes every image in st.
func (s *Server) PublishStore(st *imaging.Store) (int, error) {
	ms, err := st.List()
	if err != nil {
		return 0, fmt.Errorf("swarm: listing store %s: %w", st.Dir(), err)
	}
	for _, m := range ms {
		im, err := st.Get(m.Ref())
		if err != nil {
			return 0, fmt.Errorf("swarm: %w", err)
		}
		img, err := ImageFromStore(im)
		if err != nil {
			return 0, fmt.Errorf("swarm: %w", err)
		}
		if err := s.Publish(img); err != nil {
			return 0, err
		}
	}
	return len(ms), nil
}

// Tracker returns the server's tracker.
func (s *Server) Tracker() *tracker.Tracker { return s.tracker }
