package tracker

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/anacrolix/torrent/bencode"
)

var ih = [20]byte{1, 2, 3}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func TestAnnounce(t *testing.T) {
	tr := New(Config{MaxPeers: 3, Interval: time.Minute})
	tr.Allow(ih, 6881)
	// Peers of three kinds: same rack, same /24, elsewhere.
	for _, a := range []Announce{
		{Addr: ap("198.18.1.10:1"), Left: 1, Rack: "r1"},
		{Addr: ap("198.18.1.11:1"), Left: 1, Rack: "r1"},
		{Addr: ap("198.18.0.20:1"), Left: 1},
		{Addr: ap("198.18.0.21:1"), Left: 1},
		{Addr: ap("198.18.2.30:1"), Left: 0},
	} {
		a.InfoHash = ih
		if _, err := tr.Announce(a); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name string
		a    Announce
		want []string // the answer must start with these, in this order of tiers
		n    int
	}{
		{"leecher gets the local seeder then its rack", Announce{Addr: ap("198.18.0.99:1"), Left: 5, Rack: "r1", Local: netip.MustParseAddr("198.18.0.1")},
			[]string{"198.18.0.1:6881", "198.18.1.1"}, 3},
		{"subnet preferred without rack", Announce{Addr: ap("198.18.0.99:1"), Left: 5},
			[]string{"198.18.0.2", "198.18.0.2"}, 3},
		{"numwant bounds the answer", Announce{Addr: ap("198.18.0.99:1"), Left: 5, NumWant: 1},
			[]string{"198.18.0.2"}, 1},
		{"a seeder gets no seeders and not the local seeder", Announce{Addr: ap("198.18.9.9:1"), Left: 0, Local: netip.MustParseAddr("198.18.0.1")},
			nil, 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.a.InfoHash = ih
			if tt.a.NumWant == 0 {
				tt.a.NumWant = -1
			}
			got, err := tr.Announce(tt.a)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != tt.n {
				t.Fatalf("got %d peers %v, want %d", len(got), got, tt.n)
			}
			for i, prefix := range tt.want {
				if !strings.HasPrefix(got[i].String(), prefix) {
					t.Errorf("peer %d = %v, want prefix %s (all: %v)", i, got[i], prefix, got)
				}
			}
			for _, p := range got {
				if p == tt.a.Addr {
					t.Errorf("the announcer got itself back")
				}
				if tt.a.Left == 0 && p.String() == "198.18.2.30:1" {
					t.Errorf("a seeder got another seeder")
				}
			}
		})
	}
	// Stopped peers leave the swarm.
	tr.Announce(Announce{InfoHash: ih, Addr: ap("198.18.1.10:1"), Event: "stopped"})
	got, _ := tr.Announce(Announce{InfoHash: ih, Addr: ap("198.18.0.99:1"), Left: 1, NumWant: -1})
	for _, p := range got {
		if p == ap("198.18.1.10:1") {
			t.Error("a stopped peer is still handed out")
		}
	}
}

func TestHTTP(t *testing.T) {
	tr := New(Config{})
	tr.Allow(ih, 0)
	tr.Announce(Announce{InfoHash: ih, Addr: ap("198.18.0.5:7000"), Left: 1})
	hs := httptest.NewServer(tr)
	defer hs.Close()
	tests := []struct {
		name, query string
		failure     string // expected "failure reason" substring, "" for success
		peers       int
	}{
		{"compact peers", "info_hash=" + url.QueryEscape(string(ih[:])) + "&peer_id=abcdefghijabcdefghij&port=6881&left=10&compact=1", "", 1},
		{"unknown info hash", "info_hash=" + url.QueryEscape(strings.Repeat("x", 20)) + "&peer_id=abcdefghijabcdefghij&port=6881&left=10", "unknown info hash", 0},
		{"short info hash", "info_hash=abc&port=6881", "info_hash", 0},
		{"bad port", "info_hash=" + url.QueryEscape(string(ih[:])) + "&port=0", "port", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := http.Get(hs.URL + "/announce?" + tt.query)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			var r struct {
				Failure  string `bencode:"failure reason"`
				Interval int    `bencode:"interval"`
				Peers    []byte `bencode:"peers"`
			}
			if err := bencode.Unmarshal(body, &r); err != nil {
				t.Fatalf("%q: %v", body, err)
			}
			if tt.failure != "" {
				if !strings.Contains(r.Failure, tt.failure) {
					t.Errorf("failure reason %q, want it to mention %q", r.Failure, tt.failure)
				}
				return
			}
			if r.Failure != "" || r.Interval != 10 || len(r.Peers) != 6*tt.peers {
				t.Errorf("response %+v", r)
			}
			if tt.peers > 0 && fmt.Sprintf("%d.%d.%d.%d:%d", r.Peers[0], r.Peers[1], r.Peers[2], r.Peers[3], int(r.Peers[4])<<8|int(r.Peers[5])) != "198.18.0.5:7000" {
				t.Errorf("peer %x", r.Peers)
			}
		})
	}
}

func TestPeers(t *testing.T) {
	tr := New(Config{Interval: time.Minute})
	tr.Allow(ih, 6881)
	if got := tr.Peers(ih); len(got) != 0 {
		t.Fatalf("peers before any announce: %v", got)
	}
	for _, a := range []Announce{
		{InfoHash: ih, Addr: ap("198.18.0.10:6881"), Left: 1},
		{InfoHash: ih, Addr: ap("198.18.0.11:6881"), Left: 0},
		{InfoHash: ih, Addr: ap("198.18.0.12:6881"), Left: 1},
		{InfoHash: ih, Addr: ap("198.18.0.12:6881"), Event: "stopped"},
	} {
		if _, err := tr.Announce(a); err != nil {
			t.Fatal(err)
		}
	}
	got := map[netip.AddrPort]bool{}
	for _, p := range tr.Peers(ih) {
		got[p] = true
	}
	if len(got) != 2 || !got[ap("198.18.0.10:6881")] || !got[ap("198.18.0.11:6881")] {
		t.Fatalf("peers %v: want the two that announced and did not stop (never the local seeder)", got)
	}
	if got := tr.Peers([20]byte{9}); len(got) != 0 {
		t.Fatalf("peers of an unknown info hash: %v", got)
	}
}
