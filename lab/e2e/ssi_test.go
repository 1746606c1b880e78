package e2e

import (
	"context"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/lab"
	"github.com/esir-project/esir/server/cluster"
)

// ssiTimeout is the SSI lab's hard limit: on a clean machine the debian-ssi
// image is debootstrapped first (the packages downloaded once, then cached
// in /var/cache/esir/lab/debian-ssi).
const ssiTimeout = 25 * time.Minute

// TestSSILab is the SSI lab scenario (scripts/lab-ssi.sh) run by the user's
// command: `esir lab up --nodes 3 --image debian-ssi` builds Debian 12 with
// the SSI stack, deploys it onto three QEMU machines (SeaBIOS and OVMF, mixed
// NICs and disks) and returns only once every node is enrolled in a quorate
// cluster, the VIP answered from more than one node and clush answered from
// every node. The test then reads the cluster as the server keeps it: three
// core members enrolled, one director holding the VIP, its IPVS table
// listing the three nodes.
func TestSSILab(t *testing.T) {
	if testing.Short() {
		t.Skip("SSI lab skipped with -short")
	}
	if err := lab.Available(); err != nil {
		t.Skipf("the lab cannot run here: %v", err)
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Skip("debootstrap is not installed (scripts/setup.sh test installs it)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), ssiTimeout)
	defer cancel()
	esir, agent := buildBinaries(t, t.TempDir())
	dir := filepath.Join(t.TempDir(), "lab")
	const name = "ssie2e"
	t.Cleanup(func() {
		if st, err := lab.Load(dir); err == nil {
			keepArtifacts(t, st, "lab-"+name)
		}
		dctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if out, err := exec.CommandContext(dctx, esir, "lab", "down", "--dir", dir, "--name", name).CombinedOutput(); err != nil {
			t.Errorf("lab down: %v\n%s", err, out)
		}
	})
	start := time.Now()
	cmd := exec.CommandContext(ctx, esir, "lab", "up", "--dir", dir, "--name", name, "--nodes", "3", "--image", lab.DebianSSI,
		"--agent", agent, "--cluster-wait", "15m")
	cmd.WaitDelay = 30 * time.Second
	out, err := cmd.CombinedOutput()
	t.Logf("esir lab up (%.0f s):\n%s", time.Since(start).Seconds(), tail(string(out), 40))
	if err != nil {
		t.Fatalf("esir lab up: %v", err)
	}
	for _, re := range []string{`cluster \S+ ready after`, `VIP \S+ leveled connections across [23] nodes`,
		`clush from node01 answered from all 3 nodes`} {
		if !regexp.MustCompile(re).MatchString(string(out)) {
			t.Errorf("esir lab up printed no %q", re)
		}
	}

	st, err := lab.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	c, err := st.Client()
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.Cluster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !s.Quorate || len(s.Members) != 3 {
		t.Fatalf("cluster %s: quorate %v, %d members; want 3 in a quorate cluster", s.Name, s.Quorate, len(s.Members))
	}
	for _, m := range s.Members {
		if m.State != cluster.Enrolled || m.Role != "core" {
			t.Errorf("%s: %s %s (%s %s), want an enrolled core member", m.Name, m.Role, m.State, m.Check, m.Error)
		}
	}
	if len(s.VIPHolders) != 1 {
		t.Fatalf("VIP holders %v, want the lab's one VIP (%s)", s.VIPHolders, lab.VIPAddr)
	}
	var holders []string
	for vip, h := range s.VIPHolders {
		if len(h) != 1 || !strings.HasPrefix(lab.VIPAddr, vip+"/") {
			t.Fatalf("VIP %s held by %v, want %s held by exactly one director", vip, h, lab.VIPAddr)
		}
		holders = h
	}
	reals := map[string]bool{}
	for _, m := range s.Members {
		if v, ok := cluster.MemberView(m); ok && m.Name == holders[0] {
			for _, e := range v.IPVS {
				reals[e.Real] = true
			}
		}
	}
	if len(reals) != 3 {
		t.Errorf("the director %s's IPVS table lists real servers %v, want the 3 nodes", holders[0], reals)
	}
}

// progressLine is a line of the rollout's progress bar (printed a line a
// tick when the output is not a terminal).
var progressLine = regexp.MustCompile(`^(rollout \d+ |node\d+ +)\S* *\[[#.]+\]`)

// tail returns the last n lines of s without the progress bar's lines.
func tail(s string, n int) string {
	var lines []string
	for l := range strings.Lines(s) {
		if !progressLine.MatchString(l) {
			lines = append(lines, strings.TrimRight(l, "\n"))
		}
	}
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
