package imaging

import (
	"bufio"
	"fmt"
	"os"
	"path"
	"strings"
)

// DefaultExcludes returns the patterns left out of every image unless the build says
// otherwise: the contents (not the directories) of the kernel's and the
// runtime's virtual and scratch filesystems, and the SSH host keys, which
// every clone must generate for itself. /etc/machine-id is kept but emptied
// (see BuildOptions.KeepMachineID).
func DefaultExcludes() []string {
	return []string{
		"proc/*", "sys/*", "dev/*", "run/*", "tmp/*",
		"etc/ssh/ssh_host_*",
	}
}

// ReadExcludeFile reads patterns from a file: one a line, blank lines and
// lines starting with # ignored.
func ReadExcludeFile(name string) ([]string, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, fmt.Errorf("exclude file: %w", err)
	}
	defer f.Close()
	var pats []string
	sc := bufio.NewScanner(f)
	line := 0
	for sc.Scan() {
		line++
		p := strings.TrimSpace(sc.Text())
		if p == "" || strings.HasPrefix(p, "#") {
			continue
		}
		if _, err := path.Match(p, ""); err != nil {
			return nil, fmt.Errorf("exclude file %s:%d: pattern %q: %w", name, line, p, err)
		}
		pats = append(pats, p)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("exclude file %s: %w", name, err)
	}
	return pats, nil
}

// excluder decides which paths (slash paths relative to the root, no
// leading slash) stay out of an image. A pattern is a path.Match glob matched
// against the whole relative path; a leading "/" is ignored; an excluded
// directory takes its whole subtree with it.
type excluder struct {
	patterns []string
}

func newExcluder(patterns []string) (*excluder, error) {
	e := &excluder{}
	for _, p := range patterns {
		p = strings.TrimSuffix(strings.TrimLeft(strings.TrimSpace(p), "/"), "/")
		if p == "" {
			continue
		}
		if _, err := path.Match(p, ""); err != nil {
			return nil, fmt.Errorf("exclude pattern %q: %w", p, err)
		}
		e.patterns = append(e.patterns, p)
	}
	return e, nil
}

func (e *excluder) excluded(rel string) bool {
	for _, p := range e.patterns {
		if ok, _ := path.Match(p, rel); ok {
			return true
		}
	}
	return false
}
