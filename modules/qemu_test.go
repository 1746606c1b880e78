package modules

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/initramfs"
	"github.com/esir-project/esir/vm"
	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

const qemuInit = `#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "ESIR-MODULES-BEGIN $(cat /proc/uptime)"
/bin/esir-agent modules load --log-level error --settle 1s
echo "ESIR-MODULES-RC $? $(cat /proc/uptime)"
echo "ESIR-AGAIN $(/bin/esir-agent modules load --log-level error --settle 200ms | head -1)"
for n in /sys/class/net/*; do
  [ "${n##*/}" = lo ] && continue
  drv=$(readlink $n/device/driver)
  echo "ESIR-NIC ${n##*/} $(cat $n/address) ${drv##*/}"
done
for b in /sys/block/*; do
  echo "ESIR-BLOCK ${b##*/} $(cat $b/size)"
done
echo ESIR-MODULES-END
poweroff -f
`

// buildQEMUInitramfs makes the test's initramfs: busybox-static as the
// shell, a freshly built esir-agent, and the kernel's module tree (indices
// whole, files minus some driver classes). Nothing else: every driver the machines
// need comes from the loader.
func buildQEMUInitramfs(t *testing.T, k vm.Kernel, dir string) string {
	t.Helper()
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		t.Skip("needs busybox-static (package busybox-static)")
	}
	if ef, err := elf.Open(busybox); err == nil {
		for _, p := range ef.Progs {
			if p.Type == elf.PT_INTERP {
				t.Skipf("%s is dynamically linked: needs busybox-static", busybox)
			}
		}
		ef.Close()
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("needs the go tool to build esir-agent")
	}
	agent := filepath.Join(dir, "esir-agent")
	build := exec.Command(goBin, "build", "-o", agent, "../cmd/esir-agent")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build esir-agent: %v\n%s", err, out)
	}
	a := initramfs.New()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(a.File("bin/busybox", busybox, 0o755))
	for _, app := range []string{"sh", "mount", "cat", "echo", "readlink", "poweroff", "ls"} {
		must(a.Symlink("bin/"+app, "busybox"))
	}
	must(a.File("bin/esir-agent", agent, 0o755))
	must(a.Bytes("init", []byte(qemuInit), 0o755))
	for _, d := range []string{"proc", "sys", "dev", "tmp"} {
		must(a.Dir(d, 0o755))
	}
	must(a.CharDev("dev/console", 0o600, 5, 1))
	// The module tree: every index whole, and the module files of the
	// driver classes a PC has (buses, storage, Intel and Realtek NICs, input,
	// CPU features). Leaving out graphics, sound, wireless, InfiniBand and
	// the like keeps the initramfs near 50 MB; a module matched there would
	// fail as a missing file, which the test tolerates.
	dirs := []string{"arch", "block", "crypto", "lib", "virt", "net/core", "drivers/acpi", "drivers/ata", "drivers/block",
		"drivers/cdrom", "drivers/char", "drivers/cpufreq", "drivers/edac", "drivers/firmware", "drivers/i2c",
		"drivers/input", "drivers/hid", "drivers/nvme", "drivers/parport", "drivers/pci", "drivers/usb/core",
		"drivers/usb/common", "drivers/usb/host", "drivers/usb/storage", "drivers/virtio",
		"drivers/net/ethernet/intel", "drivers/net/ethernet/realtek", "drivers/net/phy", "drivers/net/mdio"}
	topOnly := []string{"drivers/scsi", "drivers/net"} // their own files, not subfolders
	keep := func(rel string) bool {
		if !strings.HasPrefix(rel, "kernel/") {
			return true // indices
		}
		rel = strings.TrimPrefix(rel, "kernel/")
		for _, d := range dirs {
			if strings.HasPrefix(rel, d+"/") {
				return true
			}
		}
		for _, d := range topOnly {
			if filepath.Dir(rel) == d {
				return true
			}
		}
		return false
	}
	base := filepath.Join("lib/modules", k.Version)
	files := 0
	// The NIC and disk drivers go in compressed (xz, zstd, gzip), as
	// Fedora and Ubuntu ship them: Debian's kernel cannot decompress
	// modules itself, so they load only through the loader's own
	// decompression and init_module. modules.dep is rewritten to name the
	// compressed files, and modules.dep.bin left out so the loader reads it.
	suffixOf := map[string]string{
		"virtio_net": ".xz", "net_failover": ".xz", "failover": ".xz", "sd_mod": ".xz",
		"e1000": ".zst", "e1000e": ".zst", "virtio_pci": ".zst", "virtio_ring": ".zst", "virtio": ".zst",
		"virtio_blk": ".zst", "nvme": ".zst", "nvme_core": ".zst",
		"ahci": ".gz", "libahci": ".gz", "libata": ".gz",
	}
	compress := map[string]string{}
	must(filepath.WalkDir(filepath.Join(k.ModulesDir, "kernel"), func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(k.ModulesDir, p)
		if suf, ok := suffixOf[nameFromPath(rel)]; ok && d.Type().IsRegular() && keep(rel) {
			compress[rel] = suf
		}
		return nil
	}))
	if len(compress) != len(suffixOf) {
		t.Fatalf("found %d of the %d modules to compress: %v", len(compress), len(suffixOf), compress)
	}
	err = filepath.WalkDir(k.ModulesDir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(k.ModulesDir, p)
		if !d.Type().IsRegular() || !keep(rel) || rel == "modules.dep.bin" {
			return nil
		}
		files++
		if suf, ok := compress[rel]; ok {
			return a.Bytes(filepath.Join(base, rel+suf), compressFile(t, p, suf), 0o644)
		}
		if rel == "modules.dep" {
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			var b strings.Builder
			for _, line := range strings.Split(strings.TrimRight(string(data), "\n"), "\n") {
				f := strings.Fields(line)
				if len(f) == 0 {
					continue
				}
				f[0] = strings.TrimSuffix(f[0], ":")
				for i := range f {
					f[i] += compress[f[i]]
				}
				b.WriteString(f[0] + ":")
				for _, dep := range f[1:] {
					b.WriteString(" " + dep)
				}
				b.WriteString("\n")
			}
			return a.Bytes(filepath.Join(base, rel), []byte(b.String()), 0o644)
		}
		return a.File(filepath.Join(base, rel), p, 0o644)
	})
	must(err)
	t.Logf("initramfs: %d modules compressed", len(compress))
	// Uncompressed: the kernel unpacks a plain cpio much faster under TCG.
	out := filepath.Join(dir, "initrd.cpio")
	f, err := os.Create(out)
	must(err)
	must(a.WriteCPIO(f))
	must(f.Close())
	fi, _ := os.Stat(out)
	t.Logf("initramfs: %d module tree files, %d MiB", files, fi.Size()>>20)
	return out
}

// TestQEMULoad boots Debian's kernel in QEMU (TCG) on three machines whose
// NIC and disk drivers are all modules, with an initramfs holding only the
// module tree, busybox and esir-agent; the loader must bring up the NIC
// (found by its MAC, with the right driver) and the disk.
func TestQEMULoad(t *testing.T) {
	if testing.Short() {
		t.Skip("QEMU boots are slow; skipped with -short")
	}
	if err := vm.Available(vm.BIOS); err != nil {
		t.Skip(err)
	}
	k, err := vm.HostDebianKernel()
	if err != nil {
		t.Skip(err)
	}
	dir := t.TempDir()
	initrd := buildQEMUInitramfs(t, k, dir)
	for i, tc := range []struct {
		name, machine, nic, nicDriver, disk, blockPrefix string
	}{
		{"virtio", "q35", "virtio-net-pci", "virtio_net", "virtio-blk", "vda"},
		{"e1000-ahci", "pc", "e1000", "e1000", "ahci", "sda"},
		{"e1000e-nvme", "q35", "e1000e", "e1000e", "nvme", "nvme0n1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			disk := filepath.Join(dir, tc.name+".img")
			if err := os.WriteFile(disk, make([]byte, 32<<20), 0o644); err != nil {
				t.Fatal(err)
			}
			mac := fmt.Sprintf("52:54:00:e5:00:%02x", i+1)
			ctx, cancel := context.WithTimeout(context.Background(), 240*time.Second)
			defer cancel()
			m, err := vm.Start(ctx, vm.Config{
				Name:      "modules-" + tc.name,
				Machine:   tc.machine,
				MemoryMiB: 1024,
				NICs:      []vm.NIC{{Model: tc.nic, MAC: mac}},
				Disks:     []vm.Disk{{Path: disk, Model: tc.disk}},
				Kernel:    k.Vmlinuz,
				Initrd:    initrd,
				Append:    "console=ttyS0 panic=-1 quiet",
				NoReboot:  true,
				WorkDir:   dir,
			})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Kill()
			defer func() {
				if t.Failed() {
					if err := m.KeepLog(os.Getenv("ESIR_ARTIFACTS"), "modules-qemu"); err != nil {
						t.Log(err)
					}
				}
			}()
			start := time.Now()
			if _, _, err := m.WaitFor(ctx, regexp.MustCompile(`^ESIR-MODULES-END`), 0); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: boot and module load took %s", tc.name, time.Since(start).Round(time.Second))
			console := strings.ReplaceAll(m.Serial(), "\r", "")
			var nicOK, diskOK, again bool
			for _, line := range strings.Split(console, "\n") {
				f := strings.Fields(line)
				switch {
				case len(f) >= 4 && f[0] == "ESIR-NIC" && f[2] == mac:
					if f[3] != tc.nicDriver {
						t.Errorf("NIC %s (%s) is driven by %q, want %s", f[1], mac, f[3], tc.nicDriver)
					}
					nicOK = true
				case len(f) == 3 && f[0] == "ESIR-BLOCK" && f[1] == tc.blockPrefix:
					diskOK = f[2] == fmt.Sprint(32<<20/512)
				case len(f) >= 2 && (f[0] == "ESIR-MODULES-BEGIN" || f[0] == "ESIR-MODULES-RC"):
					t.Logf("%s", line)
				case f0(f) == "ESIR-AGAIN":
					// A second run finds everything loaded and loads nothing.
					again = true
					if !strings.HasPrefix(line, "ESIR-AGAIN modules: 0 loaded (") {
						t.Errorf("second load: %s", line)
					}
				case strings.HasPrefix(line, "modules: FAILED"):
					// Tolerated: files left out of the test's tree, drivers
					// whose init finds no hardware here (cpufreq, EDAC), and
					// the modules that need those.
					if !strings.Contains(line, "module file: open") && !strings.Contains(line, "no such device") && !strings.Contains(line, "its dependency") {
						t.Errorf("a module failed for a reason the test does not expect: %s", line)
					}
				}
			}
			if !again {
				t.Error("the second load printed nothing")
			}
			if !nicOK {
				t.Errorf("no NIC with MAC %s came up", mac)
			}
			if !diskOK {
				t.Errorf("disk %s with %d sectors did not appear", tc.blockPrefix, 32<<20/512)
			}
			if t.Failed() {
				t.Logf("console:\n%s", tailLines(console, 40))
			}
		})
	}
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// compressFile returns file compressed the way suffix says.
func compressFile(t *testing.T, file, suffix string) []byte {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	var w io.WriteCloser
	switch suffix {
	case ".xz":
		w, err = xz.NewWriter(&buf)
	case ".zst":
		w, err = zstd.NewWriter(&buf)
	case ".gz":
		w = gzip.NewWriter(&buf)
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func f0(f []string) string {
	if len(f) == 0 {
		return ""
	}
	return f[0]
}
