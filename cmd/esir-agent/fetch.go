package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
	"sync"
	"time"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/progress"
	"github.com/esir-project/esir/swarm"
	"github.com/esir-project/esir/swarm/havewire"
	"github.com/spf13/cobra"
)

func newFetchCmd(app *cli.App) *cobra.Command {
	var (
		server, image, out, listen, mode, rack, progressMode, resultFile, cpuProfile string
		seedFor, webSeedAfter, stealHold                                             time.Duration
		maxConns, maxRequests, chunkSize                                             int
		uploadRate                                                                   int64
	)
	cmd := &cobra.Command{
		Use:   "fetch --server URL --image NAME[:VERSION] --out PATH",
		Short: "Download an image peer-to-peer, verify it and keep seeding",
		Long: `Fetch downloads an image's archive from the swarm of the ESIR server (its
tracker, its seeder and the other nodes), writes it to --out, verifies its
SHA-256 against the manifest and then keeps seeding it for --seed-for (or until
SIGTERM: the rollout is done). When no peer delivers data it falls back to the
server's HTTP web seed. Progress goes to stderr as a bar (--progress bar) or to
stdout as JSON lines (--progress json); the result, with the HAVE counters
and the bytes received from each peer, is printed as JSON on stdout at exit and
written to --result (atomically) as soon as the image is verified.`,
		Example: `  esir-agent fetch --server http://198.18.0.1:8080 --image compute:1.0 --out /tmp/image.tar.zst
  esir-agent fetch --server http://esir:8080 --image compute --out /mnt/image.tar.zst --seed-for 10m --have-mode adaptive`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if server == "" || image == "" || out == "" {
				return fmt.Errorf("--server, --image and --out are required")
			}
			if uploadRate < 0 {
				return fmt.Errorf("--upload-rate %d: want bytes per second, 0 for unlimited", uploadRate)
			}
			m, err := havewire.ParseMode(mode)
			if err != nil {
				return err
			}
			if cpuProfile != "" {
				pf, err := os.Create(cpuProfile)
				if err != nil {
					return fmt.Errorf("fetch: CPU profile: %w", err)
				}
				defer pf.Close()
				if err := pprof.StartCPUProfile(pf); err != nil {
					return fmt.Errorf("fetch: CPU profile %s: %w", cpuProfile, err)
				}
				defer pprof.StopCPUProfile()
			}
			n, err := swarm.NewNode(swarm.NodeConfig{Listen: listen, Mode: m, MaxConns: maxConns, MaxRequests: maxRequests,
				StealHold: stealHold, UploadRate: uploadRate, ChunkSize: chunkSize, Log: app.Log})
			if err != nil {
				return err
			}
			defer n.Close()
			var (
				bar *progress.Bar
				mu  sync.Mutex
				enc = json.NewEncoder(app.Stdout)
			)
			report := func(p swarm.Progress) {
				mu.Lock()
				defer mu.Unlock()
				switch progressMode {
				case "json":
					enc.Encode(p)
				case "bar":
					if bar == nil && p.Total > 0 {
						bar = app.Progress("fetch "+p.Image, p.Total, true)
					}
					if bar != nil {
						bar.Set(p.Bytes)
					}
				}
				if p.Event != "" {
					app.Log.Info("fetch: "+p.Event, "image", p.Image, "phase", p.Phase, "bytes", p.Bytes, "peers", p.Peers,
						"have_sent", p.Have.Messages(), "have_emitted", p.Have.Emitted, "error", p.Err)
				}
			}
			d, err := n.Fetch(ctx, swarm.FetchConfig{Server: server, Image: image, Out: out, Rack: rack,
				WebSeedAfter: webSeedAfter, Progress: report})
			if err != nil {
				return err
			}
			res, err := d.Wait(ctx)
			mu.Lock()
			if bar != nil {
				bar.Finish()
			}
			mu.Unlock()
			if err != nil {
				d.Close()
				return err
			}
			if resultFile != "" {
				if err := writeResult(resultFile, res); err != nil {
					return err
				}
			}
			d.Seed(ctx, seedFor)
			// ctx may be cancelled by now (SIGTERM ends seeding): the download
			// is finished, so Wait returns at once.
			res, _ = d.Wait(context.WithoutCancel(ctx))
			if resultFile != "" {
				if err := writeResult(resultFile, res); err != nil {
					return err
				}
			}
			return json.NewEncoder(app.Stdout).Encode(res)
		},
	}
	f := cmd.Flags()
	f.StringVar(&server, "server", "", "ESIR server URL (http://host:port)")
	f.StringVar(&image, "image", "", "image reference NAME[:VERSION]")
	f.StringVar(&out, "out", "", "file to write the archive to")
	f.StringVar(&listen, "listen", ":6881", "BitTorrent peer address")
	f.StringVar(&mode, "have-mode", "adaptive", "HAVE suppression: off, redundant or adaptive")
	f.StringVar(&rack, "rack", "", "rack label for the tracker's peer selection")
	f.DurationVar(&seedFor, "seed-for", 10*time.Minute, "keep seeding this long after completion (0: until SIGTERM)")
	f.DurationVar(&webSeedAfter, "webseed-after", 10*time.Second, "fall back to the web seed after this long without data (negative: never)")
	f.IntVar(&maxConns, "max-conns", 0, "peer connections (0: default)")
	f.IntVar(&maxRequests, "max-requests", 0, "chunk requests outstanding per peer (0: default 32)")
	f.IntVar(&chunkSize, "chunk-size", 0, "bytes per block request, 1024 to 16384 (0: 8192); smaller blocks keep piece information fresher on slow links")
	f.Int64Var(&uploadRate, "upload-rate", 0, "cap on what this node uploads to all peers together, bytes per second (0: unlimited); pace just under the node's link rate to keep switch queues short")
	f.DurationVar(&stealHold, "steal-hold", 0, "hold a request moved between ESIR peers this long for the first peer's answer (0: default 1s; negative: never)")
	f.StringVar(&progressMode, "progress", "bar", "progress output: bar, json or none")
	f.StringVar(&resultFile, "result", "", "write the result JSON here once verified (and again at exit)")
	f.StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile of the whole fetch (and seeding) to this file")
	return cmd
}

// writeResult writes res as JSON to path atomically.
func writeResult(path string, res swarm.Result) error {
	b, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".result-*")
	if err != nil {
		return fmt.Errorf("writing result %s: %w", path, err)
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return fmt.Errorf("writing result %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("writing result %s: %w", path, err)
	}
	return os.Rename(tmp.Name(), path)
}
