package install

import (
	"fmt"
	"io"
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

// bootloader installs extlinux (BIOS) into the root filesystem and the
// disk's first 440 bytes, and systemd-boot (UEFI) onto the ESP.
func (r *run) bootloader() (string, error) {
	if err := r.extlinux(); err != nil {
		return "", fmt.Errorf("BIOS (extlinux): %w", err)
	}
	if err := r.esp(); err != nil {
		return "", fmt.Errorf("UEFI (systemd-boot on the ESP): %w", err)
	}
	return fmt.Sprintf("extlinux and systemd-boot, kernel %s, cmdline %q", r.kernel.version, r.cmdline()), nil
}

func (r *run) extlinux() error {
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
	if _, err := runCmd(r.ctx, r.opts.Tools.Extlinux, "--install", r.inRoot(path.Dir(ExtlinuxConf))); err != nil {
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

// esp makes a fresh FAT32 filesystem on the ESP and writes systemd-boot, its
// configuration, the kernel and the early-boot initramfs (systemd-boot reads
// only FAT). go-diskfs writes it, so no vfat driver is needed here.
func (r *run) esp() error {
	d, err := diskfs.Open(r.disk.Path, diskfs.WithOpenMode(diskfs.ReadWrite), diskfs.WithSectorSize(512))
	if err != nil {
		return err
	}
	defer d.Close()
	fs, err := d.CreateFilesystem(fsdisk.FilesystemSpec{Partition: espPart, FSType: filesystem.TypeFat32, VolumeLabel: "ESP", Reproducible: true})
	if err != nil {
		return fmt.Errorf("create FAT32: %w", err)
	}
	kernel := espKernelDir + "/vmlinuz-" + r.kernel.version
	initrd := espKernelDir + "/initrd.img-" + r.kernel.version
	entry := fmt.Sprintf("title %s %s\nversion %s\nlinux %s\ninitrd %s\noptions %s\n",
		bootEntryTitle, r.img.Ref, r.kernel.version, kernel, initrd, r.cmdline())
	files := []struct {
		name string
		src  string // file on the host or in the root
		data string
	}{
		{ESPLoader, r.opts.Tools.SystemdBoot, ""},
		{ESPLoaderConf, "", "default esir.conf\ntimeout 0\nconsole-mode keep\n"},
		{ESPEntry, "", entry},
		{kernel, r.inRoot(r.kernel.vmlinuz), ""},
		{initrd, r.inRoot(r.kernel.initrd), ""},
	}
	for _, f := range files {
		if err := fs.Mkdir(path.Dir(f.name)); err != nil {
			return fmt.Errorf("mkdir %s: %w", path.Dir(f.name), err)
		}
		var src io.Reader = strings.NewReader(f.data)
		if f.src != "" {
			in, err := os.Open(f.src)
			if err != nil {
				return err
			}
			defer in.Close()
			src = in
		}
		out, err := fs.OpenFile(f.name, os.O_CREATE|os.O_RDWR|os.O_TRUNC)
		if err != nil {
			return fmt.Errorf("create %s: %w", f.name, err)
		}
		if _, err := io.Copy(out, src); err != nil {
			return fmt.Errorf("write %s: %w", f.name, err)
		}
		if err := out.Close(); err != nil {
			return fmt.Errorf("write %s: %w", f.name, err)
		}
	}
	if w, err := d.Backend.Writable(); err == nil {
		if s, ok := w.(interface{ Sync() error }); ok {
			return s.Sync()
		}
	}
	return nil
}
