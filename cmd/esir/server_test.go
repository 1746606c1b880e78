package main

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/esir-project/esir/server"
)

const hupDef = `name: hup
profile: {corosync: true, chrony: true}
core_size: 1
time: {allow: 198.18.0.0/24}
`

// TestReloadOnHangup: each SIGHUP reloads the server's cluster definition;
// a changed file bumps the nodelist version, a broken one is logged and the
// running definition stays.
func TestReloadOnHangup(t *testing.T) {
	dir := t.TempDir()
	def := filepath.Join(dir, "cluster.yaml")
	if err := os.WriteFile(def, []byte(hupDef), 0o644); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	listen := ln.Addr().String()
	ln.Close()
	cfg := server.DefaultConfig()
	cfg.Listen, cfg.DataDir, cfg.ImageStore, cfg.SwarmListen = listen, filepath.Join(dir, "data"), filepath.Join(dir, "store"), ""
	cfg.ClusterDefinition = def
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv, err := server.New(ctx, cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	ran := make(chan error, 1)
	go func() { ran <- srv.Run(ctx) }()
	hup := make(chan os.Signal, 1)
	done := make(chan struct{})
	go func() { reloadOnHangup(ctx, hup, srv, log); close(done) }()
	defer func() { cancel(); <-done; <-ran }()
	c := srv.API().Cluster()
	v := c.Snapshot().Version

	waitLog := func(want string) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if strings.Contains(logs.String(), want) {
				return
			}
		}
		t.Fatalf("no %q in the log:\n%s", want, logs.String())
	}
	hup <- syscall.SIGHUP
	waitLog("cluster definition unchanged")
	if err := os.WriteFile(def, []byte(strings.Replace(hupDef, "198.18.0.0/24", "198.18.0.0/16", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	hup <- syscall.SIGHUP
	waitLog("definition reloaded")
	if got := c.Snapshot().Version; got != v+1 {
		t.Fatalf("nodelist version %d after the reload, want %d", got, v+1)
	}
	if err := os.WriteFile(def, []byte("name: hup\ncore_size: [\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	hup <- syscall.SIGHUP
	waitLog("cluster definition not reloaded")
	if got := c.Snapshot().Version; got != v+1 {
		t.Fatalf("nodelist version %d after a broken definition, want %d", got, v+1)
	}
}

// syncBuffer is a bytes.Buffer that a logger writes while the test reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
