package imaging

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// buildPartition makes a raw ext4 image of the tree (partition mode, kept to
// compare sizes with file mode): the tree goes through the same archive
// writer (so exclusions and the emptied machine-id apply) and extractor into
// a staging directory, which e2fsprogs' mkfs.ext4 -d copies into a new
// filesystem.
func buildPartition(ctx context.Context, work, src string, opts BuildOptions) (*Manifest, error) {
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		return nil, fmt.Errorf("partition mode needs mkfs.ext4 (Debian package e2fsprogs): %w", err)
	}
	stage := filepath.Join(work, "stage")
	if err := os.Mkdir(stage, 0o755); err != nil {
		return nil, fmt.Errorf("staging directory: %w", err)
	}
	pr, pw := io.Pipe()
	type result struct {
		st  ArchiveStats
		err error
	}
	done := make(chan result, 1)
	go func() {
		st, err := WriteArchive(ctx, pw, src, opts.ArchiveOptions)
		pw.CloseWithError(err)
		done <- result{st, err}
	}()
	_, xerr := Extract(ctx, pr, stage, ExtractOptions{})
	pr.CloseWithError(fmt.Errorf("extraction stopped"))
	res := <-done
	if res.err != nil {
		return nil, res.err
	}
	if xerr != nil {
		return nil, fmt.Errorf("stage tree: %w", xerr)
	}
	st := res.st

	img := filepath.Join(work, PartitionFile)
	// Room for the data rounded to blocks, an inode and a block per entry,
	// and the journal; grow and retry when mkfs runs out of space.
	size := st.ContentSize + st.ContentSize/8 + st.Entries*(4096+256) + 64<<20
	inodes := st.Entries + st.Entries/4 + 1024
	for attempt := 0; ; attempt++ {
		size = (size + 1<<20 - 1) &^ (1<<20 - 1)
		os.Remove(img)
		f, err := os.OpenFile(img, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return nil, fmt.Errorf("create %s: %w", img, err)
		}
		terr := f.Truncate(size)
		f.Close()
		if terr != nil {
			return nil, fmt.Errorf("size %s: %w", img, terr)
		}
		cmd := exec.CommandContext(ctx, mkfs, "-q", "-F", "-t", "ext4", "-d", stage,
			"-N", strconv.FormatInt(inodes, 10), "-L", label(opts.Name), img)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err = cmd.Run()
		if err == nil {
			break
		}
		msg := strings.TrimSpace(out.String())
		if attempt < 3 && (strings.Contains(msg, "No space left") || strings.Contains(msg, "Could not allocate")) {
			size += size / 2
			continue
		}
		return nil, fmt.Errorf("mkfs.ext4 -d %s %s: %w: %s", stage, img, err, msg)
	}
	if err := os.RemoveAll(stage); err != nil {
		return nil, fmt.Errorf("remove staging directory: %w", err)
	}
	f, err := os.Open(img)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return nil, fmt.Errorf("sync %s: %w", img, err)
	}
	h := sha256.New()
	n, err := io.CopyBuffer(h, readerCtx{ctx, f}, make([]byte, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("hash %s: %w", img, err)
	}
	var fst unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &fst); err != nil {
		return nil, fmt.Errorf("stat %s: %w", img, err)
	}
	m := newManifest(opts, st, ModePartition, PartitionFile)
	m.SHA256 = hex.EncodeToString(h.Sum(nil))
	m.CompressedSize = n
	m.AllocatedSize = fst.Blocks * 512
	if err := finishImage(ctx, work, m); err != nil {
		return nil, err
	}
	return m, nil
}

// label makes an ext4 volume label (at most 16 bytes) from an image name.
func label(name string) string {
	if len(name) > 16 {
		return name[:16]
	}
	return name
}
