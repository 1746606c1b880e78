// Package server is ESIR's deployment server: one process that keeps the
// inventory and rollouts (SQLite), serves the administrator API and the
// agent protocol, seeds images and runs the tracker (swarm), answers network
// boots (pxe: iPXE scripts, and DHCP/TFTP when configured), and shuts all of
// it down together.
package server

import (
	"context"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/pxe"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/auth"
	"github.com/esir-project/esir/server/cluster"
	"github.com/esir-project/esir/server/rollout"
	"github.com/esir-project/esir/server/store"
	"github.com/esir-project/esir/swarm"
	"github.com/esir-project/esir/web"
	"github.com/labstack/echo/v4"
	"golang.org/x/sync/errgroup"
)

// metaSigningKey is the meta key holding the node token signing key (hex).
const metaSigningKey = "node_token_key"

// Server is a configured, not yet running, deployment server.
type Server struct {
	cfg    Config
	log    *slog.Logger
	db     *store.SQLite
	images *imaging.Store
	api    *api.API
	sched  *rollout.Scheduler
	echo   *echo.Echo
	swarm  *swarm.Server
	// cluster is the SSI cluster, when ClusterDefinition is set.
	cluster *cluster.Service
	ln      net.Listener
	// debugLn serves the profiler when DebugListen is set.
	debugLn net.Listener

	pubMu     sync.Mutex
	published map[string]bool
}

// New opens the database and image store, creates the signing key and, on
// the first start, the first admin token (written to stderr once, and to
// cfg.AdminTokenFile when set), and binds the HTTP listener so a busy port
// fails here, before anything runs.
func New(ctx context.Context, cfg Config, log *slog.Logger) (*Server, error) {
	if err := cfg.Finish(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("data_dir %s: %w", cfg.DataDir, err)
	}
	s := &Server{cfg: cfg, log: log, published: map[string]bool{}}
	ok := false
	defer func() {
		if !ok {
			s.close()
		}
	}()
	var err error
	if s.images, err = imaging.OpenStore(cfg.ImageStore); err != nil {
		return nil, fmt.Errorf("image_store: %w", err)
	}
	if s.db, err = store.OpenSQLite(ctx, cfg.Database); err != nil {
		return nil, err
	}
	signer, err := s.signer(ctx)
	if err != nil {
		return nil, err
	}
	if err := s.firstToken(ctx); err != nil {
		return nil, err
	}
	imgs := images{st: s.images, published: s.publish}
	s.sched = rollout.New(s.db, imgs, log, nil)
	s.sched.Interval = cfg.SchedulerTick
	authorized, err := cfg.AuthorizedKeys()
	if err != nil {
		return nil, err
	}
	s.api, err = api.New(s.db, s.sched, signer, imgs, api.Config{
		AuthorizedKeys:  authorized,
		PublicURL:       cfg.PublicURL,
		BootTokenTTL:    cfg.BootTokenTTL,
		EnrollTokenTTL:  cfg.EnrollTokenTTL,
		HostnamePattern: cfg.HostnamePattern,
		Discovery:       cfg.Discovery,
	}, log, nil)
	if err != nil {
		return nil, err
	}
	if cfg.ClusterDefinition != "" {
		if s.cluster, err = cluster.Open(cfg.ClusterDefinition, filepath.Join(cfg.DataDir, "ssi"),
			cluster.Options{LeaveTimeout: cfg.ClusterLeaveTimeout, Log: log}); err != nil {
			return nil, fmt.Errorf("cluster_definition: %w", err)
		}
		s.api.SetCluster(s.cluster)
	}
	s.echo = s.api.Echo(s.health)
	if cfg.SwarmListen != "" {
		up, _ := cfg.SwarmUploadBytes() // validated by Finish
		if s.swarm, err = swarm.NewServer(swarm.ServerConfig{Node: swarm.NodeConfig{Listen: cfg.SwarmListen, UploadRate: up}, Log: log}); err != nil {
			return nil, fmt.Errorf("swarm_listen %s: %w", cfg.SwarmListen, err)
		}
		s.echo.Any("/swarm/*", echo.WrapHandler(s.swarm.Handler()))
		s.publish()
	}
	if err := s.mountBoot(); err != nil {
		return nil, err
	}
	if _, err := web.Mount(ctx, s.echo, web.Options{API: s.api, Images: s.images, Seeder: s.swarm, DataDir: cfg.DataDir, Notice: os.Stderr, Log: log}); err != nil {
		return nil, err
	}
	if s.ln, err = net.Listen("tcp", cfg.Listen); err != nil {
		return nil, fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	if cfg.DebugListen != "" {
		if s.debugLn, err = net.Listen("tcp", cfg.DebugListen); err != nil {
			return nil, fmt.Errorf("debug_listen %s: %w", cfg.DebugListen, err)
		}
	}
	ok = true
	return s, nil
}

// Echo returns the HTTP application, so other parts (the web console) can
// mount their routes before Run.
func (s *Server) Echo() *echo.Echo { return s.echo }

// API returns the API (store, scheduler, live progress) for other parts.
func (s *Server) API() *api.API { return s.api }

// Addr returns the HTTP listener's address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Config returns the effective configuration.
func (s *Server) Config() Config { return s.cfg }

func (s *Server) signer(ctx context.Context) (*auth.Signer, error) {
	var key []byte
	err := s.db.Update(ctx, func(tx store.Tx) error {
		v, err := tx.Meta(metaSigningKey)
		if err != nil {
			return err
		}
		if v != "" {
			key, err = hex.DecodeString(v)
			return err
		}
		if key, err = auth.NewKey(); err != nil {
			return err
		}
		return tx.SetMeta(metaSigningKey, hex.EncodeToString(key))
	})
	if err != nil {
		return nil, fmt.Errorf("node token key: %w", err)
	}
	return auth.NewSigner(key)
}

// firstToken creates the first admin token when there is none.
func (s *Server) firstToken(ctx context.Context) error {
	var n int
	if err := s.db.View(ctx, func(tx store.Tx) error {
		ts, err := tx.Tokens()
		n = len(ts)
		return err
	}); err != nil {
		return err
	}
	if n > 0 {
		return nil
	}
	tok, err := api.CreateAdminToken(ctx, s.db, "initial", time.Now())
	if err != nil {
		return err
	}
	if s.cfg.AdminTokenFile != "" {
		if err := writeFile0600(s.cfg.AdminTokenFile, []byte(tok.Token+"\n")); err != nil {
			return fmt.Errorf("admin_token_file: %w", err)
		}
	}
	fmt.Fprintf(os.Stderr, "esir server: created the first admin token (shown only now): %s\n", tok.Token)
	s.log.Info("created the first admin token", "id", tok.ID, "file", s.cfg.AdminTokenFile)
	return nil
}

// writeFile0600 writes data atomically (temporary file + rename) with mode 0600.
func writeFile0600(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

func (s *Server) health(ctx context.Context) error {
	return s.db.View(ctx, func(tx store.Tx) error {
		_, err := tx.Meta(metaSigningKey)
		return err
	})
}

// publish seeds every file-mode image of the store not yet published.
func (s *Server) publish() {
	if s.swarm == nil {
		return
	}
	ms, err := s.images.List()
	if err != nil {
		s.log.Error("publish images: list store", "err", err)
		return
	}
	s.pubMu.Lock()
	defer s.pubMu.Unlock()
	for _, m := range ms {
		if m.Mode != imaging.ModeFile || s.published[m.Ref()] {
			continue
		}
		img, err := s.images.Get(m.Ref())
		if err != nil {
			s.log.Error("publish image", "image", m.Ref(), "err", err)
			continue
		}
		si, err := swarm.ImageFromTorrent(img.ArchivePath(), img.TorrentPath(), m.Name, m.Version, m.SHA256)
		if err != nil {
			s.log.Error("publish image", "image", m.Ref(), "err", err)
			continue
		}
		if err := s.swarm.Publish(si); err != nil {
			s.log.Error("publish image", "image", m.Ref(), "err", err)
			continue
		}
		s.published[m.Ref()] = true
	}
}

// Run serves until ctx ends, then shuts everything down gracefully: the
// HTTP server stops accepting and drains requests for up to
// ShutdownTimeout, the scheduler and boot servers stop, the database closes.
func (s *Server) Run(ctx context.Context) error {
	defer s.close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, gctx := errgroup.WithContext(ctx)
	hs := &http.Server{Handler: s.echo, ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)}
	g.Go(func() error {
		var err error
		if s.cfg.TLSCert != "" {
			hs.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
			err = hs.ServeTLS(s.ln, s.cfg.TLSCert, s.cfg.TLSKey)
		} else {
			err = hs.Serve(s.ln)
		}
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("http %s: %w", s.cfg.Listen, err)
	})
	g.Go(func() error {
		s.sched.Run(gctx)
		return nil
	})
	if s.debugLn != nil {
		ds := &http.Server{Handler: debugHandler(), ReadHeaderTimeout: 10 * time.Second}
		g.Go(func() error {
			if err := ds.Serve(s.debugLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("debug %s: %w", s.cfg.DebugListen, err)
			}
			return nil
		})
		g.Go(func() error {
			<-gctx.Done()
			return ds.Close()
		})
	}
	if s.swarm != nil {
		g.Go(func() error { every(gctx, 10*time.Second, s.publish); return nil })
	}
	if s.cluster != nil {
		g.Go(func() error { every(gctx, 2*time.Second, s.cluster.Tick); return nil })
	}
	if err := s.startBoot(gctx, g); err != nil {
		cancel()
		g.Wait()
		return err
	}
	g.Go(func() error {
		<-gctx.Done()
		s.api.Stop() // ends the long polls, which Shutdown would wait for
		sctx, scancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
		defer scancel()
		if err := hs.Shutdown(sctx); err != nil {
			return fmt.Errorf("http shutdown: %w", err)
		}
		return nil
	})
	s.log.Info("esir server running", "listen", s.ln.Addr().String(), "public_url", s.cfg.PublicURL, "database", s.cfg.Database)
	err := g.Wait()
	s.log.Info("esir server stopped")
	return err
}

func (s *Server) close() {
	if s.swarm != nil {
		s.swarm.Close()
	}
	if s.ln != nil {
		s.ln.Close()
	}
	if s.debugLn != nil {
		s.debugLn.Close()
	}
	if s.db != nil {
		s.db.Close()
	}
}

var _ pxe.Policy = (*policy)(nil)

// debugHandler serves Go's profiler under /debug/pprof/ (CPU, heap,
// goroutines, and the mutex and block profiles when their rates are set).
func debugHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// every calls fn every d until ctx ends.
func every(ctx context.Context, d time.Duration, fn func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}
