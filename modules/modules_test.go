package modules

import (
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
)

// debianTree returns Debian's kernel module tree installed on this machine
// (package linux-image-amd64), or skips.
func debianTree(t testing.TB) string {
	t.Helper()
	found, _ := filepath.Glob("/lib/modules/*-amd64/modules.alias")
	sort.Strings(found)
	if len(found) == 0 {
		t.Skip("needs Debian's kernel module tree (/lib/modules/*-amd64, package linux-image-amd64; scripts/setup.sh installs it)")
	}
	return filepath.Dir(found[len(found)-1])
}

func corpusFiles(t testing.TB) []string {
	files, err := filepath.Glob("testdata/corpus/*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no corpus in testdata/corpus: %v", err)
	}
	return files
}

// oracle is what `modprobe --show-depends` prints for one alias.
type oracle struct {
	found    bool
	insmod   []string          // module names in order, first occurrence
	params   map[string]string // module -> parameters
	builtins []string
}

func runModprobe(t testing.TB, tree, conf, alias string) oracle {
	t.Helper()
	root := filepath.Dir(filepath.Dir(filepath.Dir(tree)))
	cmd := exec.Command("modprobe", "-d", root, "-S", filepath.Base(tree), "-C", conf, "-b", "--show-depends", alias)
	out, err := cmd.CombinedOutput()
	o := oracle{params: map[string]string{}}
	text := string(out)
	if err != nil {
		if strings.Contains(text, "not found") {
			return o
		}
		t.Fatalf("modprobe --show-depends %q: %v\n%s", alias, err, text)
	}
	o.found = true
	seen := map[string]bool{}
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "insmod":
			name := nameFromPath(f[1])
			if !seen[name] {
				seen[name] = true
				o.insmod = append(o.insmod, name)
				o.params[name] = strings.Join(f[2:], " ")
			}
		case "builtin":
			o.builtins = append(o.builtins, normalizeName(f[1]))
		default:
			t.Fatalf("modprobe --show-depends %q: unexpected line %q", alias, line)
		}
	}
	return o
}

// TestOracleKmod compares ESIR's match and load order with kmod's modprobe on
// Debian's real module tree, alias by alias, for every recorded device.
func TestOracleKmod(t *testing.T) {
	tree := debianTree(t)
	if _, err := exec.LookPath("modprobe"); err != nil {
		t.Skip("needs kmod's modprobe as the oracle (package kmod)")
	}
	conf, _ := filepath.Abs("testdata/modprobe.d")
	tr, err := Open(tree, Options{ConfigDirs: []string{conf}})
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	matched := 0
	for _, file := range corpusFiles(t) {
		devs, err := ReadDeviceList(file)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range devs {
			if seen[d.Modalias] {
				continue
			}
			seen[d.Modalias] = true
			t.Run(filepath.Base(file)+"/"+d.Modalias, func(t *testing.T) {
				want := runModprobe(t, tree, conf, d.Modalias)
				plan, err := tr.Plan([]Device{d})
				if err != nil {
					t.Fatalf("plan: %v", err)
				}
				if !want.found {
					if len(plan.Steps) != 0 || len(plan.Skipped) != 0 {
						t.Fatalf("modprobe finds nothing, ESIR plans %v (skipped %v)", plan.Names(), plan.Skipped)
					}
					return
				}
				matched++
				if got := plan.Names(); !reflect.DeepEqual(got, nonNil(want.insmod)) {
					t.Errorf("load order:\n ESIR   %v\n modprobe %v", got, want.insmod)
				}
				for _, s := range plan.Steps {
					if s.Params != want.params[s.Module] {
						t.Errorf("%s parameters: ESIR %q, modprobe %q", s.Module, s.Params, want.params[s.Module])
					}
				}
				var gotBuiltin []string
				for _, s := range plan.Skipped {
					if s.Reason == "builtin" {
						gotBuiltin = append(gotBuiltin, s.Module)
					}
				}
				sort.Strings(gotBuiltin)
				wb := dedupe(want.builtins)
				if !reflect.DeepEqual(nonNil(gotBuiltin), nonNil(wb)) {
					t.Errorf("builtins: ESIR %v, modprobe %v", gotBuiltin, wb)
				}
			})
		}
	}
	if matched < 30 {
		t.Errorf("only %d corpus aliases matched a module: the corpus is too thin to mean anything", matched)
	}
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func dedupe(s []string) []string {
	m := map[string]bool{}
	var out []string
	for _, x := range s {
		if !m[x] {
			m[x] = true
			out = append(out, x)
		}
	}
	sort.Strings(out)
	return out
}

// TestPlanOrder checks, for each recorded machine as a whole, that every
// module's dependencies and pre-softdeps come before it.
func TestPlanOrder(t *testing.T) {
	tree := debianTree(t)
	tr, err := Open(tree, Options{ConfigDirs: []string{"testdata/modprobe.d"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, file := range corpusFiles(t) {
		t.Run(filepath.Base(file), func(t *testing.T) {
			devs, err := ReadDeviceList(file)
			if err != nil {
				t.Fatal(err)
			}
			plan, err := tr.Plan(devs)
			if err != nil {
				t.Fatal(err)
			}
			if len(plan.Steps) == 0 {
				t.Fatal("empty plan")
			}
			pos := map[string]int{}
			for i, s := range plan.Steps {
				if _, dup := pos[s.Module]; dup {
					t.Errorf("%s appears twice", s.Module)
				}
				pos[s.Module] = i
			}
			for i, s := range plan.Steps {
				deps, err := tr.Deps(tr.Module(s.Module))
				if err != nil {
					t.Fatal(err)
				}
				for _, d := range deps {
					if j, ok := pos[d]; !ok || j > i {
						t.Errorf("%s (step %d) needs %s, which is at %d", s.Module, i, d, j)
					}
				}
				if s.Reason == "alias" && len(s.Devices) == 0 {
					t.Errorf("%s is there for an alias but names no device", s.Module)
				}
				if s.Reason != "alias" && s.Of == "" {
					t.Errorf("%s is a %s of nobody", s.Module, s.Reason)
				}
			}
		})
	}
}

func TestFnmatch(t *testing.T) {
	for _, tc := range []struct {
		pattern, name string
		want          bool
	}{
		{"pci:v00008086d*sv*", "pci:v00008086d000010D3sv00001AF4", true},
		{"pci:v00008086d*sv*", "pci:v00008087d000010D3sv00001AF4", false},
		{"dmi*:svnQEMU:*", "dmi:bvnSeaBIOS:bd04/01/2014:svnQEMU:pnStandard PC", true}, // '*' crosses '/'
		{"usb:v*p*d*dc*dsc*dp*ic03isc01ip01in*", "usb:v0627p0001d0000dc00dsc00dp00ic03isc01ip01in00", true},
		{"usb:v*p*d*dc*dsc*dp*ic03isc01ip01in*", "usb:v0627p0001d0000dc00dsc00dp00ic03isc01ip02in00", false},
		{"usb:v0BDAp8153d[0-2]*", "usb:v0BDAp8153d3000", false},
		{"usb:v0BDAp8153d[0-2]*", "usb:v0BDAp8153d2000", true},
		{"usb:v0BDAp8153d[!0-2]*", "usb:v0BDAp8153d3000", true},
		{"a?c", "abc", true},
		{"a?c", "ac", false},
		{"a\\*c", "a*c", true},
		{"a\\*c", "abc", false},
		{"a[", "a[", true},
		{"*", "", true},
		{"a*b*c", "aXXbYYbc", true},
		{"a*b*c", "aXXbYYb", false},
		{"x[[:digit:]]y", "x5y", true},
		{"x[]]y", "x]y", true},
	} {
		if got := fnmatch(tc.pattern, tc.name); got != tc.want {
			t.Errorf("fnmatch(%q, %q) = %v, want %v", tc.pattern, tc.name, got, tc.want)
		}
	}
}

func TestBadIndex(t *testing.T) {
	for _, tc := range []struct {
		name    string
		files   map[string]string
		wantErr string
	}{
		{"dep without colon", map[string]string{"modules.dep": "kernel/a.ko:\nkernel/b.ko kernel/a.ko\n", "modules.alias": ""}, "modules.dep:2: malformed"},
		{"alias short", map[string]string{"modules.dep": "kernel/a.ko:\n", "modules.alias": "# c\nalias pci:v*\n"}, "modules.alias:2: malformed"},
		{"alias missing", map[string]string{"modules.dep": "kernel/a.ko:\n"}, "modules.alias"},
		{"softdep bad", map[string]string{"modules.dep": "kernel/a.ko:\n", "modules.alias": "", "modules.softdep": "softdep\n"}, "modules.softdep:1: malformed"},
		{"builtin bad", map[string]string{"modules.dep": "kernel/a.ko:\n", "modules.alias": "", "modules.builtin": "kernel/x.ko\nnot a module\n"}, "modules.builtin:2: malformed"},
		{"config bad", map[string]string{"modules.dep": "kernel/a.ko:\n", "modules.alias": "", "conf/x.conf": "# hi\noptions\n"}, "x.conf:2: malformed"},
		{"config options bad after continuation", map[string]string{"modules.dep": "kernel/a.ko:\n", "modules.alias": "", "conf/x.conf": "options a \\\n  x=1\nblacklist\n"}, "x.conf:3: malformed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := writeTree(t, tc.files)
			_, err := Open(dir, Options{ConfigDirs: []string{filepath.Join(dir, "conf")}})
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Open: %v, want an error containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestConfigWarnings(t *testing.T) {
	dir := writeTree(t, map[string]string{"modules.dep": "kernel/a.ko:\n", "modules.alias": "", "conf/x.conf": "options a \\\n  x=1\nfrobnicate a\n"})
	tr, err := Open(dir, Options{ConfigDirs: []string{filepath.Join(dir, "conf")}})
	if err != nil {
		t.Fatal(err)
	}
	if len(tr.Warnings) != 1 || !strings.Contains(tr.Warnings[0], "x.conf:3: unknown command") {
		t.Errorf("warnings %q", tr.Warnings)
	}
	if got := tr.Options("a"); got != "x=1" {
		t.Errorf("options across a continuation line: %q", got)
	}
}

func writeTree(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "lib", "modules", "6.1.0-test")
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestMissingModule: a module named in modules.dep but missing on disk is
// reported with its name and path; the rest of the plan stays.
func TestMissingModule(t *testing.T) {
	dir := writeTree(t, map[string]string{
		"modules.dep":               "kernel/net/a.ko: kernel/lib/b.ko\nkernel/lib/b.ko:\n",
		"modules.alias":             "alias pci:v00001234d* a\n",
		"kernel/net/a.ko":           "not really ELF",
		"conf/options-for-a.conf":   "options a x=1 y=2\n",
		"conf/empty-dir-ok.conf":    "",
		"conf/not-a-config.txt":     "garbage",
		"conf/sub/ignored.conf.bak": "garbage",
	})
	tr, err := Open(dir, Options{ConfigDirs: []string{filepath.Join(dir, "conf")}})
	if err != nil {
		t.Fatal(err)
	}
	plan, err := tr.Plan([]Device{{Path: "bus/pci/devices/x", Modalias: "pci:v00001234d00005678"}})
	if err == nil || !strings.Contains(err.Error(), "module b") || !strings.Contains(err.Error(), filepath.Join(dir, "kernel/lib/b.ko")) {
		t.Fatalf("want an error naming b and its path, got %v", err)
	}
	if got := plan.Names(); !reflect.DeepEqual(got, []string{"b", "a"}) {
		t.Fatalf("plan %v, want [b a]", got)
	}
	if p := plan.Step("a").Params; p != "x=1 y=2" {
		t.Errorf("params %q", p)
	}
}

func TestReadDevices(t *testing.T) {
	root := t.TempDir()
	put := func(p, s string) {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(s), 0o444); err != nil {
			t.Fatal(err)
		}
	}
	put("bus/pci/devices/0000:00:03.0/modalias", "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00\n")
	put("bus/virtio/devices/virtio0/modalias", "virtio:d00000001v00001AF4\n")
	put("bus/pci/devices/0000:00:1f.0/vendor", "0x8086\n") // no modalias: not a device to match
	put("devices/system/cpu/modalias", "cpu:type:x86,ven0000fam0006mod003F:feature:,0000\n")
	devs, err := ReadDevices(root)
	if err != nil {
		t.Fatal(err)
	}
	want := []Device{
		{Path: "bus/pci/devices/0000:00:03.0", Bus: "pci", Modalias: "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"},
		{Path: "bus/virtio/devices/virtio0", Bus: "virtio", Modalias: "virtio:d00000001v00001AF4"},
		{Path: "devices/system/cpu", Bus: "cpu", Modalias: "cpu:type:x86,ven0000fam0006mod003F:feature:,0000"},
	}
	if !reflect.DeepEqual(devs, want) {
		t.Fatalf("got %+v\nwant %+v", devs, want)
	}
}

// TestBinaryIndex: lookups through kmod's modules.alias.bin and through the
// text modules.alias agree for every recorded device; a corrupt binary index
// is an error naming the file.
func TestBinaryIndex(t *testing.T) {
	tree := debianTree(t)
	bin, err := Open(tree, Options{ConfigDirs: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	text, err := Open(tree, Options{ConfigDirs: []string{}, TextIndex: true})
	if err != nil {
		t.Fatal(err)
	}
	if bin.aliasBin == nil || text.aliasBin != nil {
		t.Fatal("expected one tree on modules.alias.bin and one on the text")
	}
	for _, f := range corpusFiles(t) {
		devs, err := ReadDeviceList(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range devs {
			a, err := bin.Lookup(d.Modalias)
			if err != nil {
				t.Fatal(err)
			}
			b, err := text.Lookup(d.Modalias)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(a, b) {
				t.Errorf("%s: binary index %v, text %v", d.Modalias, a, b)
			}
		}
	}

	dir := writeTree(t, map[string]string{"modules.dep": "kernel/a.ko:\n", "modules.alias": "alias pci:* a\n"})
	// A valid header whose root points past the end of the file.
	if err := os.WriteFile(filepath.Join(dir, "modules.alias.bin"), []byte("\xb0\x07\xf4\x57\x00\x02\x00\x01\x20\x00\x40\x00"), 0o644); err != nil {
		t.Fatal(err)
	}
	tr, err := Open(dir, Options{ConfigDirs: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tr.Lookup("pci:v1"); err == nil || !strings.Contains(err.Error(), "modules.alias.bin") {
		t.Fatalf("corrupt index: %v", err)
	}
}
