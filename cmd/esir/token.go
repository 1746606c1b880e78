package main

import (
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/spf13/cobra"
)

func newTokenCmd(app *cli.App) *cobra.Command {
	var r remote
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Manage the server's admin API tokens",
		Example: `  esir token create --name ci
  esir token ls
  esir token rm 3f2a9c1b7d4e`,
	}
	r.addFlags(cmd)
	var name string
	create := &cobra.Command{
		Use:   "create --name NAME",
		Short: "Create an admin token (its secret is shown only now)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			t, err := c.CreateToken(cmd.Context(), name)
			if err != nil {
				return err
			}
			if r.json() {
				return json.NewEncoder(app.Stdout).Encode(t)
			}
			fmt.Fprintf(app.Stdout, "id %s (%s)\n%s\n", t.ID, t.Name, t.Token)
			return nil
		},
	}
	create.Flags().StringVar(&name, "name", "", "what the token is for")
	create.MarkFlagRequired("name")
	ls := &cobra.Command{
		Use:   "ls",
		Short: "List admin tokens (IDs and names, never secrets)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			ts, err := c.Tokens(cmd.Context())
			if err != nil {
				return err
			}
			if r.json() {
				return json.NewEncoder(app.Stdout).Encode(ts)
			}
			tw := tabwriter.NewWriter(app.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tCREATED")
			for _, t := range ts {
				fmt.Fprintf(tw, "%s\t%s\t%s\n", t.ID, t.Name, t.Created.Local().Format(time.DateTime))
			}
			return tw.Flush()
		},
	}
	rm := &cobra.Command{
		Use:   "rm ID...",
		Short: "Remove admin tokens",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			for _, id := range args {
				if err := c.RemoveToken(cmd.Context(), id); err != nil {
					return fmt.Errorf("token %s: %w", id, err)
				}
			}
			return nil
		},
	}
	cmd.AddCommand(create, ls, rm)
	return cmd
}
