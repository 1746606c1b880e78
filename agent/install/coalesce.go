package install

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sync"

	"github.com/diskfs/go-diskfs/backend"
	"github.com/diskfs/go-diskfs/backend/file"
	"golang.org/x/sys/unix"
)

// coalescing is a go-diskfs storage backend that merges adjacent writes.
// go-diskfs writes a FAT file one cluster per WriteAt, and an ESP of up
// to 260 MB has 512-byte clusters: the early-boot initramfs alone took
// some 40,000 pwrite calls, most of a second. Here contiguous writes
// collect in a buffer that goes out in one call when a write lands
// elsewhere, the buffer is full, or anything reads, seeks, syncs or closes.
type coalescing struct {
	backend.Storage
	f *os.File

	mu  sync.Mutex
	off int64  // disk offset of buf[0]
	buf []byte // pending bytes
	err error  // the first failed flush, returned from then on
}

// coalesceMax bounds the pending bytes.
const coalesceMax = 8 << 20

// openCoalescing opens path read-write as a coalescing backend.
func openCoalescing(path string) (*coalescing, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	return &coalescing{Storage: file.New(f, false), f: f}, nil
}

func (c *coalescing) Writable() (backend.WritableFile, error) { return c, nil }

// WriteAt buffers p when it continues the pending bytes.
func (c *coalescing) WriteAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return 0, c.err
	}
	if len(c.buf) > 0 && (off != c.off+int64(len(c.buf)) || len(c.buf)+len(p) > coalesceMax) {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
	}
	if len(p) >= coalesceMax {
		return c.f.WriteAt(p, off)
	}
	if len(c.buf) == 0 {
		c.off = off
	}
	if c.buf == nil {
		// Grown by append, the buffer would be copied a dozen times
		// on its way to its full size.
		c.buf = make([]byte, 0, coalesceMax)
	}
	c.buf = append(c.buf, p...)
	return len(p), nil
}

func (c *coalescing) flushLocked() error {
	if len(c.buf) == 0 {
		return c.err
	}
	if _, err := c.f.WriteAt(c.buf, c.off); err != nil {
		c.err = fmt.Errorf("write %d bytes at offset %d of %s: %w", len(c.buf), c.off, c.f.Name(), err)
	}
	c.buf = c.buf[:0]
	return c.err
}

func (c *coalescing) flush() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.flushLocked()
}

func (c *coalescing) ReadAt(p []byte, off int64) (int, error) {
	if err := c.flush(); err != nil {
		return 0, err
	}
	return c.f.ReadAt(p, off)
}

func (c *coalescing) Read(p []byte) (int, error) {
	if err := c.flush(); err != nil {
		return 0, err
	}
	return c.f.Read(p)
}

func (c *coalescing) Seek(offset int64, whence int) (int64, error) {
	if err := c.flush(); err != nil {
		return 0, err
	}
	return c.f.Seek(offset, whence)
}

func (c *coalescing) Stat() (fs.FileInfo, error) { return c.f.Stat() }

func (c *coalescing) Sys() (*os.File, error) {
	if err := c.flush(); err != nil {
		return nil, err
	}
	return c.f, nil
}

// startWriteback writes the pending bytes and starts writing the range
// [off, off+n) of the disk back without waiting for it (a later fsync of
// the disk does).
func (c *coalescing) startWriteback(off, n int64) error {
	if err := c.flush(); err != nil {
		return err
	}
	if err := unix.SyncFileRange(int(c.f.Fd()), off, n, unix.SYNC_FILE_RANGE_WRITE); err != nil {
		return fmt.Errorf("write back %s: %w", c.f.Name(), err)
	}
	return nil
}

// Sync writes the pending bytes and flushes the device.
func (c *coalescing) Sync() error {
	if err := c.flush(); err != nil {
		return err
	}
	return c.f.Sync()
}

func (c *coalescing) Close() error {
	return errors.Join(c.flush(), c.f.Close())
}
