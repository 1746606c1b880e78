package imaging

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
)

// maxParallelFrame bounds the content of a zstd frame that the parallel
// decoder holds in memory whole; ESIR's frames hold at most frameSize
// bytes. A stream whose frame is larger or does not state its size (one
// frame made by a streaming compressor) is decoded by the streaming decoder
// from that frame on.
const maxParallelFrame = 64 << 20

// readSize is the most the frame cutter asks its source for at once.
const readSize = 1 << 20

const (
	zstdMagic          = 0xFD2FB528
	skippableMagicMask = 0xFFFFFFF0
	skippableMagic     = 0x184D2A50
)

// decJob is one frame: its compressed bytes and, once done is closed, its
// content or the error decoding it. A job with last set ends the frames:
// the stream goes on in rest, or ends with err when rest is nil.
type decJob struct {
	src  []byte
	out  []byte
	off  int // bytes of out already read
	at   int64
	err  error
	done chan struct{}
	last bool
	rest *readAhead
	// refs counts the reader's hold on the frame and the content lent
	// out of it; the frame's buffers are reused when it drops to zero.
	refs atomic.Int32
}

// frameReader decodes a zstd stream on all cores: one goroutine cuts the
// stream into frames, workers decode whole frames with DecodeAll, and Read
// hands the contents over in stream order; lend gives them out without a
// copy. It falls back to the streaming decoder, with read-ahead, at the
// first frame that is too large to hold whole or has no content size.
type frameReader struct {
	src     io.Reader
	carry   []byte // bytes read past the end of the last frame cut
	dec     *zstd.Decoder
	work    chan *decJob
	ordered chan *decJob
	slots   chan *decJob
	stop    chan struct{}
	once    sync.Once
	cur     *decJob
	rest    *readAhead
	restBuf []byte // lend's buffer in the streaming decoder's part
	err     error
	pos     int64 // stream bytes before the frame being cut
}

// newFrameReader starts decoding r.
func newFrameReader(r io.Reader) (*frameReader, error) {
	workers := runtime.GOMAXPROCS(0)
	dec, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(workers),
		zstd.WithDecoderMaxWindow(1<<30),
		zstd.WithDecoderMaxMemory(maxParallelFrame))
	if err != nil {
		return nil, fmt.Errorf("zstd decoder: %w", err)
	}
	// One frame being read, one decoding per worker, one being cut: about
	// 6 MiB each (a frame and its compressed form).
	jobs := workers + 2
	fr := &frameReader{
		src:     r,
		dec:     dec,
		work:    make(chan *decJob, jobs),
		ordered: make(chan *decJob, jobs+1),
		slots:   make(chan *decJob, jobs),
		stop:    make(chan struct{}),
	}
	for i := 0; i < jobs; i++ {
		fr.slots <- &decJob{}
	}
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go fr.decode(&wg)
	}
	go func() {
		wg.Wait()
		dec.Close()
	}()
	go fr.cut()
	return fr, nil
}

func (fr *frameReader) decode(wg *sync.WaitGroup) {
	defer wg.Done()
	for j := range fr.work {
		select {
		case <-fr.stop:
			continue // nobody reads it any more
		default:
		}
		j.out, j.err = fr.dec.DecodeAll(j.src, j.out[:0])
		if j.err != nil {
			j.err = fmt.Errorf("zstd frame at archive byte %d: %w", j.at, j.err)
		}
		close(j.done)
	}
}

// send queues j for the reader; false when the reader has stopped.
func (fr *frameReader) send(j *decJob) bool {
	select {
	case fr.ordered <- j:
		return true
	case <-fr.stop:
		return false
	}
}

// cut reads the stream frame by frame and queues the frames, then the end.
func (fr *frameReader) cut() {
	defer close(fr.work)
	for {
		var j *decJob
		select {
		case j = <-fr.slots:
		case <-fr.stop:
			return
		}
		j.src = append(j.src[:0], fr.carry...)
		j.out, j.off, j.err, j.last, j.rest = j.out[:0], 0, nil, false, nil
		j.done = make(chan struct{})
		j.refs.Store(1)
		j.at = fr.pos
		end, err := fr.readFrame(j)
		if err != nil || end < 0 {
			j.last = true
			if err != nil {
				j.err = err
			} else {
				// The streaming decoder takes over from this frame's
				// first byte, read or not.
				src := io.MultiReader(bytes.NewReader(j.src), fr.src)
				j.rest = newReadAhead(1<<20, 4, func(w io.Writer) error {
					d, err := zstd.NewReader(src,
						zstd.WithDecoderConcurrency(min(2, runtime.GOMAXPROCS(0))),
						zstd.WithDecoderMaxWindow(1<<30))
					if err != nil {
						return fmt.Errorf("zstd decoder: %w", err)
					}
					defer d.Close()
					_, err = d.WriteTo(w)
					return err
				})
			}
			close(j.done)
			if j.rest == nil {
				fr.send(j)
				return
			}
			if !fr.send(j) {
				j.rest.Close()
				return
			}
			// Close may have run after the send: it closes what it
			// finds queued, this closes what it did not find.
			select {
			case <-fr.stop:
				j.rest.Close()
			default:
			}
			return
		}
		fr.carry = append(fr.carry[:0], j.src[end:]...)
		j.src = j.src[:end]
		fr.pos += int64(end)
		if !fr.send(j) {
			return
		}
		fr.work <- j
	}
}

// fill reads until j.src holds at least n bytes. At the end of the stream
// it returns io.EOF when j.src is empty and n > 0, or io.ErrUnexpectedEOF.
func (fr *frameReader) fill(j *decJob, n int) error {
	if cap(j.src) < n {
		grown := make([]byte, len(j.src), max(n+readSize, 2*cap(j.src), 4<<20))
		copy(grown, j.src)
		j.src = grown
	}
	for len(j.src) < n {
		l := len(j.src)
		m, err := fr.src.Read(j.src[l:min(cap(j.src), max(n, l+readSize))])
		j.src = j.src[:l+m]
		if err != nil && len(j.src) < n {
			if errors.Is(err, io.EOF) {
				if len(j.src) == 0 {
					return io.EOF
				}
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("zstd stream at archive byte %d: %w", fr.pos+int64(len(j.src)), err)
		}
	}
	return nil
}

// readFrame reads the next frame into j.src (which starts with the bytes
// read past the previous frame), skipping skippable frames, and returns
// where the frame ends in j.src. It returns -1 when the frame is not one to
// decode whole, and io.EOF at the end of the stream.
func (fr *frameReader) readFrame(j *decJob) (int, error) {
	for {
		if err := fr.fill(j, 4); err != nil {
			return 0, err
		}
		magic := binary.LittleEndian.Uint32(j.src)
		if magic&skippableMagicMask != skippableMagic {
			if magic != zstdMagic {
				return 0, fmt.Errorf("zstd frame at archive byte %d: %w", fr.pos, zstd.ErrMagicMismatch)
			}
			break
		}
		if err := fr.fill(j, 8); err != nil {
			return 0, err
		}
		size := 8 + int64(binary.LittleEndian.Uint32(j.src[4:]))
		if size <= int64(len(j.src)) {
			j.src = j.src[:copy(j.src, j.src[size:])]
		} else {
			have := int64(len(j.src))
			j.src = j.src[:0]
			if n, err := io.CopyN(io.Discard, fr.src, size-have); err != nil {
				return 0, fmt.Errorf("zstd stream at archive byte %d: skippable frame: %w", fr.pos+have+n, io.ErrUnexpectedEOF)
			}
		}
		fr.pos += size
		j.at = fr.pos
	}
	if err := fr.fill(j, 5); err != nil {
		return 0, err
	}
	fhd := j.src[4]
	single := fhd&0x20 != 0
	hasCRC := fhd&0x04 != 0
	fcsLen := [4]int{0, 2, 4, 8}[fhd>>6]
	if fcsLen == 0 && single {
		fcsLen = 1
	}
	hlen := 5 + [4]int{0, 1, 2, 4}[fhd&3] + fcsLen
	if !single {
		hlen++
	}
	if fcsLen == 0 {
		return -1, nil // content size unknown
	}
	if err := fr.fill(j, hlen); err != nil {
		return 0, err
	}
	fcsb := j.src[hlen-fcsLen : hlen]
	var fcs uint64
	switch fcsLen {
	case 1:
		fcs = uint64(fcsb[0])
	case 2:
		fcs = uint64(binary.LittleEndian.Uint16(fcsb)) + 256
	case 4:
		fcs = uint64(binary.LittleEndian.Uint32(fcsb))
	case 8:
		fcs = binary.LittleEndian.Uint64(fcsb)
	}
	if fcs > maxParallelFrame {
		return -1, nil
	}
	// A frame is its header, blocks (3-byte header each, the last flagged)
	// and an optional checksum. Blocks never expand data by more than their
	// headers, so a frame much longer than its content is corrupt.
	limit := int(fcs) + int(fcs>>10) + 1<<16
	pos := hlen
	for {
		if err := fr.fill(j, pos+3); err != nil {
			return 0, err
		}
		b := j.src[pos:]
		v := uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16
		last := v&1 != 0
		size := int(v >> 3)
		switch (v >> 1) & 3 {
		case 1: // RLE: one byte repeated size times
			size = 1
		case 3:
			return 0, fmt.Errorf("zstd frame at archive byte %d: reserved block type at byte %d", j.at, fr.pos+int64(pos))
		}
		pos += 3 + size
		if pos > limit {
			return 0, fmt.Errorf("zstd frame at archive byte %d: longer than its content size allows (corrupt)", j.at)
		}
		if last {
			break
		}
	}
	if hasCRC {
		pos += 4
	}
	if err := fr.fill(j, pos); err != nil {
		return 0, err
	}
	return pos, nil
}

// frame returns the frame being read, waiting for it; nil in the
// streaming decoder's part or at the end.
func (fr *frameReader) frame() (*decJob, error) {
	for {
		if fr.err != nil {
			return nil, fr.err
		}
		if fr.rest != nil {
			return nil, nil
		}
		if fr.cur == nil {
			fr.cur = <-fr.ordered
			<-fr.cur.done
		}
		j := fr.cur
		if j.off < len(j.out) {
			return j, nil
		}
		if j.err != nil {
			fr.err = j.err
			continue
		}
		if j.last {
			fr.rest = j.rest
			continue
		}
		fr.cur = nil
		fr.release(j)
	}
}

// Read implements io.Reader.
func (fr *frameReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	j, err := fr.frame()
	if err != nil {
		return 0, err
	}
	if j == nil {
		n, err := fr.rest.Read(p)
		if err != nil {
			fr.err = err
		}
		return n, err
	}
	n := copy(p, j.out[j.off:])
	j.off += n
	return n, nil
}

// lend returns up to n of the next content bytes without copying them
// (less at a frame's end) and the frame they belong to, to be released
// when the caller is done with them: until then the frame's buffer is not
// reused. In the streaming decoder's part the bytes are a copy in a buffer
// the next lend reuses, and the frame nil.
func (fr *frameReader) lend(n int) ([]byte, *decJob, error) {
	j, err := fr.frame()
	if err != nil {
		return nil, nil, err
	}
	if j == nil {
		if cap(fr.restBuf) < n {
			fr.restBuf = make([]byte, n)
		}
		b := fr.restBuf[:n]
		m, err := io.ReadFull(fr.rest, b)
		if m > 0 {
			return b[:m], nil, nil
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			err = io.EOF
		}
		fr.err = err
		return nil, nil, err
	}
	b := j.out[j.off:min(len(j.out), j.off+n)]
	j.off += len(b)
	j.refs.Add(1)
	return b, j, nil
}

// release drops a hold on a frame; the last one returns its buffers for
// the next frame. It is safe to call from any goroutine, and with nil.
func (fr *frameReader) release(j *decJob) {
	if j != nil && j.refs.Add(-1) == 0 {
		fr.slots <- j
	}
}

// Close stops decoding without waiting for the goroutines: the cutter may
// be blocked on a slow source and returns when its read does; the workers
// return after it and close the decoder.
func (fr *frameReader) Close() {
	fr.once.Do(func() {
		close(fr.stop)
		if fr.rest != nil {
			fr.rest.Close()
		}
		for {
			select {
			case j := <-fr.ordered:
				if j.rest != nil {
					j.rest.Close()
				}
			default:
				return
			}
		}
	})
}
