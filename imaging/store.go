package imaging

import (
	"archive/tar"
	"bufio"
	"compress/bzip2"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
	"golang.org/x/sys/unix"
)

// Errors the store returns; test with errors.Is.
var (
	ErrNotFound = errors.New("image not found")
	ErrExists   = errors.New("image already exists (images are immutable: choose a new version)")
)

// Store is a directory of immutable, versioned images:
// <dir>/images/<name>/<version>/{manifest.json, image.tar.zst|image.ext4,
// image.torrent}, and <dir>/tmp for work in progress.
type Store struct {
	dir string
}

// Image is one image in a store.
type Image struct {
	Manifest Manifest
	// Dir is the image's directory in the store.
	Dir string
}

// ArchivePath returns the path of the image's archive (or ext4 image).
func (i *Image) ArchivePath() string { return filepath.Join(i.Dir, i.Manifest.Archive) }

// TorrentPath returns the path of the image's .torrent (no announce URL).
func (i *Image) TorrentPath() string { return filepath.Join(i.Dir, i.Manifest.Torrent) }

// ManifestPath returns the path of the image's manifest.json.
func (i *Image) ManifestPath() string { return filepath.Join(i.Dir, ManifestFile) }

// OpenStore opens (creating it if needed) the store at dir, and removes
// work directories that processes which no longer run left behind.
func OpenStore(dir string) (*Store, error) {
	if dir == "" {
		return nil, fmt.Errorf("image store: no directory given")
	}
	s := &Store{dir: dir}
	for _, d := range []string{s.imagesDir(), s.tmpDir()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("image store %s: %w", dir, err)
		}
	}
	ents, err := os.ReadDir(s.tmpDir())
	if err != nil {
		return nil, fmt.Errorf("image store %s: %w", dir, err)
	}
	for _, e := range ents {
		parts := strings.SplitN(e.Name(), "-", 3)
		if len(parts) < 3 {
			continue
		}
		pid, err := strconv.Atoi(parts[1])
		if err != nil || pid <= 0 {
			continue
		}
		if unix.Kill(pid, 0) == unix.ESRCH {
			os.RemoveAll(filepath.Join(s.tmpDir(), e.Name()))
		}
	}
	return s, nil
}

// Dir returns the store's directory.
func (s *Store) Dir() string { return s.dir }

func (s *Store) imagesDir() string { return filepath.Join(s.dir, "images") }
func (s *Store) tmpDir() string    { return filepath.Join(s.dir, "tmp") }

func (s *Store) workDir(kind string) (string, error) {
	d, err := os.MkdirTemp(s.tmpDir(), fmt.Sprintf("%s-%d-", kind, os.Getpid()))
	if err != nil {
		return "", fmt.Errorf("image store: work directory: %w", err)
	}
	// It becomes the image's directory, readable by the server's users.
	if err := os.Chmod(d, 0o755); err != nil {
		os.Remove(d)
		return "", fmt.Errorf("image store: work directory: %w", err)
	}
	return d, nil
}

// List returns the manifests of every image, sorted by name then version.
func (s *Store) List() ([]Manifest, error) {
	names, err := os.ReadDir(s.imagesDir())
	if err != nil {
		return nil, fmt.Errorf("list images: %w", err)
	}
	var out []Manifest
	for _, n := range names {
		vers, err := os.ReadDir(filepath.Join(s.imagesDir(), n.Name()))
		if err != nil {
			continue
		}
		for _, v := range vers {
			m, err := ReadManifest(filepath.Join(s.imagesDir(), n.Name(), v.Name(), ManifestFile))
			if err != nil {
				return nil, fmt.Errorf("list images: %w", err)
			}
			out = append(out, *m)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Name != out[j].Name {
			return out[i].Name < out[j].Name
		}
		return compareVersions(out[i].Version, out[j].Version) < 0
	})
	return out, nil
}

// Get returns the image NAME[:VERSION]; without a version, the newest
// (versions compare naturally: 1.10 is newer than 1.9).
func (s *Store) Get(ref string) (*Image, error) {
	name, version, err := ParseRef(ref)
	if err != nil {
		return nil, err
	}
	if version == "" {
		vers, err := os.ReadDir(filepath.Join(s.imagesDir(), name))
		if errors.Is(err, os.ErrNotExist) || err == nil && len(vers) == 0 {
			return nil, fmt.Errorf("image %s: %w", ref, ErrNotFound)
		}
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", ref, err)
		}
		for _, v := range vers {
			if version == "" || compareVersions(v.Name(), version) > 0 {
				version = v.Name()
			}
		}
	}
	dir := filepath.Join(s.imagesDir(), name, version)
	m, err := ReadManifest(filepath.Join(dir, ManifestFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("image %s: %w", ref, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", ref, err)
	}
	if m.Name != name || m.Version != version {
		return nil, fmt.Errorf("image %s: manifest in %s names %s", ref, dir, m.Ref())
	}
	return &Image{Manifest: *m, Dir: dir}, nil
}

// BuildOptions describe the image Build makes.
type BuildOptions struct {
	Name    string
	Version string
	// Arch overrides the architecture read from the tree's binaries.
	Arch string
	// Mode is ModeFile (default) or ModePartition.
	Mode Mode
	// Created overrides the creation time (default: now).
	Created time.Time
	// PieceLength is the BitTorrent piece size: a power of two from 16 KiB
	// to 64 MiB, or 0 to choose one from the archive's size (PieceLength).
	PieceLength int64
	ArchiveOptions
}

// Build turns the root filesystem tree at src into a new image in the store.
// Nothing appears in the store unless every step succeeds.
func (s *Store) Build(ctx context.Context, src string, opts BuildOptions) (*Image, error) {
	if err := s.checkNew(opts); err != nil {
		return nil, err
	}
	work, err := s.workDir("build")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	opts.Exclude = append(opts.Exclude, s.excludeSelf(src)...)
	var m *Manifest
	if opts.Mode == ModePartition {
		m, err = buildPartition(ctx, work, src, opts)
	} else {
		m, err = buildFile(ctx, work, src, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("build image %s:%s from %s: %w", opts.Name, opts.Version, src, err)
	}
	return s.commit(ctx, work, m)
}

// excludeSelf returns an exclude pattern for the store when it lies inside
// the tree being built (building "/" with the store in /var/lib/esir), so the
// build never reads its own output.
func (s *Store) excludeSelf(src string) []string {
	abs := func(p string) string {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			p = r
		}
		a, _ := filepath.Abs(p)
		return a
	}
	rel, err := filepath.Rel(abs(src), abs(s.dir))
	if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, "../") {
		return nil
	}
	// Escape glob characters: the pattern must name exactly this path.
	var b strings.Builder
	for _, c := range filepath.ToSlash(rel) {
		if strings.ContainsRune(`*?[\`, c) {
			b.WriteByte('\\')
		}
		b.WriteRune(c)
	}
	return []string{b.String()}
}

// BuildFromTar is Build for a root filesystem tarball (plain, gzip, xz,
// bzip2 or zstd; e.g. one exported from a container). The tarball is
// unpacked into the store's work area first, so the archive comes out
// sorted and deterministic whatever the tarball's order.
func (s *Store) BuildFromTar(ctx context.Context, tarball string, opts BuildOptions) (*Image, error) {
	if err := s.checkNew(opts); err != nil {
		return nil, err
	}
	work, err := s.workDir("build")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	root := filepath.Join(work, "rootfs")
	if err := os.Mkdir(root, 0o755); err != nil {
		return nil, fmt.Errorf("build image from %s: %w", tarball, err)
	}
	f, err := os.Open(tarball)
	if err != nil {
		return nil, fmt.Errorf("build image from tarball: %w", err)
	}
	defer f.Close()
	r, err := decompressAny(f)
	if err != nil {
		return nil, fmt.Errorf("build image from %s: %w", tarball, err)
	}
	defer r.Close()
	// Directories the tarball does not list get a fixed time, so the image
	// does not depend on when it was built.
	if _, err := ExtractTar(ctx, r, root, ExtractOptions{ImplicitDirTime: time.Unix(0, 0)}); err != nil {
		return nil, fmt.Errorf("build image from %s: unpack: %w", tarball, err)
	}
	out := filepath.Join(work, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		return nil, err
	}
	var m *Manifest
	if opts.Mode == ModePartition {
		m, err = buildPartition(ctx, out, root, opts)
	} else {
		m, err = buildFile(ctx, out, root, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("build image %s:%s from %s: %w", opts.Name, opts.Version, tarball, err)
	}
	if err := os.RemoveAll(root); err != nil {
		return nil, fmt.Errorf("build image from %s: clean up: %w", tarball, err)
	}
	return s.commit(ctx, out, m)
}

// decompressAny recognises gzip, xz, bzip2 and zstd by their magic bytes;
// anything else is read as a plain tar.
func decompressAny(f io.Reader) (io.ReadCloser, error) {
	br := bufio.NewReaderSize(f, 1<<20)
	magic, _ := br.Peek(6)
	switch {
	case len(magic) >= 2 && magic[0] == 0x1f && magic[1] == 0x8b:
		return gzip.NewReader(br)
	case len(magic) >= 4 && string(magic[:4]) == "\x28\xb5\x2f\xfd":
		d, err := zstd.NewReader(br, zstd.WithDecoderMaxWindow(1<<30))
		if err != nil {
			return nil, err
		}
		return d.IOReadCloser(), nil
	case len(magic) >= 6 && string(magic) == "\xfd7zXZ\x00":
		r, err := xz.NewReader(br)
		if err != nil {
			return nil, err
		}
		return io.NopCloser(r), nil
	case len(magic) >= 3 && string(magic[:3]) == "BZh":
		return io.NopCloser(bzip2.NewReader(br)), nil
	}
	return io.NopCloser(br), nil
}

func (s *Store) checkNew(opts BuildOptions) error {
	if err := ValidName("name", opts.Name); err != nil {
		return err
	}
	if err := ValidName("version", opts.Version); err != nil {
		return err
	}
	if opts.Mode != "" && opts.Mode != ModeFile && opts.Mode != ModePartition {
		return fmt.Errorf("image mode %q: want file or partition", opts.Mode)
	}
	if pl := opts.PieceLength; pl != 0 && (pl < 16<<10 || pl > 64<<20 || pl&(pl-1) != 0) {
		return fmt.Errorf("image %s:%s: piece length %d: want a power of two from 16 KiB to 64 MiB", opts.Name, opts.Version, pl)
	}
	if _, err := os.Stat(filepath.Join(s.imagesDir(), opts.Name, opts.Version)); err == nil {
		return fmt.Errorf("image %s:%s: %w", opts.Name, opts.Version, ErrExists)
	}
	return nil
}

type hashingWriter struct {
	w io.Writer
	h hash.Hash
	n int64
}

func (hw *hashingWriter) Write(p []byte) (int, error) {
	n, err := hw.w.Write(p)
	hw.h.Write(p[:n])
	hw.n += int64(n)
	return n, err
}

// buildFile writes image.tar.zst, image.torrent and manifest.json into work.
func buildFile(ctx context.Context, work, src string, opts BuildOptions) (*Manifest, error) {
	archive := filepath.Join(work, ArchiveFile)
	f, err := os.OpenFile(archive, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create archive: %w", err)
	}
	defer f.Close()
	bw := bufio.NewWriterSize(f, 1<<20)
	hw := &hashingWriter{w: bw, h: sha256.New()}
	st, err := WriteArchive(ctx, hw, src, opts.ArchiveOptions)
	if err != nil {
		return nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("write archive %s: %w", archive, err)
	}
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("sync archive %s: %w", archive, err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("close archive %s: %w", archive, err)
	}
	m := newManifest(opts, st, ModeFile, ArchiveFile)
	m.SHA256 = hex.EncodeToString(hw.h.Sum(nil))
	m.CompressedSize = hw.n
	if err := finishImage(ctx, work, m); err != nil {
		return nil, err
	}
	return m, nil
}

func newManifest(opts BuildOptions, st ArchiveStats, mode Mode, archive string) *Manifest {
	created := opts.Created
	if created.IsZero() {
		created = time.Now()
	}
	arch := opts.Arch
	if arch == "" {
		arch = st.Arch
	}
	if arch == "" {
		arch = "unknown"
	}
	kernels := st.Kernels
	if kernels == nil {
		kernels = []Kernel{}
	}
	return &Manifest{
		Schema:           manifestSchemaLabel,
		Name:             opts.Name,
		Version:          opts.Version,
		Arch:             arch,
		Mode:             mode,
		Archive:          archive,
		UncompressedSize: st.UncompressedSize,
		ContentSize:      st.ContentSize,
		FileCount:        st.Entries,
		Kernels:          kernels,
		Created:          created.UTC().Truncate(time.Second),
		Torrent:          TorrentFile,
		PieceLength:      opts.PieceLength, // 0: finishImage chooses
	}
}

// finishImage writes the torrent and the manifest next to the archive.
func finishImage(ctx context.Context, work string, m *Manifest) error {
	ext := strings.TrimPrefix(filepath.Ext(m.Archive), ".")
	if m.Mode == ModeFile {
		ext = "tar.zst"
	}
	mi, ih, err := makeTorrent(ctx, filepath.Join(work, m.Archive), fmt.Sprintf("%s_%s.%s", m.Name, m.Version, ext), m.Created, m.PieceLength)
	if err != nil {
		return err
	}
	info, err := mi.UnmarshalInfo()
	if err != nil {
		return fmt.Errorf("torrent: %w", err)
	}
	m.PieceLength = info.PieceLength
	m.InfoHash = ih.HexString()
	if err := writeFileSync(filepath.Join(work, TorrentFile), func(w io.Writer) error { return mi.Write(w) }); err != nil {
		return fmt.Errorf("write torrent: %w", err)
	}
	return writeManifest(filepath.Join(work, ManifestFile), m)
}

func writeManifest(path string, m *Manifest) error {
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("encode manifest: %w", err)
	}
	b = append(b, '\n')
	if err := writeFileSync(path, func(w io.Writer) error { _, err := w.Write(b); return err }); err != nil {
		return fmt.Errorf("write manifest: %w", err)
	}
	return nil
}

func writeFileSync(path string, write func(io.Writer) error) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := write(f); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return f.Close()
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// commit moves a finished work directory into the store with one rename that
// never replaces an existing image.
func (s *Store) commit(ctx context.Context, work string, m *Manifest) (*Image, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("image %s: %w", m.Ref(), err)
	}
	if err := syncDir(work); err != nil {
		return nil, fmt.Errorf("image %s: sync: %w", m.Ref(), err)
	}
	nameDir := filepath.Join(s.imagesDir(), m.Name)
	if err := os.MkdirAll(nameDir, 0o755); err != nil {
		return nil, fmt.Errorf("image %s: %w", m.Ref(), err)
	}
	dst := filepath.Join(nameDir, m.Version)
	if err := unix.Renameat2(unix.AT_FDCWD, work, unix.AT_FDCWD, dst, unix.RENAME_NOREPLACE); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("image %s: %w", m.Ref(), ErrExists)
		}
		return nil, fmt.Errorf("image %s: move into store: %w", m.Ref(), err)
	}
	if err := syncDir(nameDir); err != nil {
		return nil, fmt.Errorf("image %s: sync: %w", m.Ref(), err)
	}
	return &Image{Manifest: *m, Dir: dst}, nil
}

// Remove deletes the image NAME:VERSION (the version is required). The image
// leaves the store with one rename before its files are deleted.
func (s *Store) Remove(ref string) error {
	name, version, err := ParseRef(ref)
	if err != nil {
		return err
	}
	if version == "" {
		return fmt.Errorf("remove image %s: give the version (NAME:VERSION)", ref)
	}
	src := filepath.Join(s.imagesDir(), name, version)
	if _, err := os.Stat(src); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove image %s: %w", ref, ErrNotFound)
	}
	work, err := s.workDir("rm")
	if err != nil {
		return err
	}
	gone := filepath.Join(work, "image")
	if err := os.Rename(src, gone); err != nil {
		os.Remove(work)
		return fmt.Errorf("remove image %s: %w", ref, err)
	}
	os.Remove(filepath.Join(s.imagesDir(), name)) // only when empty
	if err := os.RemoveAll(work); err != nil {
		return fmt.Errorf("remove image %s: delete files: %w", ref, err)
	}
	return nil
}

// Verify re-hashes an image: the archive's SHA-256 and size against the
// manifest, the torrent's info hash and every piece against the archive,
// and, in file mode, decompresses and reads the whole archive, checking its
// length and entry count.
func (s *Store) Verify(ctx context.Context, ref string) (*Image, error) {
	img, err := s.Get(ref)
	if err != nil {
		return nil, err
	}
	if err := verifyDir(ctx, img.Dir, &img.Manifest); err != nil {
		return img, fmt.Errorf("verify image %s: %w", img.Manifest.Ref(), err)
	}
	return img, nil
}

func verifyDir(ctx context.Context, dir string, m *Manifest) error {
	archive := filepath.Join(dir, m.Archive)
	f, err := os.Open(archive)
	if err != nil {
		return fmt.Errorf("archive: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.CopyBuffer(h, readerCtx{ctx, f}, make([]byte, 1<<20))
	if err != nil {
		return fmt.Errorf("read archive %s: %w", archive, err)
	}
	if n != m.CompressedSize {
		return fmt.Errorf("archive %s: %d bytes, manifest says %d", archive, n, m.CompressedSize)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != m.SHA256 {
		return fmt.Errorf("archive %s: sha256 %s, manifest says %s", archive, got, m.SHA256)
	}
	if err := checkTorrent(ctx, filepath.Join(dir, m.Torrent), archive, m.InfoHash); err != nil {
		return err
	}
	if m.Mode != ModeFile {
		return nil
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	dec, err := zstd.NewReader(bufio.NewReaderSize(f, 1<<20), zstd.WithDecoderMaxWindow(1<<30))
	if err != nil {
		return err
	}
	defer dec.Close()
	cr := &countReader{r: dec}
	tr := tar.NewReader(cr)
	var entries int64
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		_, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("archive %s: entry %d: %w", archive, entries+1, err)
		}
		entries++
		if _, err := io.Copy(io.Discard, tr); err != nil {
			return fmt.Errorf("archive %s: entry %d: %w", archive, entries, err)
		}
	}
	if _, err := io.Copy(io.Discard, cr); err != nil {
		return fmt.Errorf("archive %s: end: %w", archive, err)
	}
	if entries != m.FileCount {
		return fmt.Errorf("archive %s: %d entries, manifest says %d", archive, entries, m.FileCount)
	}
	if cr.n != m.UncompressedSize {
		return fmt.Errorf("archive %s: %d uncompressed bytes, manifest says %d", archive, cr.n, m.UncompressedSize)
	}
	return nil
}

type readerCtx struct {
	ctx context.Context
	r   io.Reader
}

func (r readerCtx) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

// Export writes the image as an uncompressed tar holding
// NAME_VERSION/manifest.json, the torrent and the archive, for Import on
// another store.
func (s *Store) Export(ctx context.Context, ref string, w io.Writer) error {
	img, err := s.Get(ref)
	if err != nil {
		return err
	}
	top := img.Manifest.Name + "_" + img.Manifest.Version
	tw := tar.NewWriter(w)
	for _, name := range []string{ManifestFile, img.Manifest.Torrent, img.Manifest.Archive} {
		if err := exportFile(ctx, tw, filepath.Join(img.Dir, name), top+"/"+name, img.Manifest.Created); err != nil {
			return fmt.Errorf("export image %s: %w", img.Manifest.Ref(), err)
		}
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("export image %s: %w", img.Manifest.Ref(), err)
	}
	return nil
}

func exportFile(ctx context.Context, tw *tar.Writer, src, name string, mtime time.Time) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	hdr := &tar.Header{Name: name, Mode: 0o644, Size: fi.Size(), ModTime: mtime, Typeflag: tar.TypeReg, Format: tar.FormatPAX}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	if _, err := io.CopyBuffer(tw, readerCtx{ctx, f}, make([]byte, 1<<20)); err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	return nil
}

// Import reads an exported image, verifies it completely and adds it to
// the store; an image of the same name and version already there is an
// error (ErrExists).
func (s *Store) Import(ctx context.Context, r io.Reader) (*Image, error) {
	work, err := s.workDir("import")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(work)
	tr := tar.NewReader(r)
	top := ""
	seen := map[string]bool{}
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("import image: read: %w", err)
		}
		dir, file := filepath.Split(hdr.Name)
		dir = strings.TrimSuffix(dir, "/")
		if top == "" {
			top = dir
		}
		allowed := file == ManifestFile || file == TorrentFile || file == ArchiveFile || file == PartitionFile
		if dir != top || strings.Contains(dir, "/") || !allowed || seen[file] || hdr.Typeflag != tar.TypeReg {
			return nil, fmt.Errorf("import image: unexpected entry %q (want %s/{%s,%s,%s})", hdr.Name, top, ManifestFile, TorrentFile, ArchiveFile)
		}
		seen[file] = true
		if err := writeFileSync(filepath.Join(work, file), func(w io.Writer) error {
			_, err := io.CopyBuffer(w, readerCtx{ctx, tr}, make([]byte, 1<<20))
			return err
		}); err != nil {
			return nil, fmt.Errorf("import image: %w", err)
		}
	}
	m, err := ReadManifest(filepath.Join(work, ManifestFile))
	if err != nil {
		return nil, fmt.Errorf("import image: %w", err)
	}
	if !seen[m.Archive] || !seen[m.Torrent] {
		return nil, fmt.Errorf("import image %s: missing %s or %s", m.Ref(), m.Archive, m.Torrent)
	}
	if err := verifyDir(ctx, work, m); err != nil {
		return nil, fmt.Errorf("import image %s: verify: %w", m.Ref(), err)
	}
	return s.commit(ctx, work, m)
}
