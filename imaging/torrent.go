package imaging

import (
	"bytes"
	"context"
	"crypto/sha1"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/anacrolix/torrent/bencode"
	"github.com/anacrolix/torrent/metainfo"
)

// PieceLength chooses a BitTorrent piece size for an archive of size bytes
// on a LAN: up to about 2,000 pieces, a power of two between 32 KiB and
// 16 MiB. Larger pieces mean fewer HAVE messages and requests; but a node
// passes a piece on only once it has all of it, so a small image needs small
// pieces for the swarm to pipeline (12 MiB in 1 MiB pieces took 1.77 x F/B
// to 8 nodes, in 64 KiB pieces 1.39 x; to 32 nodes at 5 Mbit/s, 32 KiB
// pieces took 1.37 x where 64 KiB took 1.48 x, and 16 KiB no better than
// 32 KiB for more CPU); the cap keeps the first piece (and a corrupt piece's
// re-fetch) short.
func PieceLength(size int64) int64 {
	const lo, hi = 32 << 10, 16 << 20
	pl := int64(lo)
	for pl < hi && size/pl > 2048 {
		pl *= 2
	}
	return pl
}

// makeTorrent hashes the archive's pieces on all cores and returns the
// metainfo (private, no announce URL: whoever serves it fills in its own
// tracker and web seed) and its info hash.
func makeTorrent(ctx context.Context, archive, torrentName string, created time.Time, pieceLength int64) (*metainfo.MetaInfo, metainfo.Hash, error) {
	f, err := os.Open(archive)
	if err != nil {
		return nil, metainfo.Hash{}, fmt.Errorf("torrent: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, metainfo.Hash{}, fmt.Errorf("torrent: %w", err)
	}
	pl := pieceLength
	if pl <= 0 {
		pl = PieceLength(fi.Size())
	}
	pieces, err := pieceHashes(ctx, f, fi.Size(), pl)
	if err != nil {
		return nil, metainfo.Hash{}, fmt.Errorf("torrent: hash pieces of %s: %w", archive, err)
	}
	private := true
	info := metainfo.Info{
		Name:        torrentName,
		Length:      fi.Size(),
		PieceLength: pl,
		Pieces:      pieces,
		Private:     &private,
	}
	ib, err := bencode.Marshal(info)
	if err != nil {
		return nil, metainfo.Hash{}, fmt.Errorf("torrent: encode info: %w", err)
	}
	mi := &metainfo.MetaInfo{InfoBytes: ib, CreatedBy: "esir", CreationDate: created.Unix()}
	return mi, mi.HashInfoBytes(), nil
}

// pieceHashes returns the concatenated SHA-1 digests of r's pieces.
func pieceHashes(ctx context.Context, r io.ReaderAt, size, pieceLen int64) ([]byte, error) {
	n := int((size + pieceLen - 1) / pieceLen)
	out := make([]byte, n*sha1.Size)
	next := make(chan int)
	errs := make(chan error, 1)
	var wg sync.WaitGroup
	for w := 0; w < runtime.GOMAXPROCS(0); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, pieceLen)
			for i := range next {
				off := int64(i) * pieceLen
				b := buf[:min(pieceLen, size-off)]
				if _, err := r.ReadAt(b, off); err != nil {
					select {
					case errs <- fmt.Errorf("piece %d: %w", i, err):
					default:
					}
					continue
				}
				sum := sha1.Sum(b)
				copy(out[i*sha1.Size:], sum[:])
			}
		}()
	}
	var err error
feed:
	for i := 0; i < n; i++ {
		select {
		case next <- i:
		case err = <-errs:
			break feed
		case <-ctx.Done():
			err = ctx.Err()
			break feed
		}
	}
	close(next)
	wg.Wait()
	if err != nil {
		return nil, err
	}
	select {
	case err := <-errs:
		return nil, err
	default:
	}
	return out, nil
}

// checkTorrent verifies that a stored metainfo describes the archive: its
// info hash is the manifest's, its length matches, and every piece hash
// matches the archive's bytes.
func checkTorrent(ctx context.Context, torrentPath, archivePath, wantInfoHash string) error {
	mi, err := metainfo.LoadFromFile(torrentPath)
	if err != nil {
		return fmt.Errorf("load %s: %w", torrentPath, err)
	}
	if got := mi.HashInfoBytes().HexString(); got != wantInfoHash {
		return fmt.Errorf("%s: info hash %s, manifest says %s", torrentPath, got, wantInfoHash)
	}
	info, err := mi.UnmarshalInfo()
	if err != nil {
		return fmt.Errorf("%s: decode info: %w", torrentPath, err)
	}
	if info.Private == nil || !*info.Private {
		return fmt.Errorf("%s: private flag not set", torrentPath)
	}
	f, err := os.Open(archivePath)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if fi.Size() != info.Length {
		return fmt.Errorf("%s: torrent length %d, archive %s has %d bytes", torrentPath, info.Length, archivePath, fi.Size())
	}
	pieces, err := pieceHashes(ctx, f, fi.Size(), info.PieceLength)
	if err != nil {
		return fmt.Errorf("hash pieces of %s: %w", archivePath, err)
	}
	if !bytes.Equal(pieces, info.Pieces) {
		for i := 0; i+sha1.Size <= len(pieces) && i+sha1.Size <= len(info.Pieces); i += sha1.Size {
			if !bytes.Equal(pieces[i:i+sha1.Size], info.Pieces[i:i+sha1.Size]) {
				return fmt.Errorf("%s: piece %d does not match the torrent's hash", archivePath, i/sha1.Size)
			}
		}
		return fmt.Errorf("%s: piece count differs from the torrent", archivePath)
	}
	return nil
}
