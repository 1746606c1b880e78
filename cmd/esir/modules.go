package main

import (
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/initramfs"
	"github.com/esir-project/esir/modules"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
)

// modulesFlags are the inputs every `esir modules` command shares.
type modulesFlags struct {
	sysfs, kernel, devices string
	config                 []string
	noConfig, asJSON       bool
}

func (f *modulesFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.sysfs, "sysfs", "/sys", "sysfs root to read the devices' modaliases from (a recorded tree works)")
	cmd.Flags().StringVar(&f.devices, "devices", "", "read modaliases from this file (one per line) instead of --sysfs")
	cmd.Flags().StringVar(&f.kernel, "kernel", "", "kernel module tree (default /lib/modules/$(uname -r))")
	cmd.Flags().StringSliceVar(&f.config, "config", nil, "modprobe.d directories or files (default: the standard ones under the tree's root)")
	cmd.Flags().BoolVar(&f.noConfig, "no-config", false, "ignore modprobe.d configuration")
	cmd.Flags().BoolVar(&f.asJSON, "json", false, "print JSON")
}

func (f *modulesFlags) open(app *cli.App) (*modules.Tree, []modules.Device, error) {
	kernel := f.kernel
	if kernel == "" {
		var u unix.Utsname
		if err := unix.Uname(&u); err != nil {
			return nil, nil, fmt.Errorf("uname: %w", err)
		}
		kernel = filepath.Join("/lib/modules", unix.ByteSliceToString(u.Release[:]))
	}
	opts := modules.Options{ConfigDirs: f.config}
	if f.noConfig {
		opts.ConfigDirs = []string{}
	}
	t, err := modules.Open(kernel, opts)
	if err != nil {
		return nil, nil, err
	}
	for _, w := range t.Warnings {
		app.Log.Warn("modprobe config", "warning", w)
	}
	var devs []modules.Device
	if f.devices != "" {
		devs, err = modules.ReadDeviceList(f.devices)
	} else {
		devs, err = modules.ReadDevices(f.sysfs)
	}
	if err != nil {
		return nil, nil, err
	}
	if len(devs) == 0 {
		return nil, nil, fmt.Errorf("no devices with a modalias under %s", f.sysfs)
	}
	return t, devs, nil
}

func newModulesCmd(app *cli.App) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "modules",
		Short: "Match hardware to kernel modules: load plans, hardware profiles, boot module sets",
		Example: `  esir modules match --sysfs /sys --kernel /lib/modules/6.1.0-26-amd64
  esir modules match --devices recorded-modaliases.txt --kernel /srv/root/lib/modules/6.1.0-26-amd64 --json
  esir modules profile
  esir modules boot --kernel /mnt/lib/modules/6.1.0-26-amd64 --fs ext4 --network --initramfs /mnt/boot/esir-modules.img`,
	}
	cmd.AddCommand(newModulesMatchCmd(app), newModulesProfileCmd(app), newModulesBootCmd(app))
	return cmd
}

func newModulesMatchCmd(app *cli.App) *cobra.Command {
	var f modulesFlags
	cmd := &cobra.Command{
		Use:   "match [--sysfs DIR | --devices FILE] [--kernel DIR] [--json]",
		Short: "Print the ordered module load plan for a machine's devices, with the reason for each module",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			t, devs, err := f.open(app)
			if err != nil {
				return err
			}
			plan, perr := t.Plan(devs)
			if f.asJSON {
				if err := printModulesJSON(app.Stdout, plan); err != nil {
					return err
				}
			} else if err := writePlan(app.Stdout, plan); err != nil {
				return err
			}
			if perr != nil {
				return fmt.Errorf("the plan has problems: %w", perr)
			}
			return nil
		},
	}
	f.register(cmd)
	return cmd
}

func printModulesJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func writePlan(w io.Writer, p *modules.Plan) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "kernel %s: %d modules to load\n", p.Kernel, len(p.Steps))
	fmt.Fprintln(tw, "#\tMODULE\tREASON\tPARAMS")
	for i, s := range p.Steps {
		reason := s.Reason
		switch {
		case len(s.Devices) > 0:
			var ds []string
			for _, d := range s.Devices {
				ds = append(ds, shortDevice(d))
			}
			reason = "device " + strings.Join(ds, ", ")
		case s.Of != "":
			reason += " of " + s.Of
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", i+1, s.Module, reason, s.Params)
	}
	for _, s := range p.Skipped {
		fmt.Fprintf(tw, "-\t%s\tskipped: %s\t\n", s.Module, s.Reason)
	}
	if len(p.Unmatched) > 0 {
		fmt.Fprintf(tw, "-\t-\t%d devices match no module\t\n", len(p.Unmatched))
	}
	return tw.Flush()
}

func newModulesProfileCmd(app *cli.App) *cobra.Command {
	var f modulesFlags
	cmd := &cobra.Command{
		Use:   "profile [--sysfs DIR | --devices FILE] [--kernel DIR] [--json]",
		Short: "Summarise a machine's hardware by the modules that drive it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			t, devs, err := f.open(app)
			if err != nil {
				return err
			}
			plan, perr := t.Plan(devs)
			if perr != nil {
				app.Log.Warn("module plan has problems", "err", perr)
			}
			prof := t.Profile(plan)
			if f.asJSON {
				return printModulesJSON(app.Stdout, prof)
			}
			return prof.WriteText(app.Stdout)
		},
	}
	f.register(cmd)
	return cmd
}

func newModulesBootCmd(app *cli.App) *cobra.Command {
	var (
		f         modulesFlags
		fs, extra []string
		network   bool
		out       string
		list      bool
	)
	cmd := &cobra.Command{
		Use:   "boot --kernel DIR [--fs ext4] [--network] [--initramfs FILE] [--list]",
		Short: "The modules an installed system needs to boot on this machine (storage, root filesystem, network)",
		Long: `Boot computes the early-boot module set of an installed system's kernel for this
machine's hardware. With --initramfs it writes a small initramfs holding just
those module files and their load list (lib/modules/VERSION/esir-boot.load);
with --list it prints a modules-load.d / initramfs-tools module list.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			t, devs, err := f.open(app)
			if err != nil {
				return err
			}
			plan, err := t.BootPlan(devs, modules.BootNeeds{Filesystems: fs, Network: network, Extra: extra})
			if err != nil {
				return err
			}
			if out != "" {
				a := initramfs.New()
				if err := modules.AddToInitramfs(a, t, plan); err != nil {
					return err
				}
				if err := a.WriteFile(out); err != nil {
					return err
				}
				app.Log.Info("boot modules written", "initramfs", out, "modules", len(plan.Steps))
			}
			switch {
			case f.asJSON:
				return printModulesJSON(app.Stdout, plan)
			case list:
				_, err := app.Stdout.Write(plan.ModuleList(false))
				return err
			case out == "":
				return writePlan(app.Stdout, plan)
			}
			return nil
		},
	}
	f.register(cmd)
	cmd.Flags().StringSliceVar(&fs, "fs", []string{"ext4"}, "filesystems the root and /boot use")
	cmd.Flags().BoolVar(&network, "network", false, "include the network cards' drivers")
	cmd.Flags().StringSliceVar(&extra, "extra", nil, "more modules or aliases to include")
	cmd.Flags().StringVar(&out, "initramfs", "", "write an initramfs with the module files and load list here")
	cmd.Flags().BoolVar(&list, "list", false, "print the module list (modules-load.d / initramfs-tools format)")
	return cmd
}

// shortDevice names a device briefly: bus and vendor:device id, or the
// start of its modalias.
func shortDevice(d modules.Device) string {
	if id := modules.NewDeviceID(d); id.ID != "" {
		return id.Bus + " " + id.ID
	}
	if len(d.Modalias) > 40 {
		return d.Modalias[:37] + "..."
	}
	return d.Modalias
}
