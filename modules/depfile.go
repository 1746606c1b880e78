package modules

import (
	"bufio"
	"bytes"
	"strings"
)

// DepClosure reads a modules.dep file ("path.ko: dep.ko dep2.ko" lines) and
// returns every module it lists, in file order, and the modules that keep
// selects together with everything they depend on.
func DepClosure(dep []byte, keep func(module string) bool) (all []string, closure map[string]bool) {
	deps := map[string][]string{}
	sc := bufio.NewScanner(bytes.NewReader(dep))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		mod, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		deps[mod] = strings.Fields(rest)
		all = append(all, mod)
	}
	closure = map[string]bool{}
	var add func(string)
	add = func(m string) {
		if closure[m] {
			return
		}
		closure[m] = true
		for _, d := range deps[m] {
			add(d)
		}
	}
	for _, m := range all {
		if keep(m) {
			add(m)
		}
	}
	return all, closure
}
