package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/esir-project/esir/agent/sysinit"
	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/spf13/cobra"
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
on the console. It then waits for a power signal (SIGUSR2/SIGPWR power off,
SIGTERM/SIGINT reboot); the install pipeline continues from here (agent issue).

Run by hand (not PID 1) it mounts nothing unless --root is given (then it
mounts under that directory, for tests in a private mount namespace), reads
the command line from --cmdline or /proc/cmdline, prints the same line and
exits on the first power signal instead of powering off.`,
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
