package modules

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	"github.com/esir-project/esir/initramfs"
)

// BootNeeds says what an installed system must reach in early boot.
type BootNeeds struct {
	// Filesystems are the filesystems its root (and /boot) use, e.g. ext4.
	Filesystems []string
	// Network adds the drivers of the machine's network cards (for a first
	// network or a network root).
	Network bool
	// Extra are more modules or aliases to include (e.g. "dm_mod").
	Extra []string
}

// LoadListName is the load list's name inside an initramfs, under
// lib/modules/VERSION/.
const LoadListName = "esir-boot.load"

// BootPlan returns the modules an installed system with this tree needs to
// boot on the machine whose devices are devs: the drivers of its storage
// controllers and disks (with the buses they sit on, such as virtio_pci),
// the root filesystem, and with need.Network its network cards, each with
// dependencies and softdeps, in load order. Devices claimed by other kinds of
// drivers (sound, graphics, sensors) are left out.
func (t *Tree) BootPlan(devs []Device, need BootNeeds) (*Plan, error) {
	// Problems with modules of other devices (say, a sound driver missing
	// from the tree) do not concern the boot set: only the second plan's do.
	full, _ := t.Plan(devs)
	// Which classes each device's drivers have.
	classes := map[string]map[string]bool{}
	for _, s := range full.Steps {
		for _, d := range s.Devices {
			if classes[d.Path] == nil {
				classes[d.Path] = map[string]bool{}
			}
			classes[d.Path][t.Class(s.Module)] = true
		}
	}
	wanted := func(c map[string]bool) bool {
		return c["storage"] || (need.Network && c["network"])
	}
	var keep []Device
	hasVirtio := false
	for _, d := range devs {
		if wanted(classes[d.Path]) {
			keep = append(keep, d)
			if d.Bus == "virtio" {
				hasVirtio = true
			}
		}
	}
	// Buses the kept devices sit on: virtio devices need their transport's
	// driver (virtio_pci), which the PCI function matches.
	if hasVirtio {
		for _, d := range devs {
			if c := classes[d.Path]; c["bus"] && strings.HasPrefix(d.Modalias, "pci:v00001AF4") {
				keep = append(keep, d)
			}
		}
	}
	p, err := t.Plan(keep)
	if err != nil {
		return nil, fmt.Errorf("boot modules for kernel %s: %w", t.Version, err)
	}
	extra := append(append([]string{}, need.Filesystems...), need.Extra...)
	if len(extra) > 0 {
		pn := t.newPlanner()
		pn.plan = p
		for i, s := range p.Steps {
			pn.index[s.Module] = i
		}
		for i, s := range p.Skipped {
			pn.skipped[s.Module] = i
		}
		for _, n := range extra {
			ms, err := t.Lookup(n)
			if err != nil {
				return nil, err
			}
			if len(ms) == 0 {
				return nil, fmt.Errorf("boot modules for kernel %s: no module or alias %q", t.Version, n)
			}
			pn.addMatches(ms, Device{})
		}
		if err := errors.Join(pn.errs...); err != nil {
			return nil, fmt.Errorf("boot modules for kernel %s: %w", t.Version, err)
		}
	}
	return p, nil
}

// ModuleList returns the plan as an early-boot module list in the format of
// modules-load.d(5) and initramfs-tools' /etc/initramfs-tools/modules: one
// module per line in load order (with its parameters, which
// initramfs-tools takes and modules-load.d ignores in favour of modprobe.d).
func (p *Plan) ModuleList(withParams bool) []byte {
	var b strings.Builder
	b.WriteString("# Hardware-matched early-boot modules for this node, written by ESIR.\n")
	for _, s := range p.Steps {
		b.WriteString(s.Module)
		if withParams && s.Params != "" {
			b.WriteString(" " + s.Params)
		}
		b.WriteByte('\n')
	}
	return []byte(b.String())
}

// AddToInitramfs adds the plan's module files to a, at
// lib/modules/VERSION/PATH as they are in the tree (compressed or not), and
// the load list lib/modules/VERSION/esir-boot.load: one "PATH PARAMS" line
// per module, in load order, which LoadList reads. The installed system's
// early-boot init (esir-agent's) loads it before it looks for the root.
func AddToInitramfs(a *initramfs.Archive, t *Tree, p *Plan) error {
	base := path.Join("lib/modules", t.Version)
	var list strings.Builder
	for _, s := range p.Steps {
		rel, err := filepath.Rel(t.Dir, s.Path)
		if err != nil || strings.HasPrefix(rel, "..") {
			return fmt.Errorf("initramfs: module %s: %s is outside the tree %s", s.Module, s.Path, t.Dir)
		}
		rel = filepath.ToSlash(rel)
		if err := a.File(path.Join(base, rel), s.Path, 0o644); err != nil {
			return fmt.Errorf("initramfs: module %s: %w", s.Module, err)
		}
		list.WriteString(rel)
		if s.Params != "" {
			list.WriteString(" " + s.Params)
		}
		list.WriteByte('\n')
	}
	return a.Bytes(path.Join(base, LoadListName), []byte(list.String()), 0o644)
}

// LoadList loads the modules a load list names (see AddToInitramfs), in
// order, from dir (lib/modules/VERSION of the running system). Every module
// is tried; failures are in the result.
func LoadList(ctx context.Context, dir string, insert func(ctx context.Context, s Step) error) (*Result, error) {
	if insert == nil {
		insert = func(_ context.Context, s Step) error { return Insert(s.Path, s.Params) }
	}
	file := filepath.Join(dir, LoadListName)
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("load list: %w", err)
	}
	defer f.Close()
	res := &Result{Kernel: filepath.Base(dir), Rounds: 1}
	sc := bufio.NewScanner(f)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		rel, params, _ := strings.Cut(line, " ")
		if !strings.Contains(rel, ".ko") || strings.Contains(rel, "..") || path.IsAbs(rel) {
			return res, fmt.Errorf("%s:%d: malformed line %q: want \"PATH.ko [PARAMS]\"", file, n, line)
		}
		if err := ctx.Err(); err != nil {
			return res, err
		}
		s := Step{Module: nameFromPath(rel), Path: filepath.Join(dir, rel), Params: strings.TrimSpace(params), Reason: "list"}
		switch err := insert(ctx, s); {
		case err == nil:
			res.Loaded = append(res.Loaded, Loaded{Step: s, Round: 1})
		case errors.Is(err, ErrLoaded):
			res.Loaded = append(res.Loaded, Loaded{Step: s, Round: 1, Already: true})
		default:
			res.Failed = append(res.Failed, Failure{Module: s.Module, Path: s.Path, Error: err.Error()})
		}
	}
	if err := sc.Err(); err != nil {
		return res, fmt.Errorf("load list %s: %w", file, err)
	}
	return res, nil
}
