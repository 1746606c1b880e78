package main

import (
	"fmt"
	"os"

	"github.com/esir-project/esir/agent/enroll"
	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/server/agentapi"
	ssienroll "github.com/esir-project/esir/ssi/enroll"
	"github.com/spf13/cobra"
)

func newEnrollCmd(app *cli.App) *cobra.Command {
	var config string
	cmd := &cobra.Command{
		Use:   "enroll",
		Short: "Enroll this installed node with the ESIR server (the node service)",
		Long: `enroll reports this node's identity and hardware to the server named in the node service's
configuration, retrying with backoff until the server answers; the server marks the node enrolled.

When the server keeps an SSI cluster, enroll then stays running as the node's part in it: it installs
the node's engine configuration (corosync, pacemaker or pacemaker-remote, chrony, keepalived, NFS home),
starts the engines, reports enrolled only once the engines say the node is a member (or which check
failed), follows nodelist changes, and stops the stack when the node is told to leave.`,
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
			if ack.Cluster == "" {
				fmt.Fprintf(app.Stdout, "%s mac=%s state=%s\n", enroll.Marker, cfg.MAC, ack.State)
				return nil
			}
			fmt.Fprintf(app.Stdout, "esir-node: joining cluster %s mac=%s\n", ack.Cluster, cfg.MAC)
			init := ssienroll.Direct
			if _, err := os.Stat("/run/systemd/system"); err == nil {
				init = ssienroll.Systemd
			}
			f := &enroll.Follower{
				Client: &agentapi.Client{Server: cfg.Server, Token: cfg.Token},
				MAC:    cfg.MAC,
				Node:   &ssienroll.Node{Root: "/", Run: ssienroll.Local{}, Init: init, Log: app.Log},
				Log:    app.Log,
				OnToken: func(tok string) {
					c := cfg
					c.Token = tok
					if err := enroll.SaveConfig(config, c); err != nil {
						app.Log.Warn("ssi: keep the renewed token", "err", err)
					}
				},
			}
			err = f.Follow(cmd.Context())
			if err == nil || enroll.IsLeft(err) {
				fmt.Fprintf(app.Stdout, "esir-node: left cluster %s\n", ack.Cluster)
				return nil
			}
			return err
		},
	}
	cmd.Flags().StringVar(&config, "config", enroll.ConfigPath, "node service configuration `FILE`")
	return cmd
}
