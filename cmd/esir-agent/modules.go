package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/modules"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

func newModulesCmd(app *cli.App) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "modules",
		Short: "Load the kernel modules this machine's hardware needs",
	}
	cmd.AddCommand(newModulesLoadCmd(app))
	return cmd
}

func newModulesLoadCmd(app *cli.App) *cobra.Command {
	var (
		sysfs, kernel string
		asJSON        bool
		settle        time.Duration
	)
	cmd := &cobra.Command{
		Use:   "load [--sysfs /sys] [--kernel /lib/modules/$(uname -r)] [--json]",
		Short: "Match the devices to modules and load them, repeating until no new device appears",
		Long: `Load reads every device's modalias under --sysfs, matches them against the
kernel's module tree, loads the plan (dependencies and softdeps first, options
from modprobe.d and the kernel command line), then looks again for devices the
new drivers revealed (virtio devices appear only once virtio_pci is loaded)
until nothing new appears. A module that fails is reported and the others
still load; the exit status is non-zero when any failed.`,
		Example: `  esir-agent modules load
  esir-agent modules load --json > /run/esir/modules.json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if kernel == "" {
				var u unix.Utsname
				if err := unix.Uname(&u); err != nil {
					return fmt.Errorf("uname: %w", err)
				}
				kernel = filepath.Join("/lib/modules", unix.ByteSliceToString(u.Release[:]))
			}
			opts := modules.Options{}
			if data, err := os.ReadFile("/proc/cmdline"); err == nil {
				opts.KernelCmdline = strings.TrimSpace(string(data))
			}
			t, err := modules.Open(kernel, opts)
			if err != nil {
				return err
			}
			for _, w := range t.Warnings {
				app.Log.Warn("modprobe config", "warning", w)
			}
			res, err := modules.Load(cmd.Context(), t, modules.LoadOptions{Sysfs: sysfs, Settle: settle, Log: app.Log})
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(app.Stdout)
				enc.SetIndent("", "  ")
				if err := enc.Encode(res); err != nil {
					return err
				}
			} else {
				fresh := 0
				for _, l := range res.Loaded {
					if !l.Already {
						fresh++
					}
				}
				fmt.Fprintf(app.Stdout, "modules: %d loaded (%d already present), %d failed, %d skipped, %d rounds, %d devices\n",
					fresh, len(res.Loaded)-fresh, len(res.Failed), len(res.Skipped), res.Rounds, len(res.Devices))
				for _, f := range res.Failed {
					fmt.Fprintf(app.Stdout, "modules: FAILED %s (%s): %s\n", f.Module, f.Path, f.Error)
				}
			}
			if err := res.Err(); err != nil {
				return fmt.Errorf("%d modules failed: %w", len(res.Failed), err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&sysfs, "sysfs", "/sys", "sysfs root")
	cmd.Flags().StringVar(&kernel, "kernel", "", "kernel module tree (default /lib/modules/$(uname -r))")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the result as JSON")
	cmd.Flags().DurationVar(&settle, "settle", 300*time.Millisecond, "how long the device list must stay unchanged before the next round")
	return cmd
}
