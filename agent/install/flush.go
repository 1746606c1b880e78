package install

import (
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// flusher writes the mounted root's dirty data back while the unpack still
// runs. Left to the kernel, writeback of a freshly unpacked tree starts
// only once the dirty threshold (a tenth of RAM) or the 30 s expiry is
// reached, so the whole image reaches the disk in the flush at the end,
// after the last archive byte; while streaming from the swarm the disk
// would idle, waiting on the network, and then do all its work at once.
// One syncfs at a time runs every interval in its own goroutine.
type flusher struct {
	fd    int
	once  sync.Once
	stop  chan struct{}
	done  chan struct{}
	mu    sync.Mutex
	err   error
	syncs int
}

// startFlusher starts flushing the filesystem mounted at mnt every interval.
func startFlusher(mnt string, every time.Duration) (*flusher, error) {
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s for writeback: %w", mnt, err)
	}
	f := &flusher{fd: fd, stop: make(chan struct{}), done: make(chan struct{})}
	go f.loop(mnt, every)
	return f, nil
}

func (f *flusher) loop(mnt string, every time.Duration) {
	defer close(f.done)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-f.stop:
			return
		case <-t.C:
		}
		err := unix.Syncfs(f.fd)
		f.mu.Lock()
		f.syncs++
		if err != nil && f.err == nil {
			f.err = fmt.Errorf("write back %s: %w", mnt, err)
		}
		f.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// Stop ends the flushing, waits for a syncfs in flight and returns the
// first writeback error and how many flushes ran. Calling it again
// returns the same.
func (f *flusher) Stop() (int, error) {
	f.once.Do(func() {
		close(f.stop)
		<-f.done
		unix.Close(f.fd)
	})
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.syncs, f.err
}
