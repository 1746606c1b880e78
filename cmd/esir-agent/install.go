package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/esir-project/esir/agent/install"
	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/modules"
	"github.com/esir-project/esir/server/agentapi"
	"github.com/spf13/cobra"
)

func newInstallCmd(app *cli.App) *cobra.Command {
	var (
		diskFile, diskPath, imagePath, assignment, hardware, agentBin, mac, cmdline string
		hostname, server, token                                                     string
		espMiB, swapMiB                                                             int
		keys                                                                        []string
	)
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Install an image onto a disk (or a disk image file) so that it boots under BIOS and UEFI",
		Long: `install partitions the target disk (GPT: ESP, root ext4, optional swap), unpacks the image,
personalises it for the node, writes the node's hardware-matched early-boot initramfs, installs
extlinux (BIOS) and systemd-boot (UEFI) and ESIR's node service, which enrolls the node with the
server at first boot. Every step is reported on stderr (step, device, cause).

--image is an image directory of an ESIR store (holding manifest.json and image.tar.zst).
--disk FILE installs onto a disk image file through a loop device; --target chooses a block device.
The assignment (hostname, disk layout, network, server, enroll token) comes from --assignment FILE
(agent protocol JSON) or from the flags.`,
		Example: `  esir-agent install --disk node1.img --image /var/lib/esir/images/sample/1 \
      --hostname node1 --mac 52:54:00:00:00:01 --server http://198.18.0.1:8080 \
      --hardware machine-modaliases.txt --cmdline console=ttyS0,115200`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			asg := &agentapi.Assignment{}
			if assignment != "" {
				b, err := os.ReadFile(assignment)
				if err != nil {
					return err
				}
				if err := json.Unmarshal(b, asg); err != nil {
					return fmt.Errorf("assignment %s: %w", assignment, err)
				}
			}
			set := func(dst *string, v string) {
				if v != "" {
					*dst = v
				}
			}
			set(&asg.Hostname, hostname)
			set(&asg.Server, server)
			set(&asg.EnrollToken, token)
			if espMiB > 0 {
				asg.Disk.ESPMiB = espMiB
			}
			if swapMiB > 0 {
				asg.Disk.SwapMiB = swapMiB
			}
			asg.AuthorizedKeys = append(asg.AuthorizedKeys, keys...)
			m, err := imaging.ReadManifest(filepath.Join(imagePath, imaging.ManifestFile))
			if err != nil {
				return err
			}
			if m.Mode != imaging.ModeFile {
				return fmt.Errorf("image %s is in %s mode; install takes file-mode images", m.Ref(), m.Mode)
			}
			img := install.ImageFromStore(m, filepath.Join(imagePath, m.Archive))
			opts := install.Options{MAC: mac, Cmdline: cmdline, Agent: agentBin,
				Report: func(e install.Event) { logEvent(app, e) }}
			if opts.Agent == "" {
				if opts.Agent, err = os.Executable(); err != nil {
					return err
				}
			}
			if hardware != "" {
				if opts.Devices, err = readHardware(hardware); err != nil {
					return err
				}
			}
			switch {
			case diskFile != "" && diskPath != "":
				return fmt.Errorf("give --disk FILE or --target DEVICE, not both")
			case diskFile != "":
				dev, detach, err := install.AttachFile(ctx, diskFile)
				if err != nil {
					return err
				}
				defer func() {
					if err := detach(); err != nil {
						app.Log.Error("detach disk image", "file", diskFile, "dev", dev, "err", err)
					}
				}()
				asg.Disk.Rule = agentapi.DiskRule{Path: dev}
			case diskPath != "":
				asg.Disk.Rule.Path = diskPath
			}
			res, err := install.Run(ctx, img, asg, opts)
			if err != nil {
				return err
			}
			out, _ := json.MarshalIndent(res, "", "  ")
			fmt.Fprintln(app.Stdout, string(out))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&diskFile, "disk", "", "disk image `FILE` to install onto (attached through a loop device)")
	f.StringVar(&diskPath, "target", "", "block `DEVICE` to install onto (default: the assignment's disk rule)")
	f.StringVar(&imagePath, "image", "", "image `DIR` holding manifest.json and the archive")
	f.StringVar(&assignment, "assignment", "", "assignment `FILE` (agent protocol JSON)")
	f.StringVar(&hardware, "hardware", "", "`DIR` (a sysfs tree) or FILE (modalias list) of the machine the disk will boot in (default: this machine's /sys)")
	f.StringVar(&agentBin, "agent", "", "static esir-agent `BINARY` to install (default: this program)")
	f.StringVar(&mac, "mac", "", "the node's boot NIC `MAC`")
	f.StringVar(&cmdline, "cmdline", "", "extra kernel command line for the installed system")
	f.StringVar(&hostname, "hostname", "", "the node's hostname")
	f.StringVar(&server, "server", "", "server `URL` the node service enrolls with")
	f.StringVar(&token, "enroll-token", "", "token the node service enrolls with")
	f.IntVar(&espMiB, "esp-mib", 0, "EFI system partition size in MiB (default 256)")
	f.IntVar(&swapMiB, "swap-mib", 0, "swap partition size in MiB (default none)")
	f.StringSliceVar(&keys, "authorized-key", nil, "SSH public key for root (repeatable)")
	_ = cmd.MarkFlagRequired("image")
	return cmd
}

// readHardware reads devices from a sysfs tree or a recorded modalias list.
func readHardware(p string) ([]modules.Device, error) {
	fi, err := os.Stat(p)
	if err != nil {
		return nil, fmt.Errorf("hardware: %w", err)
	}
	if fi.IsDir() {
		return modules.ReadDevices(p)
	}
	return modules.ReadDeviceList(p)
}

func logEvent(app *cli.App, e install.Event) {
	args := []any{"step", e.Step, "device", e.Device}
	if e.Detail != "" {
		args = append(args, "detail", e.Detail)
	}
	switch e.Status {
	case install.Failed:
		app.Log.Error("install step failed", args...)
	case install.Progress:
		app.Log.Debug("install progress", append(args, "bytes", e.Bytes, "total", e.Total)...)
	default:
		app.Log.Info("install step "+strings.ToLower(e.Status), args...)
	}
}
