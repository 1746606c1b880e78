// Package initramfs writes Linux initramfs archives: cpio "newc" records,
// compressed with zstd, as the kernel unpacks them at boot.
//
// An Archive collects entries in memory (file contents are read from disk only
// when the archive is written), adds missing parent directories, and writes
// them in sorted order so the same inputs give the same bytes.
package initramfs

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/u-root/u-root/pkg/cpio"
)

// Archive is an initramfs under construction.
type Archive struct {
	entries map[string]entry
}

type entry struct {
	kind    byte // 'd' directory, 'f' file, 'l' symlink, 'c' char device
	mode    uint32
	src     string // file: path on disk, or "" when data is set
	data    []byte
	target  string // symlink target
	devMaj  uint32
	devMin  uint32
	hasData bool
}

// New returns an empty archive.
func New() *Archive {
	return &Archive{entries: map[string]entry{}}
}

func clean(name string) (string, error) {
	n := strings.TrimPrefix(path.Clean("/"+name), "/")
	if n == "" || n == "." {
		return "", fmt.Errorf("initramfs: invalid entry name %q", name)
	}
	return n, nil
}

func (a *Archive) put(name string, e entry) error {
	n, err := clean(name)
	if err != nil {
		return err
	}
	for dir := path.Dir(n); dir != "." && dir != "/"; dir = path.Dir(dir) {
		if old, ok := a.entries[dir]; ok {
			if old.kind != 'd' {
				return fmt.Errorf("initramfs: %q needs %q to be a directory", n, dir)
			}
			continue
		}
		a.entries[dir] = entry{kind: 'd', mode: 0o755}
	}
	a.entries[n] = e
	return nil
}

// Dir adds a directory.
func (a *Archive) Dir(name string, mode os.FileMode) error {
	return a.put(name, entry{kind: 'd', mode: uint32(mode.Perm())})
}

// File adds a regular file whose contents are read from src when the archive
// is written.
func (a *Archive) File(name, src string, mode os.FileMode) error {
	if _, err := os.Stat(src); err != nil {
		return fmt.Errorf("initramfs: add %s: %w", name, err)
	}
	return a.put(name, entry{kind: 'f', mode: uint32(mode.Perm() | mode&(os.ModeSetuid|os.ModeSetgid)), src: src})
}

// Bytes adds a regular file with the given contents.
func (a *Archive) Bytes(name string, data []byte, mode os.FileMode) error {
	return a.put(name, entry{kind: 'f', mode: uint32(mode.Perm()), data: data, hasData: true})
}

// Symlink adds a symbolic link.
func (a *Archive) Symlink(name, target string) error {
	return a.put(name, entry{kind: 'l', mode: 0o777, target: target})
}

// CharDev adds a character device node (for example dev/console 5:1).
func (a *Archive) CharDev(name string, mode os.FileMode, major, minor uint32) error {
	return a.put(name, entry{kind: 'c', mode: uint32(mode.Perm()), devMaj: major, devMin: minor})
}

// Has reports whether name is already in the archive.
func (a *Archive) Has(name string) bool {
	n, err := clean(name)
	if err != nil {
		return false
	}
	_, ok := a.entries[n]
	return ok
}

// Len returns the number of entries.
func (a *Archive) Len() int { return len(a.entries) }

// WriteTo writes the archive, zstd-compressed, to w.
func (a *Archive) WriteTo(w io.Writer) (int64, error) {
	cw := &countWriter{w: w}
	zw, err := zstd.NewWriter(cw, zstd.WithEncoderLevel(zstd.SpeedDefault))
	if err != nil {
		return 0, err
	}
	if err := a.WriteCPIO(zw); err != nil {
		zw.Close()
		return cw.n, err
	}
	if err := zw.Close(); err != nil {
		return cw.n, fmt.Errorf("initramfs: compress: %w", err)
	}
	return cw.n, nil
}

// WriteCPIO writes the uncompressed cpio newc stream to w.
func (a *Archive) WriteCPIO(w io.Writer) error {
	names := make([]string, 0, len(a.entries))
	for n := range a.entries {
		names = append(names, n)
	}
	sort.Strings(names)
	rw := cpio.Newc.Writer(w)
	for i, n := range names {
		e := a.entries[n]
		info := cpio.Info{Ino: uint64(i + 1), NLink: 1, Name: n}
		var rec cpio.Record
		switch e.kind {
		case 'd':
			info.Mode = cpio.S_IFDIR | uint64(e.mode)
			info.NLink = 2
			rec = cpio.Record{Info: info, ReaderAt: strings.NewReader("")}
		case 'l':
			info.Mode = cpio.S_IFLNK | uint64(e.mode)
			info.FileSize = uint64(len(e.target))
			rec = cpio.Record{Info: info, ReaderAt: strings.NewReader(e.target)}
		case 'c':
			info.Mode = cpio.S_IFCHR | uint64(e.mode)
			info.Rmajor, info.Rminor = uint64(e.devMaj), uint64(e.devMin)
			rec = cpio.Record{Info: info, ReaderAt: strings.NewReader("")}
		case 'f':
			info.Mode = cpio.S_IFREG | uint64(e.mode)
			data := e.data
			if !e.hasData {
				b, err := os.ReadFile(e.src)
				if err != nil {
					return fmt.Errorf("initramfs: read %s for %s: %w", e.src, n, err)
				}
				data = b
			}
			info.FileSize = uint64(len(data))
			rec = cpio.Record{Info: info, ReaderAt: bytes.NewReader(data)}
		}
		if err := rw.WriteRecord(rec); err != nil {
			return fmt.Errorf("initramfs: write %s: %w", n, err)
		}
	}
	return cpio.WriteTrailer(rw)
}

// WriteFile writes the compressed archive to path atomically (temporary file
// in the same directory, then rename).
func (a *Archive) WriteFile(dst string) error {
	tmp, err := os.CreateTemp(path.Dir(dst), ".initramfs-*")
	if err != nil {
		return fmt.Errorf("initramfs: create %s: %w", dst, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := a.WriteTo(tmp); err != nil {
		tmp.Close()
		return fmt.Errorf("initramfs: write %s: %w", dst, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("initramfs: sync %s: %w", dst, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("initramfs: close %s: %w", dst, err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return fmt.Errorf("initramfs: rename to %s: %w", dst, err)
	}
	return nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
