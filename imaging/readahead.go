package imaging

import (
	"errors"
	"io"
	"sync"
	"sync/atomic"
)

// readAhead runs a producer (a zstd decoder) in its own goroutine and hands
// its output over in large chunks, so decompression overlaps the file
// system work of the consumer with one goroutine handoff per chunk instead
// of several per 128 KiB zstd block. The consumer reads (a copy) or borrows
// the bytes in place (lend), so file contents go from the chunk straight
// to the file.
type readAhead struct {
	full  chan *chunk
	free  chan *chunk
	done  chan struct{}
	once  sync.Once
	cur   *chunk
	err   error
	ended chan struct{} // closed when the producer has returned
}

type chunk struct {
	buf []byte
	n   int
	off int
	err error // set on the last chunk: io.EOF or the producer's error
	// refs counts the reader's hold and the loans out of the chunk; the
	// chunk is filled again when it drops to zero.
	refs atomic.Int32
}

// newReadAhead starts fill in a goroutine; fill writes the whole stream to
// the writer it is given and returns the producer's error (nil at the end of
// the stream). chunks buffers of size bytes circulate between the two sides.
func newReadAhead(size, chunks int, fill func(w io.Writer) error) *readAhead {
	ra := &readAhead{
		full:  make(chan *chunk, chunks),
		free:  make(chan *chunk, chunks),
		done:  make(chan struct{}),
		ended: make(chan struct{}),
	}
	for i := 0; i < chunks; i++ {
		ra.free <- &chunk{buf: make([]byte, size)}
	}
	go ra.produce(fill)
	return ra
}

// stoppedError ends the producer when the consumer has stopped reading.
type stoppedError struct{}

func (stoppedError) Error() string { return "read-ahead stopped by its reader" }

// chunkWriter fills chunks from the free list and queues them when full.
type chunkWriter struct {
	ra  *readAhead
	cur *chunk
}

func (w *chunkWriter) take() bool {
	select {
	case w.cur = <-w.ra.free:
		w.cur.n, w.cur.off, w.cur.err = 0, 0, nil
		w.cur.refs.Store(1)
		return true
	case <-w.ra.done:
		return false
	}
}

func (w *chunkWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		if w.cur == nil && !w.take() {
			return written, stoppedError{}
		}
		m := copy(w.cur.buf[w.cur.n:], p)
		w.cur.n += m
		written += m
		p = p[m:]
		if w.cur.n == len(w.cur.buf) {
			if !w.send(w.cur) {
				return written, stoppedError{}
			}
			w.cur = nil
		}
	}
	return written, nil
}

func (w *chunkWriter) send(c *chunk) bool {
	select {
	case w.ra.full <- c:
		return true
	case <-w.ra.done:
		return false
	}
}

func (ra *readAhead) produce(fill func(w io.Writer) error) {
	defer close(ra.ended)
	w := &chunkWriter{ra: ra}
	err := fill(w)
	if errors.As(err, &stoppedError{}) {
		return
	}
	if err == nil {
		err = io.EOF
	}
	if w.cur == nil && !w.take() {
		return
	}
	w.cur.err = err
	w.send(w.cur)
}

// chunk returns the chunk being read, with bytes left or the stream's end.
func (ra *readAhead) chunk() (*chunk, error) {
	for {
		if ra.err != nil {
			return nil, ra.err
		}
		if ra.cur == nil {
			ra.cur = <-ra.full
		}
		c := ra.cur
		if c.off < c.n {
			return c, nil
		}
		if c.err != nil {
			ra.err = c.err
			continue
		}
		ra.cur = nil
		ra.release(c)
	}
}

// Read implements io.Reader.
func (ra *readAhead) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c, err := ra.chunk()
	if err != nil {
		return 0, err
	}
	m := copy(p, c.buf[c.off:c.n])
	c.off += m
	return m, nil
}

// lend returns up to n of the next bytes in place (fewer at a chunk's end)
// and the chunk holding them, which must be released when the caller is
// done with them: the chunk is not filled again until then.
func (ra *readAhead) lend(n int) ([]byte, *chunk, error) {
	c, err := ra.chunk()
	if err != nil {
		return nil, nil, err
	}
	b := c.buf[c.off:min(c.n, c.off+n)]
	c.off += len(b)
	c.refs.Add(1)
	return b, c, nil
}

// release ends a hold on a chunk; safe from any goroutine.
func (ra *readAhead) release(c *chunk) {
	if c.refs.Add(-1) == 0 {
		ra.free <- c
	}
}

// Close stops the producer without waiting for it: it may be blocked on a
// slow source, and it releases what it owns itself when it returns.
func (ra *readAhead) Close() {
	ra.once.Do(func() { close(ra.done) })
}
