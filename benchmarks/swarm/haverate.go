package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
)

// rateRun is one --json result file: every method at one link rate.
type rateRun struct {
	RateMbit float64  `json:"rate_mbit"`
	Results  []method `json:"results"`
}

// havePoint is one ESIR HAVE mode at one link rate and N: its HAVE
// messages as a share of off's in the same run, and its piece-information
// delay p99.
type havePoint struct {
	RateMbit  float64
	N         int
	Share     float64 // HAVE messages / off's HAVE messages (0: no off run)
	DelayP99  float64 // ms
	HostBound bool
}

// haveVsRate gathers, per ESIR HAVE mode, the points of runs at several
// link rates, sorted by rate. Only N = n counts (every N when n is 0).
func haveVsRate(runs []rateRun, n int) map[string][]havePoint {
	out := map[string][]havePoint{}
	for _, r := range runs {
		for _, m := range r.Results {
			if !strings.HasPrefix(m.Name, "esir-bt ") || m.Err != "" || (n > 0 && m.N != n) {
				continue
			}
			p := havePoint{RateMbit: r.RateMbit, N: m.N, DelayP99: m.DelayP99Ms,
				HostBound: m.HostBound || strings.HasPrefix(m.Bottleneck, "host")}
			if off := find(r.Results, "esir-bt off", m.N); off != nil && off.Err == "" && off.HaveMsgs > 0 {
				p.Share = float64(m.HaveMsgs) / float64(off.HaveMsgs)
			}
			mode := strings.TrimPrefix(m.Name, "esir-bt ")
			out[mode] = append(out[mode], p)
		}
	}
	for _, ps := range out {
		slices.SortFunc(ps, func(a, b havePoint) int {
			if a.RateMbit != b.RateMbit {
				if a.RateMbit < b.RateMbit {
					return -1
				}
				return 1
			}
			return a.N - b.N
		})
	}
	return out
}

// readRateRuns reads --json files of earlier runs.
func readRateRuns(files []string) ([]rateRun, error) {
	var runs []rateRun
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		var r rateRun
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		if r.RateMbit <= 0 {
			return nil, fmt.Errorf("%s: no rate_mbit: not a --json file of this benchmark", f)
		}
		runs = append(runs, r)
	}
	return runs, nil
}

// printHaveVsRate prints the points as a table.
func printHaveVsRate(pts map[string][]havePoint) {
	fmt.Printf("%-10s %6s %4s %16s %10s  %s\n", "HAVE mode", "B Mbit", "N", "HAVE msgs / off", "d99 ms", "bottleneck")
	for _, mode := range haveModes(pts) {
		for _, p := range pts[mode] {
			b := "links"
			if p.HostBound {
				b = "host"
			}
			fmt.Printf("%-10s %6g %4d %16.2f %10.1f  %s\n", mode, p.RateMbit, p.N, p.Share, p.DelayP99, b)
		}
	}
}

// haveModes returns the modes present, adaptive first.
func haveModes(pts map[string][]havePoint) []string {
	var modes []string
	for _, m := range []string{"adaptive", "redundant", "off"} {
		if len(pts[m]) > 0 {
			modes = append(modes, m)
		}
	}
	return modes
}

// plotHaveVsRate draws two panels against the link rate: each mode's HAVE
// messages as a share of off's, and its piece-information delay p99, with
// the targets (0.10, 50 ms) as lines.
func plotHaveVsRate(path string, pts map[string][]havePoint) error {
	dir, err := os.MkdirTemp("", "esir-plot-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var share, delay strings.Builder
	for i, mode := range haveModes(pts) {
		f := filepath.Join(dir, fmt.Sprintf("h%d.dat", i))
		var b strings.Builder
		for _, p := range pts[mode] {
			fmt.Fprintf(&b, "%g %f %f\n", p.RateMbit, p.Share, p.DelayP99)
		}
		if err := os.WriteFile(f, []byte(b.String()), 0o644); err != nil {
			return err
		}
		fmt.Fprintf(&share, ", '%s' using 1:2 with linespoints lw 2 title '%s'", f, mode)
		fmt.Fprintf(&delay, ", '%s' using 1:3 with linespoints lw 2 title '%s'", f, mode)
	}
	script := fmt.Sprintf(`set terminal png size 1100,480
set output '%s'
set multiplot layout 1,2
set logscale x
set xlabel 'link rate B (Mbit/s, log scale)'
set grid
set key top right
set ylabel 'HAVE messages / those of off'
set yrange [0:1.1]
plot 0.1 with lines dt 2 lc rgb 'black' title 'target 0.10'%s
set ylabel 'piece-information delay p99 (ms)'
set yrange [0:*]
plot 50 with lines dt 2 lc rgb 'black' title 'target 50 ms'%s
unset multiplot
`, path, share.String(), delay.String())
	sf := filepath.Join(dir, "plot.gp")
	if err := os.WriteFile(sf, []byte(script), 0o644); err != nil {
		return err
	}
	if out, err := exec.Command("gnuplot", sf).CombinedOutput(); err != nil {
		return fmt.Errorf("gnuplot: %w: %s", err, out)
	}
	return nil
}
