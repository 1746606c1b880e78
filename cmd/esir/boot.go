package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/pxe/netboot"
	"github.com/spf13/cobra"
)

func newBootCmd(app *cli.App) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "boot",
		Short: "Build the netboot environment nodes PXE-boot into",
	}
	cmd.AddCommand(newBootBuildCmd(app))
	return cmd
}

func newBootBuildCmd(app *cli.App) *cobra.Command {
	var (
		storeDir, ref, kernelDir, kernelVersion, agent, out, helpersRoot string
		helpers                                                          []string
		force                                                            bool
	)
	cmd := &cobra.Command{
		Use:   "build (--image NAME[:VERSION] | --kernel DIR) [--agent PATH] [--out DIR]",
		Short: "Build the agent's kernel + initramfs from an image's kernel or a kernel directory",
		Long: `Build packs the netboot environment: the kernel, and an initramfs (cpio newc,
zstd) holding the static esir-agent as /init, the kernel's modules for network
cards, storage controllers and the install's filesystems, and the helpers the
install runs (mke2fs with its shared libraries).

The kernel comes from the image (--image: its boot/vmlinuz-VERSION and
lib/modules/VERSION), or from --kernel DIR, a root tree holding
boot/vmlinuz-VERSION and (usr/)lib/modules/VERSION ("/" for the host's own
kernel). The result is cached: it is rebuilt only when the agent, kernel,
modules or helpers change. With --image it goes to STORE/netboot/NAME/VERSION.`,
		Example: `  esir boot build --image compute:1.0
  esir boot build --kernel / --out /srv/esir/netboot`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if ref == "" && kernelDir == "" {
				return errors.New("give --image NAME[:VERSION] or --kernel DIR")
			}
			if agent == "" {
				a, err := findAgent()
				if err != nil {
					return err
				}
				agent = a
			}
			opts := netboot.Options{
				KernelRoot: kernelDir, KernelVersion: kernelVersion, Agent: agent, Out: out,
				HelpersRoot: helpersRoot, Force: force, Log: app.Log,
			}
			if len(helpers) > 0 {
				opts.Helpers = helpers
			}
			var res *netboot.Result
			var err error
			if ref != "" {
				store, err := imaging.OpenStore(storeDir)
				if err != nil {
					return err
				}
				img, err := store.Get(ref)
				if err != nil {
					return err
				}
				res, err = netboot.ForImage(cmd.Context(), store, img, opts)
				if err != nil {
					return err
				}
			} else {
				if opts.Out == "" {
					opts.Out = "netboot"
				}
				opts.Source = "kernel:" + kernelDir
				if res, err = netboot.Build(cmd.Context(), opts); err != nil {
					return err
				}
			}
			state := "built"
			if res.Cached {
				state = "up to date"
			}
			fmt.Fprintf(app.Stdout, "%s: kernel %s, %d modules, initramfs %d bytes\n  %s\n  %s\n",
				state, res.Manifest.KernelVersion, len(res.Manifest.Modules), res.Manifest.InitrdSize, res.Kernel, res.Initrd)
			return nil
		},
	}
	def := os.Getenv("ESIR_STORE")
	if def == "" {
		def = defaultStore
	}
	f := cmd.Flags()
	f.StringVar(&storeDir, "store", def, "image store directory (env ESIR_STORE)")
	f.StringVar(&ref, "image", "", "image NAME[:VERSION] whose kernel to use")
	f.StringVar(&kernelDir, "kernel", "", "root tree with boot/vmlinuz-VERSION and lib/modules/VERSION (overrides the image's kernel)")
	f.StringVar(&kernelVersion, "kernel-version", "", "kernel version to pick (default: the newest with modules)")
	f.StringVar(&agent, "agent", "", "static esir-agent binary (default: esir-agent beside this program, then $PATH)")
	f.StringVar(&out, "out", "", "output directory (default STORE/netboot/NAME/VERSION with --image, ./netboot with --kernel)")
	f.StringVar(&helpersRoot, "helpers-root", "/", "root tree the helpers and their libraries come from")
	f.StringSliceVar(&helpers, "helper", nil, "helper program to include with its libraries (repeatable; default /sbin/mke2fs)")
	f.BoolVar(&force, "force", false, "rebuild even when the cached build is current")
	return cmd
}

// findAgent looks for esir-agent beside this program, then in $PATH.
func findAgent() (string, error) {
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "esir-agent")
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return p, nil
		}
	}
	if p, err := exec.LookPath("esir-agent"); err == nil {
		return p, nil
	}
	return "", errors.New("esir-agent not found beside esir or in $PATH: give --agent (build it with CGO_ENABLED=0 go build ./cmd/esir-agent)")
}
