package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// netnsDir is where `ip netns` keeps its named namespaces.
const netnsDir = "/run/netns"

// DialNS opens a TCP connection to addr from inside network namespace ns:
// the socket is created on an OS thread that has entered ns, so it belongs
// to ns while this process stays in its own namespace. The thread is never
// handed back to the Go scheduler (it ends with its goroutine).
func DialNS(ctx context.Context, ns, addr string) (net.Conn, error) {
	return dialNSFrom(ctx, ns, netip.Addr{}, addr)
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
