package install

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"github.com/diskfs/go-diskfs"
	"github.com/diskfs/go-diskfs/partition/gpt"
	"github.com/esir-project/esir/agent/disk"
	"github.com/esir-project/esir/server/agentapi"
	"golang.org/x/sys/unix"
)

// Partition numbers of the layout.
const (
	espPart  = 1
	rootPart = 2
	swapPart = 3
)

// legacyBIOSBootable is GPT attribute bit 2: BIOS bootloaders (gptmbr.bin)
// boot the partition carrying it.
const legacyBIOSBootable = 1 << 2

const defaultESPMiB = 256

func espMiB(l agentapi.DiskLayout) int {
	if l.ESPMiB > 0 {
		return l.ESPMiB
	}
	return defaultESPMiB
}

// layout is the partition table an install writes.
type layout struct {
	table      *gpt.Table
	espUUID    string
	rootUUID   string
	swapUUID   string
	rootFSUUID string
	espStart   int64 // bytes
	espSize    int64
}

// uuidFrom derives a stable UUID (version 4 layout) from a seed, so the same
// node and image get the same identifiers on every install.
func uuidFrom(seed, what string) string {
	s := sha256.Sum256([]byte(seed + "\x00" + what))
	s[6] = s[6]&0x0f | 0x40
	s[8] = s[8]&0x3f | 0x80
	return fmt.Sprintf("%X-%X-%X-%X-%X", s[0:4], s[4:6], s[6:8], s[8:10], s[10:16])
}

// planLayout computes the partitions for a disk of size bytes: ESP from
// 1 MiB, root, and swap at the end.
func planLayout(size int64, l agentapi.DiskLayout, seed string) (layout, error) {
	const mib = 1 << 20
	const sector = 512
	esp := int64(espMiB(l)) * mib
	swap := int64(l.SwapMiB) * mib
	// GPT backup at the end: 33 sectors; keep 1 MiB aligned.
	usableEnd := (size-34*sector)/mib*mib - 0
	rootStart := mib + esp
	rootEnd := usableEnd - swap
	if rootEnd-rootStart < 64*mib {
		return layout{}, fmt.Errorf("disk of %s leaves %s for root after ESP and swap", disk.HumanSize(size), disk.HumanSize(rootEnd-rootStart))
	}
	ly := layout{
		espUUID:    uuidFrom(seed, "esp"),
		rootUUID:   uuidFrom(seed, "root"),
		swapUUID:   uuidFrom(seed, "swap"),
		rootFSUUID: strings.ToLower(uuidFrom(seed, "rootfs")),
		espStart:   mib,
		espSize:    esp,
	}
	parts := []*gpt.Partition{
		{Index: espPart, Start: uint64(mib / sector), End: uint64((mib+esp)/sector - 1), Type: gpt.EFISystemPartition, Name: "ESP", GUID: ly.espUUID},
		{Index: rootPart, Start: uint64(rootStart / sector), End: uint64(rootEnd/sector - 1), Type: gpt.LinuxFilesystem, Name: "root", GUID: ly.rootUUID, Attributes: legacyBIOSBootable},
	}
	if swap > 0 {
		parts = append(parts, &gpt.Partition{Index: swapPart, Start: uint64(rootEnd / sector), End: uint64(usableEnd/sector - 1), Type: gpt.LinuxSwap, Name: "swap", GUID: ly.swapUUID})
	}
	ly.table = &gpt.Table{
		LogicalSectorSize:  sector,
		PhysicalSectorSize: sector,
		ProtectiveMBR:      true,
		GUID:               uuidFrom(seed, "disk"),
		Partitions:         parts,
	}
	return ly, nil
}

// partition writes the GPT and tells the kernel about the new partitions.
func (r *run) partition() (string, error) {
	seed := r.opts.MAC + "|" + r.asg.Hostname
	ly, err := planLayout(r.disk.Size, r.asg.Disk, seed)
	if err != nil {
		return "", err
	}
	r.layout = ly
	r.res.RootPartUUID = strings.ToLower(ly.rootUUID)
	r.res.ESPPartUUID = strings.ToLower(ly.espUUID)
	if err := forgetPartitions(r.disk.Path); err != nil {
		return "", err
	}
	d, err := diskfs.Open(r.disk.Path, diskfs.WithOpenMode(diskfs.ReadWriteExclusive), diskfs.WithSectorSize(512))
	if err != nil {
		return "", fmt.Errorf("open: %w", err)
	}
	if err := d.Partition(ly.table); err != nil {
		d.Close()
		return "", fmt.Errorf("write GPT: %w", err)
	}
	if f, err := d.Backend.Writable(); err == nil {
		if s, ok := f.(interface{ Sync() error }); ok {
			if err := s.Sync(); err != nil {
				d.Close()
				return "", fmt.Errorf("flush GPT: %w", err)
			}
		}
	}
	if err := d.Close(); err != nil {
		return "", err
	}
	if err := r.writeSwap(); err != nil {
		return "", err
	}
	if err := announcePartitions(r.disk.Path, ly.table); err != nil {
		return "", err
	}
	// The ESP's filesystem needs nothing from the image: it is made
	// while the root is.
	r.startESP()
	return fmt.Sprintf("GPT: ESP %d MiB PARTUUID %s, root PARTUUID %s, swap %d MiB", espMiB(r.asg.Disk),
		r.res.ESPPartUUID, r.res.RootPartUUID, r.asg.Disk.SwapMiB), nil
}

// forgetPartitions removes the kernel's partition devices of dev, so a
// stale view of a previous install cannot survive the new table. A mounted
// partition makes it fail.
func forgetPartitions(dev string) error {
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	for n := 1; n <= 16; n++ {
		p := unix.BlkpgPartition{Pno: int32(n)}
		a := unix.BlkpgIoctlArg{Op: unix.BLKPG_DEL_PARTITION, Datalen: int32(unsafe.Sizeof(p)), Data: (*byte)(unsafe.Pointer(&p))}
		err := blkpg(f, &a)
		switch {
		case err == nil, errors.Is(err, unix.ENXIO):
		case errors.Is(err, unix.EBUSY):
			return fmt.Errorf("partition %d of %s is in use (mounted?)", n, dev)
		case errors.Is(err, unix.EINVAL):
			return fmt.Errorf("%s takes no partitions (a loop device needs losetup --partscan): %w", dev, err)
		default:
			return fmt.Errorf("forget partition %d of %s: %w", n, dev, err)
		}
	}
	return nil
}

// announcePartitions adds the table's partitions to the kernel and waits for
// their device nodes.
func announcePartitions(dev string, t *gpt.Table) error {
	f, err := os.OpenFile(dev, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, p := range t.Partitions {
		bp := unix.BlkpgPartition{Start: int64(p.Start) * 512, Length: int64(p.End-p.Start+1) * 512, Pno: int32(p.Index)}
		a := unix.BlkpgIoctlArg{Op: unix.BLKPG_ADD_PARTITION, Datalen: int32(unsafe.Sizeof(bp)), Data: (*byte)(unsafe.Pointer(&bp))}
		err := blkpg(f, &a)
		if errors.Is(err, unix.EBUSY) {
			// A kernel with a GPT parser re-read the new table already
			// (go-diskfs asks it to): the partition exists; make sure it
			// is the one just written.
			err = samePartition(dev, p.Index, bp.Start/512, bp.Length/512)
		}
		if err != nil {
			return fmt.Errorf("add partition %d of %s: %w", p.Index, dev, err)
		}
	}
	for _, p := range t.Partitions {
		path := disk.PartitionPath(dev, p.Index)
		deadline := time.Now().Add(10 * time.Second)
		for {
			if _, err := os.Stat(path); err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("partition device %s did not appear", path)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// samePartition checks in sysfs that partition n of dev starts and ends
// where the new table says (in 512-byte sectors).
func samePartition(dev string, n int, start, length int64) error {
	part := filepath.Base(disk.PartitionPath(dev, n))
	read := func(name string) (int64, error) {
		b, err := os.ReadFile(filepath.Join("/sys/class/block", part, name))
		if err != nil {
			return 0, err
		}
		return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	}
	gotStart, err1 := read("start")
	gotLen, err2 := read("size")
	if err := errors.Join(err1, err2); err != nil {
		return fmt.Errorf("partition %s is busy and unreadable in sysfs: %w", part, err)
	}
	if gotStart != start || gotLen != length {
		return fmt.Errorf("the kernel holds partition %s at sectors %d+%d, not %d+%d (in use?)", part, gotStart, gotLen, start, length)
	}
	return nil
}

func blkpg(f *os.File, a *unix.BlkpgIoctlArg) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKPG, uintptr(unsafe.Pointer(a)))
	if e != 0 {
		return e
	}
	return nil
}

// writeSwap writes a swap signature (version 1 header) into the swap
// partition, as mkswap does, so the installed system can swapon it.
func (r *run) writeSwap() error {
	if r.asg.Disk.SwapMiB <= 0 {
		return nil
	}
	var p *gpt.Partition
	for _, q := range r.layout.table.Partitions {
		if q.Index == swapPart {
			p = q
		}
	}
	const page = 4096
	size := int64(p.End-p.Start+1) * 512
	hdr := make([]byte, page)
	binary.LittleEndian.PutUint32(hdr[1024:], 1)                        // version
	binary.LittleEndian.PutUint32(hdr[1028:], uint32(size/page-1))      // last page
	copy(hdr[1036:1052], uuidBytes(strings.ToLower(r.layout.swapUUID))) // uuid
	copy(hdr[1052:1068], "swap")                                        // label
	copy(hdr[page-10:], "SWAPSPACE2")
	f, err := os.OpenFile(r.disk.Path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt(hdr, int64(p.Start)*512); err != nil {
		return fmt.Errorf("swap signature: %w", err)
	}
	return nil
}

func uuidBytes(u string) []byte {
	var b []byte
	h := strings.ReplaceAll(u, "-", "")
	for i := 0; i+1 < len(h); i += 2 {
		var v byte
		fmt.Sscanf(h[i:i+2], "%02x", &v)
		b = append(b, v)
	}
	return b
}
