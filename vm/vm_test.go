package vm

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/initramfs"
)

func TestArgs(t *testing.T) {
	cfg := Config{
		Name: "n1", Firmware: UEFI, WorkDir: "/w", BootNetworkFirst: true, NoIPv6Boot: true,
		NICs:  []NIC{{Model: "e1000", MAC: "52:54:00:00:00:01", Tap: "tap0", NoROM: true}},
		Disks: []Disk{{Path: "/d.img", Model: "nvme"}, {Path: "/e.img", Model: "ahci"}},
	}
	args, err := Args(cfg)
	if err != nil {
		t.Fatal(err)
	}
	line := strings.Join(args, " ")
	for _, want := range []string{
		"-accel tcg -cpu max",
		"if=pflash,format=raw,unit=0,readonly=on,file=" + OVMFCode,
		"file=/w/n1-vars.fd",
		"tap,id=net0,ifname=tap0,script=no,downscript=no",
		"e1000,netdev=net0,mac=52:54:00:00:00:01,romfile=,bootindex=1",
		"nvme,drive=disk0,serial=ESIRN100,bootindex=2",
		"ide-hd,drive=disk1,bus=ide.1,serial=ESIRN101,bootindex=3",
		"-serial file:/w/n1-serial.log",
		"name=opt/org.tianocore/IPv6PXESupport,string=no",
	} {
		if !strings.Contains(line, want) {
			t.Errorf("args lack %q:\n%s", want, line)
		}
	}
	bad := []Config{
		{Name: "x"},
		{Name: "x", WorkDir: "/w", Firmware: "coreboot"},
		{Name: "x", WorkDir: "/w", Disks: []Disk{{Path: "/d", Model: "scsi"}}},
		{Name: "x", WorkDir: "/w", Disks: []Disk{{Path: "/d", Model: "ide"}}},
		{Name: "x", WorkDir: "/w", Machine: "virt"},
	}
	for _, c := range bad {
		if _, err := Args(c); err == nil {
			t.Errorf("config %+v accepted", c)
		}
	}
	// Disk first unless the network is asked first; no boot indexes with -kernel.
	args, _ = Args(Config{Name: "k", WorkDir: "/w", Kernel: "/k", Initrd: "/i", Append: "console=ttyS0",
		NICs: []NIC{{}}, Disks: []Disk{{Path: "/d"}}})
	line = strings.Join(args, " ")
	if strings.Contains(line, "bootindex") || !strings.Contains(line, "-kernel /k -initrd /i -append console=ttyS0") {
		t.Errorf("direct kernel boot args: %s", line)
	}
}

func TestFindKernel(t *testing.T) {
	root := t.TempDir()
	for _, v := range []string{"6.1.0-9-amd64", "6.1.0-27-amd64", "6.1.0-30-amd64"} {
		must(t, os.MkdirAll(filepath.Join(root, "boot"), 0o755))
		must(t, os.WriteFile(filepath.Join(root, "boot", "vmlinuz-"+v), nil, 0o644))
		if v != "6.1.0-30-amd64" { // no modules: not a candidate
			must(t, os.MkdirAll(filepath.Join(root, "lib/modules", v), 0o755))
			must(t, os.WriteFile(filepath.Join(root, "lib/modules", v, "modules.dep"), nil, 0o644))
		}
	}
	k, err := findKernel(root)
	if err != nil || k.Version != "6.1.0-27-amd64" {
		t.Fatalf("findKernel = %+v, %v; want 6.1.0-27-amd64", k, err)
	}
	if _, err := findKernel(t.TempDir()); err == nil {
		t.Fatal("an empty root gave a kernel")
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestBootDebianKernel boots the host's Debian kernel with a busybox initramfs
// under SeaBIOS and OVMF and waits for the init's marker on the serial console.
func TestBootDebianKernelQEMU(t *testing.T) {
	if err := Available(UEFI); err != nil {
		t.Skip(err)
	}
	k, err := HostDebianKernel()
	if err != nil {
		t.Skip(err)
	}
	if _, err := os.Stat("/bin/busybox"); err != nil {
		t.Skip("busybox-static not installed")
	}
	dir := t.TempDir()
	a := initramfs.New()
	must(t, a.File("bin/busybox", "/bin/busybox", 0o755))
	must(t, a.Symlink("bin/sh", "busybox"))
	must(t, a.Bytes("init", []byte("#!/bin/sh\n/bin/busybox mount -t proc proc /proc\necho ESIR-VM-MARKER $(/bin/busybox cat /proc/sys/kernel/osrelease)\n/bin/busybox poweroff -f\n"), 0o755))
	must(t, a.Dir("proc", 0o555))
	must(t, a.CharDev("dev/console", 0o600, 5, 1))
	initrd := filepath.Join(dir, "initrd")
	must(t, a.WriteFile(initrd))
	for _, fw := range []Firmware{BIOS, UEFI} {
		t.Run(string(fw), func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			v, err := Start(ctx, Config{Name: "boot-" + string(fw), Firmware: fw, WorkDir: dir, MemoryMiB: 512,
				Kernel: k.Vmlinuz, Initrd: initrd, Append: "console=ttyS0 panic=-1 quiet", NoReboot: true})
			if err != nil {
				t.Fatal(err)
			}
			defer v.Kill()
			line, _, err := v.WaitFor(ctx, regexp.MustCompile(`ESIR-VM-MARKER`), 0)
			if err != nil {
				_ = v.KeepLog(os.Getenv("ESIR_ARTIFACTS"), "vm-test")
				t.Fatal(err)
			}
			if !strings.Contains(line, k.Version) {
				t.Fatalf("marker line %q lacks kernel version %s", line, k.Version)
			}
			select {
			case <-v.Done():
			case <-ctx.Done():
				t.Fatal("guest did not power off")
			}
		})
	}
}
