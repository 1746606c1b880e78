package modules

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
)

// Profile is a machine's hardware as its drivers see it: which module
// claims which devices. The agent sends it to the server with the node's
// inventory.
type Profile struct {
	Kernel  string          `json:"kernel"`
	Modules []ProfileModule `json:"modules"`
	// Unclaimed are devices (other than CPU and DMI identity) no module claims.
	Unclaimed []DeviceID `json:"unclaimed,omitempty"`
}

// ProfileModule is one matched module and the devices it drives.
type ProfileModule struct {
	Module  string     `json:"module"`
	Class   string     `json:"class"`             // network, storage, bus, other
	Builtin bool       `json:"builtin,omitempty"` // built into the kernel
	Devices []DeviceID `json:"devices"`
}

// DeviceID identifies a device for an inventory.
type DeviceID struct {
	Path     string `json:"path"`
	Bus      string `json:"bus"`
	ID       string `json:"id,omitempty"`    // vendor:device for PCI and USB, device:vendor for virtio
	Class    string `json:"class,omitempty"` // PCI class code, e.g. 0200
	Modalias string `json:"modalias"`
}

// NewDeviceID parses the identity out of a device's modalias.
func NewDeviceID(d Device) DeviceID {
	id := DeviceID{Path: d.Path, Bus: d.Bus, Modalias: d.Modalias}
	ma := d.Modalias
	switch {
	case strings.HasPrefix(ma, "pci:"):
		v, dv := field(ma, "v", 8), field(ma, "d", 8)
		if v != "" && dv != "" {
			id.ID = strings.ToLower(v[4:] + ":" + dv[4:])
		}
		if bc, sc := field(ma, "bc", 2), field(ma, "sc", 2); bc != "" && sc != "" {
			id.Class = bc + sc
		}
	case strings.HasPrefix(ma, "usb:"):
		if v, p := field(ma, "v", 4), field(ma, "p", 4); v != "" && p != "" {
			id.ID = strings.ToLower(v + ":" + p)
		}
	case strings.HasPrefix(ma, "virtio:"):
		if dv, v := field(ma, "d", 8), field(ma, "v", 8); dv != "" && v != "" {
			id.ID = strings.ToLower(dv + ":" + v)
		}
	}
	return id
}

// field returns the n characters after the first occurrence of key that
// follows the bus prefix, e.g. field("pci:v00008086d...", "v", 8).
func field(ma, key string, n int) string {
	_, rest, _ := strings.Cut(ma, ":")
	// Keys are single letters (or "bc", "sc") followed by hex digits; find
	// key at a position where the previous field ended.
	for i := 0; i+len(key)+n <= len(rest); i++ {
		if rest[i:i+len(key)] != key {
			continue
		}
		val := rest[i+len(key) : i+len(key)+n]
		if isHex(val) && (i == 0 || isHex(rest[i-1:i])) {
			return val
		}
	}
	return ""
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return s != ""
}

// Class says what kind of driver a module is, from where it lives in the tree.
func (t *Tree) Class(name string) string {
	m := t.Module(name)
	if m == nil {
		return "other"
	}
	return classOfPath(m.Path)
}

func classOfPath(p string) string {
	for _, c := range []struct{ prefix, class string }{
		{"kernel/drivers/net/", "network"},
		{"kernel/drivers/ata/", "storage"},
		{"kernel/drivers/scsi/", "storage"},
		{"kernel/drivers/nvme/", "storage"},
		{"kernel/drivers/block/", "storage"},
		{"kernel/drivers/md/", "storage"},
		{"kernel/drivers/mmc/", "storage"},
		{"kernel/drivers/usb/storage/", "storage"},
		{"kernel/drivers/virtio/", "bus"},
		{"kernel/drivers/pci/", "bus"},
		{"kernel/drivers/usb/host/", "bus"},
		{"kernel/fs/", "filesystem"},
	} {
		if strings.HasPrefix(p, c.prefix) {
			return c.class
		}
	}
	return "other"
}

// Profile summarises a plan (or the plan a Load followed) as a hardware
// profile.
func (t *Tree) Profile(p *Plan) Profile {
	prof := Profile{Kernel: t.Version}
	for _, s := range p.Steps {
		if len(s.Devices) == 0 {
			continue
		}
		pm := ProfileModule{Module: s.Module, Class: t.Class(s.Module)}
		for _, d := range s.Devices {
			pm.Devices = append(pm.Devices, NewDeviceID(d))
		}
		prof.Modules = append(prof.Modules, pm)
	}
	for _, s := range p.Skipped {
		if s.Reason != "builtin" || len(s.Devices) == 0 {
			continue
		}
		pm := ProfileModule{Module: s.Module, Class: "other", Builtin: true}
		for _, d := range s.Devices {
			pm.Devices = append(pm.Devices, NewDeviceID(d))
		}
		prof.Modules = append(prof.Modules, pm)
	}
	for _, d := range p.Unmatched {
		if d.Bus == "cpu" || d.Bus == "dmi" {
			continue
		}
		prof.Unclaimed = append(prof.Unclaimed, NewDeviceID(d))
	}
	sort.Slice(prof.Modules, func(i, j int) bool {
		a, b := prof.Modules[i], prof.Modules[j]
		if a.Class != b.Class {
			return a.Class < b.Class
		}
		return a.Module < b.Module
	})
	return prof
}

// WriteText prints the profile as a table: class, module, devices.
func (p Profile) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "kernel %s\n", p.Kernel)
	fmt.Fprintln(tw, "CLASS\tMODULE\tDEVICES")
	for _, m := range p.Modules {
		var ids []string
		for _, d := range m.Devices {
			s := d.Bus
			if d.ID != "" {
				s += " " + d.ID
			}
			ids = append(ids, s)
		}
		name := m.Module
		if m.Builtin {
			name += " (builtin)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", m.Class, name, strings.Join(ids, ", "))
	}
	if len(p.Unclaimed) > 0 {
		fmt.Fprintf(tw, "unclaimed\t-\t%d devices\n", len(p.Unclaimed))
	}
	return tw.Flush()
}
