// Command esir is the administrator's CLI for ESIR: it builds file-mode
// system images, runs the deployment server and drives rollouts.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	app := cli.NewApp()
	if err := newRootCmd(app).ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "esir:", err)
		stop()
		os.Exit(1)
	}
}

func newRootCmd(app *cli.App) *cobra.Command {
	root := &cobra.Command{
		Use:   "esir",
		Short: "Image-based deployment for server clusters",
		Long: `ESIR builds file-mode system images, PXE-boots bare-metal nodes, distributes
images peer-to-peer over BitTorrent and installs and enrolls the nodes.`,
		Example: `  esir image build --from /srv/rootfs --name compute --version 1.0
  esir image ls
  esir completion bash > /etc/bash_completion.d/esir`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	app.AddLogFlags(root)
	// Each noun registers here; its commands live in a file named after it.
	root.AddCommand(newImageCmd(app))
	addImageSampleCmd(root, app) // esir image sample (after the image noun)
	root.AddCommand(newModulesCmd(app))
	root.AddCommand(newBootCmd(app), newPXECmd(app))
	root.AddCommand(newSwarmCmd(app))
	root.AddCommand(newServerCmd(app), newNodeCmd(app), newRolloutCmd(app), newTokenCmd(app))
	root.AddCommand(newLabCmd(app))
	root.AddCommand(newClusterCmd(app))
	return root
}
