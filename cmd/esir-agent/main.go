// Command esir-agent runs on the nodes: as /init of the netboot environment it
// loads the hardware's modules, fetches the image peer-to-peer, installs it and
// enrolls the node. It is built static (CGO_ENABLED=0).
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
		fmt.Fprintln(os.Stderr, "esir-agent:", err)
		stop()
		os.Exit(1)
	}
}

func newRootCmd(app *cli.App) *cobra.Command {
	root := &cobra.Command{
		Use:           "esir-agent",
		Short:         "ESIR's node agent",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	app.AddLogFlags(root)
	// Each verb registers here; its code lives in a file named after it.
	addInitCmd(root, app)
	addInstallCmds(root, app) // after addInitCmd: as PID 1 with the argument "initrd" it selects initrd
	root.AddCommand(newModulesCmd(app))
	root.AddCommand(newFetchCmd(app))
	root.AddCommand(newRunCmd(app))
	return root
}
