package imaging

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

// readAll reads r to its end with reads of size n.
func readAll(r io.Reader, n int) ([]byte, error) {
	var got []byte
	buf := make([]byte, n)
	for {
		m, err := r.Read(buf)
		got = append(got, buf[:m]...)
		if err == io.EOF {
			return got, nil
		}
		if err != nil {
			return got, err
		}
	}
}

// TestFrameReader: the frame reader gives back exactly what the frame
// writer took, whatever the read sizes, and cuts the stream where the
// frames end.
func TestFrameReader(t *testing.T) {
	data := compressible(3*frameSize + 12345)
	archive := compressFrames(t, data, 2)
	for _, size := range []int{1, 4096, 1 << 20, 20 << 20} {
		fr, err := newFrameReader(bytes.NewReader(archive))
		if err != nil {
			t.Fatal(err)
		}
		got, err := readAll(fr, size)
		fr.Close()
		if err != nil || !bytes.Equal(got, data) {
			t.Errorf("reads of %d: got %d bytes, %v; want the %d written", size, len(got), err, len(data))
		}
	}
	// Loans: in place, and a frame is not reused while a loan is out.
	fr, err := newFrameReader(bytes.NewReader(archive))
	if err != nil {
		t.Fatal(err)
	}
	defer fr.Close()
	var got []byte
	var held []*decJob
	var copies [][]byte
	var loans [][]byte
	for {
		b, j, err := fr.lend(300_000)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, b...)
		held, loans, copies = append(held, j), append(loans, b), append(copies, bytes.Clone(b))
		if len(held) > 2 {
			if !bytes.Equal(loans[0], copies[0]) {
				t.Fatal("a frame was reused while content lent from it was out")
			}
			fr.release(held[0])
			held, loans, copies = held[1:], loans[1:], copies[1:]
		}
	}
	for _, j := range held {
		fr.release(j)
	}
	if !bytes.Equal(got, data) {
		t.Errorf("lent %d bytes, want the %d written", len(got), len(data))
	}
}

// TestFrameReaderStreams: streams not cut into frames of known size (a
// streaming compressor's, a frame too large to hold whole, or such a frame
// after small ones) and skippable frames decode too.
func TestFrameReaderStreams(t *testing.T) {
	small := compressible(300_000)
	big := make([]byte, maxParallelFrame+1)
	copy(big, small)
	stream := func(data []byte) []byte {
		var buf bytes.Buffer
		zw, _ := zstd.NewWriter(&buf, zstd.WithEncoderConcurrency(2))
		zw.Write(data)
		zw.Close()
		return buf.Bytes()
	}
	enc, _ := zstd.NewWriter(nil)
	defer enc.Close()
	whole := func(data []byte) []byte { return enc.EncodeAll(data, nil) }
	zenc, _ := zstd.NewWriter(nil, zstd.WithZeroFrames(true))
	emptyFrame := zenc.EncodeAll(nil, nil)
	zenc.Close()
	skippable := binary.LittleEndian.AppendUint32(nil, skippableMagic+3)
	skippable = binary.LittleEndian.AppendUint32(skippable, 5)
	skippable = append(skippable, "ESIR!"...)
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	for _, tc := range []struct {
		name       string
		compressed []byte
		want       []byte
	}{
		{"streaming compressor", stream(small), small},
		{"frame too large to hold", whole(big), big},
		{"frames then a stream", cat(whole(small), whole(small), stream(small)), cat(small, small, small)},
		{"skippable frames", cat(skippable, whole(small), skippable, whole(small), skippable), cat(small, small)},
		{"empty frame", cat(emptyFrame, whole(small), emptyFrame), small},
		{"empty input", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fr, err := newFrameReader(bytes.NewReader(tc.compressed))
			if err != nil {
				t.Fatal(err)
			}
			defer fr.Close()
			got, err := readAll(fr, 64<<10)
			if err != nil || !bytes.Equal(got, tc.want) {
				t.Errorf("got %d bytes, %v; want %d", len(got), err, len(tc.want))
			}
		})
	}
}

// TestFrameReaderDamage: truncation, flipped bytes and garbage end in an
// error naming the archive byte, never a hang or silent damage.
func TestFrameReaderDamage(t *testing.T) {
	data := compressible(frameSize + 500_000)
	good := compressFrames(t, data, 2)
	for _, tc := range []struct {
		name   string
		mangle func([]byte) []byte
	}{
		{"truncated in a frame", func(b []byte) []byte { return b[:len(b)/3] }},
		{"truncated in a header", func(b []byte) []byte { return b[:6] }},
		{"flipped content byte", func(b []byte) []byte { b[len(b)/4] ^= 0x10; return b }},
		{"flipped second frame", func(b []byte) []byte { b[len(b)-1000] ^= 0x01; return b }},
		{"flipped checksum", func(b []byte) []byte { b[len(b)-1] ^= 0x80; return b }},
		{"trailing garbage", func(b []byte) []byte { return append(b, "not zstd"...) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := tc.mangle(bytes.Clone(good))
			fr, err := newFrameReader(bytes.NewReader(bad))
			if err != nil {
				t.Fatal(err)
			}
			defer fr.Close()
			done := make(chan error, 1)
			go func() {
				got, err := readAll(fr, 1<<20)
				if err == nil && !bytes.Equal(got, data) {
					err = errors.New("silently damaged")
				}
				done <- err
			}()
			select {
			case err := <-done:
				if err == nil {
					t.Fatal("damage not detected")
				}
				if !strings.Contains(err.Error(), "archive byte") && !strings.Contains(err.Error(), "damaged") {
					t.Errorf("error %q does not say where", err)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("reader hangs on a damaged stream")
			}
		})
	}
}

// TestFrameReaderClose: a reader that stops early releases the goroutines,
// also when the stream went on in the streaming decoder.
func TestFrameReaderClose(t *testing.T) {
	data := compressible(3*frameSize + 1)
	archive := compressFrames(t, data, 2)
	var buf bytes.Buffer
	zw, _ := zstd.NewWriter(&buf)
	zw.Write(data)
	zw.Close()
	before := runtime.NumGoroutine()
	for _, in := range [][]byte{archive, buf.Bytes()} {
		for i := 0; i < 5; i++ {
			fr, err := newFrameReader(bytes.NewReader(in))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(fr, make([]byte, 100_000)); err != nil {
				t.Fatal(err)
			}
			fr.Close()
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Errorf("%d goroutines left running after Close (%d before)", n-before, before)
	}
}
