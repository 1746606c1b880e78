package main

import (
	"fmt"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/sampleimage"
	"github.com/esir-project/esir/vm"
	"github.com/spf13/cobra"
)

// addImageSampleCmd adds "sample" to the image noun (registered before it).
func addImageSampleCmd(root *cobra.Command, app *cli.App) {
	for _, c := range root.Commands() {
		if c.Name() == "image" {
			c.AddCommand(newImageSampleCmd(app))
			return
		}
	}
}

func newImageSampleCmd(app *cli.App) *cobra.Command {
	var out, hostname, mods string
	cmd := &cobra.Command{
		Use:   "sample",
		Short: "Write the lab's sample root filesystem (busybox, Debian's kernel and modules) into a directory",
		Long: `sample writes a small, deterministic root filesystem: Debian's static busybox with its applet
links and busybox init, the host's Debian kernel (package linux-image-amd64) with its modules, and
a minimal /etc. Build an image from it with "esir image build --from DIR".`,
		Example: `  esir image sample --out /tmp/sample
  esir image build --from /tmp/sample --name sample --version 1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			k, err := vm.HostDebianKernel()
			if err != nil {
				return err
			}
			opts := sampleimage.Options{Kernel: k, Hostname: hostname}
			switch mods {
			case "all":
			case "storage":
				opts.Modules = sampleimage.StorageNetFS
			default:
				return fmt.Errorf("--modules %q: want all or storage", mods)
			}
			if err := sampleimage.Build(cmd.Context(), out, opts); err != nil {
				return err
			}
			app.Log.Info("sample root filesystem written", "dir", out, "kernel", k.Version, "modules", mods)
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "empty or new `DIR` to write the tree into")
	cmd.Flags().StringVar(&hostname, "hostname", "", "the tree's /etc/hostname (default esir-sample)")
	cmd.Flags().StringVar(&mods, "modules", "all", "kernel modules to include: all, or storage (storage, network and filesystem drivers)")
	_ = cmd.MarkFlagRequired("out")
	return cmd
}
