package install

import (
	"fmt"
	"os"
	"path"

	"github.com/diskfs/go-diskfs"
	fsdisk "github.com/diskfs/go-diskfs/disk"
	"github.com/diskfs/go-diskfs/filesystem"
)

// Files the bootloaders use.
const (
	ExtlinuxConf = "/boot/extlinux/extlinux.conf"
	// ESP paths (FAT, case-insensitive).
	ESPLoader      = "/EFI/BOOT/BOOTX64.EFI"
	ESPLoaderConf  = "/loader/loader.conf"
	ESPEntry       = "/loader/entries/esir.conf"
	espKernelDir   = "/esir"
	bootEntryTitle = "ESIR"
)

// cmdline is the installed kernel's command line; what follows "--" goes to
// /init, which runs esir-agent in initrd mode.
func (r *run) cmdline() string {
	c := "root=PARTUUID=" + r.res.RootPartUUID + " rootfstype=ext4 ro"
	if r.opts.Cmdline != "" {
		c += " " + r.opts.Cmdline
	}
	return c + " -- initrd"
}

// The bootloader step's work is split in two. startBootPrep runs the part
// that needs only the unpacked kernel in a goroutine while the early-boot
// initramfs is built: extlinux's files in the root (its sync flushes the
// unpacked tree), a fresh FAT32 on the ESP with the kernel and
// loader.conf. The bootloader step then waits for it and writes what
// makes the disk bootable: the early-boot initramfs and the loader entry
// on the ESP, systemd-boot as the firmware's fallback loader, extlinux's
// configuration and the boot code in the first 440 bytes. Until then
// neither firmware finds a loader of the new install.

// bootPrep is the bootloader work that runs beside the earlyboot step.
type bootPrep struct {
	// extlinux is closed once extlinux has written the root: the
	// earlyboot step writes its files after it, so that the root's
	// allocation, which ldlinux.sys records, does not depend on timing.
	extlinux chan struct{}
	done     chan struct{}
	err      error
	esp      *fsdisk.Disk          // the disk, opened by go-diskfs; closed by finish
	fs       filesystem.FileSystem // the ESP's new FAT32
}

// startBootPrep starts the bootloader's preparation; r.kernel must be set.
func (r *run) startBootPrep() {
	p := &bootPrep{extlinux: make(chan struct{}), done: make(chan struct{})}
	r.prep = p
	go func() {
		defer close(p.done)
		err := r.extlinuxInstall()
		close(p.extlinux)
		if err != nil {
			p.err = fmt.Errorf("BIOS (extlinux): %w", err)
			return
		}
		if err := r.espPrepare(p); err != nil {
			p.err = fmt.Errorf("UEFI (systemd-boot on the ESP): %w", err)
		}
	}()
}

// waitBootPrep waits for the preparation and returns its error.
func (r *run) waitBootPrep() error {
	if r.prep == nil {
		return nil
	}
	<-r.prep.done
	return r.prep.err
}

// closeBootPrep waits for the preparation and releases the ESP's disk.
func (r *run) closeBootPrep() error {
	if r.prep == nil {
		return nil
	}
	<-r.prep.done
	var err error
	if r.prep.esp != nil {
		err = r.prep.esp.Close()
		r.prep.esp = nil
	}
	r.prep = nil
	return err
}

// bootloader finishes extlinux (BIOS) in the root filesystem and the disk's
// first 440 bytes, and systemd-boot (UEFI) on the ESP.
func (r *run) bootloader() (string, error) {
	if r.prep == nil {
		r.startBootPrep()
	}
	if err := r.waitBootPrep(); err != nil {
		return "", err
	}
	if err := r.extlinuxFinish(); err != nil {
		return "", fmt.Errorf("BIOS (extlinux): %w", err)
	}
	if err := r.espFinish(r.prep); err != nil {
		return "", fmt.Errorf("UEFI (systemd-boot on the ESP): %w", err)
	}
	if err := r.closeBootPrep(); err != nil {
		return "", fmt.Errorf("UEFI (systemd-boot on the ESP): close %s: %w", r.disk.Path, err)
	}
	return fmt.Sprintf("extlinux and systemd-boot, kernel %s, cmdline %q", r.kernel.version, r.cmdline()), nil
}

// extlinuxInstall puts extlinux's loader files into /boot/extlinux.
func (r *run) extlinuxInstall() error {
	dir := r.inRoot(path.Dir(ExtlinuxConf))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	_, err := runCmd(r.ctx, r.opts.Tools.Extlinux, "--install", dir)
	return err
}

// extlinuxFinish writes extlinux's configuration and the boot code.
func (r *run) extlinuxFinish() error {
	conf := fmt.Sprintf(`# Written by ESIR's installer.
DEFAULT esir
PROMPT 0
TIMEOUT 10
LABEL esir
	MENU LABEL %s %s
	LINUX %s
	INITRD %s
	APPEND %s
`, bootEntryTitle, r.img.Ref, r.kernel.vmlinuz, r.kernel.initrd, r.cmdline())
	if err := r.writeFile(ExtlinuxConf, []byte(conf), 0o644); err != nil {
		return err
	}
	mbr, err := os.ReadFile(r.opts.Tools.GPTMBR)
	if err != nil {
		return err
	}
	if len(mbr) > 440 {
		return fmt.Errorf("%s is %d bytes, want at most 440", r.opts.Tools.GPTMBR, len(mbr))
	}
	f, err := os.OpenFile(r.disk.Path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(mbr, 0); err != nil {
		f.Close()
		return fmt.Errorf("write boot code to %s: %w", r.disk.Path, err)
	}
	return f.Close()
}

// espKernel is the kernel's path on the ESP; espInitrd the initramfs's.
func (r *run) espKernel() string { return espKernelDir + "/vmlinuz-" + r.kernel.version }
func (r *run) espInitrd() string { return espKernelDir + "/initrd.img-" + r.kernel.version }

// espPrepare makes a fresh FAT32 filesystem on the ESP and writes the
// kernel and loader.conf (systemd-boot reads only FAT). go-diskfs writes
// it, so no vfat driver is needed here.
func (r *run) espPrepare(p *bootPrep) error {
	b, err := openCoalescing(r.disk.Path)
	if err != nil {
		return err
	}
	d, err := diskfs.OpenBackend(b, diskfs.WithOpenMode(diskfs.ReadWrite), diskfs.WithSectorSize(512))
	if err != nil {
		b.Close()
		return fmt.Errorf("open %s: %w", r.disk.Path, err)
	}
	p.esp = d
	fs, err := d.CreateFilesystem(fsdisk.FilesystemSpec{Partition: espPart, FSType: filesystem.TypeFat32, VolumeLabel: "ESP", Reproducible: true})
	if err != nil {
		return fmt.Errorf("create FAT32: %w", err)
	}
	p.fs = fs
	return writeFAT(fs, []fatFile{
		{name: ESPLoaderConf, data: "default esir.conf\ntimeout 0\nconsole-mode keep\n"},
		{name: r.espKernel(), src: r.inRoot(r.kernel.vmlinuz)},
	})
}

// espFinish writes the early-boot initramfs, the loader entry and, last,
// systemd-boot as the fallback loader, then flushes the disk.
func (r *run) espFinish(p *bootPrep) error {
	entry := fmt.Sprintf("title %s %s\nversion %s\nlinux %s\ninitrd %s\noptions %s\n",
		bootEntryTitle, r.img.Ref, r.kernel.version, r.espKernel(), r.espInitrd(), r.cmdline())
	if err := writeFAT(p.fs, []fatFile{
		{name: r.espInitrd(), src: r.inRoot(r.kernel.initrd)},
		{name: ESPEntry, data: entry},
		{name: ESPLoader, src: r.opts.Tools.SystemdBoot},
	}); err != nil {
		return err
	}
	if w, err := p.esp.Backend.Writable(); err == nil {
		if s, ok := w.(interface{ Sync() error }); ok {
			return s.Sync()
		}
	}
	return nil
}

// fatFile is a file to write onto the ESP: data, or the content of src.
type fatFile struct {
	name string
	src  string
	data string
}

func writeFAT(fs filesystem.FileSystem, files []fatFile) error {
	for _, f := range files {
		if err := fs.Mkdir(path.Dir(f.name)); err != nil {
			return fmt.Errorf("mkdir %s: %w", path.Dir(f.name), err)
		}
		data := []byte(f.data)
		if f.src != "" {
			// One Write per file: go-diskfs allocates clusters and
			// rewrites the whole FAT on every Write call, so io.Copy's
			// 32 KiB writes cost a FAT rewrite each (~1 s for a kernel).
			var err error
			if data, err = os.ReadFile(f.src); err != nil {
				return err
			}
		}
		out, err := fs.OpenFile(f.name, os.O_CREATE|os.O_RDWR|os.O_TRUNC)
		if err != nil {
			return fmt.Errorf("create %s: %w", f.name, err)
		}
		if _, err := out.Write(data); err != nil {
			out.Close()
			return fmt.Errorf("write %s: %w", f.name, err)
		}
		if err := out.Close(); err != nil {
			return fmt.Errorf("write %s: %w", f.name, err)
		}
	}
	return nil
}
