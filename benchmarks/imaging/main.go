// Command imaging compares ESIR's file-mode image build and extraction with
// the standard tools on a real Debian root filesystem (debootstrap
// --variant=minbase bookworm, cached): build time against tar | zstd -T0 at
// the same level, archive size against that tar.zst, mksquashfs -comp zstd
// and partition mode's ext4 image, and extraction time into tmpfs against
// zstd -dc | tar -x, plus large-file extraction throughput. Every figure is
// measured in the same run; it prints a table and, with --json FILE, writes
// the figures as JSON. Run it as root on Debian 12.
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/esir-project/esir/imaging"
	"golang.org/x/sys/unix"
)

// row is one line of the result table.
type row struct {
	Metric   string  `json:"metric"`
	Unit     string  `json:"unit"`
	ESIR     float64 `json:"esir"`
	Baseline string  `json:"baseline"`
	Base     float64 `json:"baseline_value"`
	Ratio    float64 `json:"ratio"`
	Target   string  `json:"target"`
	Met      *bool   `json:"met,omitempty"`
}

type report struct {
	Rootfs      string    `json:"rootfs"`
	Files       int64     `json:"files"`
	ContentSize int64     `json:"content_bytes"`
	Level       int       `json:"zstd_level"`
	Runs        int       `json:"runs"`
	CPUs        int       `json:"cpus"`
	Date        time.Time `json:"date"`
	// LoadStart and LoadEnd are /proc/loadavg's 1, 5 and 15 minute figures
	// when the run started and ended: other work on the machine skews the
	// timings of both sides.
	LoadStart [3]float64 `json:"loadavg_start"`
	LoadEnd   [3]float64 `json:"loadavg_end"`
	Rows      []row      `json:"rows"`
}

func main() {
	cache := flag.String("cache", "/var/cache/esir/bench", "cache directory for the debootstrapped root filesystem")
	rootfs := flag.String("rootfs", "", "root filesystem to use instead of the cached debootstrap")
	mirror := flag.String("mirror", "http://deb.debian.org/debian", "Debian mirror for debootstrap")
	level := flag.Int("level", 3, "zstd level for ESIR and the baselines")
	runs := flag.Int("runs", 5, "timed runs per measurement (the median is reported)")
	scratch := flag.String("tmpfs", "/dev/shm", "tmpfs directory for outputs and extraction")
	largeMiB := flag.Int("large-mib", 1024, "size of the large-file extraction test in MiB")
	jsonOut := flag.String("json", "", "write the figures as JSON to this file")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	b := &bench{ctx: ctx, log: log, level: *level, runs: *runs}
	b.rep.LoadStart = loadAvg()
	if err := b.run(*cache, *rootfs, *mirror, *scratch, *largeMiB); err != nil {
		fmt.Fprintln(os.Stderr, "benchmark:", err)
		os.Exit(1)
	}
	b.rep.LoadEnd = loadAvg()
	b.print(os.Stdout)
	if *jsonOut != "" {
		data, _ := json.MarshalIndent(b.rep, "", "  ")
		tmp := *jsonOut + ".tmp"
		if err := os.WriteFile(tmp, append(data, '\n'), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "benchmark:", err)
			os.Exit(1)
		}
		if err := os.Rename(tmp, *jsonOut); err != nil {
			fmt.Fprintln(os.Stderr, "benchmark:", err)
			os.Exit(1)
		}
	}
}

type bench struct {
	ctx   context.Context
	log   *slog.Logger
	level int
	runs  int
	rep   report
}

func (b *bench) run(cache, rootfs, mirror, scratch string, largeMiB int) error {
	if os.Geteuid() != 0 {
		return errors.New("run as root (owners, device nodes, mkfs, debootstrap)")
	}
	for _, tool := range []string{"tar", "zstd", "mksquashfs", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found: run scripts/setup.sh test", tool)
		}
	}
	if rootfs == "" {
		var err error
		if rootfs, err = b.debootstrap(cache, mirror); err != nil {
			return err
		}
	}
	work, err := os.MkdirTemp(scratch, "esir-bench-")
	if err != nil {
		return fmt.Errorf("scratch directory on %s: %w", scratch, err)
	}
	defer os.RemoveAll(work)
	b.rep = report{Rootfs: rootfs, Level: b.level, Runs: b.runs, CPUs: numCPU(), Date: time.Now().UTC(), LoadStart: b.rep.LoadStart}

	// Warm the page cache so both builds read from memory. Through a pipe:
	// GNU tar writing to /dev/null itself skips reading file contents.
	if err := sh("tar -C " + q(rootfs) + " -cf - . | cat > /dev/null"); err != nil {
		return err
	}
	opts := imaging.ArchiveOptions{NoDefaultExcludes: true, Level: b.level}
	esirOut := filepath.Join(work, "esir.tar.zst")
	baseOut := filepath.Join(work, "base.tar.zst")
	var stats imaging.ArchiveStats
	baseCmd := fmt.Sprintf("set -o pipefail; tar -C %s -cf - . | zstd -q -T0 -%d -f -o %s", q(rootfs), b.level, q(baseOut))
	build, err := b.pair("build", nil, func() error {
		f, err := os.Create(esirOut)
		if err != nil {
			return err
		}
		defer f.Close()
		stats, err = imaging.WriteArchive(b.ctx, f, rootfs, opts)
		return err
	}, func() error { return bash(baseCmd) })
	if err != nil {
		return err
	}
	b.rep.Files, b.rep.ContentSize = stats.Entries, stats.ContentSize
	base := "tar -cf - | zstd -T0 -" + strconv.Itoa(b.level)
	b.add("build time", "s", build.esir, base, build.base, "ratio <= 1.0", true)
	b.add("build CPU (user+sys)", "s", build.esirCPU, base, build.baseCPU, "(reference)", nil)

	esirSize, baseSize := fileSize(esirOut), fileSize(baseOut)
	b.add("archive size", "MiB", mib(esirSize), "tar.zst (same level)", mib(baseSize), "within 2% (ratio <= 1.02)", esirSize <= baseSize*102/100)
	sq := filepath.Join(work, "rootfs.squashfs")
	if err := run("mksquashfs", rootfs, sq, "-comp", "zstd", "-noappend", "-quiet", "-no-progress"); err != nil {
		return err
	}
	b.add("archive size", "MiB", mib(esirSize), "mksquashfs -comp zstd", mib(fileSize(sq)), "(reference)", nil)
	os.Remove(sq)
	store, err := imaging.OpenStore(filepath.Join(work, "store"))
	if err != nil {
		return err
	}
	part, err := store.Build(b.ctx, rootfs, imaging.BuildOptions{Name: "bench", Version: "ext4", Mode: imaging.ModePartition,
		ArchiveOptions: imaging.ArchiveOptions{NoDefaultExcludes: true}})
	if err != nil {
		return err
	}
	alloc := part.Manifest.AllocatedSize
	b.add("archive size", "MiB", mib(esirSize), "partition mode (ext4 allocated)", mib(alloc), "ratio <= 0.5", esirSize*2 <= alloc)
	if err := store.Remove("bench:ext4"); err != nil {
		return err
	}

	// Extraction of the same archive into tmpfs.
	dst := filepath.Join(work, "x")
	reset := func() error {
		if err := os.RemoveAll(dst); err != nil {
			return err
		}
		return os.Mkdir(dst, 0o755)
	}
	x, err := b.pair("extract", reset, func() error { return extractFile(b.ctx, esirOut, dst) }, func() error {
		return bash(fmt.Sprintf("set -o pipefail; zstd -dc %s | tar -xpf - -C %s", q(esirOut), q(dst)))
	})
	if err != nil {
		return err
	}
	b.add("extract time (rootfs)", "s", x.esir, "zstd -dc | tar -x", x.base, "ratio <= 1.0", true)
	b.add("extract CPU (user+sys)", "s", x.esirCPU, "zstd -dc | tar -x", x.baseCPU, "(reference)", nil)
	os.RemoveAll(dst)
	os.Remove(baseOut)

	// Large files: throughput of uncompressed data written into tmpfs.
	big := filepath.Join(work, "big")
	if err := makeLarge(big, int64(largeMiB)<<20); err != nil {
		return err
	}
	bigOut := filepath.Join(work, "big.tar.zst")
	f, err := os.Create(bigOut)
	if err != nil {
		return err
	}
	if _, err := imaging.WriteArchive(b.ctx, f, big, opts); err != nil {
		f.Close()
		return err
	}
	f.Close()
	os.RemoveAll(big)
	total := float64(int64(largeMiB) << 20)
	l, err := b.pair("extract large", reset, func() error { return extractFile(b.ctx, bigOut, dst) }, func() error {
		return bash(fmt.Sprintf("set -o pipefail; zstd -dc %s | tar -xpf - -C %s", q(bigOut), q(dst)))
	})
	if err != nil {
		return err
	}
	esirL, baseL := l.esir, l.base
	r := row{Metric: fmt.Sprintf("extract large files (%d MiB)", largeMiB), Unit: "MB/s", ESIR: total / esirL / 1e6,
		Baseline: "zstd -dc | tar -x", Base: total / baseL / 1e6, Target: ">= 500 MB/s"}
	r.Ratio = r.ESIR / r.Base
	met := r.ESIR >= 500
	r.Met = &met
	b.rep.Rows = append(b.rep.Rows, r)
	return nil
}

// add records a row whose ratio is ESIR / baseline; met is a bool, nil, or
// true to mean "ratio <= 1".
func (b *bench) add(metric, unit string, esir float64, baseline string, base float64, target string, met any) {
	r := row{Metric: metric, Unit: unit, ESIR: esir, Baseline: baseline, Base: base, Target: target}
	if base > 0 {
		r.Ratio = esir / base
	}
	switch m := met.(type) {
	case bool:
		if target == "ratio <= 1.0" {
			m = r.Ratio <= 1.0
		}
		r.Met = &m
	}
	b.rep.Rows = append(b.rep.Rows, r)
}

// timing is the median wall time and the median CPU time (user + sys) of
// ESIR and of the baseline.
type timing struct{ esir, base, esirCPU, baseCPU float64 }

// pair measures ESIR and the baseline alternately, runs times each, so both
// see the same machine load; reset runs before each measurement, untimed.
// ESIR's CPU time is this process's, the baseline's its child processes'.
func (b *bench) pair(what string, reset, esir, base func() error) (timing, error) {
	var t [4][]float64
	for i := 0; i < b.runs; i++ {
		for k, f := range []func() error{esir, base} {
			if err := b.ctx.Err(); err != nil {
				return timing{}, err
			}
			if reset != nil {
				if err := reset(); err != nil {
					return timing{}, fmt.Errorf("%s: reset: %w", what, err)
				}
			}
			who := []int{unix.RUSAGE_SELF, unix.RUSAGE_CHILDREN}[k]
			c0 := cpuSeconds(who)
			start := time.Now()
			if err := f(); err != nil {
				return timing{}, fmt.Errorf("%s (%s): %w", what, []string{"ESIR", "baseline"}[k], err)
			}
			wall := time.Since(start).Seconds()
			t[k] = append(t[k], wall)
			t[2+k] = append(t[2+k], cpuSeconds(who)-c0)
			b.log.Info("measured", "what", what, "who", []string{"ESIR", "baseline"}[k], "run", i+1,
				"seconds", fmt.Sprintf("%.3f", wall))
		}
	}
	med := func(v []float64) float64 {
		sort.Float64s(v)
		return v[len(v)/2]
	}
	return timing{med(t[0]), med(t[1]), med(t[2]), med(t[3])}, nil
}

func cpuSeconds(who int) float64 {
	var ru unix.Rusage
	if err := unix.Getrusage(who, &ru); err != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

func (b *bench) print(w io.Writer) {
	fmt.Fprintf(w, "ESIR imaging benchmark: %s (%d entries, %.1f MiB of file content), zstd level %d, median of %d runs, %d CPUs\n",
		b.rep.Rootfs, b.rep.Files, mib(b.rep.ContentSize), b.rep.Level, b.rep.Runs, b.rep.CPUs)
	fmt.Fprintf(w, "machine load (loadavg 1/5/15 min): %.2f %.2f %.2f at start, %.2f %.2f %.2f at end\n\n",
		b.rep.LoadStart[0], b.rep.LoadStart[1], b.rep.LoadStart[2], b.rep.LoadEnd[0], b.rep.LoadEnd[1], b.rep.LoadEnd[2])
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "metric\tESIR\tbaseline\tbaseline value\tratio\ttarget\tmet")
	for _, r := range b.rep.Rows {
		met := "-"
		if r.Met != nil {
			met = map[bool]string{true: "yes", false: "NO"}[*r.Met]
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.3f\t%s\t%s\n", r.Metric, fmtVal(r.ESIR, r.Unit), r.Baseline, fmtVal(r.Base, r.Unit), r.Ratio, r.Target, met)
	}
	tw.Flush()
}

func fmtVal(v float64, unit string) string {
	switch unit {
	case "s":
		return fmt.Sprintf("%.3f s", v)
	case "MiB":
		return fmt.Sprintf("%.2f MiB", v)
	}
	return fmt.Sprintf("%.0f %s", v, unit)
}

func extractFile(ctx context.Context, archive, dst string) error {
	f, err := os.Open(archive)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = imaging.Extract(ctx, f, dst, imaging.ExtractOptions{})
	return err
}

// makeLarge writes four files totalling size bytes of data that compresses
// about 3:1 (random 4 KiB blocks, each repeated three times with changes),
// so decompression, not the disk, sets the pace.
func makeLarge(dir string, size int64) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	rng := mrand.New(mrand.NewPCG(1, 2))
	for i := 0; i < 4; i++ {
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("large-%d.bin", i)))
		if err != nil {
			return err
		}
		block := make([]byte, 4096)
		buf := make([]byte, 0, 1<<20)
		for written := int64(0); written < size/4; {
			rand.Read(block)
			for r := 0; r < 3; r++ {
				block[rng.IntN(len(block))] ^= 0xff
				buf = append(buf, block...)
			}
			if len(buf) >= 1<<20-3*4096 {
				n, err := f.Write(buf)
				if err != nil {
					f.Close()
					return err
				}
				written += int64(n)
				buf = buf[:0]
			}
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	return nil
}

// debootstrap makes (once) a minbase bookworm root filesystem in cache.
func (b *bench) debootstrap(cache, mirror string) (string, error) {
	dst := filepath.Join(cache, "bookworm-minbase")
	if _, err := os.Stat(filepath.Join(dst, "etc/debian_version")); err == nil {
		return dst, nil
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		return "", errors.New("debootstrap not found: run scripts/setup.sh test")
	}
	partial := dst + ".partial"
	os.RemoveAll(partial)
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return "", err
	}
	b.log.Info("debootstrap (once, cached)", "dir", dst, "mirror", mirror)
	cmd := exec.CommandContext(b.ctx, "debootstrap", "--variant=minbase", "bookworm", partial, mirror)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("debootstrap into %s: %w", partial, err)
	}
	// debootstrap leaves mounts behind on failure only; be sure.
	for _, m := range []string{"proc", "sys", "dev/pts"} {
		unix.Unmount(filepath.Join(partial, m), unix.MNT_DETACH)
	}
	if err := os.Rename(partial, dst); err != nil {
		return "", err
	}
	return dst, nil
}

// loadAvg reads the 1, 5 and 15 minute load averages (zeros when
// /proc/loadavg is unreadable).
func loadAvg() [3]float64 {
	var l [3]float64
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return l
	}
	for i, f := range strings.Fields(string(b)) {
		if i >= 3 {
			break
		}
		l[i], _ = strconv.ParseFloat(f, 64)
	}
	return l
}

func numCPU() int {
	var set unix.CPUSet
	if unix.SchedGetaffinity(0, &set) == nil {
		return set.Count()
	}
	return 1
}

func fileSize(p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return fi.Size()
}

func mib(n int64) float64 { return math.Round(float64(n)/(1<<20)*100) / 100 }

func q(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func sh(c string) error { return run("sh", "-c", c) }

func bash(c string) error { return run("bash", "-c", c) }

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
