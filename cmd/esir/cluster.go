package main

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"text/tabwriter"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/ssi"
	"github.com/esir-project/esir/ssi/enroll"
	"github.com/spf13/cobra"
)

// newClusterCmd is the SSI cluster noun. It works on the cluster definition,
// the allocation state and the secrets directory as files (the server keeps
// the same files); the live membership view comes from the nodes.
func newClusterCmd(app *cli.App) *cobra.Command {
	var defPath, statePath, secrets string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "SSI cluster: definition, node ids and roles, per-node engine configuration",
		Example: `  esir cluster check --def cluster.yaml
  esir cluster join n1 198.18.0.1 --def cluster.yaml --state alloc.json
  esir cluster members --state alloc.json
  esir cluster render n1 --out /mnt/n1 --def cluster.yaml --state alloc.json --secrets /var/lib/esir/ssi
  esir cluster leave n1 --state alloc.json`,
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&defPath, "def", "cluster.yaml", "cluster definition file")
	pf.StringVar(&statePath, "state", "ssi-alloc.json", "allocation state file (node ids, roles, nodelist version)")
	pf.StringVar(&secrets, "secrets", "ssi-secrets", "directory of the cluster's secrets (0700, keys 0600)")
	pf.BoolVar(&asJSON, "json", false, "print JSON")

	load := func() (*ssi.Cluster, error) {
		c, warn, err := ssi.Load(defPath)
		if err != nil {
			return nil, err
		}
		for _, w := range warn {
			app.Log.Warn("cluster definition", "file", defPath, "warning", w)
		}
		return c, nil
	}
	check := &cobra.Command{
		Use:   "check",
		Short: "Validate the cluster definition and print its warnings",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, warn, err := ssi.Load(defPath)
			if err != nil {
				return err
			}
			for _, w := range warn {
				fmt.Fprintln(app.Stdout, "warning:", w)
			}
			fmt.Fprintf(app.Stdout, "%s: valid\n", defPath)
			return nil
		},
	}
	show := &cobra.Command{
		Use:   "show",
		Short: "Show the definition's parts and the allocation's nodelist version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := load()
			if err != nil {
				return err
			}
			s, err := ssi.LoadState(statePath)
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(app.Stdout).Encode(map[string]any{"cluster": c, "state": s})
			}
			fmt.Fprintf(app.Stdout, "cluster %s: %d core voters wanted, %d members (%d core), nodelist version %d\n",
				c.Name, c.CoreSize, len(s.Members), len(s.Core()), s.Version)
			fmt.Fprintf(app.Stdout, "parts: %+v\n", c.Profile)
			for _, v := range c.VIPs {
				fmt.Fprintf(app.Stdout, "vip %s %s vrid %d, %d services\n", v.Name, v.Address, v.VRID, len(v.Services))
			}
			return nil
		},
	}
	members := &cobra.Command{
		Use:   "members",
		Short: "List the allocated members: id, name, address, role",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := ssi.LoadState(statePath)
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(app.Stdout).Encode(s.Members)
			}
			tw := tabwriter.NewWriter(app.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tADDRESS\tROLE")
			for _, m := range s.Members {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", m.ID, m.Name, m.Addr, m.Role)
			}
			return tw.Flush()
		},
	}
	join := &cobra.Command{
		Use:   "join NODE ADDRESS",
		Short: "Allocate a node's id and role (idempotent; ids are never reused)",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := load()
			if err != nil {
				return err
			}
			addr, err := netip.ParseAddr(args[1])
			if err != nil {
				return fmt.Errorf("join %s: address: %w", args[0], err)
			}
			s, err := ssi.LoadState(statePath)
			if err != nil {
				return err
			}
			m, changed, err := s.Join(args[0], addr, c.CoreSize)
			if err != nil {
				return err
			}
			if changed {
				if err := ssi.SaveState(statePath, s); err != nil {
					return err
				}
			}
			fmt.Fprintf(app.Stdout, "%s: id %d, role %s, nodelist version %d\n", m.Name, m.ID, m.Role, s.Version)
			return nil
		},
	}
	leave := &cobra.Command{
		Use:   "leave NODE",
		Short: "Remove a node from the allocation and retire its id (stop its stack first)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := ssi.LoadState(statePath)
			if err != nil {
				return err
			}
			m, err := s.Leave(args[0])
			if err != nil {
				return err
			}
			if err := ssi.SaveState(statePath, s); err != nil {
				return err
			}
			fmt.Fprintf(app.Stdout, "%s left: id %d retired, nodelist version %d; re-render and reload the other members\n", m.Name, m.ID, s.Version)
			return nil
		},
	}
	var out string
	render := &cobra.Command{
		Use:   "render NODE --out DIR",
		Short: "Write a node's engine configuration and secrets under DIR",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := load()
			if err != nil {
				return err
			}
			s, err := ssi.LoadState(statePath)
			if err != nil {
				return err
			}
			keys, err := ssi.LoadKeys(secrets)
			if err != nil {
				return err
			}
			b, err := ssi.Render(c, s, keys, args[0])
			if err != nil {
				return err
			}
			// Files go in atomically with their modes and owners; fstab lines
			// are added to DIR/etc/fstab once.
			if err := (&enroll.Node{Root: out}).Install(b); err != nil {
				return err
			}
			for _, f := range b.Files {
				fmt.Fprintf(app.Stdout, "%s %04o %s\n", f.Path, f.Mode, f.Owner)
			}
			for _, l := range b.FstabLines {
				fmt.Fprintln(app.Stdout, "fstab:", l)
			}
			fmt.Fprintln(app.Stdout, "services:", b.Services)
			return nil
		},
	}
	render.Flags().StringVar(&out, "out", "", "root directory to write the files under")
	render.MarkFlagRequired("out")
	cmd.AddCommand(check, show, members, join, leave, render)
	return cmd
}
