// Package initrd is the installed system's early boot: a small initramfs,
// written per node by the installer, whose /init is esir-agent in initrd
// mode. It loads the node's hardware-matched modules (the storage, network
// and filesystem drivers its root needs, and nothing else), finds the root
// partition by PARTUUID by reading the disks' GPTs itself (Debian's kernel
// does not put PARTUUID into uevents and there is no udev here), mounts it
// and switches to the installed system's /sbin/init.
//
// The kernel runs /init with the arguments that follow "--" on its command
// line; the installer's boot entries end with "-- initrd", which selects
// this mode in esir-agent.
package initrd

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/esir-project/esir/initramfs"
	"github.com/esir-project/esir/modules"
	"golang.org/x/sys/unix"
)

// ConfigPath is where the initramfs holds its Config.
const ConfigPath = "esir/initrd.json"

// Marker starts the line the early boot prints on the console once the root
// is mounted, before it hands over to /sbin/init:
//
//	esir-initrd: root PARTUUID=U on /dev/vda2 modules=a,b,c
const Marker = "esir-initrd:"

// Config is what the installer tells the early boot.
type Config struct {
	Kernel     string `json:"kernel"` // its modules' load list is lib/modules/KERNEL/esir-boot.load
	Root       string `json:"root"`   // PARTUUID of the root partition, lower case
	RootFSType string `json:"rootfstype"`
	Init       string `json:"init"` // default /sbin/init
}

// The installer writes the early boot as two concatenated archives, each
// compressed on its own (the kernel unpacks concatenated archives in
// order): AddBase's part, which depends only on the agent binary and is
// built while the image still downloads, then AddConfig's part with cfg,
// the modules and their load list (modules.AddToInitramfs), which needs
// the unpacked image.

// AddBase puts the part of the early boot that does not depend on the
// image into a: agent (the static esir-agent binary) as /init,
// /dev/console and the mount points.
func AddBase(a *initramfs.Archive, agent string) error {
	if err := a.File("init", agent, 0o755); err != nil {
		return err
	}
	if err := a.CharDev("dev/console", 0o600, 5, 1); err != nil {
		return err
	}
	for _, d := range []string{"proc", "sys", "newroot", "run"} {
		if err := a.Dir(d, 0o755); err != nil {
			return err
		}
	}
	return nil
}

// AddConfig puts cfg into a.
func AddConfig(a *initramfs.Archive, cfg Config) error {
	data, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	return a.Bytes(ConfigPath, data, 0o644)
}

// Run is /init: it never returns on success (it execs the root's init). log
// receives what it does (the console).
func Run(ctx context.Context, log io.Writer) error {
	for _, m := range []struct{ src, dst, fs string }{
		{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"}, {"devtmpfs", "/dev", "devtmpfs"},
	} {
		_ = os.MkdirAll(m.dst, 0o755)
		if err := unix.Mount(m.src, m.dst, m.fs, unix.MS_NOSUID, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("initrd: mount %s: %w", m.dst, err)
		}
	}
	data, err := os.ReadFile("/" + ConfigPath)
	if err != nil {
		return fmt.Errorf("initrd: %w", err)
	}
	var cfg Config
	if err := json.Unmarshal(data, &cfg); err != nil {
		return fmt.Errorf("initrd: %s: %w", ConfigPath, err)
	}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	root, fstype, flags := cfg.Root, cfg.RootFSType, uintptr(unix.MS_RDONLY)
	for _, f := range strings.Fields(string(cmdline)) {
		if f == "--" {
			break // what follows is init's arguments
		}
		switch {
		case strings.HasPrefix(f, "root=PARTUUID="):
			root = strings.ToLower(strings.TrimPrefix(f, "root=PARTUUID="))
		case strings.HasPrefix(f, "rootfstype="):
			fstype = strings.TrimPrefix(f, "rootfstype=")
		case f == "rw":
			flags = 0
		}
	}
	if fstype == "" {
		fstype = "ext4"
	}
	var loaded []string
	res, err := modules.LoadList(ctx, "/lib/modules/"+cfg.Kernel, nil)
	if err != nil {
		fmt.Fprintf(log, "esir-initrd: load list: %v\n", err)
	}
	if res != nil {
		for _, l := range res.Loaded {
			loaded = append(loaded, l.Module)
		}
		for _, f := range res.Failed {
			fmt.Fprintf(log, "esir-initrd: module %s: %s\n", f.Module, f.Error)
		}
	}
	dev, err := waitPartUUID(ctx, "/sys", root, 30*time.Second)
	if err != nil {
		return err
	}
	if err := unix.Mount(dev, "/newroot", fstype, flags, ""); err != nil {
		return fmt.Errorf("initrd: mount root %s (PARTUUID=%s) as %s: %w", dev, root, fstype, err)
	}
	fmt.Fprintf(log, "%s root PARTUUID=%s on %s modules=%s\n", Marker, root, dev, strings.Join(loaded, ","))
	init := cfg.Init
	if init == "" {
		init = "/sbin/init"
	}
	return switchRoot("/newroot", init)
}

// waitPartUUID polls the disks until one has a partition with the given
// PARTUUID and returns its device path.
func waitPartUUID(ctx context.Context, sys, partUUID string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		dev, err := FindPartUUID(sys, "/dev", partUUID)
		if err == nil {
			return dev, nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("initrd: root PARTUUID=%s: %w", partUUID, err)
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// FindPartUUID reads the GPT of every disk under sys/block (device nodes in
// devDir) and returns the device of the partition whose unique GUID is
// partUUID.
func FindPartUUID(sys, devDir, partUUID string) (string, error) {
	want := strings.ToLower(partUUID)
	ents, err := os.ReadDir(filepath.Join(sys, "block"))
	if err != nil {
		return "", err
	}
	var seen []string
	for _, e := range ents {
		name := e.Name()
		parts, err := ReadGPT(filepath.Join(devDir, name))
		if err != nil {
			continue
		}
		seen = append(seen, name)
		for _, p := range parts {
			if p.GUID != want {
				continue
			}
			// The partition's kernel name: the child of the disk whose
			// "partition" attribute is the number.
			subs, _ := os.ReadDir(filepath.Join(sys, "block", name))
			for _, s := range subs {
				b, err := os.ReadFile(filepath.Join(sys, "block", name, s.Name(), "partition"))
				if err == nil && strings.TrimSpace(string(b)) == fmt.Sprint(p.Number) {
					return filepath.Join(devDir, s.Name()), nil
				}
			}
			return "", fmt.Errorf("partition %d of %s has no device yet", p.Number, name)
		}
	}
	return "", fmt.Errorf("no partition with that PARTUUID on the GPT disks seen (%s)", strings.Join(seen, ", "))
}

// Partition is one used entry of a GPT.
type Partition struct {
	Number     int
	GUID       string // unique partition GUID, lower case
	Type       string
	Start, End uint64 // LBAs
	Attributes uint64
}

// ReadGPT reads the primary GPT of the disk at path (512-byte sectors).
func ReadGPT(path string) ([]Partition, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	hdr := make([]byte, 512)
	if _, err := f.ReadAt(hdr, 512); err != nil {
		return nil, err
	}
	if !bytes.Equal(hdr[:8], []byte("EFI PART")) {
		return nil, errors.New("no GPT")
	}
	hsize := binary.LittleEndian.Uint32(hdr[12:])
	if hsize < 92 || hsize > 512 {
		return nil, errors.New("bad GPT header size")
	}
	h := append([]byte(nil), hdr[:hsize]...)
	sum := binary.LittleEndian.Uint32(h[16:])
	binary.LittleEndian.PutUint32(h[16:], 0)
	if crc32.ChecksumIEEE(h) != sum {
		return nil, errors.New("GPT header checksum mismatch")
	}
	lba := binary.LittleEndian.Uint64(hdr[72:])
	n := binary.LittleEndian.Uint32(hdr[80:])
	esize := binary.LittleEndian.Uint32(hdr[84:])
	if n > 1024 || esize < 128 || esize > 4096 {
		return nil, errors.New("bad GPT entry array")
	}
	arr := make([]byte, int(n)*int(esize))
	if _, err := f.ReadAt(arr, int64(lba)*512); err != nil {
		return nil, err
	}
	if crc32.ChecksumIEEE(arr) != binary.LittleEndian.Uint32(hdr[88:]) {
		return nil, errors.New("GPT entry array checksum mismatch")
	}
	var out []Partition
	for i := 0; i < int(n); i++ {
		e := arr[i*int(esize) : (i+1)*int(esize)]
		if bytes.Equal(e[:16], make([]byte, 16)) {
			continue
		}
		out = append(out, Partition{
			Number: i + 1, Type: guidString(e[0:16]), GUID: guidString(e[16:32]),
			Start: binary.LittleEndian.Uint64(e[32:]), End: binary.LittleEndian.Uint64(e[40:]),
			Attributes: binary.LittleEndian.Uint64(e[48:]),
		})
	}
	return out, nil
}

// guidString formats a GPT GUID (first three fields little-endian).
func guidString(b []byte) string {
	return fmt.Sprintf("%08x-%04x-%04x-%x-%x", binary.LittleEndian.Uint32(b[0:4]), binary.LittleEndian.Uint16(b[4:6]),
		binary.LittleEndian.Uint16(b[6:8]), b[8:10], b[10:16])
}

// switchRoot makes newRoot the root filesystem and execs init there, as
// busybox switch_root does: move the pseudo filesystems, move the new root
// onto /, chroot into it.
func switchRoot(newRoot, init string) error {
	for _, m := range []string{"/dev", "/proc", "/sys"} {
		target := filepath.Join(newRoot, m)
		if _, err := os.Stat(target); err != nil {
			_ = unix.Unmount(m, unix.MNT_DETACH)
			continue
		}
		if err := unix.Mount(m, target, "", unix.MS_MOVE, ""); err != nil {
			_ = unix.Unmount(m, unix.MNT_DETACH)
		}
	}
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("initrd: chdir %s: %w", newRoot, err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("initrd: move %s to /: %w", newRoot, err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("initrd: chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	if err := unix.Exec(init, []string{init}, []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=linux", "HOME=/"}); err != nil {
		return fmt.Errorf("initrd: exec %s: %w", init, err)
	}
	return nil
}
