package pipeline

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/esir-project/esir/agent/install"
	"golang.org/x/sys/unix"
)

// BootEntry is the installed system's kernel, initramfs and command line.
type BootEntry struct {
	Kernel, Initrd, Cmdline string // paths inside the root filesystem
}

// ReadBootEntry reads the first entry of an extlinux.conf (the one the
// installer writes: LINUX, INITRD and APPEND lines).
func ReadBootEntry(path string) (BootEntry, error) {
	f, err := os.Open(path)
	if err != nil {
		return BootEntry{}, fmt.Errorf("boot entry: %w", err)
	}
	defer f.Close()
	var e BootEntry
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		key, val, _ := strings.Cut(strings.TrimSpace(sc.Text()), " ")
		val = strings.TrimSpace(val)
		switch strings.ToUpper(key) {
		case "LABEL":
			if e.Kernel != "" {
				return e, nil // the next entry begins
			}
		case "LINUX", "KERNEL":
			e.Kernel = val
		case "INITRD":
			e.Initrd = val
		case "APPEND":
			e.Cmdline = val
		}
	}
	if err := sc.Err(); err != nil {
		return e, fmt.Errorf("boot entry %s: %w", path, err)
	}
	if e.Kernel == "" {
		return e, fmt.Errorf("boot entry %s: no LINUX line", path)
	}
	return e, nil
}

// LoadKexec loads the installed system for a kexec reboot: it mounts the
// root partition read-only, reads the boot entry the installer wrote
// (extlinux.conf) and hands its kernel, initramfs and command line to
// kexec_file_load. The caller then reboots with LINUX_REBOOT_CMD_KEXEC.
func LoadKexec(res *install.Result, workDir string) error {
	if res == nil || res.RootDevice == "" {
		return fmt.Errorf("kexec: no installed root partition")
	}
	mnt, err := os.MkdirTemp(workDir, "esir-kexec-")
	if err != nil {
		return fmt.Errorf("kexec: %w", err)
	}
	defer os.Remove(mnt)
	if err := unix.Mount(res.RootDevice, mnt, "ext4", unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("kexec: mount %s: %w", res.RootDevice, err)
	}
	defer unix.Unmount(mnt, 0)
	e, err := ReadBootEntry(filepath.Join(mnt, install.ExtlinuxConf))
	if err != nil {
		return fmt.Errorf("kexec: %w", err)
	}
	k, err := os.Open(filepath.Join(mnt, e.Kernel))
	if err != nil {
		return fmt.Errorf("kexec: kernel: %w", err)
	}
	defer k.Close()
	initrdFd, flags := -1, unix.KEXEC_FILE_NO_INITRAMFS
	if e.Initrd != "" {
		i, err := os.Open(filepath.Join(mnt, e.Initrd))
		if err != nil {
			return fmt.Errorf("kexec: initramfs: %w", err)
		}
		defer i.Close()
		initrdFd, flags = int(i.Fd()), 0
	}
	if err := unix.KexecFileLoad(int(k.Fd()), initrdFd, e.Cmdline, flags); err != nil {
		return fmt.Errorf("kexec: load %s (%s): %w", e.Kernel, e.Cmdline, err)
	}
	return nil
}
