package swarm

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esir-project/esir/swarm/havewire"
	"github.com/esir-project/esir/swarm/tracker"
)

func TestInfoSharePick(t *testing.T) {
	s := newInfoShare(InfoShareConfig{Direct: 2, PerPeer: 2, Hold: time.Second})
	var ih [20]byte
	node := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}), 6881)
	}
	now := time.Now()
	pick := func(req netip.AddrPort, holders []netip.AddrPort, at time.Time, force bool) (netip.AddrPort, bool) {
		return s.pick(ih, req, holders, at, force)
	}

	// Nobody has it: two nodes at a time from the server, the next waits.
	for i := 1; i <= 2; i++ {
		if from, ok := pick(node(i), nil, now, false); !ok || from.IsValid() {
			t.Fatalf("node %d with no holder: from %v ok %v, want the server", i, from, ok)
		}
	}
	if from, ok := pick(node(3), nil, now, false); ok {
		t.Fatalf("third node with two served and no holder: from %v, want to wait", from)
	}
	if from, ok := pick(node(3), nil, now, true); !ok || from.IsValid() {
		t.Fatalf("forced: from %v ok %v, want the server", from, ok)
	}

	// Node 1 announced: it takes two nodes, never itself, then the rest wait.
	holders := []netip.AddrPort{node(1)}
	if from, ok := pick(node(1), holders, now, false); ok && from == node(1) {
		t.Fatal("node 1 was sent to itself")
	}
	for i := 4; i <= 5; i++ {
		if from, ok := pick(node(i), holders, now, false); !ok || from != node(1) {
			t.Fatalf("node %d: from %v ok %v, want node 1", i, from, ok)
		}
	}
	if from, ok := pick(node(6), holders, now, false); ok {
		t.Fatalf("node 6 with node 1 busy: from %v, want to wait", from)
	}
	// Node 4 announced: node 1 has room again, and node 4 is a holder.
	holders = append(holders, node(4))
	seen := map[netip.AddrPort]int{}
	for i := 6; i <= 8; i++ {
		from, ok := pick(node(i), holders, now, false)
		if !ok || (from != node(1) && from != node(4)) {
			t.Fatalf("node %d: from %v ok %v, want node 1 or 4", i, from, ok)
		}
		seen[from]++
	}
	if seen[node(1)] != 1 || seen[node(4)] != 2 {
		t.Fatalf("assignments %v: want node 1 once (it still serves node 5) and node 4 twice", seen)
	}
	if from, ok := pick(node(9), holders, now, false); ok {
		t.Fatalf("node 9 with every holder busy: from %v, want to wait", from)
	}
	// Assignments that never announced expire after Hold.
	later := now.Add(2 * time.Second)
	if from, ok := pick(node(9), holders, later, false); !ok || !from.IsValid() {
		t.Fatalf("node 9 after the hold: from %v ok %v, want a holder", from, ok)
	}
}

func TestPeerPortServesInfo(t *testing.T) {
	img := testImage(t, 1<<20, 64<<10)
	s, _ := startServer(t, img)
	base := "http://" + s.Node().Addr().String()
	resp, err := http.Get(base + "/swarm/info/" + img.InfoHash)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if sum := sha1.Sum(body); resp.StatusCode != 200 || hex.EncodeToString(sum[:]) != img.InfoHash {
		t.Fatalf("GET info: status %d, SHA-1 %x, want 200 and %s", resp.StatusCode, sum, img.InfoHash)
	}
	for path, code := range map[string]int{
		"/swarm/info/0000000000000000000000000000000000000000": 404,
		"/swarm/info/xyz": 400,
		"/other":          404,
	} {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != code {
			t.Errorf("GET %s: %d, want %d", path, resp.StatusCode, code)
		}
	}
	if n := s.Node().infoServed.Load(); n != 1 {
		t.Errorf("info served %d times, want 1", n)
	}
}

// TestInfoFromPeer fetches with two nodes, the second after the first
// announced: the server sends the second to the first for the info
// dictionary. A third node is sent to a peer that serves a wrong dictionary
// and takes it from the server instead.
func TestInfoFromPeer(t *testing.T) {
	img := testImage(t, 2<<20, 64<<10)
	s, url := startServer(t, img)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var ih [20]byte
	hex.Decode(ih[:], []byte(img.InfoHash))

	a := startNode(t, havewire.Adaptive)
	resA, _ := fetchAll(t, ctx, url, "test:1", []*Node{a})
	if resA[0].InfoFrom != "server" {
		t.Fatalf("first node's info from %q, want server", resA[0].InfoFrom)
	}
	waitPeers(t, s, ih, 1)
	b := startNode(t, havewire.Adaptive)
	resB, _ := fetchAll(t, ctx, url, "test:1", []*Node{b})
	if resB[0].InfoFrom != a.Addr().String() {
		t.Fatalf("second node's info from %q, want the first node %s", resB[0].InfoFrom, a.Addr())
	}
	sameFile(t, img.Path, resB[0].Path)
	st := s.collect()
	if st.InfoServed != 1 || st.InfoToPeers != 1 || a.infoServed.Load() != 1 {
		t.Fatalf("server served %d, sent %d to peers, node a served %d: want 1, 1, 1", st.InfoServed, st.InfoToPeers, a.infoServed.Load())
	}

	// A peer with a wrong dictionary: the node checks it against the info
	// hash and falls back to the server.
	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("d4:name3:bade")) }))
	defer bad.Close()
	badAddr := netip.MustParseAddrPort(bad.Listener.Addr().String())
	// Leave the fake peer the only one with room.
	s.share = newInfoShare(InfoShareConfig{PerPeer: 1})
	s.share.grants[ih] = map[netip.AddrPort]grant{
		netip.MustParseAddrPort("127.0.0.1:1"): {from: netip.MustParseAddrPort(a.Addr().String()), at: time.Now()},
		netip.MustParseAddrPort("127.0.0.1:2"): {from: netip.MustParseAddrPort(b.Addr().String()), at: time.Now()},
	}
	if _, err := s.Tracker().Announce(tracker.Announce{InfoHash: ih, Addr: badAddr, Left: 0}); err != nil {
		t.Fatal(err)
	}
	c := startNode(t, havewire.Adaptive)
	var events []string
	var mu sync.Mutex
	d, err := c.Fetch(ctx, FetchConfig{Server: url, Image: "test:1", Out: filepath.Join(t.TempDir(), "out"),
		Progress: func(p Progress) {
			mu.Lock()
			defer mu.Unlock()
			if p.Event != "" {
				events = append(events, p.Event)
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	if len(events) == 0 || !strings.Contains(events[0], "no info dictionary from peer "+badAddr.String()) {
		t.Errorf("progress events %q: want the first to name the peer that failed", events)
	}
	mu.Unlock()
	resC, err := d.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if resC.InfoFrom != "server" {
		t.Fatalf("third node's info from %q, want server after the bad peer", resC.InfoFrom)
	}
	sameFile(t, img.Path, resC.Path)
	if st := s.collect(); st.InfoServed != 2 || st.InfoToPeers != 2 {
		t.Fatalf("server served %d, sent %d to peers: want 2 and 2", st.InfoServed, st.InfoToPeers)
	}
}

// waitPeers waits until n peers announced ih at s's tracker.
func waitPeers(t *testing.T, s *Server, ih [20]byte, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(s.Tracker().Peers(ih)) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d peers announced after 10 s, want %d", len(s.Tracker().Peers(ih)), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestPeerPortSilentClient checks that a connection that never sends a byte
// holds up neither the node's HTTP side nor its BitTorrent side: each
// accepted connection is sorted on its own.
func TestPeerPortSilentClient(t *testing.T) {
	img := testImage(t, 1<<20, 64<<10)
	s, url := startServer(t, img)
	silent, err := net.Dial("tcp", s.Node().Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + s.Node().Addr().String() + "/swarm/info/" + img.InfoHash)
	if err != nil {
		t.Fatalf("info with a silent connection open: %v", err)
	}
	resp.Body.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, _ := fetchAll(t, ctx, url, "test:1", []*Node{startNode(t, havewire.Adaptive)})
	sameFile(t, img.Path, res[0].Path)
}
