// Package install puts a file-mode image onto a node's disk so that it boots
// on that node's hardware under BIOS and UEFI alike:
//
//	disk        choose the target by the assignment's rule, never the boot
//	            medium; refuse a disk too small before writing anything
//	partition   GPT with go-diskfs: ESP (FAT32), root (ext4, GPT attribute
//	            LegacyBIOSBootable), optional swap; the kernel learns the
//	            partitions through BLKPG, which needs no GPT parser in it
//	mkfs        mkfs.ext4 on the root partition
//	unpack      mount root, put extlinux's files into the empty filesystem,
//	            stream the archive into it with imaging.Extract while
//	            checking its SHA-256
//	personalise hostname, /etc/hosts, empty machine-id, no SSH host keys,
//	            network configuration, fstab by PARTUUID, authorized_keys
//	earlyboot   the node's hardware-matched boot modules in a small
//	            initramfs whose /init is esir-agent in initrd mode
//	bootloader  extlinux for BIOS (gptmbr.bin in the first 440 bytes);
//	            systemd-boot for UEFI, written onto the ESP with go-diskfs
//	service     ESIR's node service (agent binary, systemd unit, init
//	            script) that enrolls the node at first boot
//	sync        unmount, flush the disk
//
// Every step reports its start, end or failure (step, device, cause) through
// a callback. Each run starts from the partition table, so a run interrupted
// at any point is repaired by running again; until the last step succeeds
// the disk has no bootloader of the new install and is never reported
// installed.
package install

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	fsdisk "github.com/diskfs/go-diskfs/disk"
	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/esir-project/esir/agent/disk"
	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/modules"
	"github.com/esir-project/esir/server/agentapi"
	"golang.org/x/sys/unix"
)

// Step names, in order.
const (
	StepDisk        = "disk"
	StepPartition   = "partition"
	StepMkfs        = "mkfs"
	StepUnpack      = "unpack"
	StepPersonalise = "personalise"
	StepEarlyBoot   = "earlyboot"
	StepBootloader  = "bootloader"
	StepService     = "service"
	StepSync        = "sync"
)

// Steps lists the step names in the order Run takes them.
func Steps() []string {
	return []string{StepDisk, StepPartition, StepMkfs, StepUnpack, StepPersonalise, StepEarlyBoot,
		StepBootloader, StepService, StepSync}
}

// Event statuses.
const (
	Started  = "started"
	Progress = "progress"
	Done     = "done"
	Failed   = "failed"
)

// Event is one report of a step.
type Event struct {
	Time   time.Time
	Step   string
	Status string // Started, Progress, Done or Failed
	Device string // the device the step works on
	Detail string // what was done, or the cause of a failure
	Bytes  int64  // unpack: archive bytes read so far
	Total  int64  // unpack: archive size
}

// StepError is the error of a failed step: which step, on which device, and
// why.
type StepError struct {
	Step   string
	Device string
	Err    error
}

func (e *StepError) Error() string {
	if e.Device != "" {
		return fmt.Sprintf("install step %s on %s: %v", e.Step, e.Device, e.Err)
	}
	return fmt.Sprintf("install step %s: %v", e.Step, e.Err)
}

func (e *StepError) Unwrap() error { return e.Err }

// Image is the image to install.
type Image struct {
	Ref    string // NAME:VERSION, for the log and the node service
	SHA256 string // hex digest of the archive; checked while unpacking
	// Size is the archive's length in bytes; UncompressedSize the length
	// of its tar stream. Both size the root partition's minimum.
	Size             int64
	UncompressedSize int64
	// Open returns the archive (tar.zst) as a stream read once, in order:
	// a local file, or the swarm's streaming reader.
	Open func(ctx context.Context) (io.ReadCloser, error)
}

// ImageFromStore describes an image of a local imaging store.
func ImageFromStore(m *imaging.Manifest, archive string) Image {
	return Image{
		Ref: m.Ref(), SHA256: m.SHA256, Size: m.CompressedSize, UncompressedSize: m.UncompressedSize,
		Open: func(context.Context) (io.ReadCloser, error) { return os.Open(archive) },
	}
}

// Options are the node-side inputs of an install that the assignment does
// not carry.
type Options struct {
	// MAC of the node's boot NIC (its identity at the server).
	MAC string
	// Cmdline is appended to the installed kernel's command line (for
	// example "console=ttyS0,115200").
	Cmdline string
	// Agent is the path of the static esir-agent binary: installed as the
	// node service and used as /init of the early-boot initramfs.
	Agent string
	// Devices are the node's devices (modalias strings) the early-boot
	// module set is matched against; nil reads them from SysRoot.
	Devices []modules.Device
	// SysRoot and Mountinfo are where disks and mounts are read
	// (default /sys and /proc/self/mountinfo).
	SysRoot, Mountinfo string
	// Tools are the host programs and boot files the install uses.
	Tools Tools
	// WorkDir holds the temporary mount point (default os.TempDir()).
	WorkDir string
	// Report receives every step's events; nil drops them.
	Report func(Event)
}

// Tools are the programs and files outside Go that an install needs. The
// netboot environment must carry them (see HostTools).
type Tools struct {
	MkfsExt4    string // mkfs.ext4 (e2fsprogs)
	Extlinux    string // extlinux (Debian package extlinux)
	GPTMBR      string // gptmbr.bin (syslinux-common)
	SystemdBoot string // systemd-bootx64.efi (systemd-boot-efi)
}

// DefaultTools are where Debian 12 installs the tools.
func DefaultTools() Tools {
	return Tools{
		MkfsExt4:    "/sbin/mkfs.ext4",
		Extlinux:    "/usr/bin/extlinux",
		GPTMBR:      "/usr/lib/EXTLINUX/gptmbr.bin",
		SystemdBoot: "/usr/lib/systemd/boot/efi/systemd-bootx64.efi",
	}
}

// HostTools lists the files (absolute paths on a Debian 12 host) the
// netboot environment must carry for an install: each tool; programs also
// need their shared-library closure, which the netboot builder resolves.
// mke2fs is the program mkfs.ext4 links to; the mke2fs.conf it reads gives
// ext4 its defaults.
func HostTools() []string {
	t := DefaultTools()
	return []string{"/sbin/mke2fs", t.MkfsExt4, "/etc/mke2fs.conf", t.Extlinux, t.GPTMBR, t.SystemdBoot}
}

// Result describes a finished install.
type Result struct {
	Device       string   // the disk installed onto
	RootDevice   string   // the root partition's device
	RootPartUUID string   // PARTUUID of the root partition
	ESPPartUUID  string   // PARTUUID of the EFI system partition
	Kernel       string   // kernel version booted
	BootModules  []string // the early-boot module set, in load order
}

// Run installs img onto the disk asg's rule selects. It returns a
// *StepError when a step fails.
func Run(ctx context.Context, img Image, asg *agentapi.Assignment, opts Options) (*Result, error) {
	if opts.SysRoot == "" {
		opts.SysRoot = "/sys"
	}
	if opts.Mountinfo == "" {
		opts.Mountinfo = "/proc/self/mountinfo"
	}
	if opts.Tools == (Tools{}) {
		opts.Tools = DefaultTools()
	}
	r := &run{ctx: ctx, img: img, asg: asg, opts: opts, res: &Result{}}
	r.startEarlyBase()
	err := r.all()
	<-r.base.done
	r.waitJobs()
	r.closeAgentCopy()
	if perr := r.closeESP(); perr != nil && err == nil {
		err = &StepError{Step: StepBootloader, Device: r.disk.Path, Err: fmt.Errorf("UEFI (systemd-boot on the ESP): close %s: %w", r.disk.Path, perr)}
	}
	if r.fl != nil {
		r.fl.Stop()
	}
	if r.mnt != "" {
		if uerr := unmount(r.mnt); uerr != nil && err == nil {
			err = &StepError{Step: StepSync, Device: r.rootDev, Err: uerr}
		}
	}
	if err != nil {
		return nil, err
	}
	return r.res, nil
}

// run carries one install's state from step to step.
type run struct {
	ctx    context.Context
	img    Image
	asg    *agentapi.Assignment
	opts   Options
	res    *Result
	layout layout

	disk      disk.Disk
	rootDev   string   // root partition's device
	mnt       string   // where root is mounted
	fl        *flusher // writes the root back while unpacking
	kernel    kernelFiles
	kernelErr error      // why the unpacked image has no usable kernel
	base      *earlyBase // the early boot's image-independent part, started with the install

	// Jobs (see job.go) and what they leave for the steps that wait for
	// them.
	jobs         []*job
	esp          *job // the ESP's filesystem, kernel, early-boot initramfs and loader entry
	espWriteback *job // the start of the ESP's writeback to the disk
	initrd       *job // the early-boot initramfs, built and written into the root
	extlinuxConf *job // extlinux's configuration in the root
	kernelRead   *job // the kernel, read from the root for the ESP
	release      *job // the root's unmount
	svc          *job // the node service's files
	agentCopy    *job // the agent binary's copy, written while unpacking
	agentFile    *os.File
	espDisk      *fsdisk.Disk
	espBackend   *coalescing
	espFS        filesystem.FileSystem
	initrdData   []byte
	bootPlan     *modules.Plan
	svcHow       string
}

func (r *run) report(e Event) {
	if r.opts.Report != nil {
		e.Time = time.Now()
		r.opts.Report(e)
	}
}

// step runs fn as step name on device dev, reporting its start and end.
func (r *run) step(name, dev string, fn func() (string, error)) error {
	if err := r.ctx.Err(); err != nil {
		return &StepError{Step: name, Device: dev, Err: err}
	}
	r.report(Event{Step: name, Status: Started, Device: dev})
	detail, err := fn()
	if err != nil {
		se := &StepError{Step: name, Device: dev, Err: err}
		r.report(Event{Step: name, Status: Failed, Device: dev, Detail: err.Error()})
		return se
	}
	r.report(Event{Step: name, Status: Done, Device: dev, Detail: detail})
	return nil
}

func (r *run) all() error {
	if err := r.step(StepDisk, r.asg.Disk.Rule.Path, r.chooseDisk); err != nil {
		return err
	}
	dev := r.disk.Path
	steps := []struct {
		name, dev string
		fn        func() (string, error)
	}{
		{StepPartition, dev, r.partition},
		{StepMkfs, r.rootDev, r.mkfs},
		{StepUnpack, r.rootDev, r.unpack},
		{StepPersonalise, r.rootDev, r.personalise},
		{StepEarlyBoot, r.rootDev, r.earlyBoot},
		{StepBootloader, dev, r.bootloader},
		{StepService, r.rootDev, r.service},
		{StepSync, dev, r.sync},
	}
	for _, s := range steps {
		if s.dev == "" {
			s.dev = r.rootDev
		}
		if err := r.step(s.name, s.dev, s.fn); err != nil {
			return err
		}
	}
	return nil
}

// need returns the bytes the image and the layout need.
func need(img Image, l agentapi.DiskLayout) int64 {
	const mib = 1 << 20
	root := img.UncompressedSize + img.UncompressedSize/5 // ext4 metadata, journal, slack
	if c := 3 * img.Size; c > root {
		root = c // no uncompressed size given: zstd rarely beats 3:1 on a root filesystem
	}
	root += 64 * mib
	return 2*mib + int64(espMiB(l)+l.SwapMiB)*mib + root
}

func (r *run) chooseDisk() (string, error) {
	disks, err := disk.Scan(r.opts.SysRoot, r.opts.Mountinfo)
	if err != nil {
		return "", err
	}
	ru := r.asg.Disk.Rule
	d, err := disk.Choose(disks, disk.Rule{Path: ru.Path, Model: ru.Model, Serial: ru.Serial, MinSize: ru.MinBytes, MaxSize: ru.MaxBytes},
		need(r.img, r.asg.Disk))
	if err != nil {
		return "", err
	}
	r.disk = d
	r.res.Device = d.Path
	r.rootDev = disk.PartitionPath(d.Path, rootPart)
	r.res.RootDevice = r.rootDev
	return fmt.Sprintf("%s (%s, model %q, serial %q)", d.Path, disk.HumanSize(d.Size), d.Model, d.Serial), nil
}

func (r *run) mkfs() (string, error) {
	out, err := runCmd(r.ctx, r.opts.Tools.MkfsExt4, "-F", "-q", "-L", "root", "-U", r.layout.rootFSUUID,
		"-O", "^inline_data", r.rootDev)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(out), nil
}

// unpack mounts the root filesystem and streams the archive into it.
func (r *run) unpack() (string, error) {
	work := r.opts.WorkDir
	if work == "" {
		work = os.TempDir()
	}
	mnt, err := os.MkdirTemp(work, "esir-root-")
	if err != nil {
		return "", err
	}
	// noatime: reading the modules and the kernel back must not dirty
	// their inodes (relatime would: the unpack gives them an access time
	// no later than their modification time).
	if err := unix.Mount(r.rootDev, mnt, "ext4", unix.MS_NOATIME, ""); err != nil {
		os.Remove(mnt)
		return "", fmt.Errorf("mount %s on %s: %w", r.rootDev, mnt, err)
	}
	r.mnt = mnt
	if err := r.extlinuxInstall(); err != nil {
		return "", fmt.Errorf("BIOS (extlinux) on the empty root filesystem: %w", err)
	}
	fl, err := startFlusher(mnt, flushEvery)
	if err != nil {
		return "", err
	}
	r.fl = fl
	r.startAgentCopy()
	rc, err := r.img.Open(r.ctx)
	if err != nil {
		return "", fmt.Errorf("open image %s: %w", r.img.Ref, err)
	}
	defer rc.Close()
	h := sha256.New()
	cr := &countReader{r: io.TeeReader(rc, h), h: h, run: r}
	st, err := imaging.Extract(r.ctx, cr, mnt, imaging.ExtractOptions{Include: func(rel string) bool { return !extlinuxOwns(rel) }})
	if err != nil {
		return "", fmt.Errorf("image %s at archive byte %d: %w", r.img.Ref, cr.n, err)
	}
	// The decoder may stop before the archive's end (tar trailer, zstd
	// frame end): the digest covers every byte.
	if _, err := io.Copy(io.Discard, cr); err != nil {
		return "", fmt.Errorf("image %s: read: %w", r.img.Ref, err)
	}
	if r.img.Size > 0 && cr.n != r.img.Size {
		return "", fmt.Errorf("image %s: archive is %d bytes, the manifest says %d", r.img.Ref, cr.n, r.img.Size)
	}
	if got := hex.EncodeToString(h.Sum(nil)); r.img.SHA256 != "" && !strings.EqualFold(got, r.img.SHA256) {
		return "", fmt.Errorf("image %s: digest mismatch: archive sha256 %s, the manifest says %s", r.img.Ref, got, r.img.SHA256)
	}
	// The unpack's last flush runs beside what follows; the sync step
	// waits for it.
	flushes := fl.Finish()
	r.startTail()
	return fmt.Sprintf("%d entries, %d bytes of files from %d archive bytes, written back in %d flushes while unpacking",
		st.Entries, st.Bytes, cr.n, flushes), nil
}

// startTail starts, once the image is unpacked and checked, the work of
// the steps after personalise that does not wait for them: the boot files
// and the node service. Their steps wait for them in order.
func (r *run) startTail() {
	r.startService()
	k, err := findKernel(r.mnt)
	if err != nil {
		r.kernelErr = err
		return
	}
	r.kernel = k
	r.res.Kernel = k.version
	r.startInitrd()
	r.startBootFiles()
}

// startRelease starts unmounting the root (which writes it back) as soon
// as nothing writes into it or reads from it any more: the steps up to
// personalise, which have run, and the jobs of the initramfs, the node
// service, extlinux's configuration and the kernel's copy for the ESP. The
// steps that follow only write the ESP and the boot code, and the sync
// step waits for the unmount. When one of those jobs fails, the root stays
// mounted and its step reports the failure.
func (r *run) startRelease() {
	waits := []*job{r.initrd, r.svc, r.extlinuxConf, r.kernelRead}
	r.release = r.goJob(func() error {
		for _, j := range waits {
			if err := j.wait(); err != nil {
				return nil
			}
		}
		if _, err := r.fl.Stop(); err != nil {
			return err
		}
		if err := unmount(r.mnt); err != nil {
			return err
		}
		r.mnt = ""
		return nil
	})
}

// flushEvery is how often the unpack writes the root's dirty data back.
const flushEvery = 500 * time.Millisecond

// countReader counts the archive bytes read and reports progress.
type countReader struct {
	r    io.Reader
	h    hash.Hash
	n    int64
	last time.Time
	run  *run
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	if now := time.Now(); now.Sub(c.last) > 500*time.Millisecond {
		c.last = now
		c.run.report(Event{Step: StepUnpack, Status: Progress, Device: c.run.rootDev, Bytes: c.n, Total: c.run.img.Size})
	}
	return n, err
}

// sync waits for the root filesystem's unmount (which writes it back; see
// startRelease), unmounts it itself if that did not run, and flushes the
// disk, the ESP with it.
func (r *run) sync() (string, error) {
	if err := r.release.wait(); err != nil {
		return "", err
	}
	if err := r.espWriteback.wait(); err != nil {
		return "", err
	}
	if err := r.closeESP(); err != nil {
		return "", fmt.Errorf("close the ESP on %s: %w", r.disk.Path, err)
	}
	if r.mnt != "" {
		if _, err := r.fl.Stop(); err != nil {
			return "", err
		}
		if err := unmount(r.mnt); err != nil {
			return "", err
		}
		r.mnt = ""
	}
	f, err := os.OpenFile(r.disk.Path, os.O_RDWR, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return "", fmt.Errorf("flush %s: %w", r.disk.Path, err)
	}
	return "unmounted and flushed", nil
}

func unmount(mnt string) error {
	if mnt == "" {
		return nil
	}
	var err error
	for i := 0; i < 20; i++ {
		if err = unix.Unmount(mnt, 0); err == nil || errors.Is(err, unix.EINVAL) {
			return os.Remove(mnt)
		}
		if !errors.Is(err, unix.EBUSY) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("unmount %s: %w", mnt, err)
}

// inRoot returns the path of name inside the mounted root.
func (r *run) inRoot(name string) string {
	return filepath.Join(r.mnt, filepath.FromSlash(strings.TrimPrefix(name, "/")))
}

// runCmd runs a program and returns its combined output; a failure carries
// the output's tail.
func runCmd(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, tailLines(string(out), 5))
	}
	return string(out), nil
}

func tailLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}
