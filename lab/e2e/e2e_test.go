// Package e2e is ESIR's end-to-end tests: a two-node virtual cluster (lab)
// deploys the sample image through real firmware, PXE, BitTorrent between
// the machines, real disks and reboots, and both nodes enroll; and the SSI
// lab scenario, where three machines installed with Debian 12 and the SSI
// stack form one quorate cluster behind a VIP.
package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/lab"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/client"
	"github.com/esir-project/esir/server/deploy"
)

// The whole test's hard limit (the budget on a 2-core machine).
const hardTimeout = 15 * time.Minute

// buildBinaries builds esir and the static esir-agent into dir.
func buildBinaries(t *testing.T, dir string) (esir, agent string) {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	esir, agent = filepath.Join(dir, "esir"), filepath.Join(dir, "esir-agent")
	for _, b := range [][2]string{{esir, "./cmd/esir"}, {agent, "./cmd/esir-agent"}} {
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", b[0], b[1])
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", b[1], err, out)
		}
	}
	return esir, agent
}

// keepArtifacts copies the lab's logs into $ESIR_ARTIFACTS/NAME when the
// test failed.
func keepArtifacts(t *testing.T, st *lab.State, name string) {
	dir := os.Getenv("ESIR_ARTIFACTS")
	if !t.Failed() || dir == "" || st == nil {
		return
	}
	dst := filepath.Join(dir, name)
	if err := os.MkdirAll(dst, 0o755); err != nil {
		t.Log(err)
		return
	}
	files := []string{st.ServerLog, st.ForwardLog, filepath.Join(st.Dir, "state.json")}
	for _, n := range st.Nodes {
		files = append(files, n.Serial)
	}
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil {
			_ = os.WriteFile(filepath.Join(dst, filepath.Base(f)), b, 0o644)
		}
	}
	t.Logf("serial and server logs kept in %s", dst)
}

// startLab brings a lab up with the test's binaries and registers its
// teardown (artifacts first, then down).
func startLab(t *testing.T, ctx context.Context, opts lab.Options) (*lab.State, *client.Client) {
	t.Helper()
	if err := lab.Available(); err != nil {
		t.Skipf("the lab cannot run here: %v", err)
	}
	opts.Esir, opts.Agent = buildBinaries(t, t.TempDir())
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	st, err := lab.Up(ctx, opts)
	t.Cleanup(func() {
		if st != nil {
			keepArtifacts(t, st, "lab-"+opts.Name)
		}
		if err := lab.Down(context.Background(), opts.Dir, opts.Name); err != nil {
			t.Errorf("lab down: %v", err)
		}
	})
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	c, err := st.Client()
	if err != nil {
		t.Fatal(err)
	}
	return st, c
}

// waitStates polls the server until every node is in a final state
// (enrolled or failed) or want(node) holds for all, and returns the nodes.
func waitNodes(t *testing.T, ctx context.Context, c *client.Client, st *lab.State, done func(n api.NodeView) bool) map[string]api.NodeView {
	t.Helper()
	last := ""
	for {
		nodes, err := c.Nodes(ctx, "", lab.LabelKey+"="+st.Name)
		if err == nil && len(nodes) == len(st.Nodes) {
			byName := map[string]api.NodeView{}
			all := true
			var line []string
			for _, n := range nodes {
				byName[n.Hostname] = n
				all = all && done(n)
				line = append(line, fmt.Sprintf("%s=%s/%s", n.Hostname, n.State, n.Phase))
			}
			if s := strings.Join(line, " "); s != last {
				t.Logf("%s  %s", time.Now().Format("15:04:05"), s)
				last = s
			}
			if all {
				return byName
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for the nodes: %v (last: %s, last error: %v)", ctx.Err(), last, err)
		case <-time.After(2 * time.Second):
		}
	}
}

// bytesFrom reads, from the agent's "install: installed" log line on a node's
// console, how many useful bytes the node received from each source.
func bytesFrom(t *testing.T, st *lab.State, node string) map[string]int64 {
	t.Helper()
	nd, err := st.Node(node)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(nd.Serial)
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`bytes_from="?map\[([^\]]*)\]`)
	m := re.FindAllStringSubmatch(string(b), -1)
	if m == nil {
		t.Fatalf("%s: no bytes_from in the agent's install line on the console", node)
	}
	out := map[string]int64{}
	for _, kv := range strings.Fields(m[len(m)-1][1]) {
		i := strings.LastIndexByte(kv, ':')
		if i < 0 {
			continue
		}
		n, err := strconv.ParseInt(kv[i+1:], 10, 64)
		if err == nil {
			out[kv[:i]] = n
		}
	}
	return out
}

// upLine is what the installed sample system prints once it is up.
var upLine = regexp.MustCompile(`esir-sample: up hostname=(\S+) kernel=(\S+) modules=(\S*)`)

func TestTwoNodeDeployment(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end QEMU test skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), hardTimeout)
	defer cancel()
	st, c := startLab(t, ctx, lab.Options{
		Name: "e2e", Nodes: 2, Firmware: lab.FirmwareMixed, Hardware: lab.HardwareMixed, MemoryMiB: 1024,
	})
	// node01: SeaBIOS + e1000 + AHCI; node02: OVMF + virtio-net + NVMe.
	want := [][3]string{{"bios", "e1000", "ahci"}, {"uefi", "virtio-net-pci", "nvme"}}
	for i, n := range st.Nodes {
		if got := [3]string{string(n.Firmware), n.NIC, n.Disk}; got != want[i] {
			t.Fatalf("%s is %v, want %v", n.Name, got, want[i])
		}
	}
	// Both PXE-boot through ESIR into the agent.
	agentUp := regexp.MustCompile(`esir-agent: netboot environment up .*mode=install`)
	for _, n := range st.Nodes {
		if _, _, err := st.WaitConsole(ctx, n.Name, agentUp, 0); err != nil {
			t.Fatal(err)
		}
	}
	nodes := waitNodes(t, ctx, c, st, func(n api.NodeView) bool {
		return n.State == deploy.Enrolled || n.State == deploy.Failed
	})
	for name, n := range nodes {
		if n.State != deploy.Enrolled {
			t.Fatalf("%s: %s (%s); log tail:\n%s", name, n.State, n.Reason, strings.Join(n.LogTail, "\n"))
		}
	}
	// Peer to peer: each node received pieces from the other, not only from
	// the server (198.18.0.1) or its web seed.
	for _, n := range st.Nodes {
		from := bytesFrom(t, st, n.Name)
		var peer int64
		for src, b := range from {
			if src != "198.18.0.1" && src != "webseed" {
				peer += b
			}
		}
		t.Logf("%s received %v", n.Name, from)
		if peer == 0 {
			t.Errorf("%s received nothing from the other node: %v", n.Name, from)
		}
	}
	// The installed systems: booted from disk after the server answered
	// exit, each loaded the modules of its own hardware.
	mods := map[string][]string{}
	for _, n := range st.Nodes {
		line, _, err := st.WaitConsole(ctx, n.Name, upLine, 0)
		if err != nil {
			t.Fatal(err)
		}
		m := upLine.FindStringSubmatch(line)
		if m[1] != n.Name {
			t.Errorf("%s: installed system reports hostname %q", n.Name, m[1])
		}
		mods[n.Name] = strings.Split(m[3], ",")
		d, err := c.Node(ctx, nodes[n.Name].MAC)
		if err != nil {
			t.Fatal(err)
		}
		if inv := d.Inventory; inv == nil || len(inv.Modules) == 0 {
			t.Errorf("%s: the server has no matched modules for the node", n.Name)
		}
	}
	has := func(node, mod string) bool { return slices.Contains(mods[node], mod) }
	for _, c := range []struct {
		node, mod string
		want      bool
	}{
		{"node01", "e1000", true}, {"node01", "ahci", true}, {"node01", "nvme", false}, {"node01", "virtio_net", false},
		{"node01", "sd_mod", true},
		// q35 has an AHCI controller of its own, so node02 loads ahci too;
		// with no disk behind it, no sd_mod.
		{"node02", "virtio_net", true}, {"node02", "nvme", true}, {"node02", "e1000", false}, {"node02", "sd_mod", false},
	} {
		if has(c.node, c.mod) != c.want {
			t.Errorf("%s loaded %s = %v, want %v (modules: %v)", c.node, c.mod, !c.want, c.want, mods[c.node])
		}
	}
	if slices.Equal(mods["node01"], mods["node02"]) {
		t.Errorf("both nodes loaded the same modules: %v", mods["node01"])
	}
	t.Logf("node01 modules: %v", mods["node01"])
	t.Logf("node02 modules: %v", mods["node02"])
}

// TestFaults runs the three fault cases in one two-node lab:
// node02's disk is too small (the rollout marks it failed with that reason
// while node01 completes); node01 is killed during its install and started
// again (it PXE-boots, reinstalls and enrolls); and between the two the
// server is killed with SIGKILL and restarted (the rollout resumes from its
// database and completes).
func TestFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end QEMU test skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), hardTimeout)
	defer cancel()
	st, c := startLab(t, ctx, lab.Options{
		Name: "e2ef", Nodes: 2, Firmware: lab.FirmwareBIOS, Hardware: lab.HardwareVirtio, MemoryMiB: 1024,
		DiskBytesOf: map[string]int64{"node02": 64 << 20},
	})
	n1, err := st.Node("node01")
	if err != nil {
		t.Fatal(err)
	}
	// Wait until node01 writes its disk, then cut its power.
	inInstall := map[string]bool{"unpack": true, "personalise": true, "earlyboot": true, "bootloader": true, "service": true}
	for {
		d, err := c.Node(ctx, n1.MAC)
		if err == nil && d.State == deploy.Installing && d.Progress != nil && inInstall[d.Progress.Step] {
			t.Logf("node01 at install step %s: killing it", d.Progress.Step)
			break
		}
		if err == nil && (d.State == deploy.Installed || d.State == deploy.Enrolled || d.State == deploy.Failed) {
			t.Fatalf("node01 reached %s before the test could kill it during the install", d.State)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("node01 never reached the unpack: %v", ctx.Err())
		case <-time.After(300 * time.Millisecond):
		}
	}
	if err := st.KillNode("node01"); err != nil {
		t.Fatal(err)
	}
	// The server dies too, mid-rollout, and comes back on the same database.
	if err := st.KillServer(); err != nil {
		t.Fatal(err)
	}
	if err := st.StartServer(ctx); err != nil {
		t.Fatal(err)
	}
	if err := st.WaitServer(ctx, 60*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := st.StartNode(ctx, "node01"); err != nil {
		t.Fatal(err)
	}
	nodes := waitNodes(t, ctx, c, st, func(n api.NodeView) bool {
		return n.State == deploy.Enrolled || (n.Hostname == "node02" && n.State == deploy.Failed)
	})
	if s := nodes["node02"]; s.State != deploy.Failed || !strings.Contains(s.Reason, "too small") {
		t.Errorf("node02: %s (%q), want failed because its disk is too small", s.State, s.Reason)
	}
	// node01's second install ran from a fresh PXE boot.
	if _, _, err := st.WaitConsole(ctx, "node01", regexp.MustCompile(`esir-sample: up hostname=node01`), 0); err != nil {
		t.Fatal(err)
	}
	for {
		r, err := c.Rollout(ctx, st.Rollout)
		if err == nil && r.State.Final() {
			if r.State != deploy.RolloutCompleted || r.Summary.Succeeded != 1 || r.Summary.Failed != 1 {
				t.Errorf("rollout %d: %s, %d succeeded, %d failed; want completed, 1 and 1", r.ID, r.State, r.Summary.Succeeded, r.Summary.Failed)
			}
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("rollout %d never finished: %v (last error %v)", st.Rollout, ctx.Err(), err)
		case <-time.After(2 * time.Second):
		}
	}
}
