package lab

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/netlab"
	"github.com/esir-project/esir/vm"
	"golang.org/x/sys/unix"
)

func TestPlan(t *testing.T) {
	tests := []struct {
		name               string
		n                  int
		firmware, hardware string
		want               []Node // Name, MAC, Firmware, NIC, Disk only
		err                string
	}{
		{name: "mixed", n: 4, firmware: FirmwareMixed, hardware: HardwareMixed, want: []Node{
			{Name: "node01", Firmware: vm.BIOS, NIC: "e1000", Disk: "ahci"},
			{Name: "node02", Firmware: vm.UEFI, NIC: "virtio-net-pci", Disk: "nvme"},
			{Name: "node03", Firmware: vm.BIOS, NIC: "e1000e", Disk: "virtio-blk"},
			{Name: "node04", Firmware: vm.UEFI, NIC: "e1000", Disk: "ahci"},
		}},
		{name: "uniform", n: 2, firmware: FirmwareUEFI, hardware: HardwareVirtio, want: []Node{
			{Name: "node01", Firmware: vm.UEFI, NIC: "virtio-net-pci", Disk: "virtio-blk"},
			{Name: "node02", Firmware: vm.UEFI, NIC: "virtio-net-pci", Disk: "virtio-blk"},
		}},
		{name: "no nodes", n: 0, firmware: FirmwareBIOS, hardware: HardwareVirtio, err: "--nodes 0"},
		{name: "bad firmware", n: 1, firmware: "coreboot", hardware: HardwareVirtio, err: `--firmware "coreboot"`},
		{name: "bad hardware", n: 1, firmware: FirmwareBIOS, hardware: "exotic", err: `--hardware "exotic"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Plan("lab", tt.n, tt.firmware, tt.hardware, DefaultDiskBytes)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want it to contain %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tt.want) {
				t.Fatalf("%d nodes, want %d", len(got), len(tt.want))
			}
			macs := map[string]bool{}
			taps := map[string]bool{}
			for i, w := range tt.want {
				g := got[i]
				if g.Name != w.Name || g.Firmware != w.Firmware || g.NIC != w.NIC || g.Disk != w.Disk {
					t.Errorf("node %d = %s %s %s %s, want %s %s %s %s", i, g.Name, g.Firmware, g.NIC, g.Disk, w.Name, w.Firmware, w.NIC, w.Disk)
				}
				if _, err := net.ParseMAC(g.MAC); err != nil || macs[g.MAC] {
					t.Errorf("node %d MAC %q: invalid or repeated", i, g.MAC)
				}
				if len(g.Tap) > 15 || taps[g.Tap] {
					t.Errorf("node %d tap %q: too long or repeated", i, g.Tap)
				}
				macs[g.MAC], taps[g.Tap] = true, true
			}
		})
	}
	a, _ := Plan("lab", 1, FirmwareBIOS, HardwareVirtio, DefaultDiskBytes)
	b, _ := Plan("other", 1, FirmwareBIOS, HardwareVirtio, DefaultDiskBytes)
	if a[0].MAC == b[0].MAC {
		t.Errorf("labs lab and other share MAC %s", a[0].MAC)
	}
}

func TestVMConfigBootsNetworkFirst(t *testing.T) {
	st := &State{Dir: t.TempDir(), Switch: "esir-x-sw", MemoryMiB: 768}
	nodes, err := Plan("x", 2, FirmwareMixed, HardwareMixed, DefaultDiskBytes)
	if err != nil {
		t.Fatal(err)
	}
	for i, nd := range nodes {
		nd.DiskPath = filepath.Join(st.Dir, nd.Name+".img")
		cfg := vmConfig(st, nd)
		args, err := vm.Args(cfg)
		if err != nil {
			t.Fatal(err)
		}
		line := strings.Join(args, " ")
		for _, want := range []string{"-accel tcg", "-cpu max", "-m 768", "ifname=" + nd.Tap, "mac=" + nd.MAC, "bootindex=1"} {
			if !strings.Contains(line, want) {
				t.Errorf("node %d: qemu args lack %q:\n%s", i, want, line)
			}
		}
		// The NIC carries bootindex=1: network first.
		for _, a := range args {
			if strings.HasPrefix(a, nd.NIC+",") && !strings.Contains(a, "bootindex=1") {
				t.Errorf("node %d: NIC %q is not the first boot device", i, a)
			}
		}
		if !cfg.Detached || cfg.NetNS != st.Switch {
			t.Errorf("node %d: detached=%v netns=%q", i, cfg.Detached, cfg.NetNS)
		}
		// UEFI + virtio-net uses OVMF's own PXE client (no iPXE ROM).
		if nd.Firmware == vm.UEFI && nd.NIC == "virtio-net-pci" && !strings.Contains(line, "romfile=,") && !strings.HasSuffix(line, "romfile=") {
			t.Errorf("node %d: UEFI virtio-net keeps an option ROM: %s", i, line)
		}
	}
}

func TestWaitConsole(t *testing.T) {
	dir := t.TempDir()
	st := &State{Dir: dir, Nodes: []Node{{Name: "node01", Serial: filepath.Join(dir, "node01-serial.log")}}}
	if err := os.WriteFile(st.Nodes[0].Serial, []byte("firmware\r\nesir-agent: up\npartial"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	line, off, err := st.WaitConsole(ctx, "node01", regexp.MustCompile(`^esir-agent: up$`), 0)
	if err != nil || line != "esir-agent: up" || off != int64(len("firmware\r\nesir-agent: up\n")) {
		t.Fatalf("WaitConsole = %q, %d, %v", line, off, err)
	}
	go func() {
		time.Sleep(300 * time.Millisecond)
		f, _ := os.OpenFile(st.Nodes[0].Serial, os.O_APPEND|os.O_WRONLY, 0)
		fmt.Fprint(f, " line done\nesir-sample: up hostname=node01\n")
		f.Close()
	}()
	line, _, err = st.WaitConsole(ctx, "node01", regexp.MustCompile(`esir-sample: up`), off)
	if err != nil || !strings.Contains(line, "hostname=node01") {
		t.Fatalf("WaitConsole after append = %q, %v", line, err)
	}
	short, scancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer scancel()
	if _, _, err := st.WaitConsole(short, "node01", regexp.MustCompile("never"), 0); err == nil || !strings.Contains(err.Error(), "esir-sample: up hostname=node01") {
		t.Fatalf("timeout error lacks the console tail: %v", err)
	}
	if _, _, err := st.WaitConsole(ctx, "node09", regexp.MustCompile("x"), 0); err == nil || !strings.Contains(err.Error(), "node01") {
		t.Fatalf("unknown node: %v", err)
	}
}

// listenNS listens on addr inside namespace ns (the socket stays there).
func listenNS(t *testing.T, ns, addr string) net.Listener {
	t.Helper()
	ch := make(chan any, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open(filepath.Join(netnsDir, ns))
		if err != nil {
			ch <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- err
			return
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			ch <- err
			return
		}
		ch <- ln
	}()
	switch v := (<-ch).(type) {
	case net.Listener:
		return v
	case error:
		t.Fatal(v)
	}
	return nil
}

func TestForwardIntoNamespace(t *testing.T) {
	if err := netlab.Available(); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	nl, err := netlab.New(ctx, "labfwd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nl.Close() })
	if _, err := nl.SwitchHost(ctx, netip.MustParsePrefix("198.18.7.1/24")); err != nil {
		t.Fatal(err)
	}
	// An echo server that exists only inside the namespace.
	inner := listenNS(t, nl.Switch, "198.18.7.1:7000")
	defer inner.Close()
	go func() {
		for {
			c, err := inner.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- Forward(ctx, ln, nl.Switch, "198.18.7.1:7000", slog.New(slog.DiscardHandler)) }()
	for i := 0; i < 3; i++ {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		msg := fmt.Sprintf("hello %d through the forwarder\n", i)
		fmt.Fprint(c, msg)
		got, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err != nil || got != msg {
			t.Fatalf("echo %d = %q, %v; want %q", i, got, err, msg)
		}
	}
	// The forwarder stops by itself once the namespace is gone.
	if err := nl.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Forward: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the forwarder outlived its namespace")
	}
}

func TestDownIsIdempotentAndPurgesLeftovers(t *testing.T) {
	if err := netlab.Available(); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	dir := t.TempDir()
	// Nothing there: no error, twice.
	for i := 0; i < 2; i++ {
		if err := Down(ctx, dir, "labdn"); err != nil {
			t.Fatalf("down %d on an empty directory: %v", i, err)
		}
	}
	// A crashed lab: namespace with a tap and a process inside, a state file
	// naming a process, disks and logs.
	nl, err := netlab.New(ctx, "labdn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nl.Close() })
	if err := nl.AddTap(ctx, "tlabdn1"); err != nil {
		t.Fatal(err)
	}
	sleeper := netlab.NSCommand(context.Background(), nl.Switch, "sleep", "600")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	go sleeper.Wait()
	st := &State{Name: "labdn", Dir: dir, Switch: nl.Switch, Nodes: []Node{{Name: "node01", PID: 999999999}}}
	for _, d := range []string{st.diskDir(), st.vmDir()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := makeDisk(filepath.Join(st.diskDir(), "node01.img"), 1<<30); err != nil {
		t.Fatal(err)
	}
	if err := st.Save(); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "store"), 0o755); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if err := Down(ctx, dir, ""); err != nil {
			t.Fatalf("down %d: %v", i, err)
		}
	}
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "esir-labdn-") {
		t.Errorf("namespaces left: %s", out)
	}
	if alive(sleeper.Process.Pid) {
		t.Errorf("process %d in the lab's namespace survived down", sleeper.Process.Pid)
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if e.Name() != "store" {
			t.Errorf("down left %s behind", e.Name())
		}
	}
	if _, err := Load(dir); err == nil {
		t.Error("state survived down")
	}
}
