package swarm

import (
	"context"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esir-project/esir/swarm/havewire"
	"github.com/esir-project/esir/swarm/tracker"
)

// The fault tests run every node in this process on its own loopback
// address (127.0.0.x), so peers are told apart by IP as on a real network.

func nodeAt(t *testing.T, ip string) *Node {
	t.Helper()
	n, err := NewNode(NodeConfig{Listen: ip + ":0", Mode: havewire.Adaptive, Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

func limitedServer(t *testing.T, rate int64, imgs ...*Image) (*Server, string) {
	t.Helper()
	s, err := NewServer(ServerConfig{Node: NodeConfig{Listen: "127.0.0.1:0", UploadRate: rate}, Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	for _, img := range imgs {
		if err := s.Publish(img); err != nil {
			t.Fatal(err)
		}
	}
	return s, serveHTTP(t, s)
}

// events collects progress reports.
type events struct {
	mu  sync.Mutex
	all []Progress
}

func (e *events) add(p Progress) {
	e.mu.Lock()
	e.all = append(e.all, p)
	e.mu.Unlock()
}

func (e *events) has(sub string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, p := range e.all {
		if strings.Contains(p.Event, sub) || strings.Contains(p.Err, sub) {
			return true
		}
	}
	return false
}

func fetchOn(t *testing.T, ctx context.Context, n *Node, url, ref string, ev *events, webSeedAfter time.Duration) *Download {
	t.Helper()
	d, err := n.Fetch(ctx, FetchConfig{Server: url, Image: ref, Out: filepath.Join(t.TempDir(), "out"),
		Progress: ev.add, Every: 100 * time.Millisecond, WebSeedAfter: webSeedAfter})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestFaultPeerKilledMidTransfer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	img := testImage(t, 16<<20, 256<<10)
	_, url := limitedServer(t, 8<<20, img)
	victim := nodeAt(t, "127.0.0.10")
	dv := fetchOn(t, ctx, victim, url, "test:1", &events{}, -1)
	var evs [2]events
	var dls []*Download
	for i := range 2 {
		dls = append(dls, fetchOn(t, ctx, nodeAt(t, fmt.Sprintf("127.0.0.%d", 11+i)), url, "test:1", &evs[i], -1))
	}
	for dv.Progress().Bytes < 4<<20 {
		if ctx.Err() != nil {
			t.Fatal("the victim never got 4 MiB")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if dv.Progress().Bytes == img.Size {
		t.Fatal("the victim finished before it could be killed: the test lost its point")
	}
	victim.Close() // killed mid-transfer
	for i, d := range dls {
		r, err := d.Wait(ctx)
		if err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
		sameFile(t, img.Path, r.Path)
	}
	if !evs[0].has("127.0.0.10 disconnected") && !evs[1].has("127.0.0.10 disconnected") {
		t.Error("no progress report said the killed peer disconnected")
	}
}

func TestFaultSeederGone(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	img := testImage(t, 8<<20, 256<<10)
	s, url := limitedServer(t, 0, img)
	first := nodeAt(t, "127.0.0.20")
	if _, err := fetchOn(t, ctx, first, url, "test:1", &events{}, -1).Wait(ctx); err != nil {
		t.Fatal(err)
	}
	// A full copy exists in the swarm: the server stops seeding.
	if err := s.StopSeeding("test:1"); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		n := nodeAt(t, fmt.Sprintf("127.0.0.%d", 21+i))
		r, err := fetchOn(t, ctx, n, url, "test:1", &events{}, -1).Wait(ctx)
		if err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
		sameFile(t, img.Path, r.Path)
		if r.From["127.0.0.1"] != 0 || r.From["127.0.0.20"] == 0 {
			t.Errorf("node %d got bytes %v: want them from the first node, none from the server", i, r.From)
		}
	}
}

func TestFaultCorruptPeer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	img := testImage(t, 8<<20, 256<<10)
	s, url := limitedServer(t, 2<<20, img)
	// The evil peer seeds a copy with one flipped byte in every piece and
	// claims to have everything.
	b, err := os.ReadFile(img.Path)
	if err != nil {
		t.Fatal(err)
	}
	for off := 100; off < len(b); off += 256 << 10 {
		b[off] ^= 0xff
	}
	bad := filepath.Join(t.TempDir(), "corrupt")
	if err := os.WriteFile(bad, b, 0o644); err != nil {
		t.Fatal(err)
	}
	evil := nodeAt(t, "127.0.0.66")
	st, err := openSeedStorage(bad)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := evil.addTorrent(img.MetaInfo, st, nil); err != nil {
		t.Fatal(err)
	}
	var ih [20]byte
	hex.Decode(ih[:], []byte(img.InfoHash))
	if _, err := s.Tracker().Announce(tracker.Announce{InfoHash: ih, Addr: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.66"), evil.Port())}); err != nil {
		t.Fatal(err)
	}
	var evs [2]events
	var dls []*Download
	for i := range 2 {
		dls = append(dls, fetchOn(t, ctx, nodeAt(t, fmt.Sprintf("127.0.0.%d", 30+i)), url, "test:1", &evs[i], -1))
	}
	banned := false
	for i, d := range dls {
		r, err := d.Wait(ctx)
		if err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
		sameFile(t, img.Path, r.Path)
		for _, ip := range r.Banned {
			banned = banned || ip == "127.0.0.66"
		}
		t.Logf("node %d: from %v banned %v", i, r.From, r.Banned)
	}
	if !banned {
		t.Error("the corrupt peer was not banned")
	}
	if !evs[0].has("banned for corrupt pieces") && !evs[1].has("banned for corrupt pieces") {
		t.Error("no progress report said a peer was banned")
	}
}

func TestFaultFullDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	img := testImage(t, 4<<20, 256<<10)
	_, url := limitedServer(t, 0, img)
	small := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", small).CombinedOutput(); err != nil {
		t.Skipf("cannot mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", small).Run() })
	var ev events
	full := nodeAt(t, "127.0.0.40")
	_, err := full.Fetch(ctx, FetchConfig{Server: url, Image: "test:1", Out: filepath.Join(small, "out"), Progress: ev.add})
	if err == nil || !strings.Contains(err.Error(), "no space left") || !strings.Contains(err.Error(), filepath.Join(small, "out")) {
		t.Fatalf("fetch onto a full disk: %v; want an error naming the file and the full disk", err)
	}
	if !ev.has("no space left") {
		t.Error("no progress report said the disk is full")
	}
	// A healthy node still completes.
	r, err := fetchOn(t, ctx, nodeAt(t, "127.0.0.41"), url, "test:1", &events{}, -1).Wait(ctx)
	if err != nil {
		// It stalled once in CI (no web seed fallback either, in 60 s) and
		// never in 100 runs since: keep the goroutines for the next one.
		var dump strings.Builder
		_ = pprof.Lookup("goroutine").WriteTo(&dump, 2)
		t.Logf("goroutines at the failure:\n%s", dump.String())
		t.Fatal(err)
	}
	sameFile(t, img.Path, r.Path)
}

func TestFetchUnknownImage(t *testing.T) {
	img := testImage(t, 1<<20, 256<<10)
	_, url := limitedServer(t, 0, img)
	_, err := nodeAt(t, "127.0.0.50").Fetch(context.Background(), FetchConfig{Server: url, Image: "nope:1", Out: filepath.Join(t.TempDir(), "out")})
	if err == nil || !strings.Contains(err.Error(), "nope:1") || !strings.Contains(err.Error(), "404") {
		t.Fatalf("fetching an unknown image: %v", err)
	}
}

func TestFetchDialsFromThePeerAddress(t *testing.T) {
	var mu sync.Mutex
	var from []string
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		from = append(from, remoteIP(stringer(r.RemoteAddr)))
		mu.Unlock()
		http.NotFound(w, r)
	}))
	defer api.Close()
	for _, tt := range []struct{ listen, want string }{
		{"127.0.0.51", "127.0.0.51"}, // bound: the server sees the peer address
		{"", "127.0.0.1"},            // unbound: the system's choice
	} {
		mu.Lock()
		from = nil
		mu.Unlock()
		n, err := NewNode(NodeConfig{Listen: tt.listen + ":0", Mode: havewire.Adaptive, Log: testLog(t)})
		if err != nil {
			t.Fatal(err)
		}
		_, err = n.Fetch(context.Background(), FetchConfig{Server: api.URL, Image: "x:1", Out: filepath.Join(t.TempDir(), "out")})
		n.Close()
		if err == nil {
			t.Fatalf("listen %q: fetching from a server that knows no image succeeded", tt.listen)
		}
		mu.Lock()
		got := slices.Clone(from)
		mu.Unlock()
		if len(got) == 0 || got[0] != tt.want {
			t.Errorf("listen %q: the server saw requests from %v, want %s", tt.listen, got, tt.want)
		}
	}
}

type stringer string

func (s stringer) String() string { return string(s) }
