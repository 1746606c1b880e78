package main

import (
	"fmt"

	"github.com/esir-project/esir/agent/enroll"
	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/spf13/cobra"
)

func newEnrollCmd(app *cli.App) *cobra.Command {
	var config string
	cmd := &cobra.Command{
		Use:   "enroll",
		Short: "Enroll this installed node with the ESIR server (the node service)",
		Long: `enroll reports this node's identity and hardware to the server named in the node service's
configuration, retrying with backoff until the server answers; the server marks the node enrolled.`,
		Example: "  esir-agent enroll --config /etc/esir/node.json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := enroll.ReadConfig(config)
			if err != nil {
				return err
			}
			ack, err := enroll.Run(cmd.Context(), cfg, app.Log)
			if err != nil {
				return err
			}
			fmt.Fprintf(app.Stdout, "%s mac=%s state=%s\n", enroll.Marker, cfg.MAC, ack.State)
			return nil
		},
	}
	cmd.Flags().StringVar(&config, "config", enroll.ConfigPath, "node service configuration `FILE`")
	return cmd
}
