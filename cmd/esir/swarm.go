package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/swarm"
	"github.com/esir-project/esir/swarm/havewire"
	"github.com/spf13/cobra"
)

func newSwarmCmd(app *cli.App) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "swarm",
		Short: "Distribute images peer-to-peer over BitTorrent",
		Example: `  esir swarm serve --store /var/lib/esir --listen :8080 --peer-listen :6881
  esir-agent fetch --server http://esir:8080 --image compute:1.0 --out /tmp/image.tar.zst`,
	}
	cmd.AddCommand(newSwarmServeCmd(app))
	return cmd
}

func newSwarmServeCmd(app *cli.App) *cobra.Command {
	var (
		storeDir, listen, peerListen, mode string
		maxConns, seedSlots                int
		seedInFlight, uploadRate           int64
		seeding                            string
		interval                           time.Duration
	)
	cmd := &cobra.Command{
		Use:   "serve --store DIR --listen ADDR",
		Short: "Seed every image in the store, with tracker, metainfo and web seed over HTTP",
		Long: `Serve is a standalone seeding server until the deployment server exists: it
seeds every image of the store over BitTorrent (archives opened read-only,
nothing written into the store), answers announces for those images only on
/swarm/announce, hands out each image's metainfo with tracker and web seed on
/swarm/images/NAME:VERSION/torrent, tells ESIR nodes on .../source which node
already has an image's info dictionary (the server sends it to a few only),
serves the archives as BEP 19 web seeds
and reports HAVE counters on /swarm/stats and /swarm/metrics.`,
		Example: `  esir swarm serve --store /var/lib/esir --listen :8080
  esir swarm serve --store ./store --listen 198.18.0.1:8080 --peer-listen 198.18.0.1:6881 --have-mode off`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			m, err := havewire.ParseMode(mode)
			if err != nil {
				return err
			}
			st, err := imaging.OpenStore(storeDir)
			if err != nil {
				return err
			}
			if uploadRate < 0 {
				return fmt.Errorf("swarm serve: --upload-rate %d: want bytes per second, 0 for unlimited", uploadRate)
			}
			var seed *havewire.SeedConfig
			switch seeding {
			case "initial":
				seed = &havewire.SeedConfig{Slots: seedSlots, InFlightBytes: seedInFlight << 10}
			case "full":
			default:
				return fmt.Errorf("swarm serve: --seeding %q: want initial or full", seeding)
			}
			srv, err := swarm.NewServer(swarm.ServerConfig{
				Node:     swarm.NodeConfig{Listen: peerListen, Mode: m, MaxConns: maxConns, Seed: seed, UploadRate: uploadRate, Log: app.Log},
				FullSeed: seed == nil,
				Log:      app.Log,
			})
			if err != nil {
				return err
			}
			defer srv.Close()
			n, err := srv.PublishStore(st)
			if err != nil {
				return err
			}
			if n == 0 {
				app.Log.Warn("swarm: the store holds no image yet", "store", storeDir)
			}
			srv.Tracker().SetInterval(interval)
			ln, err := net.Listen("tcp", listen)
			if err != nil {
				return fmt.Errorf("swarm serve: HTTP listen on %s: %w", listen, err)
			}
			hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 10 * time.Second}
			app.Log.Info("swarm: serving", "http", ln.Addr().String(), "peers", srv.Node().Addr().String(), "images", n,
				"have_mode", m.String())
			errc := make(chan error, 1)
			go func() { errc <- hs.Serve(ln) }()
			select {
			case <-ctx.Done():
			case err := <-errc:
				return fmt.Errorf("swarm serve: %w", err)
			}
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := hs.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&storeDir, "store", defaultStore, "image store directory")
	cmd.Flags().StringVar(&listen, "listen", ":8080", "HTTP address (tracker, metainfo, web seed)")
	cmd.Flags().StringVar(&peerListen, "peer-listen", ":6881", "BitTorrent peer address")
	cmd.Flags().StringVar(&mode, "have-mode", "adaptive", "HAVE suppression: off, redundant or adaptive")
	cmd.Flags().IntVar(&maxConns, "max-conns", 0, "peer connections per image (0: default)")
	cmd.Flags().Int64Var(&uploadRate, "upload-rate", 0, "cap on the seeder's upload to all peers together, bytes per second (0: unlimited)")
	cmd.Flags().DurationVar(&interval, "announce-interval", 10*time.Second, "announce interval handed to peers")
	cmd.Flags().StringVar(&seeding, "seeding", "initial", "initial (reveal pieces a few peers at a time, BEP 16 style) or full (advertise every piece)")
	cmd.Flags().IntVar(&seedSlots, "seed-slots", 0, "initial seeding: peers served at once (0: default 4)")
	cmd.Flags().Int64Var(&seedInFlight, "seed-inflight", 0, "initial seeding: KiB of small pieces a peer may hold revealed and not passed on (0: default 1024)")
	return cmd
}
