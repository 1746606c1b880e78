package pipeline_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/diskfs/go-diskfs"
	"github.com/esir-project/esir/agent/enroll"
	"github.com/esir-project/esir/agent/initrd"
	"github.com/esir-project/esir/agent/install"
	"github.com/esir-project/esir/agent/pipeline"
	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/netlab"
	"github.com/esir-project/esir/sampleimage"
	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/client"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/vm"
	"golang.org/x/sys/unix"
)

const (
	mac1 = "52:54:00:e5:70:01" // installs onto a disk that fits, by DHCP
	mac2 = "52:54:00:e5:70:02" // its disk is too small
	mac3 = "52:54:00:e5:70:03" // unknown to the server: inventory mode first
	mib  = 1 << 20
)

func requireRoot(t *testing.T) {
	t.Helper()
	if err := netlab.Available(); err != nil {
		t.Skipf("needs network namespaces: %v", err)
	}
	for _, p := range append(install.HostTools(), "/usr/sbin/losetup", "/usr/bin/partx", sampleimage.Busybox, "/usr/sbin/depmod") {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("needs %s (scripts/setup.sh installs it): %v", p, err)
		}
	}
	if _, err := vm.HostDebianKernel(); err != nil {
		t.Skipf("needs Debian's kernel: %v", err)
	}
}

func goBuild(t *testing.T, out, pkg string) {
	t.Helper()
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
}

// nsHTTP returns an HTTP client whose connections are made inside network
// namespace ns: each dial runs on an OS thread that enters ns and returns
// to its own namespace afterwards. (A thread left to die would take the
// processes it started with it: they run with Pdeathsig.)
func nsHTTP(t *testing.T, ns string) *http.Client {
	f, err := os.Open("/var/run/netns/" + ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		type res struct {
			c   net.Conn
			err error
		}
		ch := make(chan res, 1)
		go func() {
			runtime.LockOSThread()
			own, err := os.Open("/proc/thread-self/ns/net")
			if err != nil {
				runtime.UnlockOSThread()
				ch <- res{nil, err}
				return
			}
			defer own.Close()
			if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
				runtime.UnlockOSThread()
				ch <- res{nil, fmt.Errorf("setns %s: %w", ns, err)}
				return
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if unix.Setns(int(own.Fd()), unix.CLONE_NEWNET) == nil {
				runtime.UnlockOSThread() // back home: the thread may serve others
			}
			ch <- res{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
	return &http.Client{Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}, Timeout: 30 * time.Second}
}

// process is a command running in a namespace with its output kept.
type process struct {
	name string
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func start(t *testing.T, ctx context.Context, name, ns, bin string, args ...string) *process {
	t.Helper()
	p := &process{name: name, cmd: netlab.NSCommand(ctx, ns, bin, args...), out: &syncBuffer{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			_ = unix.Kill(-p.cmd.Process.Pid, unix.SIGKILL)
			<-p.done
		}
		if t.Failed() {
			t.Logf("%s output:\n%s", name, tailLines(p.out.String(), 60))
			if a := os.Getenv("ESIR_ARTIFACTS"); a != "" {
				_ = os.MkdirAll(a, 0o755)
				_ = os.WriteFile(filepath.Join(a, "pipeline-"+name+".log"), []byte(p.out.String()), 0o644)
			}
		}
	})
	return p
}

func (p *process) wait(t *testing.T, ctx context.Context) error {
	t.Helper()
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		t.Fatalf("%s did not finish: %v\n%s", p.name, ctx.Err(), tailLines(p.out.String(), 40))
		return nil
	}
}

func tailLines(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

func waitFor(t *testing.T, ctx context.Context, what string, cond func() (bool, string)) {
	t.Helper()
	last := ""
	for {
		ok, s := cond()
		if ok {
			return
		}
		last = s
		select {
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v (last: %s)", what, ctx.Err(), last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func sparseFile(t *testing.T, p string, size int64) {
	t.Helper()
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
}

// TestNetbootInstallRoot runs the real `esir server` (DHCP in full mode,
// seeder, tracker) in a namespace lab and two agent processes in their own
// namespaces, each aimed at a disk image file: one takes its address by
// DHCP and installs, the other's disk is too small and is refused. Then the
// installed disk boots under OVMF on the lab's bridge and its node service
// enrolls.
func TestNetbootInstallRoot(t *testing.T) {
	requireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	dir := t.TempDir()
	esir, agent := filepath.Join(dir, "esir"), filepath.Join(dir, "esir-agent")
	goBuild(t, esir, "github.com/esir-project/esir/cmd/esir")
	goBuild(t, agent, "github.com/esir-project/esir/cmd/esir-agent")

	k, _ := vm.HostDebianKernel()
	tree := filepath.Join(dir, "tree")
	if err := sampleimage.Build(ctx, tree, sampleimage.Options{Kernel: k, Modules: sampleimage.StorageNetFS}); err != nil {
		t.Fatal(err)
	}
	storeDir := filepath.Join(dir, "store")
	st, err := imaging.OpenStore(storeDir)
	if err != nil {
		t.Fatal(err)
	}
	img, err := st.Build(ctx, tree, imaging.BuildOptions{Name: "sample", Version: "1"})
	if err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(tree)

	lab, err := netlab.New(ctx, "pipe")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Close() })
	if _, err := lab.SwitchHost(ctx, netip.MustParsePrefix("198.18.0.1/24")); err != nil {
		t.Fatal(err)
	}
	const base = "http://198.18.0.1:8080"
	conf := filepath.Join(dir, "server.yaml")
	tokenFile := filepath.Join(dir, "admin-token")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(`listen: 198.18.0.1:8080
public_url: %s
data_dir: %s
image_store: %s
admin_token_file: %s
swarm_listen: 198.18.0.1:6881
scheduler_tick: 100ms
dhcp_interface: br0
dhcp_mode: full
dhcp_server_ip: 198.18.0.1
dhcp_range: 198.18.0.100-198.18.0.150/24
dhcp_router: 198.18.0.1
dhcp_dns: 198.18.0.1
`, base, filepath.Join(dir, "data"), storeDir, tokenFile)), 0o644); err != nil {
		t.Fatal(err)
	}
	srv := start(t, ctx, "server", lab.Switch, esir, "server", "-c", conf)
	hc := nsHTTP(t, lab.Switch)
	waitFor(t, ctx, "the server", func() (bool, string) {
		select {
		case <-srv.done:
			t.Fatalf("server exited: %v\n%s", srv.err, srv.out.String())
		default:
		}
		r, err := hc.Get(base + "/healthz")
		if err != nil {
			return false, err.Error()
		}
		r.Body.Close()
		return r.StatusCode == 200, r.Status
	})
	tok, err := os.ReadFile(tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	c := &client.Client{Server: base, Token: strings.TrimSpace(string(tok)), HTTP: hc}
	for _, n := range []struct{ mac, host string }{{mac1, "node1"}, {mac2, "small"}} {
		if _, err := c.AddNode(ctx, api.AddNodeRequest{MAC: n.mac, Hostname: n.host}); err != nil {
			t.Fatal(err)
		}
	}
	ro, err := c.CreateRollout(ctx, deploy.Spec{Image: "sample:1", Selector: deploy.Selector{Names: []string{"node1", "small"}},
		BatchSize: 2, FailureThreshold: 2, MaxRetries: 0, Disk: &agentapi.DiskLayout{ESPMiB: 64, SwapMiB: 16}})
	if err != nil {
		t.Fatal(err)
	}
	state := func(mac string) *api.NodeDetail {
		n, err := c.Node(ctx, mac)
		if err != nil {
			if !agentapi.IsStatus(err, http.StatusNotFound) {
				t.Logf("node %s: %v", mac, err)
			}
			return nil
		}
		return n
	}
	for _, m := range []string{mac1, mac2} {
		waitFor(t, ctx, m+" assigned", func() (bool, string) {
			n := state(m)
			return n != nil && n.State == deploy.Assigned, fmt.Sprint(n)
		})
	}

	// The agents' namespaces: n1 starts without an address (DHCP), n2 static.
	// n1's link is shaped so that its download spans several of the agent's
	// one-second report ticks: unshaped, the whole install could be over
	// between two polls and its progress never show while it was active.
	n1, err := lab.AddHost(ctx, "n1", netip.MustParsePrefix("198.18.0.11/24"), netlab.Link{RateMbit: 40})
	if err != nil {
		t.Fatal(err)
	}
	n2, err := lab.AddHost(ctx, "n2", netip.MustParsePrefix("198.18.0.12/24"), netlab.Link{})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range [][]string{{"addr", "flush", "dev", "eth0"}, {"link", "set", "dev", "eth0", "address", mac1}} {
		if _, err := n1.Run(ctx, "ip", s...); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := n2.Run(ctx, "ip", "link", "set", "dev", "eth0", "address", mac2); err != nil {
		t.Fatal(err)
	}
	n3, err := lab.AddHost(ctx, "n3", netip.MustParsePrefix("198.18.0.13/24"), netlab.Link{})
	if err != nil {
		t.Fatal(err)
	}
	disk1, disk2, disk3 := filepath.Join(dir, "node1.img"), filepath.Join(dir, "small.img"), filepath.Join(dir, "node3.img")
	sparseFile(t, disk1, 768*mib)
	sparseFile(t, disk2, 128*mib)
	sparseFile(t, disk3, 768*mib)
	run := func(h *netlab.Host, mac, disk string, extra ...string) *process {
		bt, err := c.BootToken(ctx, mac)
		if err != nil {
			t.Fatal(err)
		}
		work := filepath.Join(dir, "work-"+h.Name)
		os.MkdirAll(work, 0o755)
		args := append([]string{"run", "--server", base, "--token", bt, "--mac", mac, "--disk", disk,
			"--hardware", "testdata/q35-virtio-blk.txt", "--cmdline", "console=ttyS0,115200", "--work-dir", work,
			"--seed-idle", "2s"}, extra...)
		return start(t, ctx, "agent-"+h.Name, h.NS, agent, args...)
	}
	a1 := run(n1, mac1, disk1, "--dhcp")
	// Agent 1's progress is watched from its start: its whole install can
	// be over before the subtests below get to it.
	type progressWatch struct {
		seen  *api.Progress
		polls []string
	}
	watched := make(chan progressWatch, 1)
	go func() {
		var w progressWatch
		defer func() { watched <- w }()
		for {
			select {
			case <-a1.done:
				return
			case <-ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
			n := state(mac1)
			switch {
			case n == nil:
				continue
			case n.Progress == nil:
				w.polls = append(w.polls, "state "+string(n.State)+" no progress")
			default:
				w.polls = append(w.polls, fmt.Sprintf("%s/%s %d/%d have %v", n.Progress.Phase, n.Progress.Step, n.Progress.Bytes, n.Progress.Total, n.Progress.Have != nil))
				if n.Progress.Have != nil && n.Progress.Total == img.Manifest.CompressedSize {
					w.seen = n.Progress
				}
			}
		}
	}()
	a2 := run(n2, mac2, disk2)
	a3 := run(n3, mac3, disk3)

	// The unknown node registers, reports its hardware and waits in
	// inventory mode until a rollout names it; its next poll installs.
	t.Run("inventory-then-assigned", func(t *testing.T) {
		var host string
		waitFor(t, ctx, "node 3 discovered with its inventory", func() (bool, string) {
			n := state(mac3)
			if n == nil || n.State != deploy.Discovered || n.Inventory == nil {
				return false, fmt.Sprint(n)
			}
			host = n.Hostname
			return n.Inventory.MemoryBytes > 0 && n.Inventory.CPU.Threads > 0, fmt.Sprintf("%+v", n.Inventory)
		})
		if _, err := c.CreateRollout(ctx, deploy.Spec{Image: "sample", Selector: deploy.Selector{Names: []string{host}},
			BatchSize: 1, Disk: &agentapi.DiskLayout{ESPMiB: 64}}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("too-small-disk-reported-failed", func(t *testing.T) {
		err := a2.wait(t, ctx)
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("agent with a too small disk: want a failed exit, got %v\n%s", err, a2.out.String())
		}
		n := state(mac2)
		if n == nil || n.State != deploy.Failed || !strings.Contains(n.Reason, install.StepDisk+": ") ||
			!strings.Contains(n.Reason, "too small") || !strings.Contains(n.Reason, "/dev/loop") {
			t.Fatalf("node small at the server: %+v, want failed with step disk, the device and 'too small'", n)
		}
		if len(n.LogTail) == 0 {
			t.Error("the failure report carried no log tail")
		}
		data, err := os.ReadFile(disk2)
		if err != nil {
			t.Fatal(err)
		}
		if i := bytes.IndexFunc(data, func(r rune) bool { return r != 0 }); i >= 0 {
			t.Fatalf("the refused disk was written at byte %d", i)
		}
	})

	var root string
	t.Run("install-reported-installed", func(t *testing.T) {
		// While the agent worked, its progress events showed at the server.
		if w := <-watched; w.seen == nil {
			t.Errorf("no progress event with the image's size and HAVE counters reached the server; seen every 100 ms: %s", strings.Join(w.polls, "; "))
		}
		if err := a1.wait(t, ctx); err != nil {
			t.Fatalf("agent: %v\n%s", err, tailLines(a1.out.String(), 40))
		}
		out := a1.out.String()
		for _, want := range []string{"network: configured by DHCP", "address=198.18.0.1", "install step done", `"Next": 0`} {
			if !strings.Contains(out, want) {
				t.Errorf("agent output lacks %q", want)
			}
		}
		n := state(mac1)
		if n == nil || n.State != deploy.Installed {
			t.Fatalf("node1 at the server: %+v, want installed", n)
		}
		var path []string
		for _, e := range n.Events {
			path = append(path, string(e.To))
		}
		if want := "assigned,booting,fetching,installing,installed"; !strings.Contains(strings.Join(path, ","), want) {
			t.Errorf("node1's states %v, want %s in order", path, want)
		}
		for _, want := range [][2]string{{`msg="install step started"`, "step=unpack"}, {`msg="install step done"`, "step=bootloader"}} {
			found := false
			for _, l := range n.LogTail {
				found = found || strings.Contains(l, want[0]) && strings.Contains(l, want[1])
			}
			if !found {
				t.Errorf("the server's log tail of node1 lacks a line with %s %s:\n%s", want[0], want[1], strings.Join(n.LogTail, "\n"))
			}
		}
		root = checkDisk(t, disk1, "node1", base)
	})
	if root == "" {
		t.FailNow()
	}
	t.Run("inventory-node-installed", func(t *testing.T) {
		if err := a3.wait(t, ctx); err != nil {
			t.Fatalf("agent: %v\n%s", err, tailLines(a3.out.String(), 40))
		}
		if !strings.Contains(a3.out.String(), "server: inventory mode") {
			t.Error("the agent never reported inventory mode")
		}
		if n := state(mac3); n == nil || n.State != deploy.Installed {
			t.Fatalf("node 3 at the server: %+v, want installed", n)
		}
	})
	if v, err := c.Rollout(ctx, ro.ID); err != nil || v.State != deploy.RolloutCompleted {
		t.Logf("rollout %d: %+v %v", ro.ID, v, err)
	}

	t.Run("boots-uefi-and-enrolls", func(t *testing.T) {
		if err := vm.Available(vm.UEFI); err != nil {
			t.Skip(err)
		}
		if err := lab.AddTap(ctx, "tapn1"); err != nil {
			t.Fatal(err)
		}
		vctx, vcancel := context.WithTimeout(ctx, 4*time.Minute)
		defer vcancel()
		v, err := vm.Start(vctx, vm.Config{Name: "node1", Firmware: vm.UEFI, MemoryMiB: 768, NoReboot: true, NetNS: lab.Switch,
			WorkDir: filepath.Join(dir, "vm"), NICs: []vm.NIC{{Model: "virtio-net-pci", MAC: mac1, Tap: "tapn1"}},
			Disks: []vm.Disk{{Path: disk1, Model: "virtio-blk"}}})
		if err != nil {
			t.Fatal(err)
		}
		defer v.Kill()
		t.Cleanup(func() {
			if t.Failed() {
				_ = v.KeepLog(os.Getenv("ESIR_ARTIFACTS"), "pipeline")
			}
		})
		line, _, err := v.WaitFor(vctx, regexp.MustCompile(regexp.QuoteMeta(enroll.Marker)), 0)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(line, "mac="+mac1) {
			t.Errorf("enrolled as another node: %s", line)
		}
		n := state(mac1)
		if n == nil || n.State != deploy.Enrolled {
			t.Fatalf("node1 at the server after first boot: %+v, want enrolled", n)
		}
		if n.Inventory == nil || n.Inventory.Firmware != "uefi" {
			t.Errorf("the enrollment carried no inventory of the installed system: %+v", n.Inventory)
		}
	})
}

// checkDisk checks the installed disk file: GPT, ESP files, root
// filesystem personalised for host. It returns the root's PARTUUID.
func checkDisk(t *testing.T, file, host, server string) string {
	t.Helper()
	parts, err := initrd.ReadGPT(file)
	if err != nil {
		t.Fatal(err)
	}
	if len(parts) != 3 || parts[0].Type != "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" || parts[1].Type != "0fc63daf-8483-4772-8e79-3d69d8477de4" ||
		parts[2].Type != "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f" {
		t.Fatalf("partition table: %+v, want ESP, Linux root, swap", parts)
	}
	rootUUID := parts[1].GUID
	esp := espFiles(t, file)
	for _, f := range []string{install.ESPLoader, install.ESPLoaderConf, install.ESPEntry} {
		if _, ok := esp[strings.ToLower(f)]; !ok {
			t.Errorf("ESP lacks %s", f)
		}
	}
	if e := esp[strings.ToLower(install.ESPEntry)]; !strings.Contains(e, "root=PARTUUID="+rootUUID) {
		t.Errorf("loader entry does not boot root PARTUUID=%s:\n%s", rootUUID, e)
	}

	ctx := context.Background()
	dev, detach, err := install.AttachFile(ctx, file)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := detach(); err != nil {
			t.Errorf("detach %s: %v", dev, err)
		}
	})
	if out, err := exec.Command("partx", "-a", dev).CombinedOutput(); err != nil && !strings.Contains(string(out), "busy") {
		t.Fatalf("partx -a %s: %v %s", dev, err, out)
	}
	part := dev + "p2"
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(part); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	mnt := t.TempDir()
	if err := unix.Mount(part, mnt, "ext4", unix.MS_RDONLY, ""); err != nil {
		t.Fatalf("mount %s: %v", part, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	})
	for _, c := range []struct{ file, want string }{
		{"etc/hostname", host + "\n"},
		{"etc/fstab", "PARTUUID=" + rootUUID},
		{"etc/esir/node.json", `"server": "` + server + `"`},
		{"etc/esir/node.json", `"mac": "` + mac1 + `"`},
		{"etc/init.d/S90esir-node", "esir-agent enroll"},
		{"boot/extlinux/extlinux.conf", "root=PARTUUID=" + rootUUID},
		{"etc/esir/boot-modules", "virtio_blk"},
	} {
		b, err := os.ReadFile(filepath.Join(mnt, c.file))
		if err != nil || !strings.Contains(string(b), c.want) {
			t.Errorf("%s: want %q, got %q (%v)", c.file, c.want, b, err)
		}
	}
	if fi, err := os.Stat(filepath.Join(mnt, "etc/machine-id")); err != nil || fi.Size() != 0 {
		t.Errorf("etc/machine-id must exist and be empty: %v", err)
	}
	e, err := pipeline.ReadBootEntry(filepath.Join(mnt, install.ExtlinuxConf))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{e.Kernel, e.Initrd, "usr/sbin/esir-agent", "boot/extlinux/ldlinux.sys"} {
		if _, err := os.Stat(filepath.Join(mnt, f)); err != nil {
			t.Errorf("installed root lacks %s: %v", f, err)
		}
	}
	return rootUUID
}

// espFiles reads the ESP's files (lower-cased paths) with go-diskfs: this
// host's kernel cannot mount FAT.
func espFiles(t *testing.T, file string) map[string]string {
	t.Helper()
	d, err := diskfs.Open(file, diskfs.WithOpenMode(diskfs.ReadOnly))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	fsys, err := d.GetFilesystem(1)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	var walk func(dir string)
	walk = func(dir string) {
		ents, err := fsys.ReadDir(dir)
		if err != nil {
			t.Fatalf("ESP %s: %v", dir, err)
		}
		for _, e := range ents {
			if e.Name() == "." || e.Name() == ".." {
				continue
			}
			p := path.Join(dir, e.Name())
			if e.IsDir() {
				walk(p)
				continue
			}
			f, err := fsys.OpenFile("/"+p, os.O_RDONLY)
			if err != nil {
				t.Fatalf("ESP %s: %v", p, err)
			}
			b, err := io.ReadAll(f)
			if err != nil {
				t.Fatalf("ESP %s: %v", p, err)
			}
			out[strings.ToLower("/"+p)] = string(b)
		}
	}
	walk(".")
	return out
}
