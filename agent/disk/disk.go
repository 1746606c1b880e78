// Package disk finds a node's disks in sysfs and chooses the one to install
// onto by the assignment's rule (path, model, serial, size), never the boot
// medium: a disk holding a mounted filesystem is refused, and removable,
// loop, ram and zram devices are considered only when the rule names them.
package disk

import (
	"bufio"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// Disk is one whole block device as sysfs describes it.
type Disk struct {
	Name      string // kernel name: sda, vda, nvme0n1, loop3
	Path      string // /dev/NAME
	Dev       string // MAJOR:MINOR
	Size      int64  // bytes
	Model     string
	Serial    string
	Removable bool
	ReadOnly  bool
	// Mounted lists the mount points of filesystems on the disk or its
	// partitions; a disk with any is the boot medium or in use.
	Mounted []string
	// Holders lists devices stacked on the disk or its partitions (device
	// mapper, md): such a disk is in use.
	Holders []string
}

// Virtual reports whether the disk is a loop, ram or zram device, which a
// rule must name to be chosen.
func (d Disk) Virtual() bool {
	for _, p := range []string{"loop", "ram", "zram", "nbd", "dm-", "md", "sr"} {
		if strings.HasPrefix(d.Name, p) {
			return true
		}
	}
	return false
}

// Scan lists the whole disks under sysRoot/block (sysRoot is normally /sys),
// with the mounts procMountinfo (normally /proc/self/mountinfo) lists.
func Scan(sysRoot, procMountinfo string) ([]Disk, error) {
	mounts, err := readMounts(procMountinfo)
	if err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(filepath.Join(sysRoot, "block"))
	if err != nil {
		return nil, fmt.Errorf("list disks: %w", err)
	}
	var disks []Disk
	for _, e := range ents {
		dir := filepath.Join(sysRoot, "block", e.Name())
		d := Disk{Name: e.Name(), Path: "/dev/" + e.Name(), Dev: readAttr(dir, "dev")}
		sectors, err := strconv.ParseInt(readAttr(dir, "size"), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("disk %s: size: %w", d.Name, err)
		}
		d.Size = sectors * 512 // sysfs counts 512-byte sectors whatever the device's
		d.Model = readAttr(dir, "device/model")
		d.Serial = readAttr(dir, "device/serial")
		if d.Serial == "" {
			d.Serial = readAttr(dir, "serial") // virtio-blk
		}
		if d.Serial == "" {
			d.Serial = readAttr(dir, "device/vpd_pg80")
		}
		d.Removable = readAttr(dir, "removable") == "1"
		d.ReadOnly = readAttr(dir, "ro") == "1"
		devs := []string{d.Dev}
		holders := listDir(filepath.Join(dir, "holders"))
		parts, _ := os.ReadDir(dir)
		for _, p := range parts {
			if _, err := os.Stat(filepath.Join(dir, p.Name(), "partition")); err == nil {
				devs = append(devs, readAttr(filepath.Join(dir, p.Name()), "dev"))
				holders = append(holders, listDir(filepath.Join(dir, p.Name(), "holders"))...)
			}
		}
		for _, dev := range devs {
			d.Mounted = append(d.Mounted, mounts[dev]...)
		}
		sort.Strings(d.Mounted)
		d.Holders = holders
		disks = append(disks, d)
	}
	return disks, nil
}

func readAttr(dir, name string) string {
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

func listDir(dir string) []string {
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// readMounts maps MAJOR:MINOR to the mount points of filesystems on it.
func readMounts(mountinfo string) (map[string][]string, error) {
	f, err := os.Open(mountinfo)
	if err != nil {
		return nil, fmt.Errorf("read mounts: %w", err)
	}
	defer f.Close()
	m := map[string][]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw
		f := strings.Fields(sc.Text())
		if len(f) < 5 {
			continue
		}
		m[f[2]] = append(m[f[2]], f[4])
	}
	return m, sc.Err()
}

// Rule chooses the target disk. Empty fields match anything; among the disks
// that match and are large enough, the smallest wins (ties by name), which
// keeps a node's big data disks for data.
type Rule struct {
	Path    string `json:"path,omitempty"`     // /dev/sda, or a disk image's loop device
	Model   string `json:"model,omitempty"`    // glob on the model
	Serial  string `json:"serial,omitempty"`   // glob on the serial number
	MinSize int64  `json:"min_size,omitempty"` // bytes
	MaxSize int64  `json:"max_size,omitempty"` // bytes
}

func (r Rule) String() string {
	var parts []string
	if r.Path != "" {
		parts = append(parts, "path="+r.Path)
	}
	if r.Model != "" {
		parts = append(parts, "model="+r.Model)
	}
	if r.Serial != "" {
		parts = append(parts, "serial="+r.Serial)
	}
	if r.MinSize > 0 {
		parts = append(parts, "min_size="+HumanSize(r.MinSize))
	}
	if r.MaxSize > 0 {
		parts = append(parts, "max_size="+HumanSize(r.MaxSize))
	}
	if len(parts) == 0 {
		return "any disk"
	}
	return strings.Join(parts, " ")
}

// Choose returns the disk of disks the rule selects that holds at least need
// bytes. When none fits, the error lists every disk with the reason it was
// refused. A disk that matches the rule but is too small is refused with a
// "too small" reason naming both sizes.
func Choose(disks []Disk, r Rule, need int64) (Disk, error) {
	var fits []Disk
	var reasons []string
	for _, d := range disks {
		if why := r.refuse(d, need); why != "" {
			reasons = append(reasons, d.Name+": "+why)
			continue
		}
		fits = append(fits, d)
	}
	if len(fits) == 0 {
		if len(reasons) == 0 {
			reasons = append(reasons, "no disks found")
		}
		return Disk{}, fmt.Errorf("no disk for rule %q (need %s): %s", r, HumanSize(need), strings.Join(reasons, "; "))
	}
	sort.Slice(fits, func(i, j int) bool {
		if fits[i].Size != fits[j].Size {
			return fits[i].Size < fits[j].Size
		}
		return fits[i].Name < fits[j].Name
	})
	return fits[0], nil
}

// refuse returns why r does not take d, or "".
func (r Rule) refuse(d Disk, need int64) string {
	named := r.Path != "" && (r.Path == d.Path || r.Path == d.Name || resolves(r.Path, d.Path))
	switch {
	case r.Path != "" && !named:
		return "not " + r.Path
	case len(d.Mounted) > 0:
		return "boot medium or in use (mounted at " + strings.Join(d.Mounted, ", ") + ")"
	case len(d.Holders) > 0:
		return "in use by " + strings.Join(d.Holders, ", ")
	case d.ReadOnly:
		return "read-only"
	case d.Size == 0:
		return "no medium"
	case !named && d.Removable:
		return "removable (name it by path to use it)"
	case !named && d.Virtual():
		return "virtual device (name it by path to use it)"
	case r.Model != "" && !glob(r.Model, d.Model):
		return fmt.Sprintf("model %q does not match %q", d.Model, r.Model)
	case r.Serial != "" && !glob(r.Serial, d.Serial):
		return fmt.Sprintf("serial %q does not match %q", d.Serial, r.Serial)
	case r.MinSize > 0 && d.Size < r.MinSize:
		return fmt.Sprintf("%s is below the rule's minimum %s", HumanSize(d.Size), HumanSize(r.MinSize))
	case r.MaxSize > 0 && d.Size > r.MaxSize:
		return fmt.Sprintf("%s is above the rule's maximum %s", HumanSize(d.Size), HumanSize(r.MaxSize))
	case d.Size < need:
		return fmt.Sprintf("too small: %s, the image and layout need %s", HumanSize(d.Size), HumanSize(need))
	}
	return ""
}

func resolves(p, devPath string) bool {
	a, err := filepath.EvalSymlinks(p)
	if err != nil {
		return false
	}
	b, err := filepath.EvalSymlinks(devPath)
	return err == nil && a == b
}

func glob(pattern, s string) bool {
	ok, err := path.Match(pattern, strings.TrimSpace(s))
	return err == nil && ok
}

// PartitionPath returns the device path of partition n of the disk at
// devPath: /dev/sda -> /dev/sda1, /dev/nvme0n1 and /dev/loop0 -> ...p1.
func PartitionPath(devPath string, n int) string {
	last := devPath[len(devPath)-1]
	if last >= '0' && last <= '9' {
		return devPath + "p" + strconv.Itoa(n)
	}
	return devPath + strconv.Itoa(n)
}

// HumanSize formats bytes with binary units.
func HumanSize(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
