// Package modules matches a machine's hardware to a kernel's loadable
// modules and loads them, the way udev and kmod's modprobe do, without kmod:
// it reads a module tree's indices (modules.alias, modules.dep,
// modules.softdep, modules.builtin) and modprobe.d configuration, reads the
// devices' modalias strings from a sysfs tree, and produces an ordered load
// plan with the reason for every module. On a live system Load inserts the
// plan with finit_module (init_module for compressed modules the kernel cannot
// decompress) and repeats until no new device appears.
//
// The same plan, limited to what the root disk, the root filesystem and the
// first network need, becomes the installed system's per-node early-boot
// module set (BootPlan, AddToInitramfs).
package modules

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
)

// Module is one loadable module of a tree, as modules.dep lists it.
type Module struct {
	Name string // kernel name, '-' replaced by '_'
	Path string // path relative to the tree, as modules.dep lists it
	Line int    // line in modules.dep (0 when read from modules.dep.bin)

	deps string // the raw dependency list of its modules.dep line
}

// Tree is a kernel's module tree (/lib/modules/VERSION) with its parsed
// indices and the modprobe.d configuration that applies to it.
type Tree struct {
	Dir     string // the tree's directory
	Version string // kernel version (the directory's base name)
	// Warnings are configuration lines Open ignored (unknown commands), as
	// "FILE:LINE: ..." for the caller to log.
	Warnings []string

	mu      sync.Mutex         // guards mods, filled lazily from depBin
	mods    map[string]*Module // by name
	depBin  *binIndex          // modules.dep.bin, used instead of the text when present
	builtin map[string]bool    // built-in module names

	aliasBin     *binIndex        // modules.alias.bin, used instead of the text when present
	aliases      []alias          // modules.alias, file order
	aliasHead    map[string]int32 // literal prefix -> 1 + last alias with it
	aliasNext    []int32          // per alias: 1 + previous alias with its prefix
	prefixLens   []int            // distinct literal prefix lengths, ascending
	builtinAlias []alias          // from modules.builtin.modinfo
	softdeps     []softdep        // modules.softdep, file order

	conf config
}

type alias struct {
	pattern string // normalized
	module  string
	prio    int32 // index of the module's first alias line
}

// softdep is one "softdep MODULE pre: ... post: ..." line; MODULE may be a
// pattern.
type softdep struct {
	module    string
	pre, post []string
}

// Options adjust how Open reads a tree.
type Options struct {
	// ConfigDirs are the modprobe.d directories (or single .conf files), in
	// precedence order. Nil means the standard ones under the root the tree
	// lives in (ROOT/etc/modprobe.d, ROOT/run/modprobe.d,
	// ROOT/usr/local/lib/modprobe.d, ROOT/lib/modprobe.d,
	// ROOT/usr/lib/modprobe.d for a tree at ROOT/lib/modules/VERSION); an
	// empty, non-nil slice means no configuration.
	ConfigDirs []string
	// TextIndex reads modules.alias and modules.dep even when
	// modules.alias.bin and modules.dep.bin (kmod's binary tries of the same
	// data, which need no parsing) are there.
	TextIndex bool
	// KernelCmdline, when set, adds module options given on a kernel
	// command line as MODULE.PARAM=VALUE, as modprobe does with /proc/cmdline.
	KernelCmdline string
}

// Open reads the module tree in dir.
func Open(dir string, opts Options) (*Tree, error) {
	dir = filepath.Clean(dir)
	t := &Tree{
		Dir:       dir,
		Version:   filepath.Base(dir),
		mods:      make(map[string]*Module, 4096),
		builtin:   map[string]bool{},
		aliasHead: make(map[string]int32, 16384),
	}
	// modules.alias is the big one: parse it beside the rest (it touches
	// only the alias fields).
	aliasErr := make(chan error, 1)
	if bin, err := openBinIndex(filepath.Join(dir, "modules.alias.bin")); err == nil && !opts.TextIndex {
		t.aliasBin = bin
		aliasErr <- nil
	} else {
		go func() { aliasErr <- t.readAlias() }()
	}
	var err error
	if bin, berr := openBinIndex(filepath.Join(dir, "modules.dep.bin")); berr == nil && !opts.TextIndex {
		t.depBin = bin
	} else {
		err = t.readDep()
	}
	if err == nil {
		err = t.readSoftdep()
	}
	if err == nil {
		err = t.readBuiltin()
	}
	dirs := opts.ConfigDirs
	if dirs == nil {
		dirs = defaultConfigDirs(dir)
	}
	var conf config
	if err == nil {
		conf, err = readConfig(dirs)
	}
	if aerr := <-aliasErr; err == nil {
		err = aerr
	}
	if err != nil {
		return nil, err
	}
	if opts.KernelCmdline != "" {
		conf.addCmdline(opts.KernelCmdline)
	}
	t.conf = conf
	t.Warnings = conf.warnings
	return t, nil
}

func defaultConfigDirs(dir string) []string {
	root := "/"
	if parent := filepath.Dir(dir); filepath.Base(parent) == "modules" && filepath.Base(filepath.Dir(parent)) == "lib" {
		root = filepath.Dir(filepath.Dir(parent))
	}
	var dirs []string
	for _, d := range []string{"etc/modprobe.d", "run/modprobe.d", "usr/local/lib/modprobe.d", "lib/modprobe.d", "usr/lib/modprobe.d"} {
		dirs = append(dirs, filepath.Join(root, d))
	}
	return dirs
}

// Module returns the module called name ('-' and '_' are the same), or nil
// when there is none (or the binary index cannot be read).
func (t *Tree) Module(name string) *Module {
	m, _ := t.module(normalizeName(name))
	return m
}

// module returns the module with the normalized name, reading it from
// modules.dep.bin on first use when the tree has that index.
func (t *Tree) module(name string) (*Module, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if m, ok := t.mods[name]; ok {
		return m, nil
	}
	if t.depBin == nil {
		return nil, nil
	}
	line, ok, err := t.depBin.search(name)
	if err != nil || !ok {
		return nil, err
	}
	p, deps, ok := strings.Cut(line, ":")
	if !ok || !strings.Contains(p, ".ko") {
		return nil, fmt.Errorf("%s: module %s: malformed entry %q", t.depBin.file, name, line)
	}
	m := &Module{Name: name, Path: strings.TrimSpace(p), deps: deps}
	t.mods[name] = m
	return m, nil
}

// Builtin reports whether name is built into the kernel.
func (t *Tree) Builtin(name string) bool { return t.builtin[normalizeName(name)] }

// FilePath is the module file's path on disk.
func (t *Tree) FilePath(m *Module) string { return filepath.Join(t.Dir, m.Path) }

// Deps returns the names of the modules m needs, in load order (a module's
// own dependencies come before it).
func (t *Tree) Deps(m *Module) ([]string, error) {
	fields := strings.Fields(m.deps)
	out := make([]string, 0, len(fields))
	// modules.dep lists the deepest dependency last: load in reverse.
	for i := len(fields) - 1; i >= 0; i-- {
		d, err := t.module(nameFromPath(fields[i]))
		if err != nil {
			return nil, err
		}
		if d == nil || d.Path != fields[i] {
			where := filepath.Join(t.Dir, "modules.dep.bin")
			if t.depBin == nil {
				where = fmt.Sprintf("%s:%d", filepath.Join(t.Dir, "modules.dep"), m.Line)
			}
			return nil, fmt.Errorf("%s: %s depends on %s, which has no line of its own", where, m.Name, fields[i])
		}
		out = append(out, d.Name)
	}
	return out, nil
}

// nameFromPath turns kernel/drivers/net/virtio_net.ko.xz into virtio_net.
func nameFromPath(p string) string {
	base := p
	if i := strings.LastIndexByte(base, '/'); i >= 0 {
		base = base[i+1:]
	}
	if i := strings.Index(base, ".ko"); i >= 0 {
		base = base[:i]
	}
	return normalizeName(base)
}

// lines calls fn for every line of data with its 1-based number, skipping
// blank lines and '#' comments.
func lines(data []byte, fn func(n int, line string) error) error {
	s := string(data)
	n := 0
	for len(s) > 0 {
		n++
		var line string
		if i := strings.IndexByte(s, '\n'); i >= 0 {
			line, s = s[:i], s[i+1:]
		} else {
			line, s = s, ""
		}
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		if err := fn(n, line); err != nil {
			return err
		}
	}
	return nil
}

func (t *Tree) readDep() error {
	file := filepath.Join(t.Dir, "modules.dep")
	data, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("module tree %s: read index: %w", t.Dir, err)
	}
	return lines(data, func(n int, line string) error {
		p, deps, ok := strings.Cut(line, ":")
		p = strings.TrimSpace(p)
		if !ok || p == "" || strings.ContainsAny(p, " \t") || !strings.Contains(p, ".ko") {
			return fmt.Errorf("%s:%d: malformed line %q: want \"path.ko: dependency.ko ...\"", file, n, line)
		}
		m := &Module{Name: nameFromPath(p), Path: p, Line: n, deps: deps}
		if _, dup := t.mods[m.Name]; !dup {
			t.mods[m.Name] = m
		}
		return nil
	})
}

func (t *Tree) readAlias() error {
	file := filepath.Join(t.Dir, "modules.alias")
	data, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("module tree %s: read index: %w", t.Dir, err)
	}
	n := bytes.Count(data, []byte{'\n'}) + 1
	t.aliases = make([]alias, 0, n)
	t.aliasNext = make([]int32, 0, n)
	first := map[string]int32{}
	lastMod, lastPrio := "", int32(0)
	var lens [256]bool
	long := map[int]bool{}
	err = lines(data, func(n int, line string) error {
		rest, ok := strings.CutPrefix(line, "alias ")
		sp := strings.LastIndexByte(rest, ' ')
		if !ok || sp <= 0 || sp == len(rest)-1 {
			return fmt.Errorf("%s:%d: malformed line %q: want \"alias PATTERN MODULE\"", file, n, line)
		}
		pattern, mod := normalizeAlias(strings.TrimSpace(rest[:sp])), normalizeName(rest[sp+1:])
		// A module's aliases are usually consecutive: look it up only when it changes.
		if mod != lastMod {
			prio, seen := first[mod]
			if !seen {
				prio = int32(len(t.aliases))
				first[mod] = prio
			}
			lastMod, lastPrio = mod, prio
		}
		i := int32(len(t.aliases))
		t.aliases = append(t.aliases, alias{pattern: pattern, module: mod, prio: lastPrio})
		pre := literalPrefix(pattern)
		t.aliasNext = append(t.aliasNext, t.aliasHead[pre])
		t.aliasHead[pre] = i + 1
		if len(pre) < len(lens) {
			lens[len(pre)] = true
		} else {
			long[len(pre)] = true
		}
		return nil
	})
	if err != nil {
		return err
	}
	for l, ok := range lens {
		if ok {
			t.prefixLens = append(t.prefixLens, l)
		}
	}
	for l := range long {
		t.prefixLens = append(t.prefixLens, l)
	}
	sort.Ints(t.prefixLens)
	return nil
}

func (t *Tree) readSoftdep() error {
	file := filepath.Join(t.Dir, "modules.softdep")
	data, err := os.ReadFile(file)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("module tree %s: read index: %w", t.Dir, err)
	}
	return lines(data, func(n int, line string) error {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "softdep" {
			return fmt.Errorf("%s:%d: malformed line %q: want \"softdep MODULE pre: ... post: ...\"", file, n, line)
		}
		sd := parseSoftdep(f[2:])
		sd.module = normalizeName(f[1])
		t.softdeps = append(t.softdeps, sd)
		return nil
	})
}

// parseSoftdep reads "pre: a b post: c"; names before any "pre:" or "post:"
// are ignored, as kmod does.
func parseSoftdep(f []string) softdep {
	var sd softdep
	mode := 0
	for _, w := range f {
		switch w {
		case "pre:":
			mode = 1
		case "post:":
			mode = 2
		default:
			switch mode {
			case 1:
				sd.pre = append(sd.pre, w)
			case 2:
				sd.post = append(sd.post, w)
			}
		}
	}
	return sd
}

func (t *Tree) readBuiltin() error {
	file := filepath.Join(t.Dir, "modules.builtin")
	data, err := os.ReadFile(file)
	if err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("module tree %s: read index: %w", t.Dir, err)
	}
	if err := lines(data, func(n int, line string) error {
		if strings.ContainsAny(line, " \t") || !strings.Contains(line, ".ko") {
			return fmt.Errorf("%s:%d: malformed line %q: want \"path.ko\"", file, n, line)
		}
		t.builtin[nameFromPath(line)] = true
		return nil
	}); err != nil {
		return err
	}
	// Built-in modules' aliases: "module.alias=pattern" records separated by NULs.
	file = filepath.Join(t.Dir, "modules.builtin.modinfo")
	data, err = os.ReadFile(file)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("module tree %s: read index: %w", t.Dir, err)
	}
	for _, rec := range bytes.Split(data, []byte{0}) {
		mod, val, ok := bytes.Cut(rec, []byte(".alias="))
		if !ok || bytes.IndexByte(mod, '=') >= 0 {
			continue
		}
		name := normalizeName(string(mod))
		t.builtin[name] = true
		t.builtinAlias = append(t.builtinAlias, alias{pattern: normalizeAlias(string(val)), module: name, prio: int32(len(t.builtinAlias))})
	}
	return nil
}
