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
	fd         int
	finishOnce sync.Once
	stopOnce   sync.Once
	once       sync.Once
	finish     chan struct{}
	stop       chan struct{}
	done       chan struct{}
	mu         sync.Mutex
	err        error
	syncs      int
}

// startFlusher starts flushing the filesystem mounted at mnt every interval.
func startFlusher(mnt string, every time.Duration) (*flusher, error) {
	fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s for writeback: %w", mnt, err)
	}
	f := &flusher{fd: fd, finish: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
	go f.loop(mnt, every)
	return f, nil
}

func (f *flusher) loop(mnt string, every time.Duration) {
	defer close(f.done)
	t := time.NewTicker(every)
	defer t.Stop()
	for last := false; !last; {
		select {
		case <-f.stop:
			return
		case <-f.finish:
			last = true
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

// Finish asks for one last flush at once (after the one in flight, if
// any), after which the flushing ends, and returns how many flushes have
// run; it does not wait for them. Stop does.
func (f *flusher) Finish() int {
	f.finishOnce.Do(func() { close(f.finish) })
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.syncs
}

// Stop ends the flushing (a last flush Finish asked for may be left out),
// waits for a syncfs in flight and returns the first writeback error and
// how many flushes ran. Calling it again returns the same.
func (f *flusher) Stop() (int, error) {
	f.stopOnce.Do(func() { close(f.stop) })
	f.once.Do(func() {
		<-f.done
		unix.Close(f.fd)
	})
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.syncs, f.err
}
