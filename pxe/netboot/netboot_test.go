package netboot

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// hostKernel skips unless the host has a Debian kernel with modules
// (package linux-image-amd64, in scripts/setup.sh).
func hostKernel(t *testing.T) Kernel {
	t.Helper()
	k, err := FindKernel("/", "")
	if err != nil {
		t.Skipf("no kernel with modules on this host: %v", err)
	}
	return k
}

// staticAgent returns a statically linked ELF that stands in for esir-agent
// (busybox-static): these tests check the packing, not the agent.
func staticAgent(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat("/bin/busybox"); err != nil {
		t.Skip("busybox-static not installed")
	}
	dst := filepath.Join(t.TempDir(), "esir-agent")
	b, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

func TestClosureOfMke2fs(t *testing.T) {
	if _, err := os.Stat("/sbin/mke2fs"); err != nil {
		t.Skip("e2fsprogs not installed")
	}
	files, err := Closure("/", []string{"/sbin/mke2fs"})
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, f := range files {
		names[filepath.Base(f.Name)] = true
		if st, err := os.Lstat(f.Source); err != nil || !st.Mode().IsRegular() {
			t.Errorf("%s: source %s is not a regular file", f.Name, f.Source)
		}
	}
	for _, want := range []string{"mke2fs", "ld-linux-x86-64.so.2", "libc.so.6", "libext2fs.so.2", "libcom_err.so.2", "libblkid.so.1", "libuuid.so.1", "libe2p.so.2"} {
		if !names[want] {
			t.Errorf("closure lacks %s: %v", want, names)
		}
	}
	if _, err := Closure("/", []string{"/sbin/no-such-helper"}); err == nil {
		t.Error("missing helper accepted")
	}
}

func TestClosureFollowsLinksInsideRoot(t *testing.T) {
	// A root whose /lib is an absolute symlink must resolve inside the root,
	// never on the host.
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "usr/bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skip("busybox-static not installed")
	}
	os.WriteFile(filepath.Join(root, "usr/bin/busybox"), b, 0o755)
	os.Symlink("/usr/bin", filepath.Join(root, "bin"))
	files, err := Closure(root, []string{"/bin/busybox"})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 1 || files[0].Source != filepath.Join(root, "usr/bin/busybox") || files[0].Name != "bin/busybox" {
		t.Fatalf("files %+v", files)
	}
}

func TestVersionLess(t *testing.T) {
	tests := []struct {
		a, b string
		less bool
	}{
		{"6.1.0-9-amd64", "6.1.0-27-amd64", true},
		{"6.1.0-27-amd64", "6.1.0-9-amd64", false},
		{"5.10.0-30-amd64", "6.1.0-1-amd64", true},
		{"6.1.0-27-amd64", "6.1.0-27-amd64", false},
	}
	for _, tt := range tests {
		if got := versionLess(tt.a, tt.b); got != tt.less {
			t.Errorf("versionLess(%s, %s) = %v", tt.a, tt.b, got)
		}
	}
}

func unpack(t *testing.T, initrd, dir string) {
	t.Helper()
	for _, bin := range []string{"zstd", "cpio"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed", bin)
		}
	}
	cmd := exec.Command("sh", "-c", `zstd -dc "$1" | cpio -idm --quiet --no-absolute-filenames`, "sh", initrd)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("unpack %s: %v\n%s", initrd, err, out)
	}
}

func TestBuildFromHostKernel(t *testing.T) {
	k := hostKernel(t)
	agent := staticAgent(t)
	out := filepath.Join(t.TempDir(), "netboot")
	ctx := context.Background()
	opts := Options{KernelRoot: "/", Agent: agent, Out: out, Source: "host", Log: quiet()}
	res, err := Build(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if res.Cached || res.Manifest.KernelVersion != k.Version {
		t.Fatalf("result %+v", res)
	}
	kb, _ := os.ReadFile(res.Kernel)
	hb, _ := os.ReadFile(k.Vmlinuz)
	if !bytes.Equal(kb, hb) {
		t.Error("kernel copy differs")
	}
	mods := map[string]bool{}
	for _, m := range res.Manifest.Modules {
		mods[m] = true
	}
	for _, want := range []string{"virtio_net", "e1000", "e1000e", "virtio_blk", "virtio_pci", "nvme", "ahci", "ext4", "jbd2"} {
		if !mods[want] {
			t.Errorf("module %s missing", want)
		}
	}
	for _, unwanted := range []string{"iwlwifi", "snd_hda_intel", "dm_mod"} {
		if mods[unwanted] {
			t.Errorf("module %s should not be in the netboot environment", unwanted)
		}
	}

	// The archive holds /init (the agent), the modules with consistent
	// indices, and a mke2fs that runs with its libraries.
	dir := t.TempDir()
	unpack(t, res.Initrd, dir)
	if b, _ := os.ReadFile(filepath.Join(dir, "init")); !bytes.Equal(b, mustRead(t, agent)) {
		t.Error("/init is not the agent")
	}
	modDir := filepath.Join(dir, "lib/modules", k.Version)
	dep, err := os.ReadFile(filepath.Join(modDir, "modules.dep"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(dep)), "\n")
	if len(lines) != len(res.Manifest.Modules) {
		t.Errorf("modules.dep has %d lines for %d modules", len(lines), len(res.Manifest.Modules))
	}
	for _, l := range lines {
		p, deps, _ := strings.Cut(l, ":")
		for _, f := range append([]string{p}, strings.Fields(deps)...) {
			if _, err := os.Stat(filepath.Join(modDir, f)); err != nil {
				t.Errorf("modules.dep names %s, not in the archive", f)
			}
		}
	}
	if alias, _ := os.ReadFile(filepath.Join(modDir, "modules.alias")); !bytes.Contains(alias, []byte(" virtio_net\n")) || bytes.Contains(alias, []byte(" iwlwifi\n")) {
		t.Error("modules.alias not restricted to the shipped modules")
	}
	if os.Geteuid() == 0 {
		img := "/tmp/fs.img"
		cmd := exec.Command("chroot", dir, "/sbin/mkfs.ext4", "-q", "-F", img, "8M")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("mkfs.ext4 inside the unpacked initramfs: %v\n%s", err, out)
		}
		sb := make([]byte, 1024)
		f, err := os.Open(filepath.Join(dir, img))
		if err != nil {
			t.Fatal(err)
		}
		f.ReadAt(sb, 1024)
		f.Close()
		if binary.LittleEndian.Uint16(sb[56:]) != 0xEF53 || binary.LittleEndian.Uint32(sb[96:])&0x40 == 0 {
			t.Error("mkfs.ext4 in the initramfs did not make an ext4 filesystem with extents")
		}
		// The BIOS bootloader installer runs too, and the boot files are there.
		if out, err := exec.Command("chroot", dir, "/usr/bin/extlinux", "--version").CombinedOutput(); !bytes.Contains(out, []byte("extlinux")) {
			t.Errorf("extlinux inside the unpacked initramfs: %v\n%s", err, out)
		}
	}
	for _, f := range DefaultFiles() {
		if !bytes.Equal(mustRead(t, filepath.Join(dir, f)), mustRead(t, f)) {
			t.Errorf("%s differs from the host's copy", f)
		}
	}

	// Same inputs: cached. A changed agent: rebuilt.
	res2, err := Build(ctx, opts)
	if err != nil || !res2.Cached {
		t.Fatalf("second build not cached: %v %+v", err, res2)
	}
	f, _ := os.OpenFile(agent, os.O_APPEND|os.O_WRONLY, 0)
	f.Write([]byte("changed"))
	f.Close()
	res3, err := Build(ctx, opts)
	if err != nil || res3.Cached || res3.Manifest.AgentSHA256 == res.Manifest.AgentSHA256 {
		t.Fatalf("changed agent did not rebuild: %v %+v", err, res3)
	}
}

func TestBuildRefusesBadInput(t *testing.T) {
	hostKernel(t)
	out := t.TempDir()
	if _, err := Build(context.Background(), Options{KernelRoot: "/", Agent: "/usr/sbin/mke2fs", Out: out, Log: quiet()}); err == nil || !strings.Contains(err.Error(), "dynamically linked") {
		t.Errorf("dynamic agent: %v", err)
	}
	if _, err := Build(context.Background(), Options{KernelRoot: t.TempDir(), Agent: "/bin/busybox", Out: out, Log: quiet()}); err == nil || !strings.Contains(err.Error(), "no kernel") {
		t.Errorf("empty kernel root: %v", err)
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
