package swarm

import (
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"expvar"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/anacrolix/torrent"
	"github.com/anacrolix/torrent/metainfo"

	"github.com/esir-project/esir/swarm/havewire"
)

// FetchConfig says what to fetch and how to report.
type FetchConfig struct {
	// Server is the ESIR server's base URL (http://host:port).
	Server string
	// Image is NAME[:VERSION]; the newest version when omitted.
	Image string
	// Out is the file the archive is written to.
	Out string
	// Rack labels this node for the tracker's peer selection.
	Rack string
	// WebSeedAfter falls back to the server's HTTP web seed when no byte
	// arrived for this long (10 s when zero; negative: never).
	WebSeedAfter time.Duration
	// RequestStall re-plans chunk requests on every connection when no
	// piece data arrived for this long while peers are connected (2 s when
	// zero; negative: never). See Download.replan.
	RequestStall time.Duration
	// Progress, when set, receives a report every Every (1 s when zero) and
	// on every notable event.
	Progress func(Progress)
	Every    time.Duration
	// HTTP is the client for the server's API and for info dictionaries
	// from peers (when nil: one dialing from the node's peer address if the
	// node listens on one, so a multi-homed node talks to the server from
	// the address its peers know; else http.DefaultClient).
	HTTP *http.Client
}

// Progress is one progress report.
type Progress struct {
	Image string `json:"image"`
	// Phase is fetching, verifying, seeding, done or failed.
	Phase       string        `json:"phase"`
	Bytes       int64         `json:"bytes"`
	Total       int64         `json:"total"`
	Rate        float64       `json:"rate"` // bytes per second over the last interval
	Peers       int           `json:"peers"`
	Pieces      int           `json:"pieces"`
	PiecesTotal int           `json:"pieces_total"`
	ETA         time.Duration `json:"eta_ns"`
	Uploaded    int64         `json:"uploaded"`
	// Have counts this node's HAVE messages on the wire.
	Have        havewire.Counters `json:"have"`
	HavePeakSec int64             `json:"have_peak_per_second"`
	// Event says what happened (a peer banned, the web seed fallback, an error).
	Event string `json:"event,omitempty"`
	Err   string `json:"error,omitempty"`
}

// Result is a finished download.
type Result struct {
	Image    Image             `json:"image"`
	Path     string            `json:"path"`
	Duration time.Duration     `json:"duration_ns"`
	From     map[string]int64  `json:"bytes_from"` // useful bytes by remote IP (web seed: "webseed")
	Have     havewire.Snapshot `json:"have"`
	Banned   []string          `json:"banned_peers,omitempty"`
	// Uploaded counts piece bytes this node sent to others.
	Uploaded int64 `json:"uploaded"`
	// Wasted counts piece bytes received that were not needed (a chunk
	// that came twice, or after the piece was complete).
	Wasted int64 `json:"wasted"`
	// Library holds the BitTorrent library's process-wide counters
	// (expvar "torrent"), for diagnosis.
	Library map[string]int64 `json:"library,omitempty"`
	// Pieces says when this node completed each piece and when it learned
	// of pieces from peers (for the piece-information delay).
	Pieces havewire.PieceLog `json:"pieces"`
	// InfoFrom says where the info dictionary came from: "server" or a
	// peer's address.
	InfoFrom string `json:"info_from"`
}

// Download is a running fetch; it seeds until closed.
type Download struct {
	n     *Node
	cfg   FetchConfig
	img   Image
	t     *torrent.Torrent
	st    *fileStorage
	start time.Time

	cancel context.CancelFunc
	done   chan struct{} // closed when finished (complete and verified, or failed)
	mu     sync.Mutex
	err    error
	took   time.Duration
	// infoFrom is where the info dictionary came from (Result.InfoFrom).
	infoFrom string
	last     Progress
	phase    string
}

// Fetch resolves cfg.Image at the server, reserves cfg.Out and starts the
// download. It returns once the transfer runs; use Wait for the result,
// Reader to stream the archive in order while it arrives, and Seed/Close to
// keep seeding and stop.
func (n *Node) Fetch(ctx context.Context, cfg FetchConfig) (*Download, error) {
	if cfg.HTTP == nil {
		cfg.HTTP = http.DefaultClient
		if n.httpc != nil {
			cfg.HTTP = n.httpc
		}
	}
	if cfg.Every <= 0 {
		cfg.Every = time.Second
	}
	if cfg.WebSeedAfter == 0 {
		cfg.WebSeedAfter = 10 * time.Second
	}
	if cfg.RequestStall == 0 {
		cfg.RequestStall = 2 * time.Second
	}
	base := strings.TrimSuffix(cfg.Server, "/")
	var img Image
	if err := getJSON(ctx, cfg.HTTP, base+"/swarm/images/"+url.PathEscape(cfg.Image), &img); err != nil {
		return nil, fmt.Errorf("fetch %s: %w", cfg.Image, err)
	}
	mi, from, err := n.metainfo(ctx, cfg, base, img)
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", img.Ref(), err)
	}
	img.MetaInfo = mi
	img.Path = cfg.Out
	st, err := createFetchStorage(cfg.Out, img.Size)
	if err != nil {
		err = fmt.Errorf("fetch %s on this node: %w", img.Ref(), err)
		n.log.Error("swarm: fetch failed", "image", img.Ref(), "err", err)
		if cfg.Progress != nil {
			cfg.Progress(Progress{Image: img.Ref(), Phase: "failed", Total: img.Size, Event: "cannot store the image", Err: err.Error()})
		}
		return nil, err
	}
	t, err := n.addTorrent(mi, st, [][]string{{mi.Announce}})
	if err != nil {
		st.Close()
		return nil, fmt.Errorf("fetch %s: %w", img.Ref(), err)
	}
	t.DownloadAll()
	dctx, cancel := context.WithCancel(context.Background())
	d := &Download{n: n, cfg: cfg, img: img, t: t, st: st, start: time.Now(), cancel: cancel,
		done: make(chan struct{}), phase: "fetching", infoFrom: from}
	n.log.Info("swarm: fetching image", "image", img.Ref(), "size", img.Size, "info_hash", img.InfoHash, "out", cfg.Out,
		"have_mode", n.wire.Mode().String(), "info_from", from)
	go d.run(dctx)
	return d, nil
}

// peerInfoTimeout bounds fetching an info dictionary from a peer before the
// node takes it from the server.
const peerInfoTimeout = 2 * time.Second

// metainfo assembles img's metainfo. The server says where the info
// dictionary is (a peer that has it, or the server itself; see
// InfoShareConfig) and gives the announce URL and web seeds. A dictionary a
// peer does not deliver in time, or whose SHA-1 is not the image's info
// hash, is taken from the server. It also returns where the dictionary came
// from ("server" or the peer's address).
func (n *Node) metainfo(ctx context.Context, cfg FetchConfig, base string, img Image) (*metainfo.MetaInfo, string, error) {
	ref := url.PathEscape(img.Ref())
	q := url.Values{"port": {strconv.Itoa(int(n.Port()))}}
	if cfg.Rack != "" {
		q.Set("rack", cfg.Rack)
	}
	var src InfoSource
	if err := getJSON(ctx, cfg.HTTP, base+"/swarm/images/"+ref+"/source?"+q.Encode(), &src); err != nil {
		return nil, "", err
	}
	from := "server"
	var info []byte
	var err error
	if src.Peer != "" {
		pctx, cancel := context.WithTimeout(ctx, peerInfoTimeout)
		info, err = getInfo(pctx, cfg.HTTP, src.Info, img.InfoHash)
		cancel()
		if err == nil {
			from = src.Peer
		} else {
			n.log.Warn("swarm: no info dictionary from the peer the server named; taking it from the server",
				"image", img.Ref(), "peer", src.Peer, "err", err)
			if cfg.Progress != nil {
				cfg.Progress(Progress{Image: img.Ref(), Phase: "fetching", Total: img.Size,
					Event: "no info dictionary from peer " + src.Peer + "; taken from the server", Err: err.Error()})
			}
		}
	}
	if info == nil {
		if info, err = getInfo(ctx, cfg.HTTP, base+"/swarm/images/"+ref+"/info", img.InfoHash); err != nil {
			return nil, "", err
		}
	}
	return &metainfo.MetaInfo{InfoBytes: info, Announce: src.Announce,
		AnnounceList: metainfo.AnnounceList{{src.Announce}}, UrlList: src.URLList}, from, nil
}

// getInfo fetches an info dictionary and checks it against infoHash.
func getInfo(ctx context.Context, c *http.Client, u, infoHash string) ([]byte, error) {
	body, err := get(ctx, c, u)
	if err != nil {
		return nil, err
	}
	if sum := sha1.Sum(body); hex.EncodeToString(sum[:]) != infoHash {
		return nil, fmt.Errorf("GET %s: the info dictionary's SHA-1 is %x, the image's info hash %s", u, sum, infoHash)
	}
	return body, nil
}

// run watches the transfer until it completes, fails or is closed.
func (d *Download) run(ctx context.Context) {
	tick := time.NewTicker(d.cfg.Every)
	defer tick.Stop()
	// The stall watch looks several times per RequestStall, whatever the
	// report period.
	var replanC <-chan time.Time
	if d.cfg.RequestStall > 0 {
		replan := time.NewTicker(max(d.cfg.RequestStall/4, 10*time.Millisecond))
		defer replan.Stop()
		replanC = replan.C
	}
	var (
		useful       int64 // piece bytes received, for the stall watch
		usefulAt     = time.Now()
		stalled      bool
		lastBytes    int64
		lastAt       = time.Now()
		lastProgress = time.Now()
		webSeed      bool
		banned       = map[string]bool{}
		gone         = map[string]int{}
		complete     = d.t.Complete().On()
		finished     bool
	)
	for {
		select {
		case <-ctx.Done():
			if !finished {
				d.finish(fmt.Errorf("fetch %s: stopped before completion: %w", d.img.Ref(), ctx.Err()))
			}
			return
		case <-complete:
			complete = nil
			d.setPhase("verifying")
			d.report("", "")
			if err := d.verify(); err != nil {
				d.finish(err)
				d.report("verification failed", err.Error())
				return
			}
			finished = true
			d.finish(nil)
			d.setPhase("seeding")
			d.n.log.Info("swarm: image complete and verified", "image", d.img.Ref(), "took", d.took.Round(time.Millisecond),
				"from", d.n.ReceivedBy())
			d.report("complete and verified", "")
		case now := <-replanC:
			if finished || d.st.Err() != nil {
				continue
			}
			ts := d.t.Stats()
			if b := ts.BytesReadUsefulData.Int64(); b != useful {
				useful, usefulAt, stalled = b, now, false
				continue
			}
			if now.Sub(usefulAt) < d.cfg.RequestStall || ts.ActivePeers == 0 {
				continue
			}
			if !stalled {
				d.n.log.Info("swarm: no piece data from connected peers; re-planning requests", "image", d.img.Ref(),
					"idle", now.Sub(usefulAt).Round(100*time.Millisecond), "peers", ts.ActivePeers)
			}
			stalled, usefulAt = true, now // again after another RequestStall
			d.replan()
			continue
		case <-tick.C:
		}
		if err := d.st.Err(); err != nil && !finished {
			err = fmt.Errorf("fetch %s on this node: %w", d.img.Ref(), err)
			d.n.log.Error("swarm: fetch failed", "image", d.img.Ref(), "err", err)
			d.n.dropTorrent(d.t.InfoHash())
			d.finish(err)
			d.report("cannot store the image", err.Error())
			return
		}
		var events []string
		for _, ip := range d.n.BannedPeers() {
			if !banned[ip] {
				banned[ip] = true
				d.n.log.Warn("swarm: peer banned: it served pieces that failed the hash check; refetching them from others",
					"image", d.img.Ref(), "peer", ip)
				events = append(events, "peer "+ip+" banned for corrupt pieces")
			}
		}
		if !finished {
			for ip, c := range d.n.Disconnects() {
				if c > gone[ip] {
					gone[ip] = c
					d.n.log.Info("swarm: peer disconnected; its pieces are requested from others", "image", d.img.Ref(), "peer", ip)
					events = append(events, "peer "+ip+" disconnected")
				}
			}
		}
		b := d.t.BytesCompleted()
		now := time.Now()
		if b != lastBytes {
			lastProgress = now
		}
		if !finished && !webSeed && d.cfg.WebSeedAfter > 0 && now.Sub(lastProgress) > d.cfg.WebSeedAfter && len(d.img.MetaInfo.UrlList) > 0 {
			webSeed = true
			d.n.log.Warn("swarm: no data from peers, falling back to the server's web seed", "image", d.img.Ref(),
				"idle", now.Sub(lastProgress).Round(time.Second), "url", d.img.MetaInfo.UrlList[0])
			d.t.AddWebSeeds(d.img.MetaInfo.UrlList)
			events = append(events, "web seed fallback")
		}
		rate := float64(b-lastBytes) / now.Sub(lastAt).Seconds()
		lastBytes, lastAt = b, now
		d.reportRate(strings.Join(events, "; "), "", rate)
	}
}

// replan makes the BitTorrent library plan its chunk requests afresh on
// every connection. The library plans them only when a peer says something
// (HAVE, BITFIELD, UNCHOKE, a chunk arriving) and has no periodic refresh.
// After a REJECT (BEP 6) it deliberately adds no request to that connection,
// waiting for the peer to unchoke again; but a peer acknowledges each of our
// CANCELs with a REJECT too, and the library cancels requests whenever it
// moves them to a faster peer. If the last REJECT leaves the connection to
// the only peer that has our missing pieces idle, and that peer has nothing
// new to announce (a seeder that announced every piece), those pieces are
// never requested and the download stalls with its connections open.
// Disallowing and allowing data download is the library's public way to
// re-plan every connection; it cancels outstanding requests, which after
// RequestStall without data are stuck anyway.
func (d *Download) replan() {
	d.t.DisallowDataDownload()
	d.t.AllowDataDownload()
}

func (d *Download) setPhase(p string) {
	d.mu.Lock()
	d.phase = p
	d.mu.Unlock()
}

func (d *Download) finish(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	select {
	case <-d.done:
		return
	default:
	}
	d.err = err
	d.took = time.Since(d.start)
	if err != nil {
		d.phase = "failed"
	}
	close(d.done)
}

func (d *Download) report(event, errText string) { d.reportRate(event, errText, -1) }

func (d *Download) reportRate(event, errText string, rate float64) {
	p := d.Progress()
	if rate >= 0 {
		p.Rate = rate
		if rate > 0 {
			p.ETA = time.Duration(float64(p.Total-p.Bytes) / rate * float64(time.Second))
		}
	} else {
		d.mu.Lock()
		p.Rate = d.last.Rate
		d.mu.Unlock()
	}
	p.Event, p.Err = event, errText
	d.mu.Lock()
	d.last = p
	d.mu.Unlock()
	if d.cfg.Progress != nil {
		d.cfg.Progress(p)
	}
}

// Progress returns the download's state now.
func (d *Download) Progress() Progress {
	ts := d.t.Stats()
	snap := d.n.wire.Snapshot()
	d.mu.Lock()
	phase := d.phase
	d.mu.Unlock()
	return Progress{Image: d.img.Ref(), Phase: phase, Bytes: d.t.BytesCompleted(), Total: d.img.Size,
		Peers: ts.ActivePeers, Pieces: ts.PiecesComplete, PiecesTotal: d.t.NumPieces(),
		Uploaded: ts.BytesWrittenData.Int64(), Have: snap.Total, HavePeakSec: snap.PeakPerSecond}
}

// libraryCounters reads the BitTorrent library's expvar counters.
func libraryCounters() map[string]int64 {
	m, ok := expvar.Get("torrent").(*expvar.Map)
	if !ok {
		return nil
	}
	out := map[string]int64{}
	m.Do(func(kv expvar.KeyValue) {
		if v, ok := kv.Value.(*expvar.Int); ok {
			out[kv.Key] = v.Value()
		}
	})
	return out
}

// verify checks the finished file's SHA-256 against the image's digest.
func (d *Download) verify() error {
	if d.img.SHA256 == "" {
		return nil
	}
	f, err := os.Open(d.cfg.Out)
	if err != nil {
		return fmt.Errorf("fetch %s: verifying: %w", d.img.Ref(), err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return fmt.Errorf("fetch %s: verifying %s: %w", d.img.Ref(), d.cfg.Out, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != d.img.SHA256 {
		return fmt.Errorf("fetch %s: %s has sha256 %s, the image's manifest says %s", d.img.Ref(), d.cfg.Out, got, d.img.SHA256)
	}
	return nil
}

// Wait blocks until the image is complete and verified (or failed) and
// returns the result. The download keeps seeding.
func (d *Download) Wait(ctx context.Context) (Result, error) {
	select {
	case <-ctx.Done():
		return Result{}, ctx.Err()
	case <-d.done:
	}
	d.mu.Lock()
	err, took := d.err, d.took
	d.mu.Unlock()
	ts := d.t.Stats()
	res := Result{Image: d.img, Path: d.cfg.Out, Duration: took, InfoFrom: d.infoFrom, From: d.n.ReceivedBy(), Have: d.n.wire.Snapshot(),
		Banned: d.n.BannedPeers(), Uploaded: ts.BytesWrittenData.Int64(), Pieces: d.n.wire.PieceLog(),
		Wasted: ts.BytesReadData.Int64() - ts.BytesReadUsefulData.Int64(), Library: libraryCounters()}
	slices.Sort(res.Banned)
	return res, err
}

// Reader returns an in-order reader of the archive that blocks until the
// next bytes have arrived and been verified, prioritising the pieces just
// ahead of it. The swarm keeps downloading every piece meanwhile.
func (d *Download) Reader(ctx context.Context) io.ReadCloser {
	r := d.t.NewReader()
	r.SetContext(ctx)
	r.SetReadahead(32 << 20)
	return &replanReader{Reader: r, ctx: ctx}
}

// replanReader reads on through a re-plan: replan switches the torrent's
// data download off and on again, and the library fails a reader waiting
// for data in that instant ("torrent data downloading disabled"). Nothing
// else in ESIR switches it off, so the reader waits briefly and reads again.
type replanReader struct {
	torrent.Reader
	ctx context.Context
}

func (r *replanReader) Read(p []byte) (int, error) {
	for {
		n, err := r.Reader.Read(p)
		if n > 0 || err == nil || err.Error() != "torrent data downloading disabled" {
			return n, err
		}
		select {
		case <-r.ctx.Done():
			return 0, r.ctx.Err()
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Seed keeps seeding until ctx ends or for at most dur (forever when dur is
// 0), then stops the download. It reports "done" when it stops.
func (d *Download) Seed(ctx context.Context, dur time.Duration) {
	var timeout <-chan time.Time
	if dur > 0 {
		tm := time.NewTimer(dur)
		defer tm.Stop()
		timeout = tm.C
	}
	select {
	case <-ctx.Done():
	case <-timeout:
	}
	d.Close()
}

// Close stops downloading and seeding and closes the output file.
func (d *Download) Close() error {
	d.cancel()
	d.n.dropTorrent(d.t.InfoHash())
	<-d.done
	d.setPhase("done")
	d.report("stopped seeding", "")
	return d.st.Close()
}

func get(ctx context.Context, c *http.Client, u string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", u, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s: %s", u, resp.Status, strings.TrimSpace(string(body)))
	}
	return body, nil
}

func getJSON(ctx context.Context, c *http.Client, u string, v any) error {
	body, err := get(ctx, c, u)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("GET %s: %w", u, err)
	}
	return nil
}
