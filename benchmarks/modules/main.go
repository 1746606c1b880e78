// Command modules benchmarks ESIR's module matcher against kmod: parse a
// Debian kernel's module indices and match a 60-device machine (ESIR), versus
// running `modprobe --show-depends` once per alias (what udev's per-device
// modprobe calls amount to) and, as a second baseline, one
// `modprobe -a --show-depends` for all aliases. All figures come from the
// same run; it prints a table and, with --json FILE, writes the figures.
//
//	go run ./benchmarks/modules [--kernel /lib/modules/VER] [--corpus modules/testdata/corpus] [--runs 25] [--json out.json]
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/esir-project/esir/modules"
)

type row struct {
	Measure    string  `json:"measure"`
	ESIRMs     float64 `json:"esir_ms"`
	Baseline   string  `json:"baseline"`
	BaselineMs float64 `json:"baseline_ms"`
	Ratio      float64 `json:"ratio"` // baseline / ESIR: how many times faster ESIR is
	Target     string  `json:"target"`
	Met        bool    `json:"met"`
}

type report struct {
	Kernel  string `json:"kernel"`
	Devices int    `json:"devices"`
	Modules int    `json:"modules"`
	Runs    int    `json:"runs"`
	Rows    []row  `json:"rows"`
	// Agree says ESIR's module set for the machine equals kmod's.
	Agree bool `json:"agree"`
}

func main() {
	kernel := flag.String("kernel", "", "kernel module tree (default: newest /lib/modules/*-amd64)")
	corpus := flag.String("corpus", "modules/testdata/corpus", "folder of recorded modalias lists")
	conf := flag.String("config", "modules/testdata/modprobe.d", "modprobe.d folder both sides use")
	nDev := flag.Int("devices", 60, "devices in the machine")
	runs := flag.Int("runs", 25, "repetitions (medians are reported)")
	jsonOut := flag.String("json", "", "write the figures as JSON to this file")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the whole run here")
	flag.Parse()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "benchmarks/modules:", err)
			os.Exit(1)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, "benchmarks/modules:", err)
			os.Exit(1)
		}
		defer pprof.StopCPUProfile()
	}
	if err := run(*kernel, *corpus, *conf, *nDev, *runs, *jsonOut); err != nil {
		pprof.StopCPUProfile()
		fmt.Fprintln(os.Stderr, "benchmarks/modules:", err)
		os.Exit(1)
	}
}

func run(kernel, corpus, conf string, nDev, runs int, jsonOut string) error {
	if kernel == "" {
		found, _ := filepath.Glob("/lib/modules/*-amd64/modules.alias")
		if len(found) == 0 {
			return fmt.Errorf("no Debian kernel module tree under /lib/modules (install linux-image-amd64) and no --kernel")
		}
		sort.Strings(found)
		kernel = filepath.Dir(found[len(found)-1])
	}
	if _, err := exec.LookPath("modprobe"); err != nil {
		return fmt.Errorf("kmod's modprobe is the baseline: %w", err)
	}
	devs, err := machine(corpus, nDev)
	if err != nil {
		return err
	}
	confAbs, err := filepath.Abs(conf)
	if err != nil {
		return err
	}
	opts := modules.Options{ConfigDirs: []string{confAbs}}

	// ESIR: parse the indices and match, from nothing, each run.
	var parse, match, total, esirCPU []time.Duration
	var plan *modules.Plan
	for i := 0; i < runs; i++ {
		c0 := cpuSelf()
		t0 := time.Now()
		t, err := modules.Open(kernel, opts)
		if err != nil {
			return err
		}
		t1 := time.Now()
		plan, err = t.Plan(devs)
		if err != nil {
			return err
		}
		t2 := time.Now()
		esirCPU = append(esirCPU, cpuSelf()-c0)
		parse, match, total = append(parse, t1.Sub(t0)), append(match, t2.Sub(t1)), append(total, t2.Sub(t0))
	}

	root := filepath.Dir(filepath.Dir(filepath.Dir(kernel)))
	ver := filepath.Base(kernel)
	args := func(aliases ...string) []string {
		return append([]string{"-d", root, "-S", ver, "-C", confAbs, "-b", "--show-depends"}, aliases...)
	}
	// Baseline 1: one modprobe per device, as udev runs it.
	kmodRuns := runs / 5
	if kmodRuns < 3 {
		kmodRuns = 3
	}
	var perAlias, oneCall, perAliasCPU, oneCallCPU []time.Duration
	kmodSet := map[string]bool{}
	for i := 0; i < kmodRuns; i++ {
		t0 := time.Now()
		var cpu time.Duration
		for _, d := range devs {
			cmd := exec.Command("modprobe", args(d.Modalias)...)
			out, err := cmd.Output()
			if cmd.ProcessState != nil {
				cpu += cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
			}
			if err != nil && i == 0 && len(out) == 0 {
				continue // "not found" for devices no module claims
			}
			if i == 0 {
				for _, l := range strings.Split(string(out), "\n") {
					if f := strings.Fields(l); len(f) >= 2 && f[0] == "insmod" {
						base := filepath.Base(f[1])
						kmodSet[strings.ReplaceAll(base[:strings.Index(base, ".ko")], "-", "_")] = true
					}
				}
			}
		}
		perAlias = append(perAlias, time.Since(t0))
		perAliasCPU = append(perAliasCPU, cpu)
	}
	// Baseline 2: one modprobe for all aliases.
	all := make([]string, len(devs))
	for i, d := range devs {
		all[i] = d.Modalias
	}
	for i := 0; i < kmodRuns; i++ {
		t0 := time.Now()
		cmd := exec.Command("modprobe", append([]string{"-a"}, args(all...)...)...)
		_ = cmd.Run() // non-zero when some alias has no module
		oneCall = append(oneCall, time.Since(t0))
		oneCallCPU = append(oneCallCPU, cmd.ProcessState.UserTime()+cmd.ProcessState.SystemTime())
	}

	esirSet := map[string]bool{}
	for _, s := range plan.Steps {
		esirSet[s.Module] = true
	}
	rep := report{Kernel: ver, Devices: len(devs), Modules: len(plan.Steps), Runs: runs, Agree: equalSets(esirSet, kmodSet)}
	esirMs := ms(median(total))
	rep.Rows = []row{
		{Measure: "parse+match (60 devices)", ESIRMs: esirMs, Baseline: "modprobe --show-depends per alias", BaselineMs: ms(median(perAlias)), Target: ">=10x faster"},
		{Measure: "parse+match (60 devices)", ESIRMs: esirMs, Baseline: "modprobe -a --show-depends, one call", BaselineMs: ms(median(oneCall)), Target: "(reference)"},
		{Measure: "parse+match absolute", ESIRMs: esirMs, Baseline: "-", Target: "<20 ms"},
		{Measure: "CPU time (user+sys)", ESIRMs: ms(median(esirCPU)), Baseline: "modprobe --show-depends per alias", BaselineMs: ms(median(perAliasCPU)), Target: ">=10x faster"},
		{Measure: "CPU time (user+sys)", ESIRMs: ms(median(esirCPU)), Baseline: "modprobe -a --show-depends, one call", BaselineMs: ms(median(oneCallCPU)), Target: "(reference)"},
		{Measure: "  of which parse indices", ESIRMs: ms(median(parse)), Baseline: "-"},
		{Measure: "  of which match+plan", ESIRMs: ms(median(match)), Baseline: "-"},
	}
	for i := range rep.Rows {
		r := &rep.Rows[i]
		if r.BaselineMs > 0 {
			r.Ratio = r.BaselineMs / r.ESIRMs
		}
		switch r.Target {
		case ">=10x faster":
			r.Met = r.Ratio >= 10
		case "<20 ms":
			r.Met = r.ESIRMs < 20
		}
	}
	fmt.Printf("modules: kernel %s, %d devices, %d modules planned, ESIR median of %d runs, kmod median of %d runs; module sets agree: %v; load average %s\n",
		ver, len(devs), len(plan.Steps), runs, kmodRuns, rep.Agree, loadavg())
	fmt.Printf("%-28s %10s  %-38s %12s %9s  %-14s %s\n", "measure", "ESIR ms", "baseline", "baseline ms", "ratio", "target", "met")
	for _, r := range rep.Rows {
		bms, ratio, met := "-", "-", "-"
		if r.BaselineMs > 0 {
			bms, ratio = fmt.Sprintf("%.1f", r.BaselineMs), fmt.Sprintf("%.1fx", r.Ratio)
		}
		if r.Target != "" && r.Target != "(reference)" {
			met = fmt.Sprint(r.Met)
		}
		fmt.Printf("%-28s %10.2f  %-38s %12s %9s  %-14s %s\n", r.Measure, r.ESIRMs, r.Baseline, bms, ratio, r.Target, met)
	}
	if jsonOut != "" {
		data, err := json.MarshalIndent(rep, "", "  ")
		if err != nil {
			return err
		}
		tmp := jsonOut + ".tmp"
		if err := os.WriteFile(tmp, append(data, '\n'), 0o644); err != nil {
			return err
		}
		return os.Rename(tmp, jsonOut)
	}
	return nil
}

// machine makes an n-device machine from the recorded corpus: the distinct
// modaliases of the lists, servers.txt first.
func machine(dir string, n int) ([]modules.Device, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.txt"))
	if err != nil || len(files) == 0 {
		return nil, fmt.Errorf("no recorded modalias lists in %s (run from the repository root or give --corpus)", dir)
	}
	// Server NICs and HBAs first, then the QEMU machines' platform devices.
	sort.Sort(sort.Reverse(sort.StringSlice(files)))
	seen := map[string]bool{}
	var out []modules.Device
	for _, f := range files {
		devs, err := modules.ReadDeviceList(f)
		if err != nil {
			return nil, err
		}
		for _, d := range devs {
			if !seen[d.Modalias] && len(out) < n {
				seen[d.Modalias] = true
				out = append(out, d)
			}
		}
	}
	if len(out) < n {
		return nil, fmt.Errorf("corpus in %s has only %d distinct devices, want %d", dir, len(out), n)
	}
	return out, nil
}

// cpuSelf is the CPU time (user+system) this process has used so far.
func cpuSelf() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func equalSets(a, b map[string]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if !b[k] {
			return false
		}
	}
	return true
}

func loadavg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}
