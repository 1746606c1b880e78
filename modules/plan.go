package modules

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
)

// Step is one module of a load plan.
type Step struct {
	Module string `json:"module"`
	Path   string `json:"path"`             // file on disk
	Params string `json:"params,omitempty"` // from modprobe.d options (and the kernel command line)
	// Reason says why the module is in the plan: "alias", "dependency" or
	// "softdep" (of Of).
	Reason string `json:"reason"`
	Of     string `json:"of,omitempty"` // the module that needs it (dependency, softdep)
	// Devices are the devices whose modalias matched the module itself.
	Devices []Device `json:"devices,omitempty"`
}

// Skip is a module the plan leaves out, and why.
type Skip struct {
	Module  string   `json:"module"`
	Reason  string   `json:"reason"` // "builtin", "blacklisted", "install-command"
	Devices []Device `json:"devices,omitempty"`
}

// Plan is an ordered list of modules to load: every module's dependencies
// and pre-softdeps come before it.
type Plan struct {
	Kernel    string   `json:"kernel"`
	Steps     []Step   `json:"steps"`
	Skipped   []Skip   `json:"skipped,omitempty"`
	Unmatched []Device `json:"unmatched,omitempty"` // devices no module claims
}

// Names returns the plan's module names in load order.
func (p *Plan) Names() []string {
	out := make([]string, len(p.Steps))
	for i, s := range p.Steps {
		out[i] = s.Module
	}
	return out
}

// Step returns the plan's step for module name, or nil.
func (p *Plan) Step(name string) *Step {
	name = normalizeName(name)
	for i := range p.Steps {
		if p.Steps[i].Module == name {
			return &p.Steps[i]
		}
	}
	return nil
}

// Match is what a lookup of one alias finds, in kmod's order.
type Match struct {
	Module  string
	Builtin bool
}

// Lookup resolves a name or modalias the way modprobe does: modprobe.d
// aliases, then a module of that name, then modules.alias (its binary trie
// modules.alias.bin when there is one), then built-in modules and their
// aliases. The first source with an answer wins. The error is for a corrupt
// binary index.
func (t *Tree) Lookup(name string) ([]Match, error) {
	n := normalizeAlias(name)
	var out []Match
	// modprobe.d aliases.
	for _, a := range t.conf.aliases {
		if fnmatch(a.pattern, n) {
			m, err := t.module(a.module)
			if err != nil {
				return nil, err
			}
			out = appendMatch(out, Match{Module: a.module, Builtin: m == nil && t.builtin[a.module]})
		}
	}
	if len(out) > 0 {
		return out, nil
	}
	mn := normalizeName(name)
	if m, err := t.module(mn); err != nil {
		return nil, err
	} else if m != nil {
		return []Match{{Module: mn}}, nil
	}
	if _, ok := t.conf.install[mn]; ok {
		return []Match{{Module: mn}}, nil
	}
	if t.aliasBin != nil {
		vals, err := t.aliasBin.searchWild(n)
		if err != nil {
			return nil, err
		}
		for _, v := range vals {
			out = appendMatch(out, Match{Module: normalizeName(v.value)})
		}
		if len(out) > 0 {
			return out, nil
		}
	}
	// modules.alias: candidates are the patterns whose literal prefix n starts with.
	var hits []alias
	for _, l := range t.prefixLens {
		if l > len(n) {
			break
		}
		for i := t.aliasHead[n[:l]]; i != 0; i = t.aliasNext[i-1] {
			if a := t.aliases[i-1]; fnmatch(a.pattern, n) {
				hits = append(hits, a)
			}
		}
	}
	if len(hits) > 0 {
		sort.SliceStable(hits, func(i, j int) bool { return hits[i].prio < hits[j].prio })
		for _, a := range hits {
			out = appendMatch(out, Match{Module: a.module})
		}
		return out, nil
	}
	if t.builtin[mn] {
		return []Match{{Module: mn, Builtin: true}}, nil
	}
	for _, a := range t.builtinAlias {
		if fnmatch(a.pattern, n) {
			out = appendMatch(out, Match{Module: a.module, Builtin: true})
		}
	}
	return out, nil
}

func appendMatch(out []Match, m Match) []Match {
	for _, o := range out {
		if o.Module == m.Module {
			return out
		}
	}
	return append(out, m)
}

func (t *Tree) softdepOf(name string) softdep {
	for _, list := range [][]softdep{t.conf.softdeps, t.softdeps} {
		for _, sd := range list {
			if fnmatch(sd.module, name) {
				return sd
			}
		}
	}
	return softdep{}
}

// Options returns the parameters configured for module name.
func (t *Tree) Options(name string) string {
	return strings.Join(t.conf.options[normalizeName(name)], " ")
}

// Blacklisted reports whether modprobe.d blacklists module name.
func (t *Tree) Blacklisted(name string) bool { return t.conf.blacklist[normalizeName(name)] }

// planner builds one plan.
type planner struct {
	t       *Tree
	plan    *Plan
	index   map[string]int // module -> step
	skipped map[string]int
	errs    []error
}

func (t *Tree) newPlanner() *planner {
	return &planner{t: t, plan: &Plan{Kernel: t.Version}, index: map[string]int{}, skipped: map[string]int{}}
}

// Plan matches devices against the tree and returns the load plan. Modules
// are ordered device by device as kmod's modprobe would load them for each
// modalias; builtin and blacklisted modules are skipped and listed. The
// returned error joins every problem found (a module missing on disk, an
// index naming a module that does not exist); the plan is complete
// otherwise and still returned.
func (t *Tree) Plan(devs []Device) (*Plan, error) {
	p := t.newPlanner()
	cache := map[string][]Match{}
	for _, d := range devs {
		ms, ok := cache[d.Modalias]
		if !ok {
			var err error
			if ms, err = t.Lookup(d.Modalias); err != nil {
				return p.plan, err
			}
			cache[d.Modalias] = ms
		}
		if len(ms) == 0 {
			p.plan.Unmatched = append(p.plan.Unmatched, d)
			continue
		}
		p.addMatches(ms, d)
	}
	return p.plan, errors.Join(p.errs...)
}

// PlanNames returns the plan for loading the named modules (or aliases), as
// `modprobe NAME` would.
func (t *Tree) PlanNames(names ...string) (*Plan, error) {
	p := t.newPlanner()
	for _, n := range names {
		ms, err := t.Lookup(n)
		if err != nil {
			return p.plan, err
		}
		if len(ms) == 0 {
			p.errs = append(p.errs, fmt.Errorf("module tree %s: no module or alias %q", t.Dir, n))
			continue
		}
		p.addMatches(ms, Device{})
	}
	return p.plan, errors.Join(p.errs...)
}

func (p *planner) addMatches(ms []Match, d Device) {
	for _, m := range ms {
		switch {
		case m.Builtin:
			p.skip(m.Module, "builtin", d)
		case p.t.conf.blacklist[m.Module]:
			// Blacklists apply to alias matches only (modprobe -b, as udev runs it).
			p.skip(m.Module, "blacklisted", d)
		default:
			p.probe(m.Module, "alias", "", d)
		}
	}
}

func (p *planner) skip(name, reason string, d Device) {
	i, ok := p.skipped[name]
	if !ok {
		i = len(p.plan.Skipped)
		p.skipped[name] = i
		p.plan.Skipped = append(p.plan.Skipped, Skip{Module: name, Reason: reason})
	}
	if d.Modalias != "" {
		p.plan.Skipped[i].Devices = append(p.plan.Skipped[i].Devices, d)
	}
}

// probe appends the probe list of module name the way kmod builds it
// (__kmod_module_get_probe_list): dependencies in load order, each with its
// softdeps around it, then the module with its own softdeps.
func (p *planner) probe(name, reason, of string, d Device) {
	visited := map[string]bool{}
	p.probeList(name, reason, of, visited)
	if d.Modalias != "" {
		if i, ok := p.index[name]; ok {
			s := &p.plan.Steps[i]
			s.Devices = append(s.Devices, d)
			if s.Reason != "alias" {
				// Matched a device itself as well: that is the better reason.
				s.Reason, s.Of = "alias", ""
			}
		}
	}
}

func (p *planner) probeList(name, reason, of string, visited map[string]bool) {
	if visited[name] {
		return
	}
	visited[name] = true
	m, err := p.t.module(name)
	if err != nil {
		p.errs = append(p.errs, err)
		return
	}
	if m == nil {
		if p.t.builtin[name] {
			p.skip(name, "builtin", Device{})
			return
		}
		if _, ok := p.t.conf.install[name]; ok {
			p.skip(name, "install-command", Device{})
			return
		}
		p.errs = append(p.errs, fmt.Errorf("module %s (%s of %s): not in %s/modules.dep", name, reason, of, p.t.Dir))
		return
	}
	deps, err := p.t.Deps(m)
	if err != nil {
		p.errs = append(p.errs, err)
	}
	for _, dn := range deps {
		p.withSoftdeps(dn, "dependency", name, visited)
	}
	p.withSoftdeps(name, reason, of, visited)
}

func (p *planner) withSoftdeps(name, reason, of string, visited map[string]bool) {
	sd := p.t.softdepOf(name)
	for _, pre := range sd.pre {
		p.softdepTargets(pre, name, visited)
	}
	p.add(name, reason, of)
	for _, post := range sd.post {
		p.softdepTargets(post, name, visited)
	}
}

func (p *planner) softdepTargets(target, of string, visited map[string]bool) {
	ms, err := p.t.Lookup(target)
	if err != nil {
		p.errs = append(p.errs, err)
	}
	for _, m := range ms {
		if m.Builtin {
			p.skip(m.Module, "builtin", Device{})
			continue
		}
		p.probeList(m.Module, "softdep", of, visited)
	}
}

func (p *planner) add(name, reason, of string) {
	if _, ok := p.index[name]; ok {
		return
	}
	m, _ := p.t.module(name) // errors were recorded by probeList
	if m == nil {
		if p.t.builtin[name] {
			p.skip(name, "builtin", Device{})
		}
		return
	}
	path := p.t.FilePath(m)
	if _, err := os.Stat(path); err != nil {
		p.errs = append(p.errs, fmt.Errorf("module %s (%s of %s) listed in modules.dep: file %s: %w", name, reason, orDevice(of), path, err))
	}
	p.index[name] = len(p.plan.Steps)
	p.plan.Steps = append(p.plan.Steps, Step{Module: name, Path: path, Params: p.t.Options(name), Reason: reason, Of: of})
}

func orDevice(of string) string {
	if of == "" {
		return "a device"
	}
	return of
}
