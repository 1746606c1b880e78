package imaging

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"runtime"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// compressible returns n bytes that compress about 3:1, so the frames mix
// compressed and raw blocks.
func compressible(n int) []byte {
	out := make([]byte, 0, n)
	block := make([]byte, 4096)
	rng := mrand.New(mrand.NewPCG(7, 9))
	for len(out) < n {
		rand.Read(block)
		for r := 0; r < 3 && len(out) < n; r++ {
			block[rng.IntN(len(block))] ^= 0xff
			out = append(out, block[:min(len(block), n-len(out))]...)
		}
	}
	return out
}

// compressFrames compresses data with the archive's frame writer on procs
// cores, filling it both ways: Write, and space/advance.
func compressFrames(t *testing.T, data []byte, procs int) []byte {
	t.Helper()
	old := runtime.GOMAXPROCS(procs)
	defer runtime.GOMAXPROCS(old)
	var buf bytes.Buffer
	fw, err := newFrameWriter(&buf, 3)
	if err != nil {
		t.Fatal(err)
	}
	for off, i := 0, 0; off < len(data); i++ {
		if i%2 == 0 {
			n := min(len(data)-off, 100_003)
			if _, err := fw.Write(data[off : off+n]); err != nil {
				t.Fatal(err)
			}
			off += n
			continue
		}
		s, err := fw.space()
		if err != nil {
			t.Fatal(err)
		}
		n := copy(s[:min(len(s), 77_777)], data[off:])
		fw.advance(n)
		off += n
	}
	if err := fw.Close(); err != nil {
		t.Fatal(err)
	}
	if fw.n != int64(len(data)) {
		t.Errorf("frame writer counted %d bytes, wrote %d", fw.n, len(data))
	}
	return buf.Bytes()
}

// TestFrameWriter: the output does not depend on the number of cores, is
// one zstd frame (with its content size and checksum) per frameLimit
// bytes, and any zstd decoder reads it back as one stream.
func TestFrameWriter(t *testing.T) {
	var want []uint64
	total := 0
	for k := 0; k < 5; k++ {
		want = append(want, uint64(frameLimit(k)))
		total += frameLimit(k)
	}
	want = append(want, 12345)
	data := compressible(total + 12345)
	one := compressFrames(t, data, 1)
	four := compressFrames(t, data, 4)
	if !bytes.Equal(one, four) {
		t.Fatalf("1 and 4 cores give different archives (%d and %d bytes)", len(one), len(four))
	}
	dec, _ := zstd.NewReader(nil)
	defer dec.Close()
	if got, err := dec.DecodeAll(one, nil); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("decoder reads %d bytes, %v; want the %d written", len(got), err, len(data))
	}
	var sizes []uint64
	for rest := one; len(rest) > 0; {
		var h zstd.Header
		if err := h.Decode(rest); err != nil {
			t.Fatal(err)
		}
		if !h.HasFCS || !h.HasCheckSum {
			t.Fatalf("frame %d: content size stated %v, checksum %v", len(sizes), h.HasFCS, h.HasCheckSum)
		}
		sizes = append(sizes, h.FrameContentSize)
		// The frame ends after its last block (3-byte headers: last
		// flag, type, size) and its checksum.
		end := h.HeaderSize
		for {
			v := uint32(rest[end]) | uint32(rest[end+1])<<8 | uint32(rest[end+2])<<16
			size := int(v >> 3)
			if (v>>1)&3 == 1 { // RLE
				size = 1
			}
			end += 3 + size
			if v&1 != 0 {
				break
			}
		}
		end += 4
		rest = rest[end:]
	}
	if fmt.Sprint(sizes) != fmt.Sprint(want) {
		t.Errorf("frames of %v bytes, want %v", sizes, want)
	}
	if want[3] != frameSize || want[4] != frameSize {
		t.Errorf("frames do not grow to %d bytes: %v", frameSize, want)
	}
}

// failWriter fails every write.
type failWriter struct{}

func (failWriter) Write(p []byte) (int, error) { return 0, errors.New("disk full") }

// TestFrameWriterError: an error writing the output comes back from a
// later write or from Close, and nothing blocks.
func TestFrameWriterError(t *testing.T) {
	fw, err := newFrameWriter(failWriter{}, 3)
	if err != nil {
		t.Fatal(err)
	}
	data := compressible(frameSize)
	var werr error
	for i := 0; i < 20 && werr == nil; i++ {
		_, werr = fw.Write(data)
	}
	cerr := fw.Close()
	if werr == nil && cerr == nil {
		t.Fatal("no error from a failing output")
	}
	if cerr == nil {
		t.Error("Close does not report the output's error")
	}
}
