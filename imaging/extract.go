package imaging

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// ExtractOptions tune Extract.
type ExtractOptions struct {
	// Include, when set, selects the entries to restore by their cleaned
	// relative path ("boot/vmlinuz-6.1.0-9-amd64"); a directory that is not
	// included is still created when an included entry lies below it.
	Include func(name string) bool
	// NoOwner skips restoring owners (for extraction without root).
	NoOwner bool
	// NoXattrs skips restoring extended attributes.
	NoXattrs bool
	// ImplicitDirTime, when set, is the mtime given to directories the
	// archive does not list (created because an entry lies below them) and
	// to the root when the archive has no "./" entry; otherwise they keep
	// the time of extraction.
	ImplicitDirTime time.Time
}

// ExtractStats counts what Extract restored.
type ExtractStats struct {
	Entries    int64
	Files      int64
	Dirs       int64
	Symlinks   int64
	Hardlinks  int64
	Specials   int64
	Bytes      int64 // file content written (holes not counted)
	ArchiveLen int64 // uncompressed tar bytes read
}

// ErrUnsafePath reports an archive entry that would land outside the
// target root.
var ErrUnsafePath = errors.New("entry would land outside the target root")

// Extract streams a tar.zst archive from r into root, restoring file types,
// owners, modes, nanosecond mtimes, xattrs, hardlinks and sparse files. It
// refuses (with ErrUnsafePath) any entry with an absolute path or "..", any
// entry whose parent path goes through a symlink (so a symlink planted by the
// archive cannot be written through) and hardlinks to outside the root.
func Extract(ctx context.Context, r io.Reader, root string, opts ExtractOptions) (ExtractStats, error) {
	// The decoder runs ahead in its own goroutine and hands its output
	// over in 1 MiB chunks, so decompression overlaps the file system
	// work with one handoff per chunk rather than one per 128 KiB zstd
	// block, and file contents go from the chunks to the files without
	// another copy. The decoder is synchronous: its concurrent mode took a
	// third more CPU for the same speed (rootfs on 2 cores: 0.24 s of CPU
	// instead of 0.17 s), and the file system work keeps the other core.
	// Measured and dropped on 2 cores: file writes on a pool of
	// goroutines (decoding is the longer side, so they only added
	// handoffs), and decoding the archive's independent frames on all
	// cores with DecodeAll (10% faster on an idle machine, 15-25% slower
	// and more CPU at load 3-4: 24 MiB of frame buffers against 4 MiB of
	// chunks, and more goroutines to schedule). The producer owns the
	// decoder and closes it when it returns.
	dec, err := zstd.NewReader(r,
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxWindow(1<<30))
	if err != nil {
		return ExtractStats{}, fmt.Errorf("extract: zstd decoder: %w", err)
	}
	ra := newReadAhead(readAheadChunk, readAheadChunks, func(w io.Writer) error {
		defer dec.Close()
		_, err := dec.WriteTo(w)
		return err
	})
	defer ra.Close()
	return ExtractTar(ctx, ra, root, opts)
}

const (
	// readAheadChunk is the size of the decoder's output chunks, and the
	// most content one write to a file carries.
	readAheadChunk = 1 << 20
	// readAheadChunks bounds the decoded data held: how far the decoder
	// may run ahead of the file system work.
	readAheadChunks = 4
)

// ExtractTar is Extract for an uncompressed tar stream.
func ExtractTar(ctx context.Context, r io.Reader, root string, opts ExtractOptions) (ExtractStats, error) {
	rfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return ExtractStats{}, fmt.Errorf("extract: target root %s: %w", root, err)
	}
	x := &extractor{
		ctx:     ctx,
		root:    root,
		rfd:     rfd,
		opts:    opts,
		buf:     make([]byte, 1<<20),
		zero:    make([]byte, 64<<10),
		dirs:    map[string]int{},
		implied: map[string]bool{},
		cr:      &countReader{r: r},
		euid:    unix.Geteuid(),
		egid:    unix.Getegid(),
		umask:   readUmask(),
		sgid:    map[string]bool{},
	}
	defer x.closeDirs()
	x.ra, _ = r.(*readAhead)
	tr := tar.NewReader(x.cr)
	for {
		if err := ctx.Err(); err != nil {
			return x.stats, fmt.Errorf("extract interrupted: %w", err)
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return x.stats, fmt.Errorf("extract: read archive after %d entries: %w", x.stats.Entries, err)
		}
		if err := x.entry(tr, hdr); err != nil {
			return x.stats, fmt.Errorf("extract %q: %w", hdr.Name, err)
		}
	}
	// Drain the stream so the decoder checks the trailing frame checksum.
	if _, err := io.Copy(io.Discard, x.cr); err != nil {
		return x.stats, fmt.Errorf("extract: read archive end: %w", err)
	}
	if err := x.finishDirs(); err != nil {
		return x.stats, err
	}
	x.stats.ArchiveLen = x.cr.n
	return x.stats, nil
}

type countReader struct {
	r io.Reader
	n int64
	// skip counts bytes taken from r directly (readAhead.lend): the
	// next reads return them again without reading or copying, so the tar
	// reader stays in step.
	skip int
}

func (c *countReader) Read(p []byte) (int, error) {
	if c.skip > 0 {
		n := min(len(p), c.skip)
		c.skip -= n
		c.n += int64(n)
		return n, nil
	}
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

type dirMeta struct {
	name      string
	hdr       *tar.Header
	timesOnly bool // owner and mode are right since creation
}

type extractor struct {
	ctx     context.Context
	root    string
	rfd     int
	opts    ExtractOptions
	buf     []byte
	zero    []byte          // 64 KiB of zeros, to find holes
	dirs    map[string]int  // open parent directory fds by relative path
	pending []dirMeta       // directories whose metadata is applied at the end
	implied map[string]bool // directories created without an entry of their own
	hasRoot bool            // the archive had a "./" entry
	stats   ExtractStats
	cr      *countReader
	// New entries get the owner euid:egid (unless their directory is
	// setgid) and the mode perm&^umask: when that is already what the
	// archive asks for, the chown or chmod is skipped.
	euid, egid int
	umask      uint32          // 0o7777 when unknown: never skip the chmod
	sgid       map[string]bool // directory is setgid, by relative path
	ra         *readAhead      // the archive's decoder, when it lends content
}

func (x *extractor) closeDirs() {
	for _, fd := range x.dirs {
		unix.Close(fd)
	}
	clear(x.dirs)
	unix.Close(x.rfd)
}

// cleanName turns an archive name into a relative slash path, refusing
// absolute paths and "..".
func cleanName(name string) (string, error) {
	if strings.HasPrefix(name, "/") {
		return "", ErrUnsafePath
	}
	for _, c := range strings.Split(name, "/") {
		if c == ".." {
			return "", ErrUnsafePath
		}
	}
	if strings.IndexByte(name, 0) >= 0 {
		return "", fmt.Errorf("name holds a NUL byte")
	}
	return path.Clean(name), nil
}

// parent returns an fd for the directory holding rel, creating missing
// directories, never following a symlink and never leaving the root.
func (x *extractor) parent(rel string) (int, string, error) {
	dir, base := path.Split(rel)
	dir = strings.TrimSuffix(dir, "/")
	if dir == "" {
		return x.rfd, base, nil
	}
	if fd, ok := x.dirs[dir]; ok {
		return fd, base, nil
	}
	how := &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
	}
	fd, err := unix.Openat2(x.rfd, dir, how)
	if errors.Is(err, unix.ENOENT) {
		// Create missing parents one by one (archives need not list them).
		pfd, pbase, perr := x.parent(dir)
		if perr != nil {
			return -1, "", perr
		}
		merr := unix.Mkdirat(pfd, pbase, 0o755)
		if merr != nil && !errors.Is(merr, unix.EEXIST) {
			return -1, "", fmt.Errorf("create directory %s: %w", dir, merr)
		}
		if merr == nil {
			x.implied[dir] = true
		}
		fd, err = unix.Openat2(x.rfd, dir, how)
	}
	if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.EXDEV) {
		return -1, "", fmt.Errorf("parent %s goes through a symlink: %w", dir, ErrUnsafePath)
	}
	if errors.Is(err, unix.ENOTDIR) {
		return -1, "", fmt.Errorf("parent %s is not a directory: %w", dir, ErrUnsafePath)
	}
	if err != nil {
		return -1, "", fmt.Errorf("open parent %s: %w", dir, err)
	}
	if len(x.dirs) >= 64 {
		for k, v := range x.dirs {
			unix.Close(v)
			delete(x.dirs, k)
		}
	}
	x.dirs[dir] = fd
	return fd, base, nil
}

// forget drops cached directory fds and facts at or below rel, after rel
// was replaced.
func (x *extractor) forget(rel string) {
	for k, fd := range x.dirs {
		if k == rel || strings.HasPrefix(k, rel+"/") {
			unix.Close(fd)
			delete(x.dirs, k)
		}
	}
	for k := range x.sgid {
		if k == rel || strings.HasPrefix(k, rel+"/") {
			delete(x.sgid, k)
		}
	}
}

// readUmask returns the process's umask from /proc/self/status (reading it
// with umask(2) would change it for every goroutine), or 0o7777 when the
// kernel does not tell.
func readUmask() uint32 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0o7777
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Umask:"); ok {
			m, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32)
			if err != nil {
				return 0o7777
			}
			return uint32(m)
		}
	}
	return 0o7777
}

// needOwner reports whether an entry created in directory pfd (relative
// path dir) needs a chown to get hdr's owner.
func (x *extractor) needOwner(pfd int, rel string, hdr *tar.Header) bool {
	if x.opts.NoOwner {
		return false
	}
	if hdr.Uid != x.euid || hdr.Gid != x.egid {
		return true
	}
	return x.parentSetgid(pfd, rel)
}

// parentSetgid reports whether the directory pfd holding rel is setgid (its
// new entries get its group, new directories its setgid bit); true when
// that cannot be told.
func (x *extractor) parentSetgid(pfd int, rel string) bool {
	dir := path.Dir(rel)
	sg, ok := x.sgid[dir]
	if !ok {
		var st unix.Stat_t
		if err := unix.Fstat(pfd, &st); err != nil {
			return true
		}
		sg = st.Mode&unix.S_ISGID != 0
		x.sgid[dir] = sg
	}
	return sg
}

// createPerm returns the mode to create a file with and whether that mode
// survives the umask as the archive's final mode, so no chmod is needed.
func (x *extractor) createPerm(hdr *tar.Header) (uint32, bool) {
	mode := uint32(hdr.Mode & 0o7777)
	if mode&0o7000 != 0 || mode&^x.umask != mode {
		return 0o600, false
	}
	return mode, true
}

// create runs mk, which makes base in pfd exclusively; when something is
// already there, it clears it (keeping a directory when keepDir) and runs mk
// again. Trying first saves a stat per entry on an empty target.
func (x *extractor) create(pfd int, rel, base string, keepDir bool, mk func() error) error {
	err := mk()
	if !errors.Is(err, unix.EEXIST) {
		return err
	}
	if err := x.clear(pfd, rel, base, keepDir); err != nil {
		return err
	}
	return mk()
}

// clear removes whatever is at base unless it is a directory and keepDir.
func (x *extractor) clear(pfd int, rel, base string, keepDir bool) error {
	var st unix.Stat_t
	err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stat existing: %w", err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		if keepDir {
			return nil
		}
		x.forget(rel)
		if err := os.RemoveAll(path.Join(x.root, rel)); err != nil {
			return fmt.Errorf("replace existing directory: %w", err)
		}
		return nil
	}
	if err := unix.Unlinkat(pfd, base, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("replace existing file: %w", err)
	}
	return nil
}

func (x *extractor) entry(tr *tar.Reader, hdr *tar.Header) error {
	x.stats.Entries++
	rel, err := cleanName(hdr.Name)
	if err != nil {
		return err
	}
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil
	}
	if rel == "." {
		if hdr.Typeflag != tar.TypeDir {
			return fmt.Errorf("the root entry is not a directory")
		}
		x.pending = append(x.pending, dirMeta{name: ".", hdr: hdr})
		x.hasRoot = true
		return nil
	}
	if x.opts.Include != nil && !x.opts.Include(rel) {
		return nil
	}
	pfd, base, err := x.parent(rel)
	if err != nil {
		return err
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		// A directory is created with its final mode when that keeps it
		// writable for its entries and survives the umask; otherwise
		// private (0700) until finishDirs.
		perm, permDone := x.createPerm(hdr)
		if perm&0o700 != 0o700 {
			perm, permDone = 0o700, false
		}
		created := false
		err := x.create(pfd, rel, base, true, func() error {
			err := unix.Mkdirat(pfd, base, perm)
			created = err == nil
			return err
		})
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("mkdir: %w", err)
		}
		x.stats.Dirs++
		delete(x.implied, rel)
		d := dirMeta{name: rel, hdr: hdr}
		// A directory this extraction made, with its final mode and
		// owner already (no setgid parent changing either), no xattrs:
		// only its times remain to set.
		d.timesOnly = created && permDone && !x.parentSetgid(pfd, rel) &&
			(x.opts.NoOwner || hdr.Uid == x.euid && hdr.Gid == x.egid) &&
			(x.opts.NoXattrs || len(xattrsOf(hdr)) == 0)
		x.pending = append(x.pending, d)
		return nil
	case tar.TypeReg, tar.TypeGNUSparse:
		return x.regular(tr, hdr, pfd, rel, base)
	case tar.TypeLink:
		return x.hardlink(hdr, pfd, rel, base)
	case tar.TypeSymlink:
		if err := x.create(pfd, rel, base, false, func() error { return unix.Symlinkat(hdr.Linkname, pfd, base) }); err != nil {
			return fmt.Errorf("symlink: %w", err)
		}
		x.stats.Symlinks++
		return x.meta(pfd, rel, base, hdr, true)
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
	default:
		return fmt.Errorf("unsupported entry type %q", hdr.Typeflag)
	}
	// Devices and FIFOs.
	mode := uint32(unix.S_IFIFO)
	switch hdr.Typeflag {
	case tar.TypeChar:
		mode = unix.S_IFCHR
	case tar.TypeBlock:
		mode = unix.S_IFBLK
	}
	dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
	if err := x.create(pfd, rel, base, false, func() error { return unix.Mknodat(pfd, base, mode|0o600, int(dev)) }); err != nil {
		return fmt.Errorf("mknod: %w", err)
	}
	x.stats.Specials++
	return x.meta(pfd, rel, base, hdr, false)
}

func (x *extractor) regular(tr *tar.Reader, hdr *tar.Header, pfd int, rel, base string) error {
	perm, permDone := x.createPerm(hdr)
	fd := -1
	err := x.create(pfd, rel, base, false, func() error {
		var err error
		fd, err = unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, perm)
		return err
	})
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	closed := false
	defer func() {
		if !closed {
			unix.Close(fd)
		}
	}()
	// Sparse entries (any of GNU's PAX formats, or old GNU 'S'): the tar
	// reader fills the holes in, so their content is read, not lent.
	sparse := hdr.Typeflag == tar.TypeGNUSparse
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			sparse = true
			break
		}
	}
	owner := x.needOwner(pfd, rel, hdr)
	if err := x.writeContent(fd, tr, hdr.Size, sparse); err != nil {
		return err
	}
	x.stats.Files++
	if err := x.fmeta(fd, hdr, owner, !permDone); err != nil {
		return err
	}
	closed = true
	if err := unix.Close(fd); err != nil {
		return fmt.Errorf("close: %w", err)
	}
	return nil
}

// content reads up to n bytes (n at most the entry's content left) of the
// current entry: lent in place from the decoder's read-ahead when there is
// one, the tar reader then skipping them unread (release the chunk after
// use); otherwise read into x.buf.
func (x *extractor) content(tr *tar.Reader, n int) (data []byte, lent *chunk, err error) {
	if x.ra == nil {
		if _, err := io.ReadFull(tr, x.buf[:n]); err != nil {
			return nil, nil, err
		}
		return x.buf[:n], nil, nil
	}
	data, lent, err = x.ra.lend(n)
	if err != nil {
		return nil, nil, err
	}
	x.cr.skip = len(data)
	_, err = io.ReadFull(tr, x.buf[:len(data)])
	if err == nil && x.cr.skip != 0 {
		err = fmt.Errorf("tar reader out of step by %d bytes", x.cr.skip)
	}
	if err != nil {
		x.ra.release(lent)
		return nil, nil, err
	}
	return data, lent, nil
}

// writeFull writes all of p at the file offset (or at off when off >= 0).
func writeFull(fd int, p []byte, off int64) error {
	for len(p) > 0 {
		var n int
		var err error
		if off >= 0 {
			n, err = unix.Pwrite(fd, p, off)
			off += int64(max(n, 0))
		} else {
			n, err = unix.Write(fd, p)
		}
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrShortWrite
		}
		p = p[n:]
	}
	return nil
}

// writeContent writes size bytes of the entry's content into fd, in place
// from the decoder's chunks when it can; for sparse entries, runs of zero
// blocks become holes again.
func (x *extractor) writeContent(fd int, tr *tar.Reader, size int64, sparse bool) error {
	if !sparse {
		for off := int64(0); off < size; {
			if err := x.ctx.Err(); err != nil {
				return err
			}
			data, lent, err := x.content(tr, int(min(size-off, readAheadChunk)))
			if err != nil {
				return fmt.Errorf("read content at offset %d of %d: %w", off, size, err)
			}
			err = writeFull(fd, data, -1)
			if lent != nil {
				x.ra.release(lent)
			}
			if err != nil {
				return fmt.Errorf("write: %w", err)
			}
			off += int64(len(data))
			x.stats.Bytes += int64(len(data))
		}
		return nil
	}
	const zblock = 64 << 10
	var off int64
	for off < size {
		if err := x.ctx.Err(); err != nil {
			return err
		}
		chunk := x.buf
		if int64(len(chunk)) > size-off {
			chunk = chunk[:size-off]
		}
		n, err := io.ReadFull(tr, chunk)
		if err != nil {
			return fmt.Errorf("read content at offset %d of %d: %w", off+int64(n), size, err)
		}
		for i := 0; i < n; {
			j := min(i+zblock, n)
			if bytes.Equal(chunk[i:j], x.zero[:j-i]) {
				i = j
				continue
			}
			k := j
			for k < n && !bytes.Equal(chunk[k:min(k+zblock, n)], x.zero[:min(k+zblock, n)-k]) {
				k = min(k+zblock, n)
			}
			if err := writeFull(fd, chunk[i:k], off+int64(i)); err != nil {
				return fmt.Errorf("write: %w", err)
			}
			x.stats.Bytes += int64(k - i)
			i = k
		}
		off += int64(n)
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		return fmt.Errorf("set size: %w", err)
	}
	return nil
}

func (x *extractor) hardlink(hdr *tar.Header, pfd int, rel, base string) error {
	target, err := cleanName(hdr.Linkname)
	if err != nil || target == "." {
		return fmt.Errorf("hardlink to %q: %w", hdr.Linkname, ErrUnsafePath)
	}
	tfd, tbase, err := x.parent(target)
	if err != nil {
		return fmt.Errorf("hardlink to %q: %w", hdr.Linkname, err)
	}
	var st unix.Stat_t
	if err := unix.Fstatat(tfd, tbase, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("hardlink to %q: target: %w", hdr.Linkname, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return fmt.Errorf("hardlink to directory %q refused", hdr.Linkname)
	}
	if target == rel {
		return nil
	}
	if err := x.clear(pfd, rel, base, false); err != nil {
		return err
	}
	// Recompute the parent: clear may have dropped cached fds.
	pfd, base, err = x.parent(rel)
	if err != nil {
		return err
	}
	tfd, tbase, err = x.parent(target)
	if err != nil {
		return err
	}
	if err := unix.Linkat(tfd, tbase, pfd, base, 0); err != nil {
		return fmt.Errorf("hardlink to %q: %w", hdr.Linkname, err)
	}
	x.stats.Hardlinks++
	return nil
}

// xattrs returns the SCHILY.xattr records of hdr.
func xattrsOf(hdr *tar.Header) map[string]string {
	var m map[string]string
	for k, v := range hdr.PAXRecords {
		if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
			if m == nil {
				m = map[string]string{}
			}
			m[name] = v
		}
	}
	return m
}

// fmeta applies owner, mode, xattrs and times to an open regular file, in
// the order that keeps each: chown clears setuid and capabilities, so it
// comes first; times come last.
func (x *extractor) fmeta(fd int, hdr *tar.Header, owner, mode bool) error {
	if owner {
		if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
			return fmt.Errorf("chown %d:%d: %w", hdr.Uid, hdr.Gid, err)
		}
	}
	if mode {
		if err := unix.Fchmod(fd, uint32(hdr.Mode&0o7777)); err != nil {
			return fmt.Errorf("chmod %#o: %w", hdr.Mode&0o7777, err)
		}
	}
	if !x.opts.NoXattrs {
		for name, v := range xattrsOf(hdr) {
			if err := unix.Fsetxattr(fd, name, []byte(v), 0); err != nil {
				return fmt.Errorf("set xattr %s: %w", name, err)
			}
		}
	}
	ts := []unix.Timespec{unix.NsecToTimespec(hdr.ModTime.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
	if err := unix.UtimesNanoAt(fd, "", ts, unix.AT_EMPTY_PATH); err != nil {
		return fmt.Errorf("set mtime: %w", err)
	}
	return nil
}

// meta applies metadata by name for entries that cannot be opened for
// writing (symlinks, devices, FIFOs).
func (x *extractor) meta(pfd int, rel, base string, hdr *tar.Header, symlink bool) error {
	if x.needOwner(pfd, rel, hdr) {
		if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("chown %d:%d: %w", hdr.Uid, hdr.Gid, err)
		}
	}
	if !symlink {
		if err := unix.Fchmodat(pfd, base, uint32(hdr.Mode&0o7777), 0); err != nil {
			return fmt.Errorf("chmod %#o: %w", hdr.Mode&0o7777, err)
		}
	}
	if xa := xattrsOf(hdr); len(xa) > 0 && !x.opts.NoXattrs {
		// The parent path was checked to hold no symlink, so the full path
		// names the entry just created.
		full := path.Join(x.root, rel)
		for name, v := range xa {
			if err := unix.Lsetxattr(full, name, []byte(v), 0); err != nil {
				return fmt.Errorf("set xattr %s: %w", name, err)
			}
		}
	}
	mt := hdr.ModTime
	if mt.IsZero() {
		mt = time.Unix(0, 0)
	}
	ts := []unix.Timespec{unix.NsecToTimespec(mt.UnixNano()), unix.NsecToTimespec(mt.UnixNano())}
	if err := unix.UtimesNanoAt(pfd, base, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set mtime: %w", err)
	}
	return nil
}

// finishDirs applies directory metadata deepest first, after every child
// exists, so restrictive modes and mtimes survive.
func (x *extractor) finishDirs() error {
	if t := x.opts.ImplicitDirTime; !t.IsZero() {
		ts := []unix.Timespec{unix.NsecToTimespec(t.UnixNano()), unix.NsecToTimespec(t.UnixNano())}
		for dir := range x.implied {
			pfd, base, err := x.parent(dir)
			if err != nil {
				return fmt.Errorf("extract: directory %s: %w", dir, err)
			}
			if err := unix.UtimesNanoAt(pfd, base, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return fmt.Errorf("extract: directory %s: set mtime: %w", dir, err)
			}
		}
		if !x.hasRoot {
			if err := unix.UtimesNanoAt(x.rfd, ".", ts, 0); err != nil {
				return fmt.Errorf("extract: root directory: set mtime: %w", err)
			}
		}
	}
	for i := len(x.pending) - 1; i >= 0; i-- {
		d := x.pending[i]
		if d.name == "." {
			if err := x.dirMeta(x.rfd, ".", "", d.hdr); err != nil {
				return fmt.Errorf("extract root directory: %w", err)
			}
			continue
		}
		pfd, base, err := x.parent(d.name)
		if err != nil {
			return fmt.Errorf("extract %q: %w", d.hdr.Name, err)
		}
		if d.timesOnly {
			ts := []unix.Timespec{unix.NsecToTimespec(d.hdr.ModTime.UnixNano()), unix.NsecToTimespec(d.hdr.ModTime.UnixNano())}
			if err := unix.UtimesNanoAt(pfd, base, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return fmt.Errorf("extract %q: set mtime: %w", d.hdr.Name, err)
			}
			continue
		}
		if err := x.dirMeta(pfd, d.name, base, d.hdr); err != nil {
			return fmt.Errorf("extract %q: %w", d.hdr.Name, err)
		}
	}
	return nil
}

func (x *extractor) dirMeta(pfd int, rel, base string, hdr *tar.Header) error {
	how := &unix.OpenHow{Flags: unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC}
	name := base
	if rel == "." {
		name = "."
	}
	fd, err := unix.Openat2(pfd, name, how)
	if err != nil {
		return fmt.Errorf("open directory: %w", err)
	}
	defer unix.Close(fd)
	return x.fmeta(fd, hdr, !x.opts.NoOwner, true)
}
