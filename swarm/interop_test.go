package swarm

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/anacrolix/torrent/metainfo"
)

// Interoperability with Debian's BitTorrent clients, on loopback. ESIR's
// nodes run in adaptive mode throughout: standard clients must only ever see
// standard messages.

func saveTorrent(t *testing.T, url, ref string) (string, *metainfo.Info) {
	t.Helper()
	resp, err := http.Get(url + "/swarm/images/" + ref + "/torrent")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	mi, err := metainfo.Load(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	info, err := mi.UnmarshalInfo()
	if err != nil {
		t.Fatal(err)
	}
	// Without the web seed: the clients must use BitTorrent.
	mi.UrlList = nil
	path := filepath.Join(t.TempDir(), "image.torrent")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := mi.Write(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return path, &info
}

// freePort returns a TCP port free on every address, from 20000-29999:
// below the kernel's ephemeral ports (32768-60999 by default), so no
// outgoing connection takes it between this check and the client's bind.
func freePort(t *testing.T) int {
	for range 200 {
		port := 20000 + rand.IntN(10000)
		l, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
		if err != nil {
			continue
		}
		l.Close()
		return port
	}
	t.Fatal("no free TCP port in 20000-29999")
	return 0
}

// aria2Ports is the range aria2c may listen on: aria2c takes the first port
// of it that it can bind. It lies below the kernel's ephemeral ports
// (32768-60999 by default) and away from ESIR's own default peer port
// (6881, inside aria2c's default 6881-6999). A single port that freePort
// found free on 127.0.0.1 could be taken by another socket's ephemeral port
// before aria2c bound it; aria2c then listened on IPv6 only, ESIR's node
// could not dial it, and they met only after aria2c's next announce,
// sometimes after the node had finished (no HAVE for aria2c to count).
const aria2Ports = "16881-16999"

// TestInteropAria2 has aria2c download an image through ESIR's tracker from
// ESIR's seeder while an ESIR node (adaptive HAVE) fetches it too.
func TestInteropAria2(t *testing.T) {
	if _, err := exec.LookPath("aria2c"); err != nil {
		t.Skip("aria2c is not installed (Debian aria2)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	img := testImage(t, 16<<20, 256<<10)
	// A slow seeder keeps both downloaders busy at once, trading pieces.
	s, url := limitedServer(t, 4<<20, img)
	tf, info := saveTorrent(t, url, "test:1")
	out := t.TempDir()
	cmd := exec.CommandContext(ctx, "aria2c", "--dir", out, "--seed-time=0", "--enable-dht=false", "--enable-dht6=false",
		"--bt-enable-lpd=false", "--enable-peer-exchange=false", "--file-allocation=none", "--summary-interval=0",
		"--console-log-level=notice", "--listen-port="+aria2Ports, "--bt-require-crypto=false", tf)
	ariaOut, err := os.Create(filepath.Join(t.TempDir(), "aria2c.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = ariaOut, ariaOut
	keepArtifacts(t, ariaOut.Name())
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	esir := fetchOn(t, ctx, nodeAt(t, "127.0.0.70"), url, "test:1", &events{}, -1)
	if err := cmd.Wait(); err != nil {
		b, _ := os.ReadFile(ariaOut.Name())
		t.Fatalf("aria2c: %v\n%s", err, b)
	}
	sameFile(t, img.Path, filepath.Join(out, info.Name))
	r, err := esir.Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sameFile(t, img.Path, r.Path)
	if st := s.collect(); st.BytesSent == 0 {
		t.Error("ESIR's seeder sent nothing over BitTorrent")
	}
	t.Logf("ESIR node HAVE counters: %+v; peers %+v", r.Have.Total, r.Have.Peers)
	standard := false
	for _, p := range r.Have.Peers {
		if p.ESIR {
			continue
		}
		standard = standard || p.Counters.Emitted > 0
		if p.Counters.Coalesced != 0 || p.Counters.Updates != 0 {
			t.Errorf("standard peer %s got BITFIELD updates: %+v", p.Remote, p.Counters)
		}
	}
	if !standard {
		t.Error("the ESIR node never announced a piece to aria2c")
	}
}

// TestInteropTransmissionSeeder has an ESIR node download from a
// transmission-cli seeder found through ESIR's tracker, with the server's
// seeder and web seed out of the way.
func TestInteropTransmissionSeeder(t *testing.T) {
	if _, err := exec.LookPath("transmission-cli"); err != nil {
		t.Skip("transmission-cli is not installed (Debian transmission-cli)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	img := testImage(t, 8<<20, 256<<10)
	s, url := limitedServer(t, 0, img)
	if err := s.StopSeeding("test:1"); err != nil {
		t.Fatal(err)
	}
	tf, info := saveTorrent(t, url, "test:1")
	data := t.TempDir()
	b, _ := os.ReadFile(img.Path)
	if err := os.WriteFile(filepath.Join(data, info.Name), b, 0o644); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(t.TempDir(), "transmission.log")
	lg, _ := os.Create(logPath)
	keepArtifacts(t, logPath)
	tr := exec.CommandContext(ctx, "transmission-cli", "-w", data, "-g", t.TempDir(), "-p", strconv.Itoa(freePort(t)),
		"-et", "-D", "-M", tf)
	tr.Stdout, tr.Stderr = lg, lg
	if err := tr.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Process.Kill(); tr.Wait() })
	n := nodeAt(t, "127.0.0.71")
	r, err := fetchOn(t, ctx, n, url, "test:1", &events{}, -1).Wait(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sameFile(t, img.Path, r.Path)
	if r.From["127.0.0.1"] != img.Size {
		t.Errorf("bytes from %v: want all %d from transmission at 127.0.0.1", r.From, img.Size)
	}
	t.Logf("ESIR node HAVE counters: %+v", r.Have.Total)
}
