package modules

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// config is what modprobe.d files say.
type config struct {
	aliases   []alias // "alias PATTERN MODULE", file order
	options   map[string][]string
	blacklist map[string]bool
	softdeps  []softdep         // first match wins, as in kmod
	install   map[string]string // "install MODULE COMMAND"
	warnings  []string          // lines ignored, as kmod ignores them
}

// readConfig reads every *.conf file of dirs (a directory or a single file
// each). Files are applied in the order of their base names; a name in an
// earlier directory hides the same name in later ones, as kmod does.
func readConfig(dirs []string) (config, error) {
	c := config{options: map[string][]string{}, blacklist: map[string]bool{}, install: map[string]string{}}
	byName := map[string]string{}
	for _, d := range dirs {
		fi, err := os.Stat(d)
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			return c, fmt.Errorf("modprobe config %s: %w", d, err)
		}
		if !fi.IsDir() {
			if _, seen := byName[filepath.Base(d)]; !seen {
				byName[filepath.Base(d)] = d
			}
			continue
		}
		ents, err := os.ReadDir(d)
		if err != nil {
			return c, fmt.Errorf("modprobe config %s: %w", d, err)
		}
		for _, e := range ents {
			if e.IsDir() || !strings.HasSuffix(e.Name(), ".conf") {
				continue
			}
			if _, seen := byName[e.Name()]; !seen {
				byName[e.Name()] = filepath.Join(d, e.Name())
			}
		}
	}
	names := make([]string, 0, len(byName))
	for n := range byName {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if err := c.readFile(byName[n]); err != nil {
			return c, err
		}
	}
	return c, nil
}

func (c *config) readFile(file string) error {
	data, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("modprobe config: %w", err)
	}
	// A "\" at the end of a line continues it; errors name the first line.
	var logical []string
	var first []int
	pending, start := "", 0
	for i, l := range strings.Split(string(data), "\n") {
		if pending == "" {
			start = i + 1
		}
		if cont, ok := strings.CutSuffix(l, "\\"); ok {
			pending += cont + " "
			continue
		}
		logical = append(logical, pending+l)
		first = append(first, start)
		pending = ""
	}
	for i, line := range logical {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		if err := c.parseLine(file, first[i], line); err != nil {
			return err
		}
	}
	return nil
}

func (c *config) parseLine(file string, n int, line string) error {
	f := strings.Fields(line)
	bad := func(want string) error {
		return fmt.Errorf("%s:%d: malformed line %q: want %q", file, n, line, want)
	}
	switch f[0] {
	case "alias":
		if len(f) != 3 {
			return bad("alias PATTERN MODULE")
		}
		c.aliases = append(c.aliases, alias{pattern: normalizeAlias(f[1]), module: normalizeName(f[2]), prio: int32(len(c.aliases))})
	case "options":
		if len(f) < 2 {
			return bad("options MODULE PARAM=VALUE ...")
		}
		name := normalizeName(f[1])
		c.options[name] = append(c.options[name], f[2:]...)
	case "blacklist":
		if len(f) != 2 {
			return bad("blacklist MODULE")
		}
		c.blacklist[normalizeName(f[1])] = true
	case "softdep":
		if len(f) < 3 {
			return bad("softdep MODULE pre: ... post: ...")
		}
		sd := parseSoftdep(f[2:])
		sd.module = normalizeName(f[1])
		c.softdeps = append(c.softdeps, sd)
	case "install":
		if len(f) < 3 {
			return bad("install MODULE COMMAND...")
		}
		c.install[normalizeName(f[1])] = strings.Join(f[2:], " ")
	case "remove", "include", "weakdep":
		// Removal commands do not matter for loading; include and
		// weakdep are newer kmod features Debian 12's kmod lacks.
	default:
		// kmod ignores commands it does not know (newer or older
		// syntax); so do we, and say so.
		c.warnings = append(c.warnings, fmt.Sprintf("%s:%d: unknown command %q ignored", file, n, f[0]))
	}
	return nil
}

// addCmdline adds MODULE.PARAM=VALUE options from a kernel command line.
func (c *config) addCmdline(cmdline string) {
	for _, w := range splitCmdline(cmdline) {
		key, _, hasVal := strings.Cut(w, "=")
		mod, param, ok := strings.Cut(key, ".")
		if !ok || !hasVal || mod == "" || param == "" || strings.ContainsAny(mod, "/") {
			continue
		}
		name := normalizeName(mod)
		c.options[name] = append(c.options[name], w[len(mod)+1:])
	}
}

// splitCmdline splits a kernel command line on spaces outside double quotes.
func splitCmdline(s string) []string {
	var out []string
	var cur strings.Builder
	quoted := false
	for i := 0; i < len(s); i++ {
		switch ch := s[i]; {
		case ch == '"':
			quoted = !quoted
			cur.WriteByte(ch)
		case (ch == ' ' || ch == '\t' || ch == '\n') && !quoted:
			if cur.Len() > 0 {
				out = append(out, cur.String())
				cur.Reset()
			}
		default:
			cur.WriteByte(ch)
		}
	}
	if cur.Len() > 0 {
		out = append(out, cur.String())
	}
	return out
}
