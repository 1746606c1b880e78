// Package netboot builds the netboot environment a node PXE-boots into: a
// kernel and an initramfs whose /init is the static esir-agent, with the
// kernel's modules for network and storage devices (and the filesystems the
// install needs) and the helper programs the install runs (mke2fs with its
// shared-library closure, resolved the way the dynamic loader resolves it).
//
// The kernel and modules come from a root tree holding boot/vmlinuz-VERSION
// and (usr/)lib/modules/VERSION: the host ("/"), a kernel directory, or the
// part of an image that FromImage extracts. Builds are cached: an output
// directory whose recorded key matches (agent binary, kernel, modules,
// helpers) is reused.
package netboot

import (
	"bufio"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/initramfs"
	"github.com/esir-project/esir/modules"
)

// Output file names in a build directory.
const (
	KernelFile   = "vmlinuz"
	InitrdFile   = "initrd.img"
	ManifestFile = "netboot.json"
)

// format changes whenever the builder's output would change for the same
// inputs, invalidating caches.
const format = "esir-netboot-1"

// Options describe a build.
type Options struct {
	// KernelRoot is a root tree with boot/vmlinuz-VERSION and
	// (usr/)lib/modules/VERSION.
	KernelRoot string
	// KernelVersion picks one kernel; empty takes the newest that has modules.
	KernelVersion string
	// Agent is the static esir-agent binary that becomes /init.
	Agent string
	// HelpersRoot is the root the helper programs and their libraries are
	// taken from; empty means "/".
	HelpersRoot string
	// Helpers are absolute paths (inside HelpersRoot) of programs to include
	// with their shared-library closure; nil means DefaultHelpers.
	Helpers []string
	// Files are absolute paths (inside HelpersRoot) of data files the
	// install reads (boot code, EFI loaders), copied as they are; nil means
	// DefaultFiles.
	Files []string
	// Out is the build directory (created).
	Out string
	// Source identifies where the kernel came from (image ref, info hash)
	// for the manifest and the cache key.
	Source string
	// Force rebuilds even when the cache is current.
	Force bool
	Log   *slog.Logger
}

// DefaultHelpers are the programs the install needs in the netboot
// environment.
// mke2fs makes the root filesystem; extlinux makes the disk boot under BIOS.
func DefaultHelpers() []string { return []string{"/sbin/mke2fs", "/usr/bin/extlinux"} }

// DefaultFiles are the data files the install needs in the netboot
// environment, at the paths Debian 12 installs them: the GPT boot code for
// BIOS (syslinux-common) and systemd-boot for UEFI (systemd-boot-efi).
func DefaultFiles() []string {
	return []string{"/usr/lib/EXTLINUX/gptmbr.bin", "/usr/lib/systemd/boot/efi/systemd-bootx64.efi"}
}

// Manifest describes a build; it is written as netboot.json.
type Manifest struct {
	Format        string    `json:"format"`
	Key           string    `json:"key"`
	Source        string    `json:"source,omitempty"`
	KernelVersion string    `json:"kernel_version"`
	AgentSHA256   string    `json:"agent_sha256"`
	Modules       []string  `json:"modules"`
	Helpers       []string  `json:"helpers"`
	Files         int       `json:"files"`
	InitrdSize    int64     `json:"initrd_size"`
	Created       time.Time `json:"created"`
}

// Result is a finished build.
type Result struct {
	Dir      string
	Kernel   string // path of the kernel
	Initrd   string // path of the initramfs
	Manifest Manifest
	Cached   bool // the build directory was already current
}

// Kernel is one kernel of a root tree.
type Kernel struct {
	Version    string
	Vmlinuz    string // full path
	ModulesDir string // full path
}

// FindKernel finds a kernel with modules under root: version, or the newest.
func FindKernel(root, version string) (Kernel, error) {
	vmls, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	var found []Kernel
	for _, v := range vmls {
		ver := strings.TrimPrefix(filepath.Base(v), "vmlinuz-")
		if version != "" && ver != version {
			continue
		}
		for _, md := range []string{filepath.Join(root, "lib/modules", ver), filepath.Join(root, "usr/lib/modules", ver)} {
			if st, err := os.Stat(filepath.Join(md, "modules.dep")); err == nil && st.Mode().IsRegular() {
				found = append(found, Kernel{Version: ver, Vmlinuz: v, ModulesDir: md})
				break
			}
		}
	}
	if len(found) == 0 {
		if version != "" {
			return Kernel{}, fmt.Errorf("netboot: no kernel %s with modules under %s (want boot/vmlinuz-%s and lib/modules/%s/modules.dep)", version, root, version, version)
		}
		return Kernel{}, fmt.Errorf("netboot: no kernel with modules under %s (want boot/vmlinuz-VERSION and lib/modules/VERSION/modules.dep)", root)
	}
	sort.Slice(found, func(i, j int) bool { return versionLess(found[i].Version, found[j].Version) })
	return found[len(found)-1], nil
}

// versionLess compares kernel versions numerically field by field.
func versionLess(a, b string) bool {
	fa := strings.FieldsFunc(a, func(r rune) bool { return r == '.' || r == '-' })
	fb := strings.FieldsFunc(b, func(r rune) bool { return r == '.' || r == '-' })
	for i := 0; i < len(fa) && i < len(fb); i++ {
		var na, nb int
		_, ea := fmt.Sscan(fa[i], &na)
		_, eb := fmt.Sscan(fb[i], &nb)
		if ea == nil && eb == nil && na != nb {
			return na < nb
		}
		if (ea != nil || eb != nil) && fa[i] != fb[i] {
			return fa[i] < fb[i]
		}
	}
	return len(fa) < len(fb)
}

// FromImage extracts an image's kernel (boot/vmlinuz-*) and module trees
// into dir, which then serves as Options.KernelRoot. It fails when the image
// has no kernel with modules.
func FromImage(ctx context.Context, img *imaging.Image, dir string) error {
	var prefixes []string
	for _, k := range img.Manifest.Kernels {
		if k.Vmlinuz != "" && k.ModulesDir != "" {
			prefixes = append(prefixes, k.Vmlinuz, k.ModulesDir+"/")
		}
	}
	if len(prefixes) == 0 {
		return fmt.Errorf("netboot: image %s has no kernel with modules: give a kernel directory with --kernel", img.Manifest.Ref())
	}
	f, err := os.Open(img.ArchivePath())
	if err != nil {
		return fmt.Errorf("netboot: image %s: %w", img.Manifest.Ref(), err)
	}
	defer f.Close()
	include := func(name string) bool {
		for _, p := range prefixes {
			if name == p || strings.HasPrefix(name, p) || name+"/" == p {
				return true
			}
		}
		return false
	}
	if _, err := imaging.Extract(ctx, f, dir, imaging.ExtractOptions{Include: include, NoOwner: true, NoXattrs: true}); err != nil {
		return fmt.Errorf("netboot: extract the kernel of image %s: %w", img.Manifest.Ref(), err)
	}
	return nil
}

// wanted reports whether a module (path relative to the tree) belongs in the
// netboot environment: drivers of network cards, storage controllers and
// their buses, and the filesystems the install makes.
func wanted(p string) bool {
	for _, skip := range []string{
		"kernel/drivers/net/wireless/", "kernel/drivers/net/wwan/", "kernel/drivers/net/can/",
		"kernel/drivers/net/ieee802154/", "kernel/drivers/net/hamradio/", "kernel/drivers/net/ppp/",
		"kernel/drivers/net/slip/", "kernel/drivers/net/wan/", "kernel/drivers/net/arcnet/",
		"kernel/drivers/net/fddi/", "kernel/drivers/net/dsa/", "kernel/drivers/net/usb/",
		"kernel/drivers/net/ipa/", "kernel/drivers/net/mhi/", "kernel/drivers/net/plip/",
		"kernel/drivers/net/thunderbolt/", "kernel/drivers/md/",
	} {
		if strings.HasPrefix(p, skip) {
			return false
		}
	}
	for _, keep := range []string{
		"kernel/drivers/net/", "kernel/drivers/ata/", "kernel/drivers/scsi/", "kernel/drivers/nvme/",
		"kernel/drivers/block/", "kernel/drivers/mmc/", "kernel/drivers/virtio/", "kernel/drivers/pci/",
		"kernel/drivers/usb/host/", "kernel/drivers/usb/storage/", "kernel/drivers/message/fusion/",
		"kernel/fs/ext4/", "kernel/fs/jbd2/", "kernel/fs/mbcache", "kernel/fs/fat/", "kernel/fs/efivarfs/",
		"kernel/fs/nls/nls_cp437", "kernel/fs/nls/nls_iso8859-1", "kernel/fs/nls/nls_ascii",
	} {
		if strings.HasPrefix(p, keep) {
			return true
		}
	}
	return false
}

// wantedModules lists the names of the modules in a modules.dep that wanted
// selects.
func wantedModules(depFile string) ([]string, error) {
	f, err := os.Open(depFile)
	if err != nil {
		return nil, fmt.Errorf("netboot: %w", err)
	}
	defer f.Close()
	var names []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		p, _, ok := strings.Cut(sc.Text(), ":")
		if !ok || !wanted(p) {
			continue
		}
		n := path.Base(p)
		for _, ext := range []string{".xz", ".zst", ".gz"} {
			n = strings.TrimSuffix(n, ext)
		}
		names = append(names, strings.ReplaceAll(strings.TrimSuffix(n, ".ko"), "-", "_"))
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("netboot: read %s: %w", depFile, err)
	}
	return names, nil
}

// Build builds (or reuses) the netboot environment in opts.Out.
func Build(ctx context.Context, opts Options) (*Result, error) {
	log := opts.Log
	if log == nil {
		log = slog.Default()
	}
	if opts.Out == "" {
		return nil, errors.New("netboot: no output directory")
	}
	if opts.HelpersRoot == "" {
		opts.HelpersRoot = "/"
	}
	if opts.Helpers == nil {
		opts.Helpers = DefaultHelpers()
	}
	if opts.Files == nil {
		opts.Files = DefaultFiles()
	}
	k, err := FindKernel(opts.KernelRoot, opts.KernelVersion)
	if err != nil {
		return nil, err
	}
	agentSum, err := checkAgent(opts.Agent)
	if err != nil {
		return nil, err
	}
	tree, err := modules.Open(k.ModulesDir, modules.Options{ConfigDirs: []string{}})
	if err != nil {
		return nil, fmt.Errorf("netboot: kernel %s modules: %w", k.Version, err)
	}
	names, err := wantedModules(filepath.Join(k.ModulesDir, "modules.dep"))
	if err != nil {
		return nil, err
	}
	plan, err := tree.PlanNames(names...)
	if err != nil {
		// A softdep naming a module this kernel lacks is not fatal.
		log.Debug("netboot: module plan", "kernel", k.Version, "err", err)
	}
	if plan == nil || len(plan.Steps) == 0 {
		return nil, fmt.Errorf("netboot: kernel %s in %s has no network or storage modules", k.Version, k.ModulesDir)
	}
	helpers, err := Closure(opts.HelpersRoot, opts.Helpers)
	if err != nil {
		return nil, err
	}
	for _, f := range opts.Files {
		src := filepath.Join(opts.HelpersRoot, f)
		st, err := os.Stat(src)
		if err != nil || !path.IsAbs(f) || !st.Mode().IsRegular() {
			return nil, fmt.Errorf("netboot: file %s: want an absolute path to a regular file (%v)", f, err)
		}
		helpers = append(helpers, File{Name: strings.TrimPrefix(path.Clean(f), "/"), Source: src, Mode: 0o644})
	}

	key, err := cacheKey(k, agentSum, plan, helpers)
	if err != nil {
		return nil, err
	}
	res := &Result{Dir: opts.Out, Kernel: filepath.Join(opts.Out, KernelFile), Initrd: filepath.Join(opts.Out, InitrdFile)}
	if !opts.Force {
		if m, err := readManifest(filepath.Join(opts.Out, ManifestFile)); err == nil && m.Key == key && fileExists(res.Kernel) && fileExists(res.Initrd) {
			res.Manifest, res.Cached = *m, true
			log.Info("netboot: up to date", "dir", opts.Out, "kernel", k.Version)
			return res, nil
		}
	}

	a := initramfs.New()
	for _, d := range []string{"proc", "sys", "dev", "run", "tmp", "etc", "root"} {
		if err := a.Dir(d, 0o755); err != nil {
			return nil, err
		}
	}
	if err := a.CharDev("dev/console", 0o600, 5, 1); err != nil {
		return nil, err
	}
	if err := a.CharDev("dev/null", 0o666, 1, 3); err != nil {
		return nil, err
	}
	if err := a.File("init", opts.Agent, 0o755); err != nil {
		return nil, fmt.Errorf("netboot: agent: %w", err)
	}
	if err := a.Symlink("usr/bin/esir-agent", "/init"); err != nil {
		return nil, err
	}
	if err := modules.AddToInitramfs(a, tree, plan); err != nil {
		return nil, fmt.Errorf("netboot: %w", err)
	}
	if err := addIndices(a, tree, plan); err != nil {
		return nil, err
	}
	for _, f := range helpers {
		if err := a.File(f.Name, f.Source, f.Mode); err != nil {
			return nil, fmt.Errorf("netboot: helper %s: %w", f.Name, err)
		}
	}
	if a.Has("usr/sbin/mke2fs") || a.Has("sbin/mke2fs") {
		dir := "sbin"
		if a.Has("usr/sbin/mke2fs") {
			dir = "usr/sbin"
		}
		for _, n := range []string{"mkfs.ext4", "mkfs.ext2", "mkfs.ext3"} {
			if !a.Has(path.Join(dir, n)) {
				if err := a.Symlink(path.Join(dir, n), "mke2fs"); err != nil {
					return nil, err
				}
			}
		}
	}
	if conf := filepath.Join(opts.HelpersRoot, "etc/mke2fs.conf"); fileExists(conf) && !a.Has("etc/mke2fs.conf") {
		if err := a.File("etc/mke2fs.conf", conf, 0o644); err != nil {
			return nil, err
		}
	}

	if err := os.MkdirAll(opts.Out, 0o755); err != nil {
		return nil, fmt.Errorf("netboot: %w", err)
	}
	if err := a.WriteFile(res.Initrd); err != nil {
		return nil, fmt.Errorf("netboot: %w", err)
	}
	if err := copyAtomic(k.Vmlinuz, res.Kernel); err != nil {
		return nil, err
	}
	st, err := os.Stat(res.Initrd)
	if err != nil {
		return nil, err
	}
	m := Manifest{
		Format: format, Key: key, Source: opts.Source, KernelVersion: k.Version, AgentSHA256: agentSum,
		Modules: plan.Names(), Files: a.Len(), InitrdSize: st.Size(), Created: time.Now().UTC(),
	}
	for _, h := range helpers {
		m.Helpers = append(m.Helpers, "/"+h.Name)
	}
	b, _ := json.MarshalIndent(m, "", "  ")
	if err := writeAtomic(filepath.Join(opts.Out, ManifestFile), append(b, '\n')); err != nil {
		return nil, err
	}
	res.Manifest = m
	log.Info("netboot: built", "dir", opts.Out, "kernel", k.Version, "modules", len(m.Modules), "files", m.Files, "initrd_bytes", m.InitrdSize)
	return res, nil
}

// addIndices writes the module tree's text indices restricted to the
// shipped modules, so the agent's module loader reads a consistent tree.
func addIndices(a *initramfs.Archive, t *modules.Tree, p *modules.Plan) error {
	base := path.Join("lib/modules", t.Version)
	shipped := map[string]bool{}
	paths := map[string]bool{}
	for _, s := range p.Steps {
		shipped[s.Module] = true
		if rel, err := filepath.Rel(t.Dir, s.Path); err == nil {
			paths[filepath.ToSlash(rel)] = true
		}
	}
	norm := func(n string) string { return strings.ReplaceAll(n, "-", "_") }
	filters := map[string]func(line string) bool{
		"modules.dep": func(l string) bool {
			p, _, _ := strings.Cut(l, ":")
			return paths[p]
		},
		"modules.order": func(l string) bool { return paths[strings.TrimSpace(l)] },
		"modules.alias": func(l string) bool {
			f := strings.Fields(l)
			return len(f) >= 3 && f[0] == "alias" && shipped[norm(f[len(f)-1])]
		},
		"modules.softdep": func(l string) bool {
			f := strings.Fields(l)
			return len(f) >= 2 && f[0] == "softdep" && shipped[norm(f[1])]
		},
		"modules.builtin":         nil,
		"modules.builtin.modinfo": nil,
	}
	for name, keep := range filters {
		src := filepath.Join(t.Dir, name)
		b, err := os.ReadFile(src)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("netboot: %w", err)
		}
		if keep != nil {
			var out strings.Builder
			sc := bufio.NewScanner(strings.NewReader(string(b)))
			sc.Buffer(make([]byte, 64*1024), 1<<20)
			for sc.Scan() {
				if l := sc.Text(); keep(l) {
					out.WriteString(l)
					out.WriteByte('\n')
				}
			}
			b = []byte(out.String())
		}
		if err := a.Bytes(path.Join(base, name), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

// checkAgent verifies the agent binary exists and is statically linked, and
// returns its SHA-256.
func checkAgent(p string) (string, error) {
	if p == "" {
		return "", errors.New("netboot: no esir-agent binary given")
	}
	f, err := elf.Open(p)
	if err != nil {
		return "", fmt.Errorf("netboot: agent %s: not an ELF executable: %w", p, err)
	}
	defer f.Close()
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return "", fmt.Errorf("netboot: agent %s is dynamically linked: build it with CGO_ENABLED=0", p)
		}
	}
	return fileSHA256(p)
}

func fileSHA256(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", fmt.Errorf("netboot: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("netboot: read %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func cacheKey(k Kernel, agentSum string, p *modules.Plan, helpers []File) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s\nagent %s\n", format, agentSum)
	ks, err := fileSHA256(k.Vmlinuz)
	if err != nil {
		return "", err
	}
	fmt.Fprintf(h, "kernel %s %s\n", k.Version, ks)
	for _, s := range p.Steps {
		st, err := os.Stat(s.Path)
		if err != nil {
			return "", fmt.Errorf("netboot: module %s: %w", s.Module, err)
		}
		fmt.Fprintf(h, "module %s %d %d %s\n", s.Path, st.Size(), st.ModTime().UnixNano(), s.Params)
	}
	for _, f := range helpers {
		st, err := os.Stat(f.Source)
		if err != nil {
			return "", fmt.Errorf("netboot: helper %s: %w", f.Source, err)
		}
		fmt.Fprintf(h, "file %s %s %d %d\n", f.Name, f.Source, st.Size(), st.ModTime().UnixNano())
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func readManifest(p string) (*Manifest, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("netboot: %s: %w", p, err)
	}
	return &m, nil
}

// ReadManifest reads the netboot.json of a build directory.
func ReadManifest(dir string) (*Manifest, error) {
	return readManifest(filepath.Join(dir, ManifestFile))
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

func copyAtomic(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("netboot: %w", err)
	}
	defer in.Close()
	return writeAtomicFrom(dst, in)
}

func writeAtomic(dst string, b []byte) error {
	return writeAtomicFrom(dst, strings.NewReader(string(b)))
}

func writeAtomicFrom(dst string, r io.Reader) error {
	tmp, err := os.CreateTemp(filepath.Dir(dst), ".netboot-*")
	if err != nil {
		return fmt.Errorf("netboot: create %s: %w", dst, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, r); err != nil {
		tmp.Close()
		return fmt.Errorf("netboot: write %s: %w", dst, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("netboot: sync %s: %w", dst, err)
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return fmt.Errorf("netboot: rename to %s: %w", dst, err)
	}
	return nil
}

// ImageDir is where the netboot environment of an image is kept in a store.
func ImageDir(storeDir string, m imaging.Manifest) string {
	return filepath.Join(storeDir, "netboot", m.Name, m.Version)
}

// ForImage builds the netboot environment of an image (the server calls it
// when an image is published; `esir boot build --image` by hand). When
// opts.KernelRoot is empty the kernel and modules come from the image itself;
// otherwise from opts.KernelRoot. opts.Out defaults to ImageDir. A build
// directory made for the same image archive and agent is reused without
// reading the archive again.
func ForImage(ctx context.Context, store *imaging.Store, img *imaging.Image, opts Options) (*Result, error) {
	if opts.Out == "" {
		opts.Out = ImageDir(store.Dir(), img.Manifest)
	}
	opts.Source = img.Manifest.Ref() + " sha256:" + img.Manifest.SHA256
	if opts.KernelRoot != "" {
		opts.Source += " kernel:" + opts.KernelRoot
	}
	if !opts.Force {
		agentSum, err := checkAgent(opts.Agent)
		if err != nil {
			return nil, err
		}
		res := &Result{Dir: opts.Out, Kernel: filepath.Join(opts.Out, KernelFile), Initrd: filepath.Join(opts.Out, InitrdFile)}
		if m, err := ReadManifest(opts.Out); err == nil && m.Format == format && m.Source == opts.Source &&
			m.AgentSHA256 == agentSum && fileExists(res.Kernel) && fileExists(res.Initrd) {
			res.Manifest, res.Cached = *m, true
			return res, nil
		}
	}
	if opts.KernelRoot == "" {
		tmp, err := os.MkdirTemp(store.Dir(), ".netboot-kernel-*")
		if err != nil {
			return nil, fmt.Errorf("netboot: %w", err)
		}
		defer os.RemoveAll(tmp)
		if err := FromImage(ctx, img, tmp); err != nil {
			return nil, err
		}
		opts.KernelRoot = tmp
	}
	return Build(ctx, opts)
}
