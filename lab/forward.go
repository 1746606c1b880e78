package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// netnsDir is where `ip netns` keeps its named namespaces.
const netnsDir = "/run/netns"

// DialNS opens a TCP connection to addr from inside network namespace ns:
// the socket is created on an OS thread that has entered ns, so it belongs
// to ns while this process stays in its own namespace. The thread is never
// handed back to the Go scheduler (it ends with its goroutine).
func DialNS(ctx context.Context, ns, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread() // no Unlock: the thread dies with the goroutine
		f, err := os.Open(filepath.Join(netnsDir, ns))
		if err != nil {
			ch <- result{err: fmt.Errorf("network namespace %s: %w", ns, err)}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- result{err: fmt.Errorf("enter network namespace %s: %w", ns, err)}
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			err = fmt.Errorf("dial %s in namespace %s: %w", addr, ns, err)
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

// Forward accepts connections on ln (in this process's namespace, e.g. a
// loopback port of the host) and copies each, both ways, to target inside
// namespace ns. It returns when ctx ends, when ln fails, or when ns
// disappears (the lab was taken down), so a forwarder never outlives its lab.
func Forward(ctx context.Context, ln net.Listener, ns, target string, log *slog.Logger) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		t := time.NewTicker(2 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				ln.Close()
				return
			case <-t.C:
				if _, err := os.Stat(filepath.Join(netnsDir, ns)); errors.Is(err, os.ErrNotExist) {
					log.Info("lab forwarder: namespace gone, stopping", "netns", ns)
					cancel()
				}
			}
		}
	}()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("lab forwarder: accept on %s: %w", ln.Addr(), err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
			up, err := DialNS(dctx, ns, target)
			dcancel()
			if err != nil {
				log.Warn("lab forwarder", "err", err)
				return
			}
			defer up.Close()
			stop := context.AfterFunc(ctx, func() { c.Close(); up.Close() })
			defer stop()
			done := make(chan struct{}, 2)
			pipe := func(dst, src net.Conn) {
				_, _ = io.Copy(dst, src)
				if tc, ok := dst.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
				done <- struct{}{}
			}
			go pipe(up, c)
			go pipe(c, up)
			<-done
			<-done
		}()
	}
}
