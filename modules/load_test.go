package modules

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esir-project/esir/initramfs"
)

// compressedTree copies Debian's indices into a temporary tree and, for the
// modules the recorded machines need, puts compressed copies (xz, zstd, gzip
// in turn, made with the real tools as distributions do) where modules.dep
// says. It returns the new tree and the original.
func compressedTree(t *testing.T) (dir string, orig *Tree) {
	t.Helper()
	src := debianTree(t)
	for _, tool := range []string{"xz", "zstd", "gzip"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (packages xz-utils, zstd, gzip)", tool)
		}
	}
	orig, err := Open(src, Options{ConfigDirs: []string{"testdata/modprobe.d"}})
	if err != nil {
		t.Fatal(err)
	}
	var devs []Device
	for _, f := range corpusFiles(t) {
		d, err := ReadDeviceList(f)
		if err != nil {
			t.Fatal(err)
		}
		devs = append(devs, d...)
	}
	plan, err := orig.Plan(devs)
	if err != nil {
		t.Fatal(err)
	}
	suffix := map[string]string{}
	for i, s := range plan.Steps {
		suffix[orig.Module(s.Module).Path] = []string{".xz", ".zst", ".gz"}[i%3]
	}
	dir = filepath.Join(t.TempDir(), "lib", "modules", orig.Version)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"modules.alias", "modules.softdep", "modules.builtin", "modules.builtin.modinfo"} {
		data, err := os.ReadFile(filepath.Join(src, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	dep, err := os.ReadFile(filepath.Join(src, "modules.dep"))
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	for _, line := range strings.SplitAfter(string(dep), "\n") {
		for _, f := range strings.Fields(line) {
			p := strings.TrimSuffix(f, ":")
			if suf, ok := suffix[p]; ok {
				line = strings.Replace(line, p, p+suf, 1)
			}
		}
		out.WriteString(line)
	}
	if err := os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(out.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 4)
	for p, suf := range suffix {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			compressModule(t, filepath.Join(src, p), filepath.Join(dir, p+suf))
		}()
	}
	wg.Wait()
	return dir, orig
}

func compressModule(t *testing.T, src, dst string) {
	suf := filepath.Ext(dst)
	{
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			t.Error(err)
			return
		}
		var cmd *exec.Cmd
		switch suf {
		case ".xz":
			cmd = exec.Command("xz", "--check=crc32", "-1", "-T1", "-c", src)
		case ".zst":
			cmd = exec.Command("zstd", "-q", "-c", src)
		case ".gz":
			cmd = exec.Command("gzip", "-c", src)
		}
		data, err := cmd.Output()
		if err != nil {
			t.Errorf("%v: %v", cmd.Args, err)
			return
		}
		if err := os.WriteFile(dst, data, 0o644); err != nil {
			t.Error(err)
		}
	}
}

// TestCompressedTree: .ko.xz, .ko.zst and .ko.gz copies give the same plan
// and the same loadable bytes; then Load works through such a tree.
func TestCompressedTree(t *testing.T) {
	dir, orig := compressedTree(t)
	t.Run("plan", func(t *testing.T) { testCompressedPlan(t, dir, orig) })
	t.Run("load-rescan", func(t *testing.T) { testLoadRescan(t, dir) })
}

func testCompressedPlan(t *testing.T, dir string, orig *Tree) {
	ct, err := Open(dir, Options{ConfigDirs: []string{"testdata/modprobe.d"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range corpusFiles(t) {
		devs, err := ReadDeviceList(f)
		if err != nil {
			t.Fatal(err)
		}
		want, err := orig.Plan(devs)
		if err != nil {
			t.Fatal(err)
		}
		got, err := ct.Plan(devs)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got.Names(), want.Names()) {
			t.Fatalf("%s: compressed tree plans %v, plain tree %v", f, got.Names(), want.Names())
		}
		kinds := map[string]int{}
		for i, s := range got.Steps {
			kinds[filepath.Ext(s.Path)]++
			if !Compressed(s.Path) {
				t.Fatalf("%s is not compressed", s.Path)
			}
			data, err := ReadModule(s.Path)
			if err != nil {
				t.Fatal(err)
			}
			plain, err := os.ReadFile(want.Steps[i].Path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(data, plain) {
				t.Errorf("%s: decompressed bytes differ from %s", s.Path, want.Steps[i].Path)
			}
		}
		t.Logf("%s: %d modules, by compression %v", filepath.Base(f), len(got.Steps), kinds)
	}
}

// fakeKernel stands in for the kernel in Load: it reads every module the
// way init_module would get it (decompressed by ReadModule), records the
// order, and makes the devices that a bus driver reveals appear in a sysfs
// tree, a little later, as the kernel does.
type fakeKernel struct {
	t      *testing.T
	sysfs  string
	reveal map[string][]string // module -> modaliases of the devices it brings
	mu     sync.Mutex
	order  []string
}

func (k *fakeKernel) insert(_ context.Context, s Step) error {
	if _, err := ReadModule(s.Path); err != nil {
		return err
	}
	k.mu.Lock()
	k.order = append(k.order, s.Module)
	k.mu.Unlock()
	if err := os.MkdirAll(filepath.Join(k.sysfs, "module", s.Module), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(k.sysfs, "module", s.Module, "initstate"), []byte("live\n"), 0o444); err != nil {
		return err
	}
	if devs := k.reveal[s.Module]; len(devs) > 0 {
		go func() {
			time.Sleep(50 * time.Millisecond) // probing finishes after init returns
			for i, ma := range devs {
				bus, _, _ := strings.Cut(ma, ":")
				writeFile(k.t, filepath.Join(k.sysfs, "bus", bus, "devices", fmt.Sprintf("%s-%s%d", s.Module, bus, i), "modalias"), ma+"\n")
			}
		}()
	}
	return nil
}

func writeFile(t *testing.T, p, s string) {
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Error(err)
		return
	}
	if err := os.WriteFile(p, []byte(s), 0o444); err != nil {
		t.Error(err)
	}
}

// testLoadRescan: on a recorded q35 virtio machine, loading virtio_pci
// reveals the virtio devices, whose drivers load in the next round; a
// corrupt compressed module fails alone and is reported.
func testLoadRescan(t *testing.T, dir string) {
	tr, err := Open(dir, Options{ConfigDirs: []string{"testdata/modprobe.d"}})
	if err != nil {
		t.Fatal(err)
	}
	devs, err := ReadDeviceList("testdata/corpus/q35-virtio.txt")
	if err != nil {
		t.Fatal(err)
	}
	sysfs := t.TempDir()
	k := &fakeKernel{t: t, sysfs: sysfs, reveal: map[string][]string{}}
	for i, d := range devs {
		switch d.Bus {
		case "pci":
			writeFile(t, filepath.Join(sysfs, "bus/pci/devices", fmt.Sprintf("0000:00:%02x.0", i), "modalias"), d.Modalias+"\n")
		case "virtio":
			k.reveal["virtio_pci"] = append(k.reveal["virtio_pci"], d.Modalias)
		case "cpu":
			writeFile(t, filepath.Join(sysfs, "devices/system/cpu/modalias"), d.Modalias+"\n")
		}
	}
	// Corrupt one module the first round needs (and nothing depends on).
	broken := tr.Module("bochs")
	if broken == nil || !Compressed(broken.Path) {
		t.Fatalf("test expects bochs compressed in the tree, got %+v", broken)
	}
	brokenPath := tr.FilePath(broken)
	if err := os.WriteFile(brokenPath, []byte("\xfd7zXZ\x00 this is not xz data"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := Load(ctx, tr, LoadOptions{Sysfs: sysfs, Insert: k.insert, Settle: 150 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	round := map[string]int{}
	for _, l := range res.Loaded {
		round[l.Module] = l.Round
	}
	for mod, want := range map[string]int{"virtio_pci": 1, "ahci": 1, "xhci_pci": 1, "virtio_net": 2, "virtio_blk": 2, "virtio_rng": 2, "virtio_scsi": 2} {
		if round[mod] != want {
			t.Errorf("%s loaded in round %d, want %d", mod, round[mod], want)
		}
	}
	if res.Rounds != 2 {
		t.Errorf("rounds %d, want 2 (the third finds nothing new)", res.Rounds)
	}
	var nets []string
	for _, m := range res.Profile.Modules {
		if m.Class == "network" {
			nets = append(nets, m.Module)
		}
	}
	if !reflect.DeepEqual(nets, []string{"virtio_net"}) {
		t.Errorf("profile's network modules %v, want [virtio_net]", nets)
	}
	if len(res.Failed) != 1 || res.Failed[0].Module != "bochs" || res.Failed[0].Path != brokenPath {
		t.Fatalf("failures %+v, want bochs alone with its path", res.Failed)
	}
	if err := res.Err(); err == nil || !strings.Contains(err.Error(), brokenPath) {
		t.Errorf("Err() = %v, want it to name %s", err, brokenPath)
	}
	pos := map[string]int{}
	for i, m := range k.order {
		pos[m] = i
	}
	for _, m := range k.order {
		deps, err := tr.Deps(tr.Module(m))
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range deps {
			if j, ok := pos[d]; !ok || j > pos[m] {
				t.Errorf("%s inserted before its dependency %s", m, d)
			}
		}
	}
	// A second Load finds everything loaded (sysfs module/*/initstate).
	again, err := Load(ctx, tr, LoadOptions{Sysfs: sysfs, Insert: k.insert, Settle: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	n := len(k.order)
	for _, l := range again.Loaded {
		if !l.Already {
			t.Errorf("%s loaded twice", l.Module)
		}
	}
	if len(k.order) != n {
		t.Errorf("second load inserted %v", k.order[n:])
	}
}

// TestBootModules: the boot set for each recorded machine holds its storage
// and network drivers and the root filesystem, and nothing for sound or
// graphics; it goes into an initramfs with a load list LoadList can follow.
func TestBootModules(t *testing.T) {
	tree := debianTree(t)
	tr, err := Open(tree, Options{ConfigDirs: []string{"testdata/modprobe.d"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		corpus  string
		want    []string
		notWant []string
	}{
		{"q35-virtio.txt", []string{"virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "ext4"}, []string{"bochs", "xhci_pci", "usbhid"}},
		{"q35-e1000e-nvme.txt", []string{"e1000e", "nvme", "ahci", "sd_mod", "ext4", "uas"}, []string{"bochs", "snd_hda_intel", "virtio_pci"}},
	} {
		t.Run(tc.corpus, func(t *testing.T) {
			devs, err := ReadDeviceList(filepath.Join("testdata/corpus", tc.corpus))
			if err != nil {
				t.Fatal(err)
			}
			p, err := tr.BootPlan(devs, BootNeeds{Filesystems: []string{"ext4"}, Network: true})
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range tc.want {
				if p.Step(m) == nil {
					t.Errorf("boot set lacks %s: %v", m, p.Names())
				}
			}
			for _, m := range tc.notWant {
				if p.Step(m) != nil {
					t.Errorf("boot set has %s: %v", m, p.Names())
				}
			}
			a := initramfs.New()
			if err := AddToInitramfs(a, tr, p); err != nil {
				t.Fatal(err)
			}
			// Unpack what the archive holds with cpio, then follow the list.
			if _, err := exec.LookPath("cpio"); err != nil {
				t.Skip("needs cpio")
			}
			var buf bytes.Buffer
			if err := a.WriteCPIO(&buf); err != nil {
				t.Fatal(err)
			}
			root := t.TempDir()
			cmd := exec.Command("cpio", "-id", "--quiet")
			cmd.Dir, cmd.Stdin = root, &buf
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("cpio: %v %s", err, out)
			}
			var order []string
			res, err := LoadList(context.Background(), filepath.Join(root, "lib/modules", tr.Version), func(_ context.Context, s Step) error {
				if _, err := ReadModule(s.Path); err != nil {
					return err
				}
				order = append(order, s.Module)
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Failed) > 0 || !reflect.DeepEqual(order, p.Names()) {
				t.Fatalf("load list gave %v (failed %v), plan %v", order, res.Failed, p.Names())
			}
			if list := string(p.ModuleList(false)); !strings.Contains(list, "\next4\n") {
				t.Errorf("module list lacks ext4:\n%s", list)
			}
		})
	}
}

func TestLoadListErrors(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, LoadListName), "kernel/a.ko\nkernel/missing.ko x=1\n../../etc/passwd.ko\n")
	writeFile(t, filepath.Join(dir, "kernel/a.ko"), "\x7fELF")
	res, err := LoadList(context.Background(), dir, func(_ context.Context, s Step) error {
		_, err := ReadModule(s.Path)
		return err
	})
	if err == nil || !strings.Contains(err.Error(), LoadListName+":3") {
		t.Fatalf("want an error for line 3, got %v", err)
	}
	if len(res.Loaded) != 1 || len(res.Failed) != 1 || res.Failed[0].Module != "missing" || !strings.Contains(res.Failed[0].Error, "missing.ko") {
		t.Fatalf("loaded %v failed %v", res.Loaded, res.Failed)
	}
}

func TestProfile(t *testing.T) {
	tree := debianTree(t)
	tr, err := Open(tree, Options{ConfigDirs: []string{"testdata/modprobe.d"}})
	if err != nil {
		t.Fatal(err)
	}
	devs, err := ReadDeviceList("testdata/corpus/servers.txt")
	if err != nil {
		t.Fatal(err)
	}
	p, _ := tr.Plan(devs)
	prof := tr.Profile(p)
	got := map[string]ProfileModule{}
	for _, m := range prof.Modules {
		got[m.Module] = m
	}
	for _, tc := range []struct{ module, class, id string }{
		{"i40e", "network", "8086:1572"},
		{"mlx5_core", "network", "15b3:1017"},
		{"bnxt_en", "network", "14e4:16d8"},
		{"igb", "network", "8086:1521"},
		{"mpt3sas", "storage", "1000:0097"},
		{"nvme", "storage", "144d:a80a"},
	} {
		m, ok := got[tc.module]
		if !ok {
			t.Errorf("profile lacks %s", tc.module)
			continue
		}
		found := false
		for _, d := range m.Devices {
			found = found || d.ID == tc.id
		}
		if m.Class != tc.class || !found {
			t.Errorf("%s: class %s devices %+v, want %s with %s", tc.module, m.Class, m.Devices, tc.class, tc.id)
		}
	}
	var buf bytes.Buffer
	if err := prof.WriteText(&buf); err != nil || !strings.Contains(buf.String(), "mlx5_core") {
		t.Errorf("text: %v\n%s", err, buf.String())
	}
}
