package imaging

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/anacrolix/torrent/metainfo"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mknod, chown, setcap, xattrs): run the suite as root (scripts/test.sh)")
	}
}

func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found: scripts/setup.sh test installs it", name)
	}
	return p
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// makeTree builds the round-trip fixture as root: every file type and
// attribute the archive format promises to keep.
func makeTree(t *testing.T, root string) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	write := func(rel string, data []byte, mode os.FileMode) {
		t.Helper()
		p := filepath.Join(root, rel)
		must(os.MkdirAll(filepath.Dir(p), 0o755))
		must(os.WriteFile(p, data, mode))
		must(os.Chmod(p, mode))
	}
	must(os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	write("etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\nalice:x:1234:5678::/home/alice:/bin/sh\n"), 0o644)
	write("etc/group", []byte("root:x:0:\nstaff:x:5678:\n"), 0o644)
	write("empty", nil, 0o600)
	big := make([]byte, 3<<20+17)
	rand.Read(big)
	write("data/random.bin", big, 0o640)
	write("data/text.txt", bytes.Repeat([]byte("esir file-mode image\n"), 5000), 0o644)
	must(os.Chown(filepath.Join(root, "data/random.bin"), 1234, 5678))

	// Large sparse file: 512 MiB with three data islands and a trailing hole.
	sp, err := os.Create(filepath.Join(root, "data/sparse.img"))
	must(err)
	for _, off := range []int64{0, 100 << 20, 300<<20 + 12345} {
		_, err := sp.WriteAt(bytes.Repeat([]byte{0xA5}, 70000), off)
		must(err)
	}
	must(sp.Truncate(512 << 20))
	must(sp.Close())

	// Hardlinks, three names for one inode.
	write("bin/tool", []byte("#!/bin/sh\necho tool\n"), 0o755)
	must(os.Link(filepath.Join(root, "bin/tool"), filepath.Join(root, "bin/tool-alias")))
	must(os.MkdirAll(filepath.Join(root, "usr/bin"), 0o755))
	must(os.Link(filepath.Join(root, "bin/tool"), filepath.Join(root, "usr/bin/tool")))

	// Symlinks: relative, absolute, dangling, to a directory.
	must(os.Symlink("tool", filepath.Join(root, "bin/rel-link")))
	must(os.Symlink("/etc/passwd", filepath.Join(root, "bin/abs-link")))
	must(os.Symlink("../does/not/exist", filepath.Join(root, "bin/dangling")))
	must(os.Symlink("usr/bin", filepath.Join(root, "sbin")))

	// Devices and a FIFO outside /dev (whose contents are excluded).
	must(os.MkdirAll(filepath.Join(root, "srv/devs"), 0o755))
	must(unix.Mknod(filepath.Join(root, "srv/devs/null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(unix.Mknod(filepath.Join(root, "srv/devs/loop9"), unix.S_IFBLK|0o660, int(unix.Mkdev(7, 9))))
	must(unix.Mkfifo(filepath.Join(root, "srv/devs/fifo"), 0o620))

	// Special modes.
	write("bin/suid", []byte("setuid program"), 0o4755)
	write("bin/sgid", []byte("setgid program"), 0o2711)
	must(os.MkdirAll(filepath.Join(root, "var/tmp"), 0o755))
	must(os.Chmod(filepath.Join(root, "var/tmp"), 0o1777|os.ModeSticky))
	must(unix.Chmod(filepath.Join(root, "var/tmp"), 0o1777))
	must(os.MkdirAll(filepath.Join(root, "locked"), 0o755))
	write("locked/inside", []byte("x"), 0o400)
	must(unix.Chmod(filepath.Join(root, "locked"), 0o500))

	// Capabilities and xattrs.
	write("bin/ping", []byte("pretend ping"), 0o755)
	run(t, needTool(t, "setcap"), "cap_net_raw+ep", filepath.Join(root, "bin/ping"))
	must(unix.Setxattr(filepath.Join(root, "data/text.txt"), "user.esir.note", []byte("hello\x00binary"), 0))
	must(unix.Setxattr(filepath.Join(root, "data"), "user.dir", []byte("on a directory"), 0))
	if err := unix.Setxattr(filepath.Join(root, "bin/tool"), "security.selinux", []byte("system_u:object_r:bin_t:s0\x00"), 0); err != nil {
		t.Logf("security.selinux not settable here (%v); not covered", err)
	}

	// Unusual and deep names.
	write("names/with space and  two", []byte("spaces"), 0o644)
	write("names/ünïcødé ✓ 名前", []byte("utf-8"), 0o644)
	write("names/-leading-dash=equals", []byte("dash"), 0o644)
	deep := "deep"
	for i := 0; i < 4; i++ {
		deep = filepath.Join(deep, strings.Repeat(string(rune('a'+i)), 90))
	}
	write(filepath.Join(deep, strings.Repeat("long-name-", 20)), []byte("deep file"), 0o644)

	// Owners.
	must(os.Lchown(filepath.Join(root, "bin/abs-link"), 1234, 5678))
	must(os.Chown(filepath.Join(root, "names"), 4000000, 4000001))

	// Nanosecond mtimes on everything, deepest first (children change
	// their directory's mtime).
	var paths []string
	must(filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		paths = append(paths, p)
		return err
	}))
	for i := len(paths) - 1; i >= 0; i-- {
		ts := time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC).Add(time.Duration(i)*time.Hour + time.Duration(i*7919+1)*time.Nanosecond)
		tv := []unix.Timespec{unix.NsecToTimespec(ts.UnixNano()), unix.NsecToTimespec(ts.UnixNano())}
		must(unix.UtimesNanoAt(unix.AT_FDCWD, paths[i], tv, unix.AT_SYMLINK_NOFOLLOW))
	}
}

// node is what the round trip compares for one path.
type node struct {
	typ, mode     uint32
	uid, gid      uint32
	mtime         int64
	size          int64
	sha, link     string
	rdev          uint64
	xattrs        string
	allocated     int64
	hardlinkGroup string
}

func snapshot(t *testing.T, root string) map[string]node {
	t.Helper()
	out := map[string]node{}
	groups := map[uint64][]string{}
	inodes := map[string]uint64{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		n := node{
			typ: st.Mode & unix.S_IFMT, mode: st.Mode & 0o7777, uid: st.Uid, gid: st.Gid,
			mtime: st.Mtim.Nano(), allocated: st.Blocks * 512,
		}
		xa, err := readXattrs(p)
		if err != nil {
			return err
		}
		var keys []string
		for k := range xa {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			n.xattrs += fmt.Sprintf("%s=%q;", k, xa[k])
		}
		switch n.typ {
		case unix.S_IFREG:
			n.size = st.Size
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			h := sha256.New()
			_, err = io.Copy(h, f)
			f.Close()
			if err != nil {
				return err
			}
			n.sha = hex.EncodeToString(h.Sum(nil))
			if st.Nlink > 1 {
				groups[st.Ino] = append(groups[st.Ino], rel)
				inodes[rel] = st.Ino
			}
		case unix.S_IFLNK:
			n.link, err = os.Readlink(p)
			if err != nil {
				return err
			}
		case unix.S_IFCHR, unix.S_IFBLK:
			n.rdev = st.Rdev
		}
		out[rel] = n
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for rel, ino := range inodes {
		n := out[rel]
		n.hardlinkGroup = strings.Join(groups[ino], "|")
		out[rel] = n
	}
	return out
}

func compareTrees(t *testing.T, who string, want, got map[string]node) {
	t.Helper()
	for rel, w := range want {
		g, ok := got[rel]
		if !ok {
			t.Errorf("%s: %q missing", who, rel)
			continue
		}
		wa, ga := w.allocated, g.allocated
		w.allocated, g.allocated = 0, 0
		if w != g {
			t.Errorf("%s: %q differs:\n want %+v\n got  %+v", who, rel, w, g)
		}
		if w.typ == unix.S_IFREG && wa < w.size/4 && ga >= w.size/2 {
			t.Errorf("%s: %q lost its holes: %d bytes allocated for %d (source %d)", who, rel, ga, g.size, wa)
		}
	}
	for rel := range got {
		if _, ok := want[rel]; !ok {
			t.Errorf("%s: unexpected %q", who, rel)
		}
	}
}

func writeArchiveFile(t *testing.T, src, dst string, opts ArchiveOptions) ArchiveStats {
	t.Helper()
	f, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := WriteArchive(context.Background(), f, src, opts)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func TestRoundTripRoot(t *testing.T) {
	needRoot(t)
	tarBin := needTool(t, "tar")
	needTool(t, "zstd")
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	makeTree(t, src)
	want := snapshot(t, src)
	archive := filepath.Join(dir, "image.tar.zst")
	st := writeArchiveFile(t, src, archive, ArchiveOptions{})
	if st.Entries != int64(len(want)) {
		t.Errorf("archive has %d entries, tree %d", st.Entries, len(want))
	}
	out, err := exec.Command(tarBin, "--zstd", "-tvf", archive, "data/random.bin").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "alice/staff") {
		t.Errorf("tar -tv does not show the tree's owner names: %v %s", err, out)
	}
	if fi, _ := os.Stat(archive); fi.Size() > 8<<20 {
		t.Errorf("archive is %d bytes: the sparse file's holes were stored", fi.Size())
	}

	for _, tc := range []struct {
		name    string
		extract func(t *testing.T, dst string)
	}{
		{"esir", func(t *testing.T, dst string) {
			f, err := os.Open(archive)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			xs, err := Extract(context.Background(), f, dst, ExtractOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if xs.Entries != st.Entries {
				t.Errorf("extracted %d entries, archive has %d", xs.Entries, st.Entries)
			}
		}},
		{"gnu-tar", func(t *testing.T, dst string) {
			// --numeric-owner: the archive carries the tree's own user and
			// group names (from its etc/passwd and etc/group); without the
			// flag GNU tar maps them through the HOST's databases ("staff"
			// is gid 50 on Debian, 5678 in the fixture), which is wrong for
			// a foreign root filesystem.
			run(t, tarBin, "--zstd", "-xpf", archive, "--xattrs", "--xattrs-include=*", "--numeric-owner", "-C", dst)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := filepath.Join(dir, "out-"+tc.name)
			if err := os.Mkdir(dst, 0o700); err != nil {
				t.Fatal(err)
			}
			tc.extract(t, dst)
			compareTrees(t, tc.name, want, snapshot(t, dst))
		})
	}
}

func TestReproducible(t *testing.T) {
	needRoot(t)
	src := t.TempDir()
	makeTree(t, src)
	var sums []string
	// Different core counts must not change the bytes.
	for _, procs := range []int{1, 4} {
		old := runtime.GOMAXPROCS(procs)
		var buf bytes.Buffer
		_, err := WriteArchive(context.Background(), &buf, src, ArchiveOptions{})
		runtime.GOMAXPROCS(old)
		if err != nil {
			t.Fatal(err)
		}
		s := sha256.Sum256(buf.Bytes())
		sums = append(sums, hex.EncodeToString(s[:]))
		// Sorted entries: each name sorts after the previous one within
		// its directory, and parents come first.
		dec, _ := zstd.NewReader(&buf)
		tr := tar.NewReader(dec)
		seen := map[string]bool{}
		for {
			h, err := tr.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			name := strings.TrimSuffix(h.Name, "/")
			if parent := filepath.Dir(name); name != "." && !seen[parent] {
				t.Errorf("%q comes before its directory", name)
			}
			seen[name] = true
		}
		dec.Close()
	}
	if sums[0] != sums[1] {
		t.Errorf("two builds of the same tree differ: %s vs %s", sums[0], sums[1])
	}
}

func TestDefaultExcludes(t *testing.T) {
	src := t.TempDir()
	for _, p := range []string{"proc/1/status", "sys/kernel/x", "dev/null-file", "run/lock/x", "tmp/junk",
		"etc/ssh/ssh_host_ed25519_key", "etc/ssh/sshd_config", "var/cache/apt/pkg.bin", "home/u/keep"} {
		if err := os.MkdirAll(filepath.Join(src, filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(src, p), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(src, "etc/machine-id"), []byte("0123456789abcdef0123456789abcdef\n"), 0o444); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		opts    ArchiveOptions
		present []string
		absent  []string
		midSize int64
	}{
		{"defaults", ArchiveOptions{Exclude: []string{"/var/cache/apt/*"}},
			[]string{"proc", "sys", "dev", "run", "tmp", "etc/ssh/sshd_config", "var/cache/apt", "home/u/keep"},
			[]string{"proc/1", "sys/kernel", "dev/null-file", "run/lock", "tmp/junk", "etc/ssh/ssh_host_ed25519_key", "var/cache/apt/pkg.bin"},
			0},
		{"keep-machine-id", ArchiveOptions{KeepMachineID: true},
			[]string{"var/cache/apt/pkg.bin"}, []string{"proc/1"}, 33},
		{"no-defaults", ArchiveOptions{NoDefaultExcludes: true},
			[]string{"proc/1/status", "etc/ssh/ssh_host_ed25519_key", "tmp/junk"}, nil, 33},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			if _, err := WriteArchive(context.Background(), &buf, src, tc.opts); err != nil {
				t.Fatal(err)
			}
			dst := t.TempDir()
			if _, err := Extract(context.Background(), &buf, dst, ExtractOptions{NoOwner: os.Geteuid() != 0}); err != nil {
				t.Fatal(err)
			}
			for _, p := range tc.present {
				if _, err := os.Lstat(filepath.Join(dst, p)); err != nil {
					t.Errorf("%s should be in the image: %v", p, err)
				}
			}
			for _, p := range tc.absent {
				if _, err := os.Lstat(filepath.Join(dst, p)); err == nil {
					t.Errorf("%s should not be in the image", p)
				}
			}
			fi, err := os.Stat(filepath.Join(dst, "etc/machine-id"))
			if err != nil || fi.Size() != tc.midSize {
				t.Errorf("etc/machine-id: %v, size want %d", err, tc.midSize)
			}
		})
	}
}

// hostile builds a tar.zst archive from entries.
func hostile(t *testing.T, entries []tar.Header) []byte {
	t.Helper()
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	for _, h := range entries {
		h := h
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len("pwned"))
		}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write([]byte("pwned"))
		}
	}
	tw.Close()
	enc, _ := zstd.NewWriter(nil)
	return enc.EncodeAll(raw.Bytes(), nil)
}

func TestHostileArchives(t *testing.T) {
	for _, tc := range []struct {
		name    string
		entries func(outside string) []tar.Header
	}{
		{"dotdot", func(string) []tar.Header {
			return []tar.Header{{Name: "../outside/pwned", Typeflag: tar.TypeReg}}
		}},
		{"dotdot-inside-path", func(string) []tar.Header {
			return []tar.Header{{Name: "a/../../outside/pwned", Typeflag: tar.TypeReg}}
		}},
		{"absolute", func(outside string) []tar.Header {
			return []tar.Header{{Name: outside + "/pwned", Typeflag: tar.TypeReg}}
		}},
		{"symlink-then-write-absolute", func(outside string) []tar.Header {
			return []tar.Header{
				{Name: "link", Typeflag: tar.TypeSymlink, Linkname: outside},
				{Name: "link/pwned", Typeflag: tar.TypeReg},
			}
		}},
		{"symlink-then-write-relative", func(string) []tar.Header {
			return []tar.Header{
				{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o755},
				{Name: "d/link", Typeflag: tar.TypeSymlink, Linkname: "../../outside"},
				{Name: "d/link/pwned", Typeflag: tar.TypeReg},
			}
		}},
		{"symlink-to-root-then-deep-write", func(string) []tar.Header {
			return []tar.Header{
				{Name: "r", Typeflag: tar.TypeSymlink, Linkname: "/"},
				{Name: "r/tmp/pwned", Typeflag: tar.TypeReg},
			}
		}},
		{"symlink-then-directory", func(outside string) []tar.Header {
			return []tar.Header{
				{Name: "link", Typeflag: tar.TypeSymlink, Linkname: outside},
				{Name: "link/sub/", Typeflag: tar.TypeDir, Mode: 0o755},
			}
		}},
		{"hardlink-dotdot", func(string) []tar.Header {
			return []tar.Header{{Name: "hl", Typeflag: tar.TypeLink, Linkname: "../outside/secret"}}
		}},
		{"hardlink-absolute", func(outside string) []tar.Header {
			return []tar.Header{{Name: "hl", Typeflag: tar.TypeLink, Linkname: outside + "/secret"}}
		}},
		{"hardlink-through-symlink", func(outside string) []tar.Header {
			return []tar.Header{
				{Name: "link", Typeflag: tar.TypeSymlink, Linkname: outside},
				{Name: "hl", Typeflag: tar.TypeLink, Linkname: "link/secret"},
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			root, outside := filepath.Join(dir, "root"), filepath.Join(dir, "outside")
			for _, d := range []string{root, outside} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			if err := os.WriteFile(filepath.Join(outside, "secret"), []byte("secret"), 0o600); err != nil {
				t.Fatal(err)
			}
			data := hostile(t, tc.entries(outside))
			_, err := Extract(context.Background(), bytes.NewReader(data), root, ExtractOptions{NoOwner: true})
			if !errors.Is(err, ErrUnsafePath) {
				t.Errorf("extract: got %v, want ErrUnsafePath", err)
			}
			ents, _ := os.ReadDir(outside)
			if len(ents) != 1 || ents[0].Name() != "secret" {
				t.Errorf("something was written outside the root: %v", ents)
			}
			if b, _ := os.ReadFile(filepath.Join(outside, "secret")); string(b) != "secret" {
				t.Errorf("outside file changed: %q", b)
			}
			var links int
			filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
				var st unix.Stat_t
				if err == nil && unix.Lstat(p, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFREG && st.Nlink > 1 {
					links++
				}
				return nil
			})
			if links > 0 {
				t.Errorf("a hardlink to an outside file was made")
			}
		})
	}
}

func TestCorruption(t *testing.T) {
	src := t.TempDir()
	data := make([]byte, 2<<20)
	rand.Read(data)
	if err := os.WriteFile(filepath.Join(src, "payload"), append(data, bytes.Repeat([]byte("text "), 200000)...), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	img, err := s.Build(context.Background(), src, BuildOptions{Name: "c", Version: "1"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Verify(context.Background(), "c:1"); err != nil {
		t.Fatalf("fresh image: %v", err)
	}
	orig, err := os.ReadFile(img.ArchivePath())
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		mangle func([]byte) []byte
	}{
		{"flip-early", func(b []byte) []byte { b[len(b)/10] ^= 0x40; return b }},
		{"flip-middle", func(b []byte) []byte { b[len(b)/2] ^= 0x01; return b }},
		{"flip-last", func(b []byte) []byte { b[len(b)-1] ^= 0x80; return b }},
		{"truncated", func(b []byte) []byte { return b[:len(b)*2/3] }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := tc.mangle(bytes.Clone(orig))
			if err := os.WriteFile(img.ArchivePath(), bad, 0o644); err != nil {
				t.Fatal(err)
			}
			defer os.WriteFile(img.ArchivePath(), orig, 0o644)
			_, err := s.Verify(context.Background(), "c:1")
			if err == nil || !strings.Contains(err.Error(), img.ArchivePath()) {
				t.Errorf("verify: got %v, want an error naming %s", err, img.ArchivePath())
			}
			_, err = Extract(context.Background(), bytes.NewReader(bad), t.TempDir(), ExtractOptions{NoOwner: true})
			if err == nil {
				t.Errorf("extract accepted a corrupt archive")
			}
		})
	}
	// A manifest whose digest does not match.
	mb, _ := os.ReadFile(img.ManifestPath())
	bad := strings.Replace(string(mb), img.Manifest.SHA256, strings.Repeat("0", 64), 1)
	if err := os.WriteFile(img.ManifestPath(), []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Verify(context.Background(), "c:1"); err == nil || !strings.Contains(err.Error(), "sha256") {
		t.Errorf("verify with a wrong manifest digest: %v", err)
	}
}

func TestStoreLifecycle(t *testing.T) {
	ctx := context.Background()
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "hello"), []byte("hello"), 0o644)
	os.MkdirAll(filepath.Join(src, "boot"), 0o755)
	os.WriteFile(filepath.Join(src, "boot/vmlinuz-6.1.0-9-amd64"), []byte("kernel"), 0o644)
	os.WriteFile(filepath.Join(src, "boot/initrd.img-6.1.0-9-amd64"), []byte("initrd"), 0o644)
	os.MkdirAll(filepath.Join(src, "usr/lib/modules/6.1.0-9-amd64/kernel"), 0o755)
	os.Symlink("usr/lib", filepath.Join(src, "lib"))
	s, err := OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	opts := ArchiveOptions{}
	if os.Geteuid() != 0 {
		t.Log("not root: owners are not restored")
	}
	for _, v := range []string{"1.9", "1.10", "1.2"} {
		if _, err := s.Build(ctx, src, BuildOptions{Name: "web", Version: v, Arch: "amd64", ArchiveOptions: opts}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Build(ctx, src, BuildOptions{Name: "web", Version: "1.9"}); !errors.Is(err, ErrExists) {
		t.Errorf("rebuild of web:1.9: %v, want ErrExists", err)
	}
	img, err := s.Get("web")
	if err != nil || img.Manifest.Version != "1.10" {
		t.Fatalf("Get(web) = %v, %v; want version 1.10", img, err)
	}
	m := img.Manifest
	wantK := Kernel{Version: "6.1.0-9-amd64", Vmlinuz: "boot/vmlinuz-6.1.0-9-amd64",
		Initrd: "boot/initrd.img-6.1.0-9-amd64", ModulesDir: "usr/lib/modules/6.1.0-9-amd64"}
	if len(m.Kernels) != 1 || m.Kernels[0] != wantK {
		t.Errorf("kernels %+v, want [%+v]", m.Kernels, wantK)
	}
	if m.PieceLength != 32<<10 || len(m.InfoHash) != 40 || m.Mode != ModeFile || m.Arch != "amd64" {
		t.Errorf("manifest %+v", m)
	}
	list, err := s.List()
	if err != nil || len(list) != 3 || list[0].Version != "1.2" || list[2].Version != "1.10" {
		t.Errorf("List = %v, %v", list, err)
	}
	a, _ := s.Get("web:1.9")
	b, _ := s.Get("web:1.10")
	if a.Manifest.SHA256 != b.Manifest.SHA256 {
		t.Errorf("same tree, different archives")
	}
	if _, err := s.Verify(ctx, "web:1.9"); err != nil {
		t.Error(err)
	}

	var exp bytes.Buffer
	if err := s.Export(ctx, "web:1.9", &exp); err != nil {
		t.Fatal(err)
	}
	s2, _ := OpenStore(t.TempDir())
	imp, err := s2.Import(ctx, bytes.NewReader(exp.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if imp.Manifest.SHA256 != a.Manifest.SHA256 || imp.Manifest.InfoHash != a.Manifest.InfoHash || imp.Manifest.Created != a.Manifest.Created {
		t.Errorf("imported manifest %+v, want %+v", imp.Manifest, a.Manifest)
	}
	if _, err := s2.Verify(ctx, "web:1.9"); err != nil {
		t.Error(err)
	}
	if _, err := s2.Import(ctx, bytes.NewReader(exp.Bytes())); !errors.Is(err, ErrExists) {
		t.Errorf("second import: %v, want ErrExists", err)
	}
	// A tampered export is refused.
	tampered := bytes.Clone(exp.Bytes())
	tampered[len(tampered)-2048] ^= 1
	s3, _ := OpenStore(t.TempDir())
	if _, err := s3.Import(ctx, bytes.NewReader(tampered)); err == nil {
		t.Errorf("tampered import accepted")
	}
	if l, _ := s3.List(); len(l) != 0 {
		t.Errorf("tampered import left %v in the store", l)
	}

	if err := s.Remove("web"); err == nil {
		t.Errorf("Remove without a version succeeded")
	}
	if err := s.Remove("web:1.9"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get("web:1.9"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get after Remove: %v", err)
	}
	if _, err := s.Get("nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(nope): %v", err)
	}
	assertNoWork(t, s)
}

func assertNoWork(t *testing.T, s *Store) {
	t.Helper()
	ents, _ := os.ReadDir(filepath.Join(s.Dir(), "tmp"))
	if len(ents) != 0 {
		t.Errorf("work files left in the store: %v", ents)
	}
}

func TestBuildErrors(t *testing.T) {
	ctx := context.Background()
	s, err := OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "no-such-tree")
	_, err = s.Build(ctx, missing, BuildOptions{Name: "x", Version: "1"})
	if err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing source: %v", err)
	}
	for _, bad := range []BuildOptions{{Name: "../x", Version: "1"}, {Name: "x", Version: ""}, {Name: "x", Version: "1", Mode: "disk"}} {
		if _, err := s.Build(ctx, t.TempDir(), bad); err == nil {
			t.Errorf("build with %+v succeeded", bad)
		}
	}
	if _, err := s.Build(ctx, t.TempDir(), BuildOptions{Name: "x", Version: "1", ArchiveOptions: ArchiveOptions{Exclude: []string{"[unclosed"}}}); err == nil {
		t.Errorf("bad exclude pattern accepted")
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.Build(cctx, t.TempDir(), BuildOptions{Name: "x", Version: "1"}); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled build: %v", err)
	}
	if l, _ := s.List(); len(l) != 0 {
		t.Errorf("failed builds left %v", l)
	}
	assertNoWork(t, s)
}

// TestChangedWhileReading appends to a file during the build: the build
// must fail naming the file, and leave nothing in the store.
func TestChangedWhileReading(t *testing.T) {
	src := t.TempDir()
	grow := filepath.Join(src, "growing.log")
	if err := os.WriteFile(grow, make([]byte, 32<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	s, _ := OpenStore(t.TempDir())
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		f, err := os.OpenFile(grow, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			return
		}
		defer f.Close()
		for {
			select {
			case <-stop:
				return
			default:
				f.Write([]byte("line\n"))
			}
		}
	}()
	_, err := s.Build(context.Background(), src, BuildOptions{Name: "g", Version: "1", ArchiveOptions: ArchiveOptions{Level: 1}})
	close(stop)
	<-done
	if !errors.Is(err, ErrChanged) || !strings.Contains(err.Error(), grow) {
		t.Errorf("got %v, want ErrChanged naming %s", err, grow)
	}
	if l, _ := s.List(); len(l) != 0 {
		t.Errorf("store holds %v", l)
	}
	assertNoWork(t, s)
}

// TestFullDiskRoot builds into a store on a 4 MiB tmpfs.
func TestFullDiskRoot(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	mnt := filepath.Join(dir, "small")
	os.Mkdir(mnt, 0o755)
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=4m"); err != nil {
		t.Skipf("cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	src := filepath.Join(dir, "src")
	os.Mkdir(src, 0o755)
	data := make([]byte, 16<<20)
	rand.Read(data)
	os.WriteFile(filepath.Join(src, "random"), data, 0o644)
	s, err := OpenStore(mnt)
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Build(context.Background(), src, BuildOptions{Name: "full", Version: "1"})
	if !errors.Is(err, unix.ENOSPC) || !strings.Contains(err.Error(), mnt) {
		t.Errorf("got %v, want ENOSPC naming the store path", err)
	}
	if l, _ := s.List(); len(l) != 0 {
		t.Errorf("store holds %v", l)
	}
	assertNoWork(t, s)
}

func TestPartitionModeRoot(t *testing.T) {
	needRoot(t)
	needTool(t, "mkfs.ext4")
	fsck := needTool(t, "e2fsck")
	src := t.TempDir()
	makeTree(t, src)
	s, _ := OpenStore(t.TempDir())
	ctx := context.Background()
	img, err := s.Build(ctx, src, BuildOptions{Name: "p", Version: "1", Mode: ModePartition})
	if err != nil {
		t.Fatal(err)
	}
	m := img.Manifest
	if m.Mode != ModePartition || m.Archive != PartitionFile || m.AllocatedSize <= 0 || m.AllocatedSize > m.CompressedSize {
		t.Errorf("manifest %+v", m)
	}
	if _, err := s.Verify(ctx, "p:1"); err != nil {
		t.Error(err)
	}
	run(t, fsck, "-fn", img.ArchivePath())
	fileImg, err := s.Build(ctx, src, BuildOptions{Name: "p", Version: "1-file"})
	if err != nil {
		t.Fatal(err)
	}
	if fileImg.Manifest.FileCount != m.FileCount {
		t.Errorf("partition image has %d entries, file image %d", m.FileCount, fileImg.Manifest.FileCount)
	}
	assertNoWork(t, s)
}

func TestBuildFromTar(t *testing.T) {
	// An unsorted tarball, as container exports can be.
	var raw bytes.Buffer
	tw := tar.NewWriter(&raw)
	mt := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	files := []tar.Header{
		{Name: "usr/bin/zz", Typeflag: tar.TypeReg, Mode: 0o755, Size: 2, ModTime: mt},
		{Name: "etc/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: mt},
		{Name: "etc/hostname", Typeflag: tar.TypeReg, Mode: 0o644, Size: 2, ModTime: mt},
		{Name: "usr/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: mt},
		{Name: "bin", Typeflag: tar.TypeSymlink, Linkname: "usr/bin", ModTime: mt},
	}
	for _, h := range files {
		h := h
		tw.WriteHeader(&h)
		if h.Size > 0 {
			tw.Write([]byte("ok"))
		}
	}
	tw.Close()
	if os.Geteuid() != 0 {
		t.Skip("unpacking a tarball with its owners needs root")
	}
	enc, _ := zstd.NewWriter(nil)
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(raw.Bytes())
	zw.Close()
	s, _ := OpenStore(t.TempDir())
	var sums []string
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"rootfs.tar.zst", enc.EncodeAll(raw.Bytes(), nil)},
		{"rootfs.tar.gz", gz.Bytes()},
		{"rootfs.tar", raw.Bytes()},
	} {
		tarball := filepath.Join(t.TempDir(), tc.name)
		os.WriteFile(tarball, tc.data, 0o644)
		img, err := s.BuildFromTar(context.Background(), tarball, BuildOptions{Name: "t", Version: tc.name})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		sums = append(sums, img.Manifest.SHA256)
	}
	if sums[0] != sums[1] || sums[1] != sums[2] {
		t.Errorf("the same tarball compressed three ways gave different archives: %v", sums)
	}
	img, err := s.Get("t:rootfs.tar.zst")
	if err != nil {
		t.Fatal(err)
	}
	f, _ := os.Open(img.ArchivePath())
	defer f.Close()
	dec, _ := zstd.NewReader(f)
	defer dec.Close()
	tr := tar.NewReader(dec)
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		if h.Name == "./" && h.Mode != 0o755 {
			t.Errorf("root mode %#o, want 0755", h.Mode)
		}
	}
	want := []string{"./", "bin", "etc/", "etc/hostname", "usr/", "usr/bin/", "usr/bin/zz"}
	if strings.Join(names, ",") != strings.Join(want, ",") {
		t.Errorf("entries %v, want %v", names, want)
	}
	if _, err := s.BuildFromTar(context.Background(), filepath.Join(t.TempDir(), "missing.tar"), BuildOptions{Name: "t", Version: "2"}); err == nil {
		t.Errorf("missing tarball accepted")
	}
	assertNoWork(t, s)
}

func TestExtractInclude(t *testing.T) {
	src := t.TempDir()
	for _, p := range []string{"boot/vmlinuz-6.1", "usr/lib/modules/6.1/kernel/drivers/net/e1000.ko", "usr/bin/big", "etc/x"} {
		os.MkdirAll(filepath.Join(src, filepath.Dir(p)), 0o755)
		os.WriteFile(filepath.Join(src, p), []byte(p), 0o644)
	}
	var buf bytes.Buffer
	if _, err := WriteArchive(context.Background(), &buf, src, ArchiveOptions{}); err != nil {
		t.Fatal(err)
	}
	dst := t.TempDir()
	_, err := Extract(context.Background(), &buf, dst, ExtractOptions{NoOwner: true, Include: func(n string) bool {
		return strings.HasPrefix(n, "boot/vmlinuz-") || strings.HasPrefix(n, "usr/lib/modules/")
	}})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	filepath.WalkDir(dst, func(p string, d fs.DirEntry, err error) error {
		if d != nil && !d.IsDir() {
			rel, _ := filepath.Rel(dst, p)
			got = append(got, rel)
		}
		return nil
	})
	want := "boot/vmlinuz-6.1,usr/lib/modules/6.1/kernel/drivers/net/e1000.ko"
	if strings.Join(got, ",") != want {
		t.Errorf("extracted %v, want %s", got, want)
	}
}

func TestPieceLength(t *testing.T) {
	for _, tc := range []struct{ size, want int64 }{
		{0, 32 << 10},
		{12 << 20, 32 << 10},
		{64 << 20, 32 << 10},
		{100 << 20, 64 << 10},
		{596 << 20, 512 << 10},
		{2 << 30, 1 << 20},
		{3 << 30, 2 << 20},
		{10 << 30, 8 << 20},
		{200 << 30, 16 << 20},
	} {
		if got := PieceLength(tc.size); got != tc.want {
			t.Errorf("PieceLength(%d) = %d, want %d", tc.size, got, tc.want)
		}
	}
}

func TestBuildPieceLength(t *testing.T) {
	ctx := context.Background()
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "data"), bytes.Repeat([]byte("esir"), 50000), 0o644)
	s, err := OpenStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range []int64{1000, 8 << 10, 3 << 20, 128 << 20} {
		_, err := s.Build(ctx, src, BuildOptions{Name: "p", Version: "bad", PieceLength: bad})
		if err == nil || !strings.Contains(err.Error(), "piece length") || !strings.Contains(err.Error(), "p:bad") {
			t.Errorf("piece length %d: %v, want an error naming the image and the piece length", bad, err)
		}
	}
	if _, err := s.Get("p:bad"); err == nil {
		t.Error("a refused build left an image behind")
	}
	im, err := s.Build(ctx, src, BuildOptions{Name: "p", Version: "16k", PieceLength: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	mi, err := metainfo.LoadFromFile(filepath.Join(filepath.Dir(im.ArchivePath()), TorrentFile))
	if err != nil {
		t.Fatal(err)
	}
	info, err := mi.UnmarshalInfo()
	if err != nil {
		t.Fatal(err)
	}
	if im.Manifest.PieceLength != 16<<10 || info.PieceLength != 16<<10 {
		t.Errorf("manifest piece length %d, torrent %d; want 16384", im.Manifest.PieceLength, info.PieceLength)
	}
	if want := (im.Manifest.CompressedSize + 16<<10 - 1) / (16 << 10); int64(info.NumPieces()) != want {
		t.Errorf("%d pieces, want %d", info.NumPieces(), want)
	}
}

func TestRefsAndVersions(t *testing.T) {
	for _, tc := range []struct {
		ref, name, version string
		ok                 bool
	}{
		{"web", "web", "", true},
		{"web:1.0", "web", "1.0", true},
		{"web:1.0-rc1+b2", "web", "1.0-rc1+b2", true},
		{"../etc:1", "", "", false},
		{"web:..", "", "", false},
		{"web:a/b", "", "", false},
		{":1", "", "", false},
	} {
		n, v, err := ParseRef(tc.ref)
		if (err == nil) != tc.ok || n != tc.name || v != tc.version {
			t.Errorf("ParseRef(%q) = %q, %q, %v", tc.ref, n, v, err)
		}
	}
	for _, tc := range []struct {
		a, b string
		want int
	}{
		{"1.9", "1.10", -1}, {"1.10", "1.9", 1}, {"2", "2", 0}, {"1.0", "1.0.1", -1}, {"01", "1", 0}, {"b", "a", 1},
	} {
		if got := compareVersions(tc.a, tc.b); got != tc.want {
			t.Errorf("compareVersions(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}

// TestUnreadableRoot builds, as an unprivileged user (setpriv), a tree
// holding a file only root can read: the build fails naming the file and
// leaves nothing in the store.
func TestUnreadableRoot(t *testing.T) {
	needRoot(t)
	setpriv := needTool(t, "setpriv")
	dir, err := os.MkdirTemp("", "esir-unreadable-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	src, store := filepath.Join(dir, "src"), filepath.Join(dir, "store")
	secret := filepath.Join(src, "etc", "shadow")
	for _, d := range []string{dir, src, filepath.Join(src, "etc"), store} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		os.Chmod(d, 0o755)
	}
	if err := os.WriteFile(secret, []byte("root only"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(store, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(filepath.Dir(exe), 0o755)
	cmd := exec.Command(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
		exe, "-test.run=^TestBuildHelper$", "-test.v")
	cmd.Env = append(os.Environ(), "ESIR_TEST_BUILD_SRC="+src, "ESIR_TEST_BUILD_STORE="+store)
	out, err := cmd.CombinedOutput()
	if !strings.Contains(string(out), "BUILD ERROR:") {
		t.Fatalf("helper did not run (%v):\n%s", err, out)
	}
	if !strings.Contains(string(out), secret) || !strings.Contains(string(out), "permission denied") {
		t.Errorf("error does not name %s and the cause:\n%s", secret, out)
	}
	s, err := OpenStore(store)
	if err != nil {
		t.Fatal(err)
	}
	if l, _ := s.List(); len(l) != 0 {
		t.Errorf("store holds %v", l)
	}
	assertNoWork(t, s)
}

// TestBuildHelper is TestUnreadableRoot's unprivileged half; it does
// nothing unless that test runs it.
func TestBuildHelper(t *testing.T) {
	src, store := os.Getenv("ESIR_TEST_BUILD_SRC"), os.Getenv("ESIR_TEST_BUILD_STORE")
	if src == "" {
		t.Skip("run by TestUnreadableRoot")
	}
	s, err := OpenStore(store)
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Build(context.Background(), src, BuildOptions{Name: "u", Version: "1"})
	fmt.Printf("BUILD ERROR: %v\n", err)
}

// TestStoreInsideTree builds a tree that holds the store itself (building
// "/" with the store under /var/lib/esir): the store stays out of the image.
func TestStoreInsideTree(t *testing.T) {
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "hello"), []byte("hello"), 0o644)
	s, err := OpenStore(filepath.Join(src, "var/lib/esir[1]"))
	if err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "rootfs")
	if err := os.Symlink(src, link); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"1", "2"} {
		if _, err := s.Build(context.Background(), link, BuildOptions{Name: "self", Version: v}); err != nil {
			t.Fatal(err)
		}
	}
	img, _ := s.Get("self:2")
	f, _ := os.Open(img.ArchivePath())
	defer f.Close()
	dec, _ := zstd.NewReader(f)
	defer dec.Close()
	tr := tar.NewReader(dec)
	var names []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
	}
	if want := "./,hello,var/,var/lib/"; strings.Join(names, ",") != want {
		t.Errorf("entries %v, want %s", names, want)
	}
}

// TestExtractOverExisting extracts onto a target that already holds other
// things at the same names (a rerun after an interrupted install): each is
// replaced, nothing is written through a symlink, and a second extraction
// gives the same tree.
func TestExtractOverExisting(t *testing.T) {
	src := t.TempDir()
	os.WriteFile(filepath.Join(src, "a"), []byte("file a"), 0o644)
	os.MkdirAll(filepath.Join(src, "b/sub"), 0o755)
	os.WriteFile(filepath.Join(src, "c"), []byte("file c"), 0o644)
	os.Symlink("a", filepath.Join(src, "d"))
	var buf bytes.Buffer
	if _, err := WriteArchive(context.Background(), &buf, src, ArchiveOptions{}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	dst, outside := filepath.Join(dir, "dst"), filepath.Join(dir, "outside")
	os.MkdirAll(filepath.Join(dst, "a/old"), 0o755)
	os.WriteFile(filepath.Join(dst, "a/old/x"), []byte("x"), 0o644)
	os.WriteFile(filepath.Join(dst, "b"), []byte("was a file"), 0o644)
	os.MkdirAll(outside, 0o755)
	os.WriteFile(filepath.Join(outside, "target"), []byte("outside"), 0o644)
	os.Symlink(filepath.Join(outside, "target"), filepath.Join(dst, "c"))
	os.WriteFile(filepath.Join(dst, "d"), []byte("was a file"), 0o644)
	opts := ExtractOptions{NoOwner: os.Geteuid() != 0}
	if _, err := Extract(context.Background(), bytes.NewReader(buf.Bytes()), dst, opts); err != nil {
		t.Fatal(err)
	}
	first := snapshot(t, dst)
	if b, _ := os.ReadFile(filepath.Join(outside, "target")); string(b) != "outside" {
		t.Errorf("wrote through a symlink: %q", b)
	}
	for name, want := range map[string]string{"a": "file a", "c": "file c"} {
		if b, err := os.ReadFile(filepath.Join(dst, name)); err != nil || string(b) != want {
			t.Errorf("%s: %q %v, want %q", name, b, err, want)
		}
	}
	if fi, err := os.Lstat(filepath.Join(dst, "b/sub")); err != nil || !fi.IsDir() {
		t.Errorf("b/sub: %v", err)
	}
	if l, err := os.Readlink(filepath.Join(dst, "d")); err != nil || l != "a" {
		t.Errorf("d: %q %v", l, err)
	}
	if _, err := Extract(context.Background(), bytes.NewReader(buf.Bytes()), dst, opts); err != nil {
		t.Fatal(err)
	}
	compareTrees(t, "second extraction", first, snapshot(t, dst))
	compareTrees(t, "against the source", snapshot(t, src), first)
}

// TestStaleWorkRemoved: a build killed with SIGKILL leaves its work
// directory; the next OpenStore removes it when its process is gone, and
// keeps the work of a live process.
func TestStaleWorkRemoved(t *testing.T) {
	dir := t.TempDir()
	if _, err := OpenStore(dir); err != nil {
		t.Fatal(err)
	}
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(dir, "tmp", fmt.Sprintf("build-%d-123", dead.Process.Pid))
	live := filepath.Join(dir, "tmp", fmt.Sprintf("build-%d-456", os.Getpid()))
	for _, d := range []string{stale, live} {
		if err := os.MkdirAll(filepath.Join(d, "partial"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := OpenStore(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale work directory kept: %v", err)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("a live build's work directory was removed: %v", err)
	}
}

// TestExtractOwnerAndMode: the extractor skips chown and chmod when a new
// entry already has the archive's owner and mode; it must not skip them in
// a setgid directory (new entries take the directory's group) or when the
// umask would strip mode bits.
func TestExtractOwnerAndMode(t *testing.T) {
	needRoot(t)
	type want struct {
		uid, gid int
		mode     uint32
	}
	entries := []tar.Header{
		{Name: "plain", Typeflag: tar.TypeReg, Mode: 0o644},
		{Name: "group-writable", Typeflag: tar.TypeReg, Mode: 0o664},
		{Name: "world-writable", Typeflag: tar.TypeReg, Mode: 0o666},
		{Name: "setuid", Typeflag: tar.TypeReg, Mode: 0o4755},
		{Name: "owned", Typeflag: tar.TypeReg, Mode: 0o640, Uid: 1234, Gid: 4321},
		{Name: "sub/file", Typeflag: tar.TypeReg, Mode: 0o644},
		{Name: "sub/link", Typeflag: tar.TypeSymlink, Linkname: "file"},
	}
	wants := map[string]want{
		"plain":          {0, 0, 0o644},
		"group-writable": {0, 0, 0o664},
		"world-writable": {0, 0, 0o666},
		"setuid":         {0, 0, 0o4755},
		"owned":          {1234, 4321, 0o640},
		"sub/file":       {0, 0, 0o644},
		"sub/link":       {0, 0, 0o777},
	}
	arc := hostile(t, entries)
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, dst string)
	}{
		{"plain target", func(*testing.T, string) {}},
		{"setgid target", func(t *testing.T, dst string) {
			// Entries created here would get group 777 and sub/
			// would inherit the setgid bit without explicit chowns.
			if err := os.Chown(dst, 0, 777); err != nil {
				t.Fatal(err)
			}
			if err := unix.Chmod(dst, 0o2775); err != nil {
				t.Fatal(err)
			}
		}},
		{"setgid subdirectory", func(t *testing.T, dst string) {
			if err := os.Mkdir(filepath.Join(dst, "sub"), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(filepath.Join(dst, "sub"), 0, 777); err != nil {
				t.Fatal(err)
			}
			if err := unix.Chmod(filepath.Join(dst, "sub"), 0o2775); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := t.TempDir()
			tc.setup(t, dst)
			if _, err := Extract(context.Background(), bytes.NewReader(arc), dst, ExtractOptions{}); err != nil {
				t.Fatal(err)
			}
			for name, w := range wants {
				var st unix.Stat_t
				if err := unix.Lstat(filepath.Join(dst, name), &st); err != nil {
					t.Fatal(err)
				}
				if int(st.Uid) != w.uid || int(st.Gid) != w.gid || st.Mode&0o7777 != w.mode {
					t.Errorf("%s: owner %d:%d mode %#o, want %d:%d %#o", name, st.Uid, st.Gid, st.Mode&0o7777, w.uid, w.gid, w.mode)
				}
			}
		})
	}
}

// TestReadAhead: the read-ahead hands over exactly the producer's bytes
// whatever the chunk and read sizes, passes its error on after the bytes
// written before it, and stops a producer blocked on a reader that quit.
func TestReadAhead(t *testing.T) {
	data := make([]byte, 300_001)
	rand.Read(data)
	boom := errors.New("boom")
	for _, tc := range []struct {
		name          string
		chunk, chunks int
		write, read   int
		fail          error
	}{
		{"small chunks", 1000, 2, 777, 333, nil},
		{"writes larger than chunks", 4096, 3, 100_000, 5000, nil},
		{"reads larger than chunks", 4096, 4, 1000, 100_000, nil},
		{"one chunk", 1 << 20, 1, 64 << 10, 64 << 10, nil},
		{"exact multiple", 300_001, 2, 300_001, 1 << 20, nil},
		{"producer error", 1000, 2, 777, 333, boom},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ra := newReadAhead(tc.chunk, tc.chunks, func(w io.Writer) error {
				for off := 0; off < len(data); off += tc.write {
					if _, err := w.Write(data[off:min(off+tc.write, len(data))]); err != nil {
						return err
					}
				}
				return tc.fail
			})
			defer ra.Close()
			var got []byte
			buf := make([]byte, tc.read)
			var err error
			for {
				var n int
				n, err = ra.Read(buf)
				got = append(got, buf[:n]...)
				if err != nil {
					break
				}
			}
			want := tc.fail
			if want == nil {
				want = io.EOF
			}
			if !errors.Is(err, want) {
				t.Errorf("error %v, want %v", err, want)
			}
			if !bytes.Equal(got, data) {
				t.Errorf("got %d bytes, want the %d written", len(got), len(data))
			}
			if n, err := ra.Read(buf); n != 0 || !errors.Is(err, want) {
				t.Errorf("read after the end: %d, %v", n, err)
			}
		})
	}
	t.Run("reader quits", func(t *testing.T) {
		returned := make(chan error, 1)
		ra := newReadAhead(1000, 2, func(w io.Writer) error {
			for {
				if _, err := w.Write(data[:5000]); err != nil {
					returned <- err
					return err
				}
			}
		})
		if _, err := io.ReadFull(ra, make([]byte, 2500)); err != nil {
			t.Fatal(err)
		}
		ra.Close()
		select {
		case err := <-returned:
			if err == nil {
				t.Error("producer's write succeeded after Close")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("producer still blocked 10 s after Close")
		}
		<-ra.ended
	})
}

// TestReadAheadLend: lent bytes are the stream's, in place, a chunk is not
// refilled while a loan on it is out, and reads and loans mix.
func TestReadAheadLend(t *testing.T) {
	data := make([]byte, 100_000)
	rand.Read(data)
	ra := newReadAhead(4096, 3, func(w io.Writer) error {
		for off := 0; off < len(data); off += 1000 {
			if _, err := w.Write(data[off:min(off+1000, len(data))]); err != nil {
				return err
			}
		}
		return nil
	})
	defer ra.Close()
	type loan struct {
		b    []byte
		want []byte
		c    *chunk
	}
	var held []loan
	var got []byte
	buf := make([]byte, 3000)
	for i := 0; ; i++ {
		if i%3 == 0 {
			n, err := ra.Read(buf[:1+i%2999])
			got = append(got, buf[:n]...)
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			continue
		}
		b, c, err := ra.lend(2500)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(b) == 0 || len(b) > 2500 {
			t.Fatalf("lent %d bytes", len(b))
		}
		got = append(got, b...)
		held = append(held, loan{b, bytes.Clone(b), c})
		// Hold two loans at a time: the producer must not refill them.
		if len(held) > 2 {
			l := held[0]
			held = held[1:]
			if !bytes.Equal(l.b, l.want) {
				t.Fatal("a lent chunk was refilled before its release")
			}
			ra.release(l.c)
		}
	}
	for _, l := range held {
		ra.release(l.c)
	}
	if !bytes.Equal(got, data) {
		t.Errorf("got %d bytes, want the %d written", len(got), len(data))
	}
}

// TestExtractGNUSparseFormats: sparse files in each of GNU tar's formats
// (PAX 0.0, 0.1 and 1.0, old GNU) extract with their holes and content.
func TestExtractGNUSparseFormats(t *testing.T) {
	tarPath := needTool(t, "tar")
	zstdPath := needTool(t, "zstd")
	src := t.TempDir()
	f, err := os.Create(filepath.Join(src, "sparse.img"))
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("esir"), 300_000)
	for _, off := range []int64{0, 5 << 20, 9<<20 + 3} {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Truncate(16 << 20); err != nil {
		t.Fatal(err)
	}
	f.Close()
	want, _ := os.ReadFile(filepath.Join(src, "sparse.img"))
	for _, format := range []string{"--format=pax --sparse-version=0.0", "--format=pax --sparse-version=0.1",
		"--format=pax --sparse-version=1.0", "--format=gnu"} {
		t.Run(format, func(t *testing.T) {
			arc := filepath.Join(t.TempDir(), "a.tar.zst")
			cmd := exec.Command("sh", "-c", tarPath+" -C "+src+" --sparse "+format+" -cf - sparse.img | "+zstdPath+" -q -o "+arc)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			b, err := os.ReadFile(arc)
			if err != nil {
				t.Fatal(err)
			}
			dst := t.TempDir()
			if _, err := Extract(context.Background(), bytes.NewReader(b), dst, ExtractOptions{NoOwner: true}); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(filepath.Join(dst, "sparse.img"))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("extracted %d bytes differ from the %d written", len(got), len(want))
			}
		})
	}
}
