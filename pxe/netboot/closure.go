package netboot

import (
	"bufio"
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
)

// File is one file to put into the initramfs.
type File struct {
	Name   string // path in the archive, without a leading slash
	Source string // file on disk (symbolic links resolved)
	Mode   os.FileMode
}

// Closure returns programs (absolute paths inside root) together with the
// interpreter and every shared library they load, found as the dynamic
// loader finds them: DT_RPATH (when there is no DT_RUNPATH), DT_RUNPATH with
// $ORIGIN, the directories of ROOT/etc/ld.so.conf (with its includes), then
// the default directories; a library of the wrong ELF class or machine is
// skipped as the loader skips it. Each file keeps the path the loader asks
// for, with the content its symbolic links lead to.
func Closure(root string, programs []string) ([]File, error) {
	c := &closure{root: root, seen: map[string]bool{}}
	c.confDirs = readLdSoConf(root, "/etc/ld.so.conf", 0)
	for _, p := range programs {
		if !path.IsAbs(p) {
			return nil, fmt.Errorf("netboot: helper %q: want an absolute path", p)
		}
		if err := c.add(p, nil, true); err != nil {
			return nil, err
		}
	}
	return c.files, nil
}

type closure struct {
	root     string
	confDirs []string
	seen     map[string]bool
	files    []File
}

// resolve follows symbolic links of p (absolute, inside root) as if root
// were "/", and returns the real path on disk.
func (c *closure) resolve(p string) (string, error) {
	cur := "/"
	rest := strings.Split(strings.TrimPrefix(path.Clean(p), "/"), "/")
	for hops := 0; len(rest) > 0; {
		part := rest[0]
		rest = rest[1:]
		if part == "" || part == "." {
			continue
		}
		if part == ".." {
			cur = path.Dir(cur)
			continue
		}
		next := path.Join(cur, part)
		full := filepath.Join(c.root, next)
		st, err := os.Lstat(full)
		if err != nil {
			return "", err
		}
		if st.Mode()&os.ModeSymlink == 0 {
			cur = next
			continue
		}
		if hops++; hops > 40 {
			return "", fmt.Errorf("%s: too many levels of symbolic links", p)
		}
		target, err := os.Readlink(full)
		if err != nil {
			return "", err
		}
		if path.IsAbs(target) {
			cur = "/"
		}
		rest = append(strings.Split(target, "/"), rest...)
	}
	return filepath.Join(c.root, cur), nil
}

type elfKind struct {
	class   elf.Class
	machine elf.Machine
}

func (c *closure) add(p string, want *elfKind, program bool) error {
	if c.seen[p] {
		return nil
	}
	real, err := c.resolve(p)
	if err != nil {
		return fmt.Errorf("netboot: helper %s under %s: %w", p, c.root, err)
	}
	st, err := os.Stat(real)
	if err != nil {
		return fmt.Errorf("netboot: helper %s: %w", p, err)
	}
	f, err := elf.Open(real)
	if err != nil {
		return fmt.Errorf("netboot: helper %s: not an ELF file: %w", p, err)
	}
	defer f.Close()
	kind := elfKind{f.Class, f.Machine}
	if want != nil && kind != *want {
		return errWrongKind
	}
	c.seen[p] = true
	mode := st.Mode().Perm()
	if program {
		mode |= 0o111
	}
	c.files = append(c.files, File{Name: strings.TrimPrefix(p, "/"), Source: real, Mode: mode})

	for _, prog := range f.Progs {
		if prog.Type != elf.PT_INTERP {
			continue
		}
		b := make([]byte, prog.Filesz)
		if _, err := prog.ReadAt(b, 0); err != nil {
			return fmt.Errorf("netboot: helper %s: interpreter: %w", p, err)
		}
		interp := strings.TrimRight(string(b), "\x00")
		if err := c.add(interp, &kind, false); err != nil {
			return fmt.Errorf("netboot: helper %s: interpreter %s: %w", p, interp, err)
		}
	}
	needed, _ := f.DynString(elf.DT_NEEDED)
	if len(needed) == 0 {
		return nil
	}
	runpath, _ := f.DynString(elf.DT_RUNPATH)
	var dirs []string
	origin := path.Dir(p)
	expand := func(list []string) {
		for _, l := range list {
			for _, d := range strings.Split(l, ":") {
				d = strings.ReplaceAll(strings.ReplaceAll(d, "${ORIGIN}", origin), "$ORIGIN", origin)
				if d != "" {
					dirs = append(dirs, d)
				}
			}
		}
	}
	if len(runpath) == 0 {
		rpath, _ := f.DynString(elf.DT_RPATH)
		expand(rpath)
	}
	expand(runpath)
	dirs = append(dirs, c.confDirs...)
	dirs = append(dirs, defaultLibDirs(kind)...)
	for _, lib := range needed {
		if strings.Contains(lib, "/") {
			if err := c.add(lib, &kind, false); err != nil {
				return fmt.Errorf("netboot: helper %s: library %s: %w", p, lib, err)
			}
			continue
		}
		found := false
		for _, d := range dirs {
			cand := path.Join(d, lib)
			if _, err := c.resolve(cand); err != nil {
				continue
			}
			err := c.add(cand, &kind, false)
			if errors.Is(err, errWrongKind) {
				continue
			}
			if err != nil {
				return err
			}
			found = true
			break
		}
		if !found {
			return fmt.Errorf("netboot: helper %s: shared library %s not found under %s (searched %s)", p, lib, c.root, strings.Join(dirs, ":"))
		}
	}
	return nil
}

var errWrongKind = errors.New("wrong ELF class or machine")

func defaultLibDirs(k elfKind) []string {
	var multiarch string
	switch {
	case k.machine == elf.EM_X86_64 && k.class == elf.ELFCLASS64:
		multiarch = "x86_64-linux-gnu"
	case k.machine == elf.EM_AARCH64:
		multiarch = "aarch64-linux-gnu"
	case k.machine == elf.EM_386:
		multiarch = "i386-linux-gnu"
	}
	var dirs []string
	if multiarch != "" {
		dirs = append(dirs, "/lib/"+multiarch, "/usr/lib/"+multiarch)
	}
	if k.class == elf.ELFCLASS64 {
		dirs = append(dirs, "/lib64", "/usr/lib64")
	}
	return append(dirs, "/lib", "/usr/lib")
}

// readLdSoConf reads an ld.so.conf inside root, following include lines.
func readLdSoConf(root, file string, depth int) []string {
	if depth > 8 {
		return nil
	}
	f, err := os.Open(filepath.Join(root, file))
	if err != nil {
		return nil
	}
	defer f.Close()
	var dirs []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line, _, _ := strings.Cut(sc.Text(), "#")
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		if inc, ok := strings.CutPrefix(line, "include"); ok && (strings.HasPrefix(inc, " ") || strings.HasPrefix(inc, "\t")) {
			pat := strings.TrimSpace(inc)
			if !path.IsAbs(pat) {
				pat = path.Join(path.Dir(file), pat)
			}
			matches, _ := filepath.Glob(filepath.Join(root, pat))
			for _, m := range matches {
				rel, err := filepath.Rel(root, m)
				if err == nil {
					dirs = append(dirs, readLdSoConf(root, "/"+filepath.ToSlash(rel), depth+1)...)
				}
			}
			continue
		}
		if path.IsAbs(line) {
			dirs = append(dirs, path.Clean(line))
		}
	}
	return dirs
}
