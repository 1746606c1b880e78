// Package pipeline is the node agent's netboot pipeline, what esir-agent
// does as /init of the netboot environment once sysinit has mounted the
// kernel's filesystems:
//
//	modules   load the modules the hardware needs from the netboot
//	          environment's module tree, rescanning until nothing new
//	network   bring up the NIC whose MAC the kernel command line names
//	          (never chosen by name) and configure it by DHCP (nclient4)
//	register  announce the node and its hardware to the server
//	inventory (mode inventory) poll the assignment until there is one
//	fetch     download the image over BitTorrent; the install reads it
//	          in order while pieces still arrive
//	install   install.Run: disk, partition, mkfs, unpack, personalise,
//	          early boot, bootloader, node service, sync
//	report    the final word: installed, or the failed step, its device
//	          and cause with the log's tail; never installed on failure
//	seed      keep seeding the image for the assignment's SeedSeconds
//	          (0: while other nodes still pull from this one)
//
// Progress events (phase, step, bytes, rate, peers, HAVE counters) and the
// log lines go to the server about once a second. Every network step
// retries with backoff. Run returns what the node should do next (reboot,
// kexec or boot its local disk); the caller, PID 1 or a test, does it.
//
// The same pipeline runs as an ordinary process aimed at a disk image file
// (esir-agent run): without module loading and DHCP, with the disk chosen
// by path.
package pipeline

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/esir-project/esir/agent/enroll"
	"github.com/esir-project/esir/agent/install"
	"github.com/esir-project/esir/modules"
	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/swarm"
	"github.com/esir-project/esir/swarm/havewire"
)

// StepFetch names the image download in failure reports (the install's own
// steps are named by install.Steps).
const StepFetch = "fetch"

// Config is what the pipeline needs from the kernel command line (or the
// flags of esir-agent run).
type Config struct {
	// Server is the deployment server's base URL; Token the node's boot
	// token; MAC the boot NIC's address, the node's identity.
	Server string
	Token  string
	MAC    net.HardwareAddr
	// Modules, when set, is the kernel module tree (/lib/modules/VERSION)
	// from which the modules matching the hardware are loaded first.
	Modules string
	// KernelCmdline gives module options (mod.param=value) to the loader.
	KernelCmdline string
	// Sysfs is where devices are read (default /sys).
	Sysfs string
	// DHCP brings up the NIC whose MAC is MAC and configures it by DHCP;
	// ResolvConf, when set, receives the lease's DNS servers.
	DHCP       bool
	ResolvConf string
	// Disk, when set, replaces the assignment's disk rule by this device
	// (esir-agent run --disk: the loop device of a disk image file).
	Disk string
	// Install carries the install's node-side options (Cmdline, Agent,
	// Devices, Tools, WorkDir); MAC and Report are set by the pipeline.
	Install install.Options
	// WorkDir holds the downloaded archive, which the node seeds from
	// (default os.TempDir(); a tmpfs in the netboot environment).
	WorkDir string
	// SwarmListen is the BitTorrent peer address (default ":6881").
	SwarmListen string
	// HaveMode is the HAVE suppression mode (adaptive by default).
	HaveMode havewire.Mode
	// Rack labels the node for the tracker's peer selection.
	Rack string
	// WebSeedAfter falls back to the server's web seed after this long
	// without data (swarm's default when 0).
	WebSeedAfter time.Duration
	// Once ends Run after one install attempt, failed or not, instead of
	// waiting for the next assignment (esir-agent run).
	Once bool
	// SeedIdle: with SeedSeconds 0, seeding ends once no byte was uploaded
	// for this long (default 10 s); SeedMax caps that (default 10 min).
	SeedIdle, SeedMax time.Duration
	// Every is the event interval (default 1 s).
	Every time.Duration
	// Backoff bounds the retries of network steps (default 1 s doubling
	// to 30 s).
	Backoff Backoff
	// Logs collects the log lines that go to the server; Log writes them
	// (and to the console). Both may be nil.
	Logs *LogBuffer
	Log  *slog.Logger
	// Version is the agent's build version, for the server's log.
	Version string
	// HTTP is the client for the server (http.DefaultClient when nil).
	HTTP *http.Client
}

// Next is what the node does once the pipeline is done.
type Next int

// What comes after the pipeline.
const (
	// Reboot: the firmware boots the network first and the server answers
	// "local disk" for an installed node.
	Reboot Next = iota
	// Kexec: start the installed kernel directly (LoadKexec, then
	// sysinit's kexec reboot).
	Kexec
	// LocalDisk: the server says the node is installed; reboot to it.
	LocalDisk
)

// String names the action.
func (n Next) String() string {
	switch n {
	case Kexec:
		return "kexec"
	case LocalDisk:
		return "local disk"
	}
	return "reboot"
}

// Outcome is what Run did.
type Outcome struct {
	Next       Next
	Assignment *agentapi.Assignment // nil in local mode
	Result     *install.Result      // the install; nil in local mode
	Fetch      *swarm.Result        // the download's counters; nil in local mode
}

// Failure is an install attempt that failed: the step, and the error that
// names the device and the cause. It was reported to the server.
type Failure struct {
	Assignment string
	Step       string
	Err        error
}

func (f *Failure) Error() string {
	return fmt.Sprintf("assignment %s failed at step %s: %v", f.Assignment, f.Step, f.Err)
}

func (f *Failure) Unwrap() error { return f.Err }

// pipe is one Run's state.
type pipe struct {
	cfg  Config
	log  *slog.Logger
	logs *LogBuffer
	cl   *agentapi.Client
	mac  string
}

// Run runs the pipeline until the node has something to do next (reboot,
// kexec, local disk), ctx ends, or, with Once, an install attempt failed:
// then the error is a *Failure, already reported to the server.
func Run(ctx context.Context, cfg Config) (*Outcome, error) {
	if cfg.Server == "" {
		return nil, errors.New("pipeline: no server (esir.server= on the kernel command line, or --server)")
	}
	if len(cfg.MAC) == 0 {
		return nil, errors.New("pipeline: no MAC (esir.mac= on the kernel command line, or --mac)")
	}
	if cfg.Sysfs == "" {
		cfg.Sysfs = "/sys"
	}
	if cfg.WorkDir == "" {
		cfg.WorkDir = os.TempDir()
	}
	if cfg.SwarmListen == "" {
		cfg.SwarmListen = ":6881"
	}
	if cfg.SeedIdle <= 0 {
		cfg.SeedIdle = 10 * time.Second
	}
	if cfg.SeedMax <= 0 {
		cfg.SeedMax = 10 * time.Minute
	}
	if cfg.Every <= 0 {
		cfg.Every = time.Second
	}
	if cfg.Logs == nil {
		cfg.Logs = NewLogBuffer()
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	log = log.With("mac", cfg.MAC.String())
	p := &pipe{cfg: cfg, log: log, logs: cfg.Logs, mac: cfg.MAC.String(),
		cl: &agentapi.Client{Server: strings.TrimRight(cfg.Server, "/"), Token: cfg.Token, HTTP: cfg.HTTP}}
	return p.run(ctx)
}

func (p *pipe) run(ctx context.Context) (*Outcome, error) {
	if p.cfg.Modules != "" {
		p.loadModules(ctx)
	}
	if p.cfg.DHCP {
		nic, err := FindNIC(ctx, p.cfg.MAC, time.Minute)
		if err != nil {
			return nil, err
		}
		lease, err := DHCP(ctx, nic, p.cfg.ResolvConf, p.log)
		if err != nil {
			return nil, err
		}
		p.log.Info("network: configured by DHCP", "nic", nic, "address", lease.Address, "router", lease.Router,
			"dhcp_server", lease.Server)
	}
	var resp *agentapi.RegisterResponse
	err := retry(ctx, p.log, "register at "+p.cfg.Server, func() error {
		var err error
		resp, err = p.cl.Register(ctx, agentapi.RegisterRequest{MAC: p.mac, Inventory: enroll.Inventory("/"),
			AgentVersion: p.cfg.Version})
		return permanent(err)
	}, p.cfg.Backoff)
	if err != nil {
		return nil, err
	}
	for {
		p.log.Info("server: "+resp.Mode+" mode", "hostname", resp.Hostname)
		switch resp.Mode {
		case agentapi.ModeLocal:
			return &Outcome{Next: LocalDisk}, nil
		case agentapi.ModeInstall:
			if resp.Assignment == nil {
				return nil, fmt.Errorf("pipeline: the server at %s answered install mode without an assignment", p.cfg.Server)
			}
			out, err := p.install(ctx, resp.Assignment)
			if err == nil {
				return out, nil
			}
			if p.cfg.Once || ctx.Err() != nil {
				return nil, err
			}
			p.log.Error("install failed; waiting for the server's next assignment", "err", err)
		case agentapi.ModeInventory:
		default:
			return nil, fmt.Errorf("pipeline: the server at %s answered an unknown mode %q", p.cfg.Server, resp.Mode)
		}
		wait := time.Duration(resp.PollSeconds) * time.Second
		if wait <= 0 {
			wait = 10 * time.Second
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("pipeline: waiting for an assignment: %w", ctx.Err())
		case <-time.After(wait):
		}
		err := retry(ctx, p.log, "poll the assignment at "+p.cfg.Server, func() error {
			var err error
			resp, err = p.cl.Assignment(ctx)
			return permanent(err)
		}, p.cfg.Backoff)
		if err != nil {
			return nil, err
		}
	}
}

// loadModules loads the hardware's modules; failures are logged (a missing
// driver shows later as a missing NIC or disk, with a precise error).
func (p *pipe) loadModules(ctx context.Context) {
	t, err := modules.Open(p.cfg.Modules, modules.Options{KernelCmdline: p.cfg.KernelCmdline})
	if err != nil {
		p.log.Error("modules: cannot read the module tree", "dir", p.cfg.Modules, "err", err)
		return
	}
	res, err := modules.Load(ctx, t, modules.LoadOptions{Sysfs: p.cfg.Sysfs, Log: p.log})
	if err != nil {
		p.log.Error("modules: load", "err", err)
		return
	}
	var names []string
	for _, l := range res.Loaded {
		if !l.Already {
			names = append(names, l.Module)
		}
	}
	p.log.Info("modules: loaded", "count", len(names), "modules", strings.Join(names, ","), "failed", len(res.Failed),
		"rounds", res.Rounds, "devices", len(res.Devices))
	for _, f := range res.Failed {
		p.log.Warn("modules: failed", "module", f.Module, "err", f.Error)
	}
	p.loadFilesystems(t)
}

// Filesystems are the modules the install needs whatever the hardware: no
// device's modalias names them, so hardware matching never loads them.
func Filesystems() []string { return []string{"ext4"} }

// loadFilesystems loads Filesystems with their dependencies; a builtin one
// needs nothing, a failure is logged (mkfs or the mount then fails, reported).
func (p *pipe) loadFilesystems(t *modules.Tree) {
	plan, err := t.PlanNames(Filesystems()...)
	if err != nil {
		p.log.Warn("modules: filesystem plan", "err", err)
	}
	if plan == nil {
		return
	}
	for _, s := range plan.Steps {
		switch err := modules.Insert(s.Path, s.Params); {
		case err == nil:
			p.log.Info("module loaded", "module", s.Module, "reason", "filesystem for the install")
		case errors.Is(err, modules.ErrLoaded):
		default:
			p.log.Warn("modules: failed", "module", s.Module, "err", err)
		}
	}
}

// install carries out one assignment and reports its end.
func (p *pipe) install(ctx context.Context, asg *agentapi.Assignment) (*Outcome, error) {
	log := p.log.With("assignment", asg.ID)
	log.Info("install: assignment", "image", asg.Image.Ref, "hostname", asg.Hostname, "size", asg.Image.Size)
	rep := newReporter(p.cl, p.mac, asg.ID, p.logs)
	rctx, stopReports := context.WithCancel(ctx)
	defer stopReports()
	go rep.run(rctx, p.cfg.Every)
	rep.mark(agentapi.PhaseBooting, "")

	f, err := p.startFetch(ctx, asg, rep, log)
	if err != nil {
		p.report(ctx, rep, asg, StepFetch, err, log)
		return nil, &Failure{Assignment: asg.ID, Step: StepFetch, Err: err}
	}
	defer f.close()

	local := *asg
	if p.cfg.Disk != "" {
		local.Disk.Rule = agentapi.DiskRule{Path: p.cfg.Disk}
	}
	opts := p.cfg.Install
	opts.MAC = p.mac
	opts.Report = func(e install.Event) {
		logStep(log, e)
		if e.Status == install.Started {
			rep.mark(agentapi.PhaseInstalling, e.Step)
		}
	}
	img := install.Image{Ref: asg.Image.Ref, SHA256: asg.Image.SHA256, Size: asg.Image.Size, Open: f.open}
	res, err := install.Run(ctx, img, &local, opts)
	if err != nil {
		step := StepFetch
		if ferr := f.failed(); ferr != nil {
			err = ferr // the download broke: the unpack only saw its reader end
		} else {
			var se *install.StepError
			if errors.As(err, &se) {
				step = se.Step
			}
		}
		p.report(ctx, rep, asg, step, err, log)
		return nil, &Failure{Assignment: asg.ID, Step: step, Err: err}
	}
	fres, err := f.d.Wait(ctx)
	if err != nil {
		// The unpack read and checked every byte; the swarm's own check disagrees.
		p.report(ctx, rep, asg, StepFetch, err, log)
		return nil, &Failure{Assignment: asg.ID, Step: StepFetch, Err: err}
	}
	log.Info("install: installed", "device", res.Device, "root", "PARTUUID="+res.RootPartUUID, "kernel", res.Kernel,
		"boot_modules", strings.Join(res.BootModules, ","), "fetch", fres.Duration.Round(time.Millisecond),
		"bytes_from", fres.From)
	rep.mark(agentapi.PhaseInstalling, install.StepSync)
	stopReports()
	_ = rep.flush(context.WithoutCancel(ctx))
	if err := retry(ctx, log, "report installed", func() error {
		_, err := p.cl.Report(ctx, agentapi.Report{MAC: p.mac, Assignment: asg.ID, Success: true})
		return permanent(err)
	}, p.cfg.Backoff); err != nil {
		return nil, err
	}
	p.seed(ctx, f, asg.SeedSeconds, log)
	fres, _ = f.d.Wait(context.WithoutCancel(ctx))
	next := Reboot
	if asg.Kexec {
		next = Kexec
	}
	return &Outcome{Next: next, Assignment: asg, Result: res, Fetch: &fres}, nil
}

// report sends a failed attempt's report: step, cause (with the device)
// and the log's tail.
func (p *pipe) report(ctx context.Context, rep *reporter, asg *agentapi.Assignment, step string, cause error, log *slog.Logger) {
	log.Error("install: step failed", "step", step, "err", cause)
	_ = rep.flush(context.WithoutCancel(ctx))
	r := agentapi.Report{MAC: p.mac, Assignment: asg.ID, Success: false, Step: step, Reason: cause.Error(),
		LogTail: p.logs.Tail()}
	rctx := ctx
	if ctx.Err() != nil {
		// Interrupted: still try once to tell the server why.
		var cancel context.CancelFunc
		rctx, cancel = context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
	}
	if err := retry(rctx, log, "report the failure", func() error {
		_, err := p.cl.Report(rctx, r)
		return permanent(err)
	}, p.cfg.Backoff.capped(2*time.Minute)); err != nil {
		log.Error("install: the failure could not be reported", "err", err)
	}
}

func logStep(log *slog.Logger, e install.Event) {
	args := []any{"step", e.Step, "device", e.Device}
	if e.Detail != "" {
		args = append(args, "detail", e.Detail)
	}
	switch e.Status {
	case install.Failed:
		log.Error("install step failed", args...)
	case install.Progress:
		log.Debug("install progress", append(args, "bytes", e.Bytes, "total", e.Total)...)
	default:
		log.Info("install step "+e.Status, args...)
	}
}

// fetch is the image download that feeds the install.
type fetch struct {
	dir  string
	node *swarm.Node
	d    *swarm.Download
	// cancel ends the stream reader with the download's error.
	ctx    context.Context
	cancel context.CancelCauseFunc
}

// startFetch resolves the image at the server and starts the download,
// retrying with backoff while the server cannot be reached.
func (p *pipe) startFetch(ctx context.Context, asg *agentapi.Assignment, rep *reporter, log *slog.Logger) (*fetch, error) {
	node, err := swarm.NewNode(swarm.NodeConfig{Listen: p.cfg.SwarmListen, Mode: p.cfg.HaveMode, Log: log})
	if err != nil {
		return nil, fmt.Errorf("swarm peer on %s: %w", p.cfg.SwarmListen, err)
	}
	dir := filepath.Join(p.cfg.WorkDir, "esir-fetch-"+asg.ID)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		node.Close()
		return nil, err
	}
	progress := func(sp swarm.Progress) {
		rep.set(func(pr *progress) {
			pr.Bytes, pr.Total, pr.Rate, pr.Peers = sp.Bytes, sp.Total, sp.Rate, sp.Peers
			pr.Have = &agentapi.Have{Emitted: sp.Have.Emitted, Sent: sp.Have.Messages(), Suppressed: sp.Have.Redundant,
				Coalesced: sp.Have.Coalesced}
		})
		if sp.Event != "" {
			log.Info("fetch: "+sp.Event, "phase", sp.Phase, "bytes", sp.Bytes, "peers", sp.Peers, "error", sp.Err)
		}
	}
	var d *swarm.Download
	err = retry(ctx, log, "fetch "+asg.Image.Ref, func() error {
		var err error
		d, err = node.Fetch(ctx, swarm.FetchConfig{Server: p.cfg.Server, Image: asg.Image.Ref,
			Out: filepath.Join(dir, "image.tar.zst"), Rack: p.cfg.Rack, WebSeedAfter: p.cfg.WebSeedAfter,
			Progress: progress, HTTP: p.cfg.HTTP})
		if err != nil && strings.Contains(err.Error(), "on this node") {
			return permanentErr{err} // cannot store it here: retrying cannot help
		}
		return err
	}, p.cfg.Backoff.capped(5*time.Minute))
	if err != nil {
		node.Close()
		os.RemoveAll(dir)
		return nil, err
	}
	rep.mark(agentapi.PhaseFetching, "")
	f := &fetch{dir: dir, node: node, d: d}
	f.ctx, f.cancel = context.WithCancelCause(ctx)
	go func() {
		if _, err := d.Wait(f.ctx); err != nil && f.ctx.Err() == nil {
			f.cancel(err)
		}
	}()
	return f, nil
}

// open is install.Image.Open: the archive in order, while it arrives.
func (f *fetch) open(context.Context) (io.ReadCloser, error) {
	return &causeReader{r: f.d.Reader(f.ctx), ctx: f.ctx}, nil
}

// failed returns the download's error, if it broke.
func (f *fetch) failed() error {
	if err := context.Cause(f.ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

func (f *fetch) close() {
	f.cancel(context.Canceled)
	f.d.Close()
	f.node.Close()
	os.RemoveAll(f.dir)
}

// causeReader replaces the reader's context error by the context's cause
// (the download's failure).
type causeReader struct {
	r   io.ReadCloser
	ctx context.Context
}

func (c *causeReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	if err != nil && err != io.EOF {
		if cause := context.Cause(c.ctx); cause != nil && !errors.Is(cause, context.Canceled) {
			err = fmt.Errorf("download: %w", cause)
		}
	}
	return n, err
}

func (c *causeReader) Close() error { return c.r.Close() }

// seed keeps seeding after the install: secs seconds when the assignment
// says so, otherwise while other nodes still pull (uploads within SeedIdle),
// at most SeedMax.
func (p *pipe) seed(ctx context.Context, f *fetch, secs int, log *slog.Logger) {
	start := time.Now()
	if secs > 0 {
		log.Info("seed: seeding the image", "for", time.Duration(secs)*time.Second)
		f.d.Seed(ctx, time.Duration(secs)*time.Second)
		return
	}
	up := f.d.Progress().Uploaded
	last := time.Now()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if u := f.d.Progress().Uploaded; u != up {
			up, last = u, time.Now()
		}
		if time.Since(last) >= p.cfg.SeedIdle || time.Since(start) >= p.cfg.SeedMax {
			log.Info("seed: done", "seeded", time.Since(start).Round(time.Second), "uploaded", up)
			return
		}
	}
}
