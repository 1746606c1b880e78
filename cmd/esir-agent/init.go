package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/esir-project/esir/agent/install"
	"github.com/esir-project/esir/agent/pipeline"
	"github.com/esir-project/esir/agent/sysinit"
	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

// addInitCmd registers `esir-agent init` and, when the process is PID 1 (the
// netboot environment's /init), makes it the command that runs whatever the
// kernel passed as arguments.
func addInitCmd(root *cobra.Command, app *cli.App) {
	root.AddCommand(newInitCmd(app))
	if sysinit.IsPID1() {
		root.SetArgs([]string{"init"})
	}
}

func newInitCmd(app *cli.App) *cobra.Command {
	var mountRoot, cmdline string
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Start the netboot environment (runs as /init, PID 1)",
		Long: `As PID 1 of the netboot environment, init mounts proc, sys, devtmpfs, devpts,
/run and /tmp, puts the console on stdin/stdout/stderr, reads the esir.* keys of
the kernel command line and prints the line
  esir-agent: netboot environment up kernel=... mode=... mac=... server=...
on the console. With esir.server and esir.mac set it then runs the netboot
pipeline (agent/pipeline): loads the hardware's modules, brings up the NIC
with that MAC by DHCP, registers, installs what the server assigns while
reporting to it, seeds, and reboots (or kexecs); without them it waits for a
power signal (SIGUSR2/SIGPWR power off, SIGTERM/SIGINT reboot).

Run by hand (not PID 1) it mounts nothing unless --root is given (then it
mounts under that directory, for tests in a private mount namespace), reads
the command line from --cmdline or /proc/cmdline, prints the same line and
exits on the first power signal instead of powering off; it does not run the
pipeline (esir-agent run does, as an ordinary process).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runInit(cmd.Context(), app, mountRoot, cmdline)
		},
	}
	cmd.Flags().StringVar(&mountRoot, "root", "", "mount the filesystems under this directory (not PID 1 only)")
	cmd.Flags().StringVar(&cmdline, "cmdline", "", "kernel command line to parse instead of /proc/cmdline (not PID 1 only)")
	return cmd
}

func runInit(ctx context.Context, app *cli.App, mountRoot, cmdline string) error {
	pid1 := sysinit.IsPID1()
	out := app.Stdout
	if pid1 {
		if err := sysinit.SetupPID1(); err != nil {
			// Keep PID 1 alive: a dying init panics the kernel and hides the cause.
			fmt.Fprintln(os.Stderr, "esir-agent:", err)
			haltForever()
		}
		out = os.Stdout
		app.Log = slog.New(slog.NewTextHandler(os.Stderr, nil))
		go sysinit.Reap(ctx, app.Log)
	} else if mountRoot != "" {
		if err := sysinit.MountAll(mountRoot, sysinit.Mounts()); err != nil {
			return err
		}
	}
	var c sysinit.Cmdline
	var err error
	if cmdline != "" && !pid1 {
		c, err = sysinit.ParseCmdline(cmdline)
	} else {
		c, err = sysinit.ReadCmdline()
	}
	if err != nil {
		app.Log.Error("reading the kernel command line", "err", err)
	}
	fmt.Fprintln(out, markerLine(sysinit.KernelRelease(), c))
	if pid1 && c.Server != "" && len(c.MAC) > 0 {
		netboot(ctx, app, c)
		haltForever()
	}
	if c.Server == "" {
		app.Log.Warn("no esir.server on the kernel command line: the agent has no server to register with")
	}
	fmt.Fprintln(out, "esir-agent: waiting for a power signal (SIGUSR2/SIGPWR power off, SIGTERM/SIGINT reboot)")
	action := sysinit.WaitPowerSignal(ctx)
	if !pid1 {
		fmt.Fprintf(out, "esir-agent: %s requested, exiting (not PID 1)\n", action)
		return nil
	}
	fmt.Fprintf(out, "esir-agent: %s\n", action)
	if err := sysinit.Power(action); err != nil {
		app.Log.Error("power", "err", err)
	}
	haltForever()
	return nil
}

// netboot runs the pipeline as PID 1 and then does what it says: reboot
// (the server answers "local disk" to the installed node's next PXE boot),
// kexec into the installed system, or, when the pipeline cannot go on,
// reboot after a pause so the node PXE-boots the agent again. A power
// signal meanwhile stops the pipeline and is obeyed.
func netboot(ctx context.Context, app *cli.App, c sysinit.Cmdline) {
	raw, _ := os.ReadFile("/proc/cmdline")
	logs := pipeline.NewLogBuffer()
	log := pipeline.NewLogger(app.Log.Handler(), logs)
	agentBin, err := os.Executable()
	if err != nil {
		agentBin = "/init"
	}
	cfg := pipeline.Config{Server: c.Server, Token: c.Token, MAC: c.MAC,
		Modules:       filepath.Join("/lib/modules", sysinit.KernelRelease()),
		KernelCmdline: strings.TrimSpace(string(raw)), DHCP: true, ResolvConf: "/etc/resolv.conf", WorkDir: "/tmp",
		Install: install.Options{Cmdline: consoleArgs(string(raw)), Agent: agentBin, WorkDir: "/run"},
		Logs:    logs, Log: log, Version: version()}
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	signalled := make(chan sysinit.PowerAction, 1)
	go func() {
		a := sysinit.WaitPowerSignal(pctx)
		if pctx.Err() == nil {
			signalled <- a
			cancel()
		}
	}()
	out, err := pipeline.Run(pctx, cfg)
	select {
	case a := <-signalled:
		log.Info("power signal: stopping the pipeline", "action", a.String())
		power(log, a)
		return
	default:
	}
	cancel()
	if err != nil {
		log.Error("netboot pipeline stopped; rebooting in 60 s to PXE-boot again", "err", err)
		time.Sleep(time.Minute)
		power(log, sysinit.Reboot)
		return
	}
	log.Info("netboot pipeline done", "next", out.Next.String())
	if out.Next == pipeline.Kexec {
		if err := pipeline.LoadKexec(out.Result, "/run"); err != nil {
			log.Error("kexec: falling back to a reboot", "err", err)
		} else {
			unix.Sync()
			if err := unix.Reboot(unix.LINUX_REBOOT_CMD_KEXEC); err != nil {
				log.Error("kexec: falling back to a reboot", "err", err)
			}
		}
	}
	power(log, sysinit.Reboot)
}

func power(log *slog.Logger, a sysinit.PowerAction) {
	fmt.Fprintf(os.Stdout, "esir-agent: %s\n", a)
	if err := sysinit.Power(a); err != nil {
		log.Error("power", "err", err)
	}
}

// consoleArgs returns the console= arguments of a kernel command line, in
// order, for the installed system's command line.
func consoleArgs(cmdline string) string {
	var out []string
	for _, f := range strings.Fields(cmdline) {
		if strings.HasPrefix(f, "console=") {
			out = append(out, f)
		}
	}
	return strings.Join(out, " ")
}

func markerLine(kernel string, c sysinit.Cmdline) string {
	mode, mac, server := c.Mode, "none", c.Server
	if mode == "" {
		mode = "none"
	}
	if len(c.MAC) > 0 {
		mac = c.MAC.String()
	}
	if server == "" {
		server = "none"
	}
	return fmt.Sprintf("esir-agent: netboot environment up kernel=%s mode=%s mac=%s server=%s", kernel, mode, mac, server)
}

// haltForever keeps PID 1 alive after a failure it cannot recover from.
func haltForever() {
	for {
		time.Sleep(time.Hour)
	}
}
