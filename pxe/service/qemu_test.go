package service

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/netlab"
	"github.com/esir-project/esir/pxe/netboot"
	"github.com/esir-project/esir/vm"
)

// buildAgent compiles the real, static esir-agent.
func buildAgent(t *testing.T, dir string) string {
	t.Helper()
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(goBin); err != nil {
		if goBin, err = exec.LookPath("go"); err != nil {
			t.Skip("no go toolchain to build esir-agent")
		}
	}
	out := filepath.Join(dir, "esir-agent")
	cmd := exec.Command(goBin, "build", "-o", out, "github.com/esir-project/esir/cmd/esir-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build esir-agent: %v\n%s", err, b)
	}
	return out
}

// TestFirmwarePXEBootsIntoAgent boots QEMU guests from the network through
// ESIR's DHCP, TFTP and HTTP into the netboot environment, whose /init (the
// real esir-agent) prints its marker on the serial console:
//   - SeaBIOS with QEMU's iPXE NIC ROM: DHCP (user class iPXE) -> script -> kernel;
//   - OVMF with its own PXE (NIC without option ROM): DHCP arch 7 -> TFTP
//     ipxe.efi -> iPXE -> DHCP -> script over HTTP -> kernel + initramfs.
func TestFirmwarePXEBootsIntoAgent(t *testing.T) {
	needLab(t)
	if err := vm.Available(vm.BIOS); err != nil {
		t.Skip(err)
	}
	if _, err := os.Stat("/usr/lib/ipxe/ipxe.efi"); err != nil {
		t.Skip("Debian's ipxe package is not installed")
	}
	if _, err := netboot.FindKernel("/", ""); err != nil {
		t.Skipf("no Debian kernel with modules on the host: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	t.Cleanup(cancel) // parallel subtests run after this function returns
	work := t.TempDir()
	agent := buildAgent(t, work)
	nb, err := netboot.Build(ctx, netboot.Options{KernelRoot: "/", Agent: agent, Out: filepath.Join(work, "netboot"), Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	lab, err := netlab.New(ctx, "pxeqemu")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lab.Close() })
	srv, err := lab.AddHost(ctx, "srv", addr("198.18.13.1/24"), netlab.Link{})
	if err != nil {
		t.Fatal(err)
	}
	startServer(t, ctx, srv, helperConfig{DHCPMode: "full", Iface: "eth0", ServerIP: "198.18.13.1",
		PoolStart: "198.18.13.100", PoolEnd: "198.18.13.150", MaskBits: 24, Router: "198.18.13.1",
		DNS: "198.18.13.1", NTP: "198.18.13.1", BootDir: nb.Dir, HTTPPort: 8080,
		Nodes: map[string]string{"52:54:00:dd:00:01": "install", "52:54:00:dd:00:02": "install"},
		Extra: "console=ttyS0,115200 panic=-1"})

	tests := []struct {
		name string
		fw   vm.Firmware
		mac  string
		nic  vm.NIC
	}{
		{name: "seabios-ipxe-rom", fw: vm.BIOS, mac: "52:54:00:dd:00:01"},
		{name: "ovmf-pxe", fw: vm.UEFI, mac: "52:54:00:dd:00:02", nic: vm.NIC{NoROM: true}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := vm.Available(tt.fw); err != nil {
				t.Skip(err)
			}
			t.Parallel()
			tap := "tappxe" + string(rune('a'+i))
			if err := lab.AddTap(ctx, tap); err != nil {
				t.Fatal(err)
			}
			nic := tt.nic
			nic.Model, nic.MAC, nic.Tap = "virtio-net-pci", tt.mac, tap
			v, err := vm.Start(ctx, vm.Config{Name: tt.name, Firmware: tt.fw, MemoryMiB: 1024, NICs: []vm.NIC{nic},
				BootNetworkFirst: true, NoReboot: true, NetNS: lab.Switch, WorkDir: filepath.Join(work, tt.name)})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				v.Kill()
				if t.Failed() {
					v.KeepLog(os.Getenv("ESIR_ARTIFACTS"), "pxe")
				}
			})
			wctx, wcancel := context.WithTimeout(ctx, 4*time.Minute)
			defer wcancel()
			re := regexp.MustCompile(`esir-agent: netboot environment up kernel=\S+ mode=install mac=` + regexp.QuoteMeta(tt.mac) +
				` server=http://198\.18\.13\.1:8080`)
			line, _, err := v.WaitFor(wctx, re, 0)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(line, "kernel="+nb.Manifest.KernelVersion) {
				t.Errorf("marker %q does not name kernel %s", line, nb.Manifest.KernelVersion)
			}
		})
	}
}
