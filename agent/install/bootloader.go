package install

import (
	"fmt"
	"os"
	"path"
	"strings"

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

// The bootloader step's work is spread over the install. Once the GPT is
// written, a job makes a fresh FAT32 on the ESP with loader.conf (it needs
// nothing from the image). The unpack step runs extlinux --install on the
// empty root filesystem before the image's first byte: extlinux's sync()
// (of every filesystem) has next to nothing to write then, and where
// ldlinux.sys lands, whose own sector list extlinux patches into it, does
// not depend on how far the unpack's writeback has got. Once the
// image is unpacked and checked, a job writes the kernel onto the ESP,
// then the early-boot initramfs as soon as it is built and the loader
// entry (systemd-boot reads only FAT). The bootloader step then writes what
// makes the disk bootable: extlinux's configuration and the boot code in
// the first 440 bytes, and systemd-boot as the firmware's fallback loader.
// Until then neither firmware finds a loader of the new install.

// startESP starts making the ESP's filesystem; the GPT must be written.
func (r *run) startESP() {
	r.esp = r.goJob(func() error {
		if err := r.espCreate(); err != nil {
			return fmt.Errorf("UEFI (systemd-boot on the ESP): %w", err)
		}
		return nil
	})
}

// startBootFiles starts the boot files' jobs that need the unpacked kernel
// (r.kernel): extlinux's configuration in the root, and the kernel onto
// the ESP once its filesystem is made (read at once, so the root can be
// released early), then the early-boot initramfs once r.initrd has built
// it.
func (r *run) startBootFiles() {
	r.extlinuxConf = r.goJob(func() error {
		if err := r.extlinuxConfig(); err != nil {
			return fmt.Errorf("BIOS (extlinux): %w", err)
		}
		return nil
	})
	var kernel []byte
	r.kernelRead = r.goJob(func() error {
		var err error
		if kernel, err = os.ReadFile(r.inRoot(r.kernel.vmlinuz)); err != nil {
			return fmt.Errorf("UEFI (systemd-boot on the ESP): %w", err)
		}
		return nil
	})
	fat, read, initrd := r.esp, r.kernelRead, r.initrd
	r.esp = r.goJob(func() error {
		if err := fat.wait(); err != nil {
			return err
		}
		if err := read.wait(); err != nil {
			return err
		}
		// The initramfs is on the install's critical path (the root's
		// unmount waits for it), the ESP is not: it waits for the CPU.
		if err := initrd.wait(); err != nil {
			return nil // the earlyboot step reports it
		}
		if err := writeFAT(r.espFS, []fatFile{
			{name: r.espKernel(), data: kernel},
			{name: r.espInitrd(), data: r.initrdData},
			{name: ESPEntry, data: []byte(r.espEntry())},
		}); err != nil {
			return fmt.Errorf("UEFI (systemd-boot on the ESP): %w", err)
		}
		return nil
	})
	// Most of the ESP's bytes are written then: the disk's writeback of
	// them runs beside the steps that follow; the sync step waits for it.
	esp := r.esp
	r.espWriteback = r.goJob(func() error {
		if err := esp.wait(); err != nil {
			return nil // the bootloader step reports it
		}
		if err := r.espBackend.startWriteback(r.layout.espStart, r.layout.espSize); err != nil {
			return fmt.Errorf("UEFI (systemd-boot on the ESP): %w", err)
		}
		return nil
	})
}

// closeESP releases the ESP's disk; every job must have finished.
func (r *run) closeESP() error {
	if r.espDisk == nil {
		return nil
	}
	err := r.espDisk.Close()
	r.espDisk, r.espFS = nil, nil
	return err
}

// bootloader finishes extlinux (BIOS) in the root filesystem and the disk's
// first 440 bytes, and systemd-boot (UEFI) on the ESP.
func (r *run) bootloader() (string, error) {
	if err := r.extlinuxConf.wait(); err != nil {
		return "", err
	}
	if err := r.extlinuxBootCode(); err != nil {
		return "", fmt.Errorf("BIOS (extlinux): %w", err)
	}
	if err := r.esp.wait(); err != nil {
		return "", err
	}
	if err := r.espFinish(); err != nil {
		return "", fmt.Errorf("UEFI (systemd-boot on the ESP): %w", err)
	}
	return fmt.Sprintf("extlinux and systemd-boot, kernel %s, cmdline %q", r.kernel.version, r.cmdline()), nil
}

// extlinuxOwns says whether the archive entry rel (cleaned, relative to
// the root) is one of the files extlinux --install writes. The unpack
// leaves an image's own copies out: they would replace the ones extlinux
// placed (and made immutable).
func extlinuxOwns(rel string) bool {
	dir := strings.TrimPrefix(path.Dir(ExtlinuxConf), "/")
	return rel == dir+"/ldlinux.sys" || rel == dir+"/ldlinux.c32"
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

// extlinuxConfig writes extlinux's configuration.
func (r *run) extlinuxConfig() error {
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
	return r.writeFile(ExtlinuxConf, []byte(conf), 0o644)
}

// extlinuxBootCode writes the boot code (gptmbr.bin) into the disk's first
// 440 bytes, which makes the disk bootable under BIOS.
func (r *run) extlinuxBootCode() error {
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

// espCreate makes a fresh FAT32 filesystem on the ESP with loader.conf.
// go-diskfs writes it, so no vfat driver is needed here.
func (r *run) espCreate() error {
	b, err := openCoalescing(r.disk.Path)
	if err != nil {
		return err
	}
	d, err := diskfs.OpenBackend(b, diskfs.WithOpenMode(diskfs.ReadWrite), diskfs.WithSectorSize(512))
	if err != nil {
		b.Close()
		return fmt.Errorf("open %s: %w", r.disk.Path, err)
	}
	r.espDisk, r.espBackend = d, b
	fs, err := d.CreateFilesystem(fsdisk.FilesystemSpec{Partition: espPart, FSType: filesystem.TypeFat32, VolumeLabel: "ESP", Reproducible: true})
	if err != nil {
		return fmt.Errorf("create FAT32: %w", err)
	}
	r.espFS = fs
	return writeFAT(fs, []fatFile{{name: ESPLoaderConf, data: []byte("default esir.conf\ntimeout 0\nconsole-mode keep\n")}})
}

// espEntry is systemd-boot's loader entry for the installed kernel.
func (r *run) espEntry() string {
	return fmt.Sprintf("title %s %s\nversion %s\nlinux %s\ninitrd %s\noptions %s\n",
		bootEntryTitle, r.img.Ref, r.kernel.version, r.espKernel(), r.espInitrd(), r.cmdline())
}

// espFinish writes systemd-boot as the fallback loader, which makes the
// ESP bootable; the sync step writes it to the disk.
func (r *run) espFinish() error {
	return writeFAT(r.espFS, []fatFile{{name: ESPLoader, src: r.opts.Tools.SystemdBoot}})
}

// fatFile is a file to write onto the ESP: data, or the content of src.
type fatFile struct {
	name string
	src  string
	data []byte
}

func writeFAT(fs filesystem.FileSystem, files []fatFile) error {
	for _, f := range files {
		if err := fs.Mkdir(path.Dir(f.name)); err != nil {
			return fmt.Errorf("mkdir %s: %w", path.Dir(f.name), err)
		}
		data := f.data
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
