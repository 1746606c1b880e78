package modules

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
	"golang.org/x/sys/unix"
)

// moduleInitCompressedFile is finit_module's MODULE_INIT_COMPRESSED_FILE flag
// (Linux 6.4 and later): the kernel decompresses the file itself.
const moduleInitCompressedFile = 4

// ErrLoaded is what inserting a module that is already in the kernel gives.
var ErrLoaded = errors.New("module already loaded")

// Compressed reports whether a module file is compressed (.ko.xz, .ko.zst,
// .ko.gz).
func Compressed(path string) bool {
	return strings.HasSuffix(path, ".xz") || strings.HasSuffix(path, ".zst") || strings.HasSuffix(path, ".gz")
}

// ReadModule returns a module file's ELF image, decompressing .ko.xz,
// .ko.zst and .ko.gz files.
func ReadModule(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("module file: %w", err)
	}
	defer f.Close()
	var r io.Reader = f
	switch {
	case strings.HasSuffix(path, ".xz"):
		xr, err := xz.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("module %s: xz: %w", path, err)
		}
		r = xr
	case strings.HasSuffix(path, ".zst"):
		zr, err := zstd.NewReader(f, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, fmt.Errorf("module %s: zstd: %w", path, err)
		}
		defer zr.Close()
		r = zr
	case strings.HasSuffix(path, ".gz"):
		gr, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("module %s: gzip: %w", path, err)
		}
		r = gr
	}
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, fmt.Errorf("module %s: decompress: %w", path, err)
	}
	if !bytes.HasPrefix(data, []byte("\x7fELF")) {
		return nil, fmt.Errorf("module %s: not an ELF object after decompression", path)
	}
	return data, nil
}

// Insert loads one module file into the running kernel with params:
// finit_module on the file, and for a compressed file the kernel cannot
// decompress (Debian's 6.1 answers EOPNOTSUPP), decompression here and
// init_module. A module that is already loaded gives ErrLoaded.
func Insert(path, params string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("module file: %w", err)
	}
	defer f.Close()
	flags := 0
	if Compressed(path) {
		flags = moduleInitCompressedFile
	}
	err = unix.FinitModule(int(f.Fd()), params, flags)
	if err != nil && !errors.Is(err, unix.EEXIST) &&
		(errors.Is(err, unix.ENOSYS) || (flags != 0 && (errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL)))) {
		data, rerr := ReadModule(path)
		if rerr != nil {
			return rerr
		}
		err = unix.InitModule(data, params)
	}
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.EEXIST):
		return ErrLoaded
	default:
		return fmt.Errorf("insert module %s: %w", path, err)
	}
}

// LoadOptions tune Load.
type LoadOptions struct {
	Sysfs string // sysfs root; default /sys
	// Insert loads one step; nil means Insert(step.Path, step.Params) into
	// the running kernel.
	Insert func(ctx context.Context, s Step) error
	// Settle is how long the device list must stay unchanged after a round
	// before the next one (devices behind a new driver appear
	// asynchronously); default 300ms. SettleMax bounds the wait; default 5s.
	Settle, SettleMax time.Duration
	// MaxRounds bounds the match-load-rescan loop; default 10.
	MaxRounds int
	Log       *slog.Logger
}

// Loaded is one module Load inserted (or found already loaded).
type Loaded struct {
	Step
	Round   int  `json:"round"`
	Already bool `json:"already,omitempty"` // was loaded before (EEXIST or in sysfs)
}

// Failure is one module that did not load.
type Failure struct {
	Module string `json:"module"`
	Path   string `json:"path"`
	Error  string `json:"error"`
	// NoDevice: the module's init found nothing to drive (ENODEV), as
	// cpufreq and EDAC drivers do in virtual machines.
	NoDevice bool `json:"no_device,omitempty"`
}

// failedDep returns a dependency of module name that failed to load, or "".
func failedDep(t *Tree, name string, failed map[string]bool) string {
	if len(failed) == 0 {
		return ""
	}
	m := t.Module(name)
	if m == nil {
		return ""
	}
	deps, _ := t.Deps(m)
	for _, d := range deps {
		if failed[d] {
			return d
		}
	}
	return ""
}

// Result is what Load did.
type Result struct {
	Kernel    string    `json:"kernel"`
	Rounds    int       `json:"rounds"`
	Loaded    []Loaded  `json:"loaded"`
	Failed    []Failure `json:"failed,omitempty"`
	Skipped   []Skip    `json:"skipped,omitempty"`
	Devices   []Device  `json:"devices"`             // every device seen, at the end
	Unmatched []Device  `json:"unmatched,omitempty"` // devices no module claims
	// Profile is the hardware profile of what was loaded, for the node's
	// inventory.
	Profile Profile `json:"profile"`
}

// Plan returns the plan Load followed, as one plan: the modules loaded (or
// found loaded) and the failed ones, in order, with what was skipped.
func (r *Result) Plan() *Plan {
	p := &Plan{Kernel: r.Kernel, Skipped: r.Skipped, Unmatched: r.Unmatched}
	for _, l := range r.Loaded {
		p.Steps = append(p.Steps, l.Step)
	}
	return p
}

// Err joins the failures into one error, or returns nil.
func (r *Result) Err() error {
	var errs []error
	for _, f := range r.Failed {
		errs = append(errs, fmt.Errorf("module %s (%s): %s", f.Module, f.Path, f.Error))
	}
	return errors.Join(errs...)
}

// Load matches the live devices under the sysfs root against the tree,
// loads the plan, waits for the devices the new drivers bring, and repeats
// until no new device appears. One module's failure is recorded and the
// others still load; the error is only for a sysfs that cannot be read or a
// cancelled context.
func Load(ctx context.Context, t *Tree, opts LoadOptions) (*Result, error) {
	if opts.Sysfs == "" {
		opts.Sysfs = "/sys"
	}
	if opts.Settle == 0 {
		opts.Settle = 300 * time.Millisecond
	}
	if opts.SettleMax == 0 {
		opts.SettleMax = 5 * time.Second
	}
	if opts.MaxRounds == 0 {
		opts.MaxRounds = 10
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	insert := opts.Insert
	if insert == nil {
		insert = func(_ context.Context, s Step) error { return Insert(s.Path, s.Params) }
	}
	res := &Result{Kernel: t.Version}
	seenDev := map[string]bool{}
	done := map[string]bool{} // modules attempted
	failed := map[string]bool{}
	skipped := map[string]int{} // module -> index in res.Skipped
	unmatched := map[string]bool{}
	var devs []Device
	var err error
	for round := 1; round <= opts.MaxRounds; round++ {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		if round == 1 {
			devs, err = ReadDevices(opts.Sysfs)
		} else {
			devs, err = settle(ctx, opts)
		}
		if err != nil {
			return res, err
		}
		var fresh []Device
		for _, d := range devs {
			key := d.Path + "\x00" + d.Modalias
			if !seenDev[key] {
				seenDev[key] = true
				fresh = append(fresh, d)
			}
		}
		if len(fresh) == 0 {
			break
		}
		res.Rounds = round
		plan, perr := t.Plan(fresh)
		if perr != nil {
			opts.Log.Warn("module plan has problems; the modules concerned will fail", "err", perr)
		}
		for _, d := range plan.Unmatched {
			if !unmatched[d.Path] {
				unmatched[d.Path] = true
				res.Unmatched = append(res.Unmatched, d)
			}
		}
		for _, s := range plan.Skipped {
			if i, ok := skipped[s.Module]; ok {
				res.Skipped[i].Devices = append(res.Skipped[i].Devices, s.Devices...)
				continue
			}
			skipped[s.Module] = len(res.Skipped)
			res.Skipped = append(res.Skipped, s)
		}
		for _, s := range plan.Steps {
			if done[s.Module] {
				continue
			}
			done[s.Module] = true
			if _, err := os.Stat(filepath.Join(opts.Sysfs, "module", s.Module, "initstate")); err == nil {
				res.Loaded = append(res.Loaded, Loaded{Step: s, Round: round, Already: true})
				continue
			}
			if dep := failedDep(t, s.Module, failed); dep != "" {
				res.Failed = append(res.Failed, Failure{Module: s.Module, Path: s.Path, Error: "not loaded: its dependency " + dep + " failed"})
				failed[s.Module] = true
				continue
			}
			start := time.Now()
			err := insert(ctx, s)
			switch {
			case err == nil:
				opts.Log.Info("module loaded", "module", s.Module, "reason", s.Reason, "of", s.Of, "took", time.Since(start).Round(time.Millisecond))
				res.Loaded = append(res.Loaded, Loaded{Step: s, Round: round})
			case errors.Is(err, ErrLoaded):
				res.Loaded = append(res.Loaded, Loaded{Step: s, Round: round, Already: true})
			default:
				opts.Log.Warn("module failed", "module", s.Module, "path", s.Path, "err", err)
				res.Failed = append(res.Failed, Failure{Module: s.Module, Path: s.Path, Error: err.Error(), NoDevice: errors.Is(err, unix.ENODEV)})
				failed[s.Module] = true
			}
		}
	}
	res.Devices = devs
	res.Profile = t.Profile(res.Plan())
	return res, nil
}

// settle waits until the device list stops changing (opts.Settle without a
// change, at most opts.SettleMax) and returns it.
func settle(ctx context.Context, opts LoadOptions) ([]Device, error) {
	deadline := time.Now().Add(opts.SettleMax)
	tick := opts.Settle / 4
	if tick < 10*time.Millisecond {
		tick = 10 * time.Millisecond
	}
	devs, err := ReadDevices(opts.Sysfs)
	if err != nil {
		return nil, err
	}
	stableSince := time.Now()
	last := len(devs)
	for time.Since(stableSince) < opts.Settle && time.Now().Before(deadline) {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(tick):
		}
		devs, err = ReadDevices(opts.Sysfs)
		if err != nil {
			return nil, err
		}
		if len(devs) != last {
			last = len(devs)
			stableSince = time.Now()
		}
	}
	return devs, nil
}
