package install

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/diskfs/go-diskfs"
	fsdisk "github.com/diskfs/go-diskfs/disk"
	"github.com/diskfs/go-diskfs/filesystem"
	"github.com/diskfs/go-diskfs/partition/gpt"
)

func TestFlusher(t *testing.T) {
	tests := []struct {
		name    string
		dir     func(t *testing.T) string
		runs    int // flushes to wait for before stopping
		wantErr string
	}{
		{name: "flushes while running", dir: func(t *testing.T) string { return t.TempDir() }, runs: 2},
		{name: "stopped at once", dir: func(t *testing.T) string { return t.TempDir() }, runs: 0},
		{name: "missing mount point", dir: func(t *testing.T) string { return filepath.Join(t.TempDir(), "gone") }, wantErr: "gone"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := tt.dir(t)
			f, err := startFlusher(dir, 50*time.Millisecond)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("startFlusher(%s) = %v, want an error naming %q", dir, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "data"), make([]byte, 1<<20), 0o644); err != nil {
				t.Fatal(err)
			}
			// A syncfs of a busy host filesystem can take long: wait for
			// the flushes by count, not by time.
			for deadline := time.Now().Add(time.Minute); ; time.Sleep(10 * time.Millisecond) {
				f.mu.Lock()
				n := f.syncs
				f.mu.Unlock()
				if n >= tt.runs {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%d flushes after a minute at one per 50 ms, want %d", n, tt.runs)
				}
			}
			n, err := f.Stop()
			if err != nil {
				t.Fatalf("Stop: %v", err)
			}
			if n < tt.runs {
				t.Errorf("Stop counted %d flushes, want at least %d", n, tt.runs)
			}
			if n2, err2 := f.Stop(); n2 != n || err2 != nil {
				t.Errorf("second Stop = %d, %v; want %d, nil", n2, err2, n)
			}
		})
	}
}

// TestFlusherFinish: Finish asks for one more flush at once, even with the
// next tick far away, and the flushing ends after it.
func TestFlusherFinish(t *testing.T) {
	dir := t.TempDir()
	f, err := startFlusher(dir, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "data"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if n := f.Finish(); n != 0 {
		t.Errorf("Finish counted %d flushes before the first tick, want 0", n)
	}
	select {
	case <-f.done:
	case <-time.After(time.Minute):
		t.Fatal("no flush a minute after Finish")
	}
	if n, err := f.Stop(); n != 1 || err != nil {
		t.Errorf("Stop after Finish = %d, %v; want 1, nil", n, err)
	}
}

// TestWriteFAT writes files onto a FAT32 made by go-diskfs in one Write
// each and reads them back.
func TestWriteFAT(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "esp.img")
	d, err := diskfs.Create(img, 80<<20, diskfs.SectorSizeDefault)
	if err != nil {
		t.Fatal(err)
	}
	tbl := &gpt.Table{LogicalSectorSize: 512, PhysicalSectorSize: 512, ProtectiveMBR: true,
		Partitions: []*gpt.Partition{{Index: 1, Start: 2048, End: 2048 + 64<<11 - 1, Type: gpt.EFISystemPartition, Name: "ESP"}}}
	if err := d.Partition(tbl); err != nil {
		t.Fatal(err)
	}
	d.Close()
	// Through the installer's write-merging backend, as espPrepare does.
	b, err := openCoalescing(img)
	if err != nil {
		t.Fatal(err)
	}
	d, err = diskfs.OpenBackend(b, diskfs.WithOpenMode(diskfs.ReadWrite), diskfs.WithSectorSize(512))
	if err != nil {
		t.Fatal(err)
	}
	fs, err := d.CreateFilesystem(fsdisk.FilesystemSpec{Partition: 1, FSType: filesystem.TypeFat32, VolumeLabel: "ESP"})
	if err != nil {
		t.Fatal(err)
	}
	big := make([]byte, 5<<20+123) // a kernel-sized file, not a multiple of the cluster size
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range big {
		big[i] = byte(rng.Uint32())
	}
	src := filepath.Join(dir, "vmlinuz")
	if err := os.WriteFile(src, big, 0o644); err != nil {
		t.Fatal(err)
	}
	files := []fatFile{
		{name: "/loader/loader.conf", data: []byte("default esir.conf\n")},
		{name: "/esir/vmlinuz-6.1", src: src},
		{name: "/loader/entries/esir.conf", data: []byte("title ESIR\n")},
	}
	if err := writeFAT(fs, files); err != nil {
		t.Fatal(err)
	}
	if err := writeFAT(fs, []fatFile{{name: "/esir/missing", src: filepath.Join(dir, "missing")}}); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("writeFAT of a missing source = %v, want an error naming it", err)
	}
	for _, f := range files {
		want := f.data
		if f.src != "" {
			want = big
		}
		r, err := fs.OpenFile(f.name, os.O_RDONLY)
		if err != nil {
			t.Fatalf("open %s: %v", f.name, err)
		}
		var got bytes.Buffer
		if _, err := got.ReadFrom(r); err != nil {
			t.Fatalf("read %s: %v", f.name, err)
		}
		if !bytes.Equal(got.Bytes(), want) {
			t.Errorf("%s: read back %d bytes, wrote %d (equal prefix: %v)", f.name, got.Len(), len(want), bytes.HasPrefix(want, got.Bytes()))
		}
	}
	// What was merged reached the file: reopened without the backend,
	// the last file written reads back whole.
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d, err = diskfs.Open(img, diskfs.WithOpenMode(diskfs.ReadOnly))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	fs2, err := d.GetFilesystem(1)
	if err != nil {
		t.Fatal(err)
	}
	r, err := fs2.OpenFile("/esir/vmlinuz-6.1", os.O_RDONLY)
	if err != nil {
		t.Fatal(err)
	}
	var got bytes.Buffer
	if _, err := got.ReadFrom(r); err != nil || !bytes.Equal(got.Bytes(), big) {
		t.Errorf("reopened: /esir/vmlinuz-6.1 read back %d bytes (%v), want the %d written", got.Len(), err, len(big))
	}
}
