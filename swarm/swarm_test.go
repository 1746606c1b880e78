package swarm

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esir-project/esir/swarm/havewire"
)

// testImage writes size random bytes and describes them as an image.
func testImage(t *testing.T, size int, pieceLength int64) *Image {
	t.Helper()
	dir := t.TempDir()
	path := filepath.Join(dir, "image.tar.zst")
	b := make([]byte, size)
	rand.Read(b)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	img, err := ImageFromFile(path, "test", "1", pieceLength)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// startServer runs a Server on loopback and returns it with its base URL.
func startServer(t *testing.T, imgs ...*Image) (*Server, string) {
	t.Helper()
	s, err := NewServer(ServerConfig{Node: NodeConfig{Listen: "127.0.0.1:0"}, Log: testLog(t)})
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

// serveHTTP serves s's handler on loopback and returns the base URL.
func serveHTTP(t *testing.T, s *Server) string {
	hs := httptest.NewServer(s.Handler())
	t.Cleanup(hs.Close)
	return hs.URL
}

func startNode(t *testing.T, mode havewire.Mode) *Node {
	t.Helper()
	n, err := NewNode(NodeConfig{Listen: "127.0.0.1:0", Mode: mode, Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

func sameFile(t *testing.T, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(x, y) {
		t.Fatalf("%s and %s differ", a, b)
	}
}

// fetchAll starts a fetch on every node and waits for all of them.
func fetchAll(t *testing.T, ctx context.Context, url, ref string, nodes []*Node) ([]Result, []*Download) {
	t.Helper()
	dls := make([]*Download, len(nodes))
	for i, n := range nodes {
		d, err := n.Fetch(ctx, FetchConfig{Server: url, Image: ref, Out: filepath.Join(t.TempDir(), "out")})
		if err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
		dls[i] = d
	}
	res := make([]Result, len(nodes))
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for i, d := range dls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i], errs[i] = d.Wait(ctx)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
	}
	return res, dls
}

func TestSwarmLoopback(t *testing.T) {
	tests := []struct {
		name string
		mode havewire.Mode
	}{
		{"adaptive", havewire.Adaptive},
		{"redundant", havewire.Redundant},
		{"off", havewire.Off},
	}
	img := testImage(t, 24<<20, 64<<10)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			srv, url := startServer(t, img)
			var nodes []*Node
			for range 4 {
				nodes = append(nodes, startNode(t, tt.mode))
			}
			res, _ := fetchAll(t, ctx, url, "test:1", nodes)
			var total havewire.Counters
			for i, r := range res {
				sameFile(t, img.Path, r.Path)
				c := r.Have.Total
				t.Logf("node %d: %+v from %v", i, c, r.From)
				total.Emitted += c.Emitted
				total.Sent += c.Sent
				total.Redundant += c.Redundant
				total.Coalesced += c.Coalesced
				total.Updates += c.Updates
			}
			// Initial seeding (the server's default) keeps the server's
			// upload near one copy: peers take the rest from each other.
			if sent := srv.collect().BytesSent; sent > 2*img.Size {
				t.Errorf("server sent %d bytes = %.2f x the image, want at most 2 x", sent, float64(sent)/float64(img.Size))
			} else {
				t.Logf("server sent %.2f x the image", float64(sent)/float64(img.Size))
			}
			if total.Emitted == 0 {
				t.Fatal("no HAVE counted on the wire")
			}
			if got := total.Sent + total.Redundant + total.Coalesced; got > total.Emitted {
				t.Errorf("sent+redundant+coalesced = %d > emitted %d", got, total.Emitted)
			}
			switch tt.mode {
			case havewire.Off:
				if total.Redundant != 0 || total.Coalesced != 0 || total.Sent != total.Emitted {
					t.Errorf("off mode suppressed HAVEs: %+v", total)
				}
			case havewire.Redundant:
				if total.Redundant == 0 || total.Coalesced != 0 {
					t.Errorf("redundant mode: want redundant drops and no coalescing: %+v", total)
				}
			}
		})
	}
}

func TestServerHTTP(t *testing.T) {
	img := testImage(t, 1<<20, 64<<10)
	_, url := startServer(t, img)
	tests := []struct {
		path string
		code int
	}{
		{"/swarm/images", 200},
		{"/swarm/images/test", 200},
		{"/swarm/images/test:1", 200},
		{"/swarm/images/test:2", 404},
		{"/swarm/images/test:1/torrent", 200},
		{"/swarm/webseed/" + img.InfoHash + "/image.tar.zst", 200},
		{"/swarm/webseed/0000000000000000000000000000000000000000/x", 404},
		{"/swarm/stats", 200},
		{"/swarm/metrics", 200},
	}
	for _, tt := range tests {
		resp, err := http.Get(url + tt.path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tt.code {
			t.Errorf("GET %s: %d, want %d", tt.path, resp.StatusCode, tt.code)
		}
	}
	req, _ := http.NewRequest("GET", url+"/swarm/webseed/"+img.InfoHash+"/image.tar.zst", nil)
	req.Header.Set("Range", "bytes=1000-1999")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got bytes.Buffer
	got.ReadFrom(resp.Body)
	want, _ := os.ReadFile(img.Path)
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(got.Bytes(), want[1000:2000]) {
		t.Errorf("range request: status %d, %d bytes", resp.StatusCode, got.Len())
	}
}

// TestMaxRequests checks that a node keeps at most MaxRequests chunk
// requests outstanding with a peer, whatever queue the peer advertises (the
// server's library advertises 1,024), and still completes.
func TestMaxRequests(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	img := testImage(t, 4<<20, 64<<10)
	_, url := startServer(t, img)
	n, err := NewNode(NodeConfig{Listen: "127.0.0.1:0", MaxRequests: 3, Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	d, err := n.Fetch(ctx, FetchConfig{Server: url, Image: "test:1", Out: filepath.Join(t.TempDir(), "out")})
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	for ctx.Err() == nil && d.t.BytesCompleted() < img.Size {
		for _, pc := range d.t.PeerConns() {
			// Read without the library's lock: the value is set once, at
			// connection and at the extended handshake.
			if max := pc.PeerMaxRequests; max > 3 {
				t.Fatalf("peer %s: the library may keep %d requests outstanding, want at most 3", pc.RemoteAddr, max)
			}
			seen++
		}
		time.Sleep(2 * time.Millisecond)
	}
	if seen == 0 {
		t.Fatal("never saw a peer connection while downloading")
	}
	res, err := d.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sameFile(t, img.Path, res.Path)
}

// TestChunkSize: a node requests DefaultChunkSize blocks unless told
// otherwise, counts its request depth in those blocks, and refuses block
// sizes standard clients would refuse.
func TestChunkSize(t *testing.T) {
	for _, size := range []int{512, 32 << 10} {
		if _, err := NewNode(NodeConfig{Listen: "127.0.0.1:0", ChunkSize: size, Log: testLog(t)}); err == nil ||
			!strings.Contains(err.Error(), fmt.Sprintf("chunk size %d bytes", size)) {
			t.Errorf("chunk size %d: got %v, want an error naming it", size, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	img := testImage(t, 2<<20, 64<<10)
	_, url := startServer(t, img)
	for _, size := range []int{0, 4 << 10} {
		n, err := NewNode(NodeConfig{Listen: "127.0.0.1:0", ChunkSize: size, Log: testLog(t)})
		if err != nil {
			t.Fatal(err)
		}
		d, err := n.Fetch(ctx, FetchConfig{Server: url, Image: "test:1", Out: filepath.Join(t.TempDir(), "out")})
		if err != nil {
			t.Fatal(err)
		}
		res, err := d.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		sameFile(t, img.Path, res.Path)
		st := d.t.Stats()
		chunks, got := st.ChunksReadUseful.Int64(), st.BytesReadUsefulData.Int64()
		want := cmp.Or(size, DefaultChunkSize)
		if chunks == 0 || got/chunks != int64(want) {
			t.Errorf("ChunkSize %d: %d useful bytes in %d chunks, want %d-byte chunks", size, got, chunks, want)
		}
		if n.depths.chunk != want {
			t.Errorf("ChunkSize %d: request depth counted in %d-byte chunks, want %d", size, n.depths.chunk, want)
		}
		n.Close()
	}
}
