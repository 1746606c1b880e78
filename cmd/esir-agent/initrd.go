package main

import (
	"os"
	"time"

	"github.com/esir-project/esir/agent/initrd"
	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/spf13/cobra"
)

// addInstallCmds registers install, initrd and enroll. The kernel of an
// installed system runs esir-agent as PID 1 with the argument "initrd" (the
// "-- initrd" its boot entry ends with); addInitCmd points PID 1 at init, so
// this must run after it to select initrd instead.
func addInstallCmds(root *cobra.Command, app *cli.App) {
	root.AddCommand(newInstallCmd(app), newInitrdCmd(app), newEnrollCmd(app))
	if os.Getpid() == 1 && len(os.Args) > 1 && os.Args[1] == "initrd" {
		root.SetArgs([]string{"initrd"})
	}
}

func newInitrdCmd(app *cli.App) *cobra.Command {
	return &cobra.Command{
		Use:   "initrd",
		Short: "Early boot of an installed system (run as /init of its initramfs)",
		Long: `initrd is /init of the early-boot initramfs the installer writes: it loads the node's
hardware-matched modules, finds the root partition by PARTUUID, mounts it and switches to
/sbin/init. The installed kernel command line ends with "-- initrd" to select it.`,
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			err := initrd.Run(cmd.Context(), app.Stderr)
			if os.Getpid() == 1 {
				// PID 1 must not exit: show the error and keep the console.
				app.Log.Error("early boot failed", "err", err)
				for {
					time.Sleep(time.Hour)
				}
			}
			return err
		},
	}
}
