package swarm

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/netlab"
)

// buildBinaries builds esir and esir-agent into a temporary directory.
func buildBinaries(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, c := range []string{"esir", "esir-agent"} {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, c), "github.com/esir-project/esir/cmd/"+c)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", c, err, out)
		}
	}
	return dir
}

// buildStore makes a store holding image test:1 with size random bytes.
func buildStore(t *testing.T, size int) (*imaging.Store, *imaging.Image) {
	t.Helper()
	work := t.TempDir()
	root := filepath.Join(work, "root")
	os.MkdirAll(filepath.Join(root, "data"), 0o755)
	b := make([]byte, size)
	rand.Read(b)
	if err := os.WriteFile(filepath.Join(root, "data", "blob"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	st, err := imaging.OpenStore(filepath.Join(work, "store"))
	if err != nil {
		t.Fatal(err)
	}
	im, err := st.Build(context.Background(), root, imaging.BuildOptions{Name: "test", Version: "1"})
	if err != nil {
		t.Fatal(err)
	}
	return st, im
}

// artifacts copies logs into $ESIR_ARTIFACTS when the test failed.
func keepArtifacts(t *testing.T, files ...string) {
	t.Cleanup(func() {
		dst := os.Getenv("ESIR_ARTIFACTS")
		if !t.Failed() || dst == "" {
			return
		}
		d := filepath.Join(dst, t.Name())
		os.MkdirAll(d, 0o755)
		for _, f := range files {
			if b, err := os.ReadFile(f); err == nil {
				os.WriteFile(filepath.Join(d, filepath.Base(f)), b, 0o644)
			}
		}
	})
}

// TestNetnsSwarmProcesses runs one `esir swarm serve` and four
// `esir-agent fetch` processes, each in its own network namespace on a
// bridge, with the server's link shaped to 20 Mbit/s.
func TestNetnsSwarmProcesses(t *testing.T) {
	if err := netlab.Available(); err != nil {
		t.Skip("needs root and network namespaces:", err)
	}
	bin := buildBinaries(t)
	st, im := buildStore(t, 16<<20)
	// The hard limit covers the namespaces and processes, not the build.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	lab, err := netlab.New(ctx, "swt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Close() })
	srvHost, err := lab.AddHost(ctx, "srv", netip.MustParsePrefix("198.18.0.1/24"), netlab.Link{RateMbit: 20})
	if err != nil {
		t.Fatal(err)
	}
	var nodes []*netlab.Host
	for i := range 4 {
		h, err := lab.AddHost(ctx, fmt.Sprintf("n%d", i), netip.MustParsePrefix(fmt.Sprintf("198.18.0.%d/24", 11+i)), netlab.Link{})
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, h)
	}
	work := t.TempDir()
	logs := []string{filepath.Join(work, "server.log")}
	srvLog, _ := os.Create(logs[0])
	srv := srvHost.Command(ctx, filepath.Join(bin, "esir"), "swarm", "serve", "--store", st.Dir(),
		"--listen", "198.18.0.1:8080", "--peer-listen", "198.18.0.1:6881")
	srv.Stderr = srvLog
	keepArtifacts(t, logs[0])
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Signal(syscall.SIGTERM); srv.Wait() })
	for {
		out, err := nodes[0].Run(ctx, "curl", "-sf", "http://198.18.0.1:8080/swarm/images")
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("server never answered: %v %s", err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	var agents []*exec.Cmd
	for i, h := range nodes {
		lg := filepath.Join(work, fmt.Sprintf("agent%d.log", i))
		logs = append(logs, lg)
		f, _ := os.Create(lg)
		a := h.Command(ctx, filepath.Join(bin, "esir-agent"), "fetch", "--server", "http://198.18.0.1:8080", "--image", "test:1",
			"--out", filepath.Join(work, fmt.Sprintf("out%d", i)), "--listen", h.IP().String()+":6881",
			"--seed-for", "0", "--progress", "none", "--result", filepath.Join(work, fmt.Sprintf("result%d.json", i)),
			"--webseed-after", "-1s")
		a.Stderr = f
		if err := a.Start(); err != nil {
			t.Fatal(err)
		}
		agents = append(agents, a)
	}
	keepArtifacts(t, logs[1:]...)
	// Wait for every node to be verified, then stop them (the rollout is
	// done) so the final results carry the whole run's counters.
	for i := range nodes {
		res := filepath.Join(work, fmt.Sprintf("result%d.json", i))
		for {
			if _, err := os.Stat(res); err == nil {
				break
			}
			if ctx.Err() != nil {
				t.Fatalf("node %d never completed", i)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	for i, a := range agents {
		a.Process.Signal(syscall.SIGTERM)
		if err := a.Wait(); err != nil {
			t.Errorf("agent %d exit: %v", i, err)
		}
	}
	var total int64
	infoFromPeers := 0
	for i := range nodes {
		sameFile(t, im.ArchivePath(), filepath.Join(work, fmt.Sprintf("out%d", i)))
		b, err := os.ReadFile(filepath.Join(work, fmt.Sprintf("result%d.json", i)))
		if err != nil {
			t.Fatal(err)
		}
		var r Result
		if err := json.Unmarshal(b, &r); err != nil {
			t.Fatal(err)
		}
		var fromPeers int64
		for ip, v := range r.From {
			if ip != "198.18.0.1" {
				fromPeers += v
			}
		}
		c := r.Have.Total
		t.Logf("node %d: took %v, HAVE %+v, bytes from %v, info dictionary from %s", i, r.Duration.Round(time.Millisecond), c, r.From, r.InfoFrom)
		if r.InfoFrom != "server" {
			infoFromPeers++
		}
		if fromPeers == 0 {
			t.Errorf("node %d received nothing from other nodes: %v", i, r.From)
		}
		if c.Emitted == 0 {
			t.Errorf("node %d: no HAVE counted on the wire", i)
		}
		if c.Messages() >= c.Emitted {
			t.Errorf("node %d: adaptive mode sent %d HAVE messages for %d emitted: nothing suppressed", i, c.Messages(), c.Emitted)
		}
		total += c.Redundant + c.Coalesced
	}
	if total == 0 {
		t.Error("no HAVE suppressed or coalesced in the swarm")
	}
	// The server sends the info dictionary to two nodes at a time while no
	// node has it; the others wait for one that has (at most 1 s).
	if infoFromPeers == 0 {
		t.Error("every node took the info dictionary from the server; none from a node that had it")
	}
}
