// Command agent measures the install pipeline's streaming: the time from the
// BitTorrent transfer's start to "installed" (unpacking while pieces
// arrive), against the pipeline's bound max(download time, disk write
// time), both measured in the same run: the download alone (the same swarm
// fetch, from the same start to the last byte, nothing else reading it),
// and an install from a local copy of the archive (first byte read to
// installed: disk write alone). Both swarm sides count from the transfer's
// start because the first verified piece comes late (pieces are hashed
// behind the wire). As on a node (agent/pipeline), the streaming install
// is installed once its last step is done and the swarm's own check of the
// archive has passed; the download keeps seeding meanwhile. Downloads go to
// a tmpfs, as on a node. Target: ratio <= 1.15. Each streaming run also
// records when its download had its last byte, which tells the swarm's
// share of a slow run from the install's.
//
// It needs root (loop devices, mount). Everything runs on loopback: an ESIR
// seeder server (tracker, metainfo, web seed) with its upload capped to the
// link rate given, and one agent node per run.
//
//	go run ./benchmarks/agent [--rate-mbit 400] [--modules all|storage] [--runs 3] [--piece-length BYTES] [--json FILE] [--trace] [--cpuprofile FILE]
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"sort"
	"time"

	"github.com/esir-project/esir/agent/install"
	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/modules"
	"github.com/esir-project/esir/sampleimage"
	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/swarm"
	"github.com/esir-project/esir/vm"
	"golang.org/x/sys/unix"
)

type result struct {
	Image            string    `json:"image"`
	ArchiveBytes     int64     `json:"archive_bytes"`
	UncompressedSize int64     `json:"uncompressed_bytes"`
	PieceLength      int64     `json:"piece_length"`
	RateMbit         float64   `json:"rate_mbit"`
	Runs             int       `json:"runs"`
	StreamSec        []float64 `json:"stream_install_s"`   // transfer start -> installed, streaming from the swarm
	StreamLastSec    []float64 `json:"stream_last_byte_s"` // transfer start -> last byte, in the streaming runs
	DownloadSec      []float64 `json:"download_s"`         // transfer start -> last byte, swarm alone
	LocalSec         []float64 `json:"local_install_s"`    // first byte -> installed, local archive
	Median           struct {
		Stream, Download, Local, Bound, Ratio float64
	} `json:"median"`
	Target float64 `json:"target_ratio"`
}

func main() {
	rate := flag.Float64("rate-mbit", 400, "seeder upload cap in Mbit/s, the emulated link (0: unlimited)")
	mods := flag.String("modules", "all", "sample image modules: all (Debian's whole tree) or storage")
	runs := flag.Int("runs", 3, "runs of each measurement (the medians are compared)")
	jsonOut := flag.String("json", "", "write the figures as JSON to this file")
	trace := flag.Bool("trace", false, "print the download's progress every 0.5 s, and the swarm's log, to stderr")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	pieceLength := flag.Int64("piece-length", 0, "BitTorrent piece length of the image in bytes (0: the image store's choice)")
	flag.Parse()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "benchmark agent: cpu profile:", err)
			os.Exit(1)
		}
		defer f.Close()
		defer pprof.StopCPUProfile()
	}
	if err := run(context.Background(), *rate, *mods, *runs, *jsonOut, *trace, *pieceLength); err != nil {
		fmt.Fprintln(os.Stderr, "benchmark agent:", err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}

func run(ctx context.Context, rateMbit float64, mods string, runs int, jsonOut string, trace bool, pieceLength int64) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (loop devices, mount)")
	}
	work, err := os.MkdirTemp("", "esir-bench-agent-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if trace {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}

	// The image: the lab's sample tree.
	k, err := vm.HostDebianKernel()
	if err != nil {
		return err
	}
	opts := sampleimage.Options{Kernel: k}
	if mods == "storage" {
		opts.Modules = sampleimage.StorageNetFS
	}
	tree := filepath.Join(work, "tree")
	if err := sampleimage.Build(ctx, tree, opts); err != nil {
		return err
	}
	st, err := imaging.OpenStore(filepath.Join(work, "store"))
	if err != nil {
		return err
	}
	img, err := st.Build(ctx, tree, imaging.BuildOptions{Name: "sample", Version: "1", PieceLength: pieceLength})
	if err != nil {
		return err
	}
	os.RemoveAll(tree)
	m := img.Manifest

	// The agent binary the install puts on the disk and into the early
	// boot, built as releases build it (static, stripped).
	agentBin := filepath.Join(work, "esir-agent")
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", agentBin, "./cmd/esir-agent")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./cmd/esir-agent (run from the repository root): %w\n%s", err, out)
	}
	devs, err := modules.ReadDevices("/sys")
	if err != nil {
		return err
	}

	// The seeder server on loopback.
	srv, err := swarm.NewServer(swarm.ServerConfig{
		Node: swarm.NodeConfig{Listen: "127.0.0.1:0", UploadRate: int64(rateMbit * 1e6 / 8)}, Log: log})
	if err != nil {
		return err
	}
	defer srv.Close()
	simg, err := swarm.ImageFromTorrent(img.ArchivePath(), img.TorrentPath(), m.Name, m.Version, m.SHA256)
	if err != nil {
		return err
	}
	if err := srv.Publish(simg); err != nil {
		return err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	hs := &http.Server{Handler: srv.Handler()}
	go hs.Serve(ln)
	defer hs.Close()
	server := "http://" + ln.Addr().String()

	// Downloads go to a tmpfs, as on a node, whose netboot environment
	// keeps the archive in RAM: a sync during the install (extlinux calls
	// sync()) must not write the downloaded archive to the host's disk.
	ram := filepath.Join(work, "ram")
	if err := os.Mkdir(ram, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", ram, "tmpfs", 0, fmt.Sprintf("size=%d", 2*m.CompressedSize+64<<20)); err != nil {
		return fmt.Errorf("mount tmpfs for downloads on %s: %w", ram, err)
	}
	defer unix.Unmount(ram, unix.MNT_DETACH)

	res := result{Image: m.Ref(), ArchiveBytes: m.CompressedSize, UncompressedSize: m.UncompressedSize, PieceLength: m.PieceLength,
		RateMbit: rateMbit, Runs: runs, Target: 1.15}
	for i := 0; i < runs; i++ {
		d, err := downloadOnly(ctx, server, m.Ref(), filepath.Join(ram, fmt.Sprintf("dl%d", i)), log, trace)
		os.RemoveAll(filepath.Join(ram, fmt.Sprintf("dl%d", i)))
		if err != nil {
			return fmt.Errorf("download alone: %w", err)
		}
		res.DownloadSec = append(res.DownloadSec, d.Seconds())

		local := install.ImageFromStore(&m, img.ArchivePath())
		d, err = installOnce(ctx, work, i, "local", local, agentBin, devs, nil, nil)
		if err != nil {
			return fmt.Errorf("local install: %w", err)
		}
		res.LocalSec = append(res.LocalSec, d.Seconds())

		// As on a node (agent/pipeline): the download goes on (seeding)
		// after the unpack has read its last byte, and the install is
		// reported once it has finished and the swarm's own check of the
		// archive has passed.
		var node *swarm.Node
		var dl *swarm.Download
		var opened time.Time
		var lastByte <-chan time.Duration
		wctx, stopWatch := context.WithCancel(ctx)
		stream := install.ImageFromStore(&m, "")
		stream.Open = func(ctx context.Context) (io.ReadCloser, error) {
			n, d, err := startFetch(ctx, server, m.Ref(), filepath.Join(ram, fmt.Sprintf("st%d", i)), log)
			if err != nil {
				return nil, err
			}
			node, dl, opened = n, d, time.Now()
			lastByte = watchLastByte(wctx, dl, opened)
			return dl.Reader(ctx), nil
		}
		verified := func() error {
			if dl == nil {
				return errors.New("the install never opened the image")
			}
			_, err := dl.Wait(ctx)
			return err
		}
		d, err = installOnce(ctx, work, i, "stream", stream, agentBin, devs, &opened, verified)
		if err == nil && lastByte == nil {
			err = errors.New("the install never opened the image")
		}
		if err == nil {
			last, ok := <-lastByte
			if !ok {
				err = errors.New("the download's last byte was never seen")
			}
			res.StreamLastSec = append(res.StreamLastSec, last.Seconds())
		}
		stopWatch()
		if dl != nil {
			dl.Close()
		}
		if node != nil {
			node.Close()
		}
		os.RemoveAll(filepath.Join(ram, fmt.Sprintf("st%d", i)))
		if err != nil {
			return fmt.Errorf("streaming install: %w", err)
		}
		res.StreamSec = append(res.StreamSec, d.Seconds())
	}
	res.Median.Stream, res.Median.Download, res.Median.Local = median(res.StreamSec), median(res.DownloadSec), median(res.LocalSec)
	res.Median.Bound = max(res.Median.Download, res.Median.Local)
	res.Median.Ratio = res.Median.Stream / res.Median.Bound

	fmt.Printf("agent install streaming: image %s, archive %.1f MiB (%.1f MiB uncompressed) in %d KiB pieces, link %.0f Mbit/s, %d runs (medians)\n",
		res.Image, float64(res.ArchiveBytes)/(1<<20), float64(res.UncompressedSize)/(1<<20), res.PieceLength>>10, rateMbit, runs)
	fmt.Printf("%-44s %10s %10s %8s %8s\n", "measure", "ESIR s", "bound s", "ratio", "target")
	fmt.Printf("%-44s %10.2f %10.2f %8.2f %8s\n", "start -> installed (streaming install)", res.Median.Stream, res.Median.Bound, res.Median.Ratio, "<= 1.15")
	fmt.Printf("%-44s %10.2f %10s %8.2f\n", "  baseline: download alone (swarm)", res.Median.Download, "", res.Median.Stream/res.Median.Download)
	fmt.Printf("%-44s %10.2f %10s %8.2f\n", "  baseline: install from a local copy", res.Median.Local, "", res.Median.Stream/res.Median.Local)
	fmt.Printf("%-44s %10.2f\n", "  streaming runs: last byte (median)", median(res.StreamLastSec))
	fmt.Printf("runs (s): stream %v download %v local %v\n", fmtList(res.StreamSec), fmtList(res.DownloadSec), fmtList(res.LocalSec))
	fmt.Printf("runs (s): streaming runs' last byte %v\n", fmtList(res.StreamLastSec))
	if jsonOut != "" {
		b, _ := json.MarshalIndent(res, "", "  ")
		if err := os.WriteFile(jsonOut, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	return nil
}

func startFetch(ctx context.Context, server, ref, dir string, log *slog.Logger) (*swarm.Node, *swarm.Download, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, nil, err
	}
	n, err := swarm.NewNode(swarm.NodeConfig{Listen: "127.0.0.1:0", Log: log})
	if err != nil {
		return nil, nil, err
	}
	d, err := n.Fetch(ctx, swarm.FetchConfig{Server: server, Image: ref, Out: filepath.Join(dir, "image.tar.zst")})
	if err != nil {
		n.Close()
		return nil, nil, err
	}
	return n, d, nil
}

// downloadOnly fetches the image to its file, nothing else reading it: the
// time from the transfer's start (Fetch returned: metainfo in hand, peers
// not yet connected) to the last byte verified (polled every 5 ms). The
// first verified piece is no usable start: pieces are hashed behind the
// wire, so it can come when most bytes have already arrived. The
// download's own whole-file check after the last byte is not counted: the
// streaming install checks the digest as it reads.
func downloadOnly(ctx context.Context, server, ref, dir string, log *slog.Logger, trace bool) (time.Duration, error) {
	n, d, err := startFetch(ctx, server, ref, dir, log)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	defer n.Close()
	defer d.Close()
	done := make(chan error, 1)
	go func() { _, err := d.Wait(ctx); done <- err }()
	var first, last, mark time.Time
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			if err != nil {
				return 0, err
			}
			if first.IsZero() || last.IsZero() {
				return 0, errors.New("download finished before its first and last bytes were seen")
			}
			return last.Sub(start), nil
		case <-tick.C:
			p := d.Progress()
			now := time.Now()
			if first.IsZero() && p.Bytes > 0 {
				first, mark = now, now
			}
			if last.IsZero() && p.Total > 0 && p.Bytes == p.Total {
				last = now
			}
			if trace && !first.IsZero() && (now.Sub(mark) >= 500*time.Millisecond || now.Equal(last)) {
				mark = now
				fmt.Fprintf(os.Stderr, "  download: +%.2fs %d/%d MiB, %d peers\n", now.Sub(first).Seconds(), p.Bytes>>20, p.Total>>20, p.Peers)
			}
		}
	}
}

// installOnce installs onto a fresh disk file and returns the time from the
// first archive byte read (or from *start, when given and set: the swarm
// transfer's start, as for the download alone) to the end of the last step
// and of done, when given (the swarm's check of the download).
func installOnce(ctx context.Context, work string, i int, name string, img install.Image, agentBin string, devs []modules.Device, start *time.Time, done func() error) (time.Duration, error) {
	file := filepath.Join(work, fmt.Sprintf("%s%d.img", name, i))
	f, err := os.Create(file)
	if err != nil {
		return 0, err
	}
	size := 3*img.UncompressedSize + 512<<20
	if err := f.Truncate(size); err != nil {
		f.Close()
		return 0, err
	}
	f.Close()
	defer os.Remove(file)
	dev, detach, err := install.AttachFile(ctx, file)
	if err != nil {
		return 0, err
	}
	defer detach()
	var first time.Time
	asg := &agentapi.Assignment{Hostname: "bench", Server: "http://198.18.0.1:8080", Disk: agentapi.DiskLayout{Rule: agentapi.DiskRule{Path: dev}, ESPMiB: 64}}
	_, err = install.Run(ctx, img, asg, install.Options{MAC: "52:54:00:be:ec:01", Agent: agentBin, Devices: devs,
		Report: func(e install.Event) {
			if e.Step == install.StepUnpack && e.Status == install.Progress && e.Bytes > 0 && first.IsZero() {
				first = time.Now()
			}
			if e.Status == install.Done && !first.IsZero() {
				ref := first
				if start != nil && !start.IsZero() {
					ref = *start
				}
				fmt.Fprintf(os.Stderr, "  %s: %s done at +%.2fs\n", name, e.Step, time.Since(ref).Seconds())
			}
		}})
	if err != nil {
		return 0, err
	}
	if done != nil {
		if err := done(); err != nil {
			return 0, err
		}
	}
	if start != nil && !start.IsZero() {
		return time.Since(*start), nil
	}
	return time.Since(first), nil
}

// watchLastByte sends when the streaming install's download has all its
// bytes (polled every 5 ms, as for the download alone), from start; the
// channel closes without it if ctx ends first.
func watchLastByte(ctx context.Context, dl *swarm.Download, start time.Time) <-chan time.Duration {
	c := make(chan time.Duration, 1)
	go func() {
		defer close(c)
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			if p := dl.Progress(); p.Total > 0 && p.Bytes == p.Total {
				d := time.Since(start)
				fmt.Fprintf(os.Stderr, "  stream: download's last byte at +%.2fs\n", d.Seconds())
				c <- d
				return
			}
		}
	}()
	return c
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

func fmtList(xs []float64) string {
	out := "["
	for i, x := range xs {
		if i > 0 {
			out += " "
		}
		out += fmt.Sprintf("%.2f", x)
	}
	return out + "]"
}
