package imaging

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ArchiveOptions tune WriteArchive.
type ArchiveOptions struct {
	// Exclude lists path.Match patterns of paths (relative to the root) to
	// leave out; an excluded directory takes its subtree with it.
	Exclude []string
	// NoDefaultExcludes drops DefaultExcludes and keeps /etc/machine-id.
	NoDefaultExcludes bool
	// KeepMachineID stores /etc/machine-id as it is instead of empty.
	KeepMachineID bool
	// Level is the zstd compression level (1-19, default 3), mapped onto the
	// encoder's speeds as zstd.EncoderLevelFromZstd does.
	Level int
	// Progress, when set, is called with the number of file-content bytes
	// read since the previous call.
	Progress func(n int64)
	// Log receives warnings (sockets left out); nil discards them.
	Log *slog.Logger
}

// ArchiveStats describes an archive WriteArchive wrote.
type ArchiveStats struct {
	// Entries counts the archive's entries of every type, the root included.
	Entries int64
	// UncompressedSize is the length of the tar stream.
	UncompressedSize int64
	// ContentSize sums the sizes of the regular files (hardlinks once).
	ContentSize int64
	// Kernels found under boot/ and (usr/)lib/modules/.
	Kernels []Kernel
	// Arch is the Debian architecture name of the tree's binaries, or "".
	Arch string
	// Skipped lists paths that tar cannot hold (sockets).
	Skipped []string
}

// ErrChanged reports a source file that changed while it was being read.
var ErrChanged = errors.New("file changed while being read")

type devIno struct{ dev, ino uint64 }

type archiver struct {
	ctx      context.Context
	root     string
	opts     ArchiveOptions
	ex       *excluder
	out      *frameWriter
	hdr      []byte
	xattrBuf []byte
	links    map[devIno]string
	users    map[int]string
	groups   map[int]string
	kernels  map[string]*Kernel
	emptyMID bool
	stats    ArchiveStats
}

// WriteArchive writes the tree at root to w as an ESIR archive: a POSIX tar
// stream (PAX headers, entries sorted, no build time inside) compressed with
// zstd on all cores. The same tree always gives the same bytes.
func WriteArchive(ctx context.Context, w io.Writer, root string, opts ArchiveOptions) (ArchiveStats, error) {
	// The root itself may be a symlink (/srv/rootfs -> /data/rootfs); what
	// lies below it is never followed.
	resolved, err := filepath.EvalSymlinks(root)
	if err != nil {
		return ArchiveStats{}, fmt.Errorf("source tree: %w", err)
	}
	root = resolved
	fi, err := os.Lstat(root)
	if err != nil {
		return ArchiveStats{}, fmt.Errorf("source tree: %w", err)
	}
	if !fi.IsDir() {
		return ArchiveStats{}, fmt.Errorf("source tree %s: not a directory", root)
	}
	pats := opts.Exclude
	if !opts.NoDefaultExcludes {
		pats = append(DefaultExcludes(), pats...)
	}
	ex, err := newExcluder(pats)
	if err != nil {
		return ArchiveStats{}, err
	}
	level := opts.Level
	if level == 0 {
		level = 3
	}
	fw, err := newFrameWriter(w, level)
	if err != nil {
		return ArchiveStats{}, err
	}
	a := &archiver{
		ctx:      ctx,
		root:     root,
		opts:     opts,
		ex:       ex,
		out:      fw,
		xattrBuf: make([]byte, 1024),
		links:    map[devIno]string{},
		users:    readIDNames(root, "etc/passwd"),
		groups:   readIDNames(root, "etc/group"),
		kernels:  map[string]*Kernel{},
		emptyMID: !opts.NoDefaultExcludes && !opts.KeepMachineID,
	}
	a.stats.Arch = detectArch(root)
	werr := a.entry(unix.AT_FDCWD, root, ".", root)
	if werr == nil {
		// End of archive: two zero blocks.
		_, werr = a.out.Write(make([]byte, 2*blockSize))
	}
	cerr := fw.Close()
	if werr != nil {
		return ArchiveStats{}, werr
	}
	if cerr != nil {
		return ArchiveStats{}, fmt.Errorf("compress archive: %w", cerr)
	}
	a.stats.UncompressedSize = fw.n
	for _, k := range a.kernels {
		a.stats.Kernels = append(a.stats.Kernels, *k)
	}
	sort.Slice(a.stats.Kernels, func(i, j int) bool {
		return compareVersions(a.stats.Kernels[i].Version, a.stats.Kernels[j].Version) < 0
	})
	return a.stats, nil
}

func (a *archiver) writeHeader(h *tarHeader) error {
	a.hdr = h.encode(a.hdr[:0])
	if _, err := a.out.Write(a.hdr); err != nil {
		return fmt.Errorf("write archive at %s: %w", h.name, err)
	}
	a.stats.Entries++
	return nil
}

// entry writes the entry name in the directory dfd (rel in the tree, full
// on the host; AT_FDCWD and the root's path for the root). Working from
// directory descriptors spares the kernel a walk of the whole path for
// every stat, open and readlink.
func (a *archiver) entry(dfd int, name, rel, full string) error {
	if err := a.ctx.Err(); err != nil {
		return fmt.Errorf("build interrupted at %s: %w", full, err)
	}
	var st unix.Stat_t
	if err := unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("%s: lstat: %w (it vanished)", full, ErrChanged)
		}
		return fmt.Errorf("%s: lstat: %w", full, err)
	}
	h := tarHeader{
		name:  rel,
		mode:  st.Mode & 0o7777,
		uid:   int(st.Uid),
		gid:   int(st.Gid),
		uname: a.users[int(st.Uid)],
		gname: a.groups[int(st.Gid)],
		mtime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
	}
	if st.Mode&unix.S_IFMT == unix.S_IFSOCK {
		a.stats.Skipped = append(a.stats.Skipped, rel)
		if a.opts.Log != nil {
			a.opts.Log.Warn("socket left out of the image", "path", full)
		}
		return nil
	}
	// Regular files and directories read their xattrs through the
	// descriptor they are opened with anyway; the others by path.
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR, unix.S_IFREG:
	default:
		xa, err := readXattrsBuf(full, &a.xattrBuf, pathXattrs(full))
		if err != nil {
			return err
		}
		h.records = xa
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		h.typ = typeDir
		fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("%s: open directory: %w", full, err)
		}
		dir := os.NewFile(uintptr(fd), full)
		defer dir.Close()
		if h.records, err = readXattrsBuf(full, &a.xattrBuf, fdXattrs(fd)); err != nil {
			return err
		}
		if err := a.writeHeader(&h); err != nil {
			return err
		}
		a.noteKernel(rel, typeDir)
		return a.walkDir(dir, fd, rel, full)
	case unix.S_IFREG:
		h.typ = typeReg
		if st.Nlink > 1 {
			key := devIno{uint64(st.Dev), st.Ino}
			if first, ok := a.links[key]; ok {
				h.typ = typeLink
				h.linkname = first
				h.records = nil
				return a.writeHeader(&h)
			}
			a.links[key] = rel
		}
		a.noteKernel(rel, typeReg)
		return a.file(&h, dfd, name, full, &st)
	case unix.S_IFLNK:
		h.typ = typeSymlink
		target, err := readlinkat(dfd, name)
		if err != nil {
			return fmt.Errorf("%s: readlink: %w", full, err)
		}
		h.linkname = target
		return a.writeHeader(&h)
	case unix.S_IFCHR, unix.S_IFBLK:
		h.typ = typeChar
		if st.Mode&unix.S_IFMT == unix.S_IFBLK {
			h.typ = typeBlock
		}
		h.devmajor, h.devminor = unix.Major(st.Rdev), unix.Minor(st.Rdev)
		return a.writeHeader(&h)
	case unix.S_IFIFO:
		h.typ = typeFifo
		return a.writeHeader(&h)
	}
	return fmt.Errorf("%s: unknown file type %#o", full, st.Mode&unix.S_IFMT)
}

// walkDir writes the entries of the directory open as dir (descriptor dfd)
// in name order.
func (a *archiver) walkDir(dir *os.File, dfd int, rel, full string) error {
	names, err := dir.Readdirnames(-1)
	if err != nil {
		return fmt.Errorf("%s: read directory: %w", full, err)
	}
	sort.Strings(names)
	for _, n := range names {
		crel := n
		if rel != "." {
			crel = rel + "/" + n
		}
		if a.ex.excluded(crel) {
			continue
		}
		if err := a.entry(dfd, n, crel, full+"/"+n); err != nil {
			return err
		}
	}
	return nil
}

type segment struct{ off, len int64 }

// fdReader reads a raw file descriptor: os.NewFile would cost an fcntl per
// file, and the archiver reads thousands of small ones.
type fdReader int

func (r fdReader) Read(p []byte) (int, error) {
	for {
		n, err := unix.Read(int(r), p)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return 0, err
		}
		if n == 0 && len(p) > 0 {
			return 0, io.EOF
		}
		return n, nil
	}
}

func (r fdReader) ReadAt(p []byte, off int64) (int, error) {
	done := 0
	for done < len(p) {
		n, err := unix.Pread(int(r), p[done:], off+int64(done))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return done, err
		}
		if n == 0 {
			return done, io.EOF
		}
		done += n
	}
	return done, nil
}

// file writes a regular file's header and content, sparse when the file
// has holes, and fails when the file changes while it is read.
func (a *archiver) file(h *tarHeader, dfd int, name, full string, st *unix.Stat_t) error {
	if a.emptyMID && h.name == "etc/machine-id" {
		xa, err := readXattrsBuf(full, &a.xattrBuf, pathXattrs(full))
		if err != nil {
			return err
		}
		h.records = xa
		return a.writeHeader(h)
	}
	fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NOATIME, 0)
	if errors.Is(err, unix.EPERM) {
		fd, err = unix.Openat(dfd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return fmt.Errorf("%s: open: %w", full, err)
	}
	defer unix.Close(fd)
	if h.records, err = readXattrsBuf(full, &a.xattrBuf, fdXattrs(fd)); err != nil {
		return err
	}
	f := fdReader(fd)
	// A file replaced between the lstat and the open is caught by the
	// fstat after reading, which compares the inode too: the build fails
	// either way, so one fstat per file suffices.
	size := st.Size
	var segs []segment
	if size > 0 && st.Blocks*512 < size {
		segs, err = dataSegments(fd, size)
		if err != nil {
			return fmt.Errorf("%s: find holes: %w", full, err)
		}
	}
	if segs != nil {
		var sm []byte
		sm = strconv.AppendInt(sm, int64(len(segs)), 10)
		sm = append(sm, '\n')
		var data int64
		for _, s := range segs {
			sm = strconv.AppendInt(sm, s.off, 10)
			sm = append(sm, '\n')
			sm = strconv.AppendInt(sm, s.len, 10)
			sm = append(sm, '\n')
			data += s.len
		}
		sm = appendPadding(sm, int64(len(sm)))
		dir, base := path.Split(h.name)
		h.records = cloneRecords(h.records)
		h.records["GNU.sparse.major"] = "1"
		h.records["GNU.sparse.minor"] = "0"
		h.records["GNU.sparse.name"] = h.name
		h.records["GNU.sparse.realsize"] = strconv.FormatInt(size, 10)
		h.name = path.Join(dir, "GNUSparseFile.0", base)
		h.size = int64(len(sm)) + data
		if err := a.writeHeader(h); err != nil {
			return err
		}
		if _, err := a.out.Write(sm); err != nil {
			return fmt.Errorf("write archive at %s: %w", full, err)
		}
		for _, s := range segs {
			if err := a.copyData(io.NewSectionReader(f, s.off, s.len), s.len, full); err != nil {
				return err
			}
		}
		h.size = data // for padding below
	} else {
		h.size = size
		if err := a.writeHeader(h); err != nil {
			return err
		}
		if err := a.copyData(f, size, full); err != nil {
			return err
		}
	}
	a.stats.ContentSize += size
	if pad := appendPadding(nil, h.size); len(pad) > 0 {
		if _, err := a.out.Write(pad); err != nil {
			return fmt.Errorf("write archive at %s: %w", full, err)
		}
	}
	var st3 unix.Stat_t
	if err := unix.Fstat(fd, &st3); err != nil {
		return fmt.Errorf("%s: fstat: %w", full, err)
	}
	if st3.Ino != st.Ino || st3.Dev != st.Dev {
		return fmt.Errorf("%s: %w (replaced)", full, ErrChanged)
	}
	if st3.Size != st.Size || st3.Mtim != st.Mtim || st3.Ctim != st.Ctim {
		return fmt.Errorf("%s: %w", full, ErrChanged)
	}
	return nil
}

// copyData reads n bytes of a file straight into the archive's current
// frame buffer (no intermediate copy).
func (a *archiver) copyData(r io.Reader, n int64, full string) error {
	for n > 0 {
		if err := a.ctx.Err(); err != nil {
			return fmt.Errorf("build interrupted at %s: %w", full, err)
		}
		chunk, werr := a.out.space()
		if werr != nil {
			return fmt.Errorf("write archive at %s: %w", full, werr)
		}
		if int64(len(chunk)) > n {
			chunk = chunk[:n]
		}
		m, err := io.ReadFull(r, chunk)
		if m > 0 {
			a.out.advance(m)
			n -= int64(m)
			if a.opts.Progress != nil {
				a.opts.Progress(int64(m))
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("%s: %w (shrank while read)", full, ErrChanged)
		}
		if err != nil {
			return fmt.Errorf("%s: read: %w", full, err)
		}
	}
	return nil
}

// dataSegments lists the data regions of a sparse file (SEEK_DATA /
// SEEK_HOLE), ending with a zero-length segment at the size when the file
// ends in a hole, as GNU tar does.
func dataSegments(fd int, size int64) ([]segment, error) {
	var segs []segment
	off := int64(0)
	for off < size {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if err != nil {
			return nil, err
		}
		if d >= size {
			break
		}
		hole, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			return nil, err
		}
		hole = min(hole, size)
		segs = append(segs, segment{d, hole - d})
		off = hole
	}
	if len(segs) == 1 && segs[0].off == 0 && segs[0].len == size {
		return nil, nil // no hole after all
	}
	if len(segs) == 0 || segs[len(segs)-1].off+segs[len(segs)-1].len < size {
		segs = append(segs, segment{size, 0})
	}
	return segs, nil
}

func cloneRecords(m map[string]string) map[string]string {
	c := make(map[string]string, len(m)+4)
	for k, v := range m {
		c[k] = v
	}
	return c
}

// readXattrs returns a file's extended attributes as PAX records
// (SCHILY.xattr.NAME), without following a symlink.
func readXattrs(full string) (map[string]string, error) {
	buf := make([]byte, 1024)
	return readXattrsBuf(full, &buf, pathXattrs(full))
}

// xattrSource names one file whose xattrs to read: by path (not following
// a symlink) or, when path is "", by open descriptor.
type xattrSource struct {
	path string
	fd   int
}

func pathXattrs(full string) xattrSource { return xattrSource{path: full} }

func fdXattrs(fd int) xattrSource { return xattrSource{fd: fd} }

func (s xattrSource) list(dst []byte) (int, error) {
	if s.path != "" {
		return unix.Llistxattr(s.path, dst)
	}
	return unix.Flistxattr(s.fd, dst)
}

func (s xattrSource) get(name string, dst []byte) (int, error) {
	if s.path != "" {
		return unix.Lgetxattr(s.path, name, dst)
	}
	return unix.Fgetxattr(s.fd, name, dst)
}

// readXattrsBuf is readXattrs from src (full names the file in errors),
// listing the names into *buf, which it grows as needed, so the archiver
// reuses one buffer for every file.
func readXattrsBuf(full string, bufp *[]byte, src xattrSource) (map[string]string, error) {
	buf := *bufp
	var n int
	for {
		var err error
		n, err = src.list(buf)
		if errors.Is(err, unix.ERANGE) {
			buf = make([]byte, len(buf)*4)
			*bufp = buf
			continue
		}
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: list xattrs: %w", full, err)
		}
		break
	}
	if n == 0 {
		return nil, nil
	}
	recs := map[string]string{}
	for _, name := range strings.Split(strings.TrimRight(string(buf[:n]), "\x00"), "\x00") {
		if name == "" {
			continue
		}
		val := make([]byte, 256)
		for {
			m, err := src.get(name, val)
			if errors.Is(err, unix.ERANGE) {
				val = make([]byte, len(val)*4)
				continue
			}
			if errors.Is(err, unix.ENODATA) {
				m, val = -1, nil
			} else if err != nil {
				return nil, fmt.Errorf("%s: read xattr %s: %w", full, name, err)
			}
			if m >= 0 {
				recs["SCHILY.xattr."+name] = string(val[:m])
			}
			break
		}
	}
	return recs, nil
}

// noteKernel records kernels: boot/vmlinuz-V, boot/initrd.img-V and the
// module trees (usr/)lib/modules/V.
func (a *archiver) noteKernel(rel string, typ byte) {
	k := func(v string) *Kernel {
		if a.kernels[v] == nil {
			a.kernels[v] = &Kernel{Version: v}
		}
		return a.kernels[v]
	}
	switch {
	case typ == typeReg && strings.HasPrefix(rel, "boot/vmlinuz-") && !strings.Contains(rel[5:], "/"):
		k(strings.TrimPrefix(rel, "boot/vmlinuz-")).Vmlinuz = rel
	case typ == typeReg && strings.HasPrefix(rel, "boot/initrd.img-") && !strings.Contains(rel[5:], "/"):
		k(strings.TrimPrefix(rel, "boot/initrd.img-")).Initrd = rel
	case typ == typeDir:
		for _, p := range []string{"lib/modules/", "usr/lib/modules/"} {
			if v, ok := strings.CutPrefix(rel, p); ok && v != "" && !strings.Contains(v, "/") {
				k(v).ModulesDir = rel
			}
		}
	}
}

// openInRoot opens name inside root, resolving symlinks as if root were "/",
// so reading a tree's /bin/sh never reads the host's.
func openInRoot(root, name string) (*os.File, error) {
	rfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(rfd)
	fd, err := unix.Openat2(rfd, name, &unix.OpenHow{
		Flags:   unix.O_RDONLY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), path.Join(root, name)), nil
}

// readIDNames maps numeric ids to names from the tree's own passwd or group
// file (not the host's); missing files give an empty map.
func readIDNames(root, file string) map[int]string {
	m := map[int]string{}
	f, err := openInRoot(root, file)
	if err != nil {
		return m
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) < 3 {
			continue
		}
		id, err := strconv.Atoi(fields[2])
		if err != nil || fields[0] == "" {
			continue
		}
		if _, dup := m[id]; !dup {
			m[id] = fields[0]
		}
	}
	return m
}

// readlinkat returns the target of the symlink name in directory dfd.
func readlinkat(dfd int, name string) (string, error) {
	for size := 256; ; size *= 4 {
		buf := make([]byte, size)
		n, err := unix.Readlinkat(dfd, name, buf)
		if err != nil {
			return "", err
		}
		if n < size {
			return string(buf[:n]), nil
		}
	}
}

// detectArch reads the ELF header of the tree's shell or init and returns
// the Debian architecture name, or "" when none is found.
func detectArch(root string) string {
	for _, p := range []string{"bin/sh", "usr/bin/env", "bin/busybox", "sbin/init", "usr/bin/busybox"} {
		f, err := openInRoot(root, p)
		if err != nil {
			continue
		}
		var hdr [20]byte
		_, err = io.ReadFull(f, hdr[:])
		f.Close()
		if err != nil || !bytes.HasPrefix(hdr[:], []byte("\x7fELF")) {
			continue
		}
		le := hdr[5] == 1
		mach := uint16(hdr[18]) | uint16(hdr[19])<<8
		if !le {
			mach = uint16(hdr[19]) | uint16(hdr[18])<<8
		}
		switch {
		case mach == 62:
			return "amd64"
		case mach == 183:
			return "arm64"
		case mach == 3:
			return "i386"
		case mach == 243:
			return "riscv64"
		case mach == 40:
			return "armhf"
		case mach == 21 && le:
			return "ppc64el"
		case mach == 22:
			return "s390x"
		case mach == 258:
			return "loong64"
		}
	}
	return ""
}
