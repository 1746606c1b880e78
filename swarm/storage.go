package swarm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"

	"github.com/anacrolix/torrent/metainfo"
	"github.com/anacrolix/torrent/storage"
)

// fileStorage keeps one single-file torrent in one file, with piece
// completion in memory: nothing else is written anywhere. A read-only
// storage (the server's, over an image store's archive) refuses writes and
// reports every piece complete.
type fileStorage struct {
	f        *os.File
	path     string
	readOnly bool
	// completed, when set, hears of every piece that passed its hash check.
	completed func(infoHash [20]byte, piece uint32)

	mu       sync.Mutex
	complete []bool
	infoHash [20]byte
	err      error // first write error (a full disk)
}

// openSeedStorage opens the archive at path read-only.
func openSeedStorage(path string) (*fileStorage, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	return &fileStorage{f: f, path: path, readOnly: true}, nil
}

// createFetchStorage creates (or truncates) path and reserves size bytes, so
// a full disk shows up before the download starts.
func createFetchStorage(path string, size int64) (*fileStorage, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	if size > 0 {
		if err := syscall.Fallocate(int(f.Fd()), 0, 0, size); err != nil {
			if !errors.Is(err, syscall.EOPNOTSUPP) {
				f.Close()
				os.Remove(path)
				return nil, fmt.Errorf("reserving %d bytes for %s: %w", size, path, err)
			}
			if err := f.Truncate(size); err != nil {
				f.Close()
				os.Remove(path)
				return nil, fmt.Errorf("sizing %s to %d bytes: %w", path, size, err)
			}
		}
	}
	return &fileStorage{f: f, path: path}, nil
}

// Err returns the first write error.
func (s *fileStorage) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Close closes the file.
func (s *fileStorage) Close() error { return s.f.Close() }

// OpenTorrent implements storage.ClientImpl.
func (s *fileStorage) OpenTorrent(_ context.Context, info *metainfo.Info, ih metainfo.Hash) (storage.TorrentImpl, error) {
	if info.IsDir() {
		return storage.TorrentImpl{}, fmt.Errorf("%s: multi-file torrents are not images", s.path)
	}
	s.mu.Lock()
	s.complete = make([]bool, info.NumPieces())
	s.infoHash = ih
	if s.readOnly {
		for i := range s.complete {
			s.complete[i] = true
		}
	}
	s.mu.Unlock()
	return storage.TorrentImpl{
		Piece: func(p metainfo.Piece) storage.PieceImpl { return &filePiece{s: s, p: p} },
		Close: func() error { return nil },
	}, nil
}

type filePiece struct {
	s *fileStorage
	p metainfo.Piece
}

func (fp *filePiece) ReadAt(b []byte, off int64) (int, error) {
	return fp.s.f.ReadAt(b, fp.p.Offset()+off)
}

func (fp *filePiece) WriteAt(b []byte, off int64) (int, error) {
	if fp.s.readOnly {
		return 0, fmt.Errorf("%s: read-only seed storage", fp.s.path)
	}
	n, err := fp.s.f.WriteAt(b, fp.p.Offset()+off)
	if err != nil {
		fp.s.mu.Lock()
		if fp.s.err == nil {
			fp.s.err = fmt.Errorf("writing %s: %w", fp.s.path, err)
		}
		fp.s.mu.Unlock()
	}
	return n, err
}

func (fp *filePiece) MarkComplete() error {
	fp.s.mu.Lock()
	was := fp.s.complete[fp.p.Index()]
	fp.s.complete[fp.p.Index()] = true
	ih, done := fp.s.infoHash, fp.s.completed
	fp.s.mu.Unlock()
	if !was && done != nil {
		done(ih, uint32(fp.p.Index()))
	}
	return nil
}

func (fp *filePiece) MarkNotComplete() error {
	fp.s.mu.Lock()
	defer fp.s.mu.Unlock()
	fp.s.complete[fp.p.Index()] = false
	return nil
}

func (fp *filePiece) Completion() storage.Completion {
	fp.s.mu.Lock()
	defer fp.s.mu.Unlock()
	return storage.Completion{Ok: true, Complete: fp.s.complete[fp.p.Index()]}
}

// noStorage is the client's default storage: every image brings its own, so
// the library never creates a default one (which would write a piece
// completion database into a directory of its choosing).
type noStorage struct{}

func (noStorage) OpenTorrent(context.Context, *metainfo.Info, metainfo.Hash) (storage.TorrentImpl, error) {
	return storage.TorrentImpl{}, errors.New("swarm: torrent added without its own storage")
}
