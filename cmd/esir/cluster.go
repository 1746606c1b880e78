package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/server/cluster"
	"github.com/esir-project/esir/ssi"
	"github.com/esir-project/esir/ssi/enroll"
	"github.com/spf13/cobra"
)

// newClusterCmd is the SSI cluster noun. show, members and leave ask the
// server, which keeps the cluster; check and render work on files (a
// definition before the server gets it; a node's configuration for a look).
func newClusterCmd(app *cli.App) *cobra.Command {
	var r remote
	var defPath, statePath, secrets string
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "SSI cluster: members, quorum, VIPs; definition checks",
		Example: `  esir cluster show
  esir cluster members -o json
  esir cluster leave node004
  esir cluster check --def cluster.yaml
  esir cluster render node001 --out /tmp/n1 --def cluster.yaml --state /var/lib/esir/server/ssi/alloc.json --secrets /var/lib/esir/server/ssi/secrets`,
	}
	r.addFlags(cmd)
	pf := cmd.PersistentFlags()
	pf.StringVar(&defPath, "def", "cluster.yaml", "cluster definition file (check, render)")
	pf.StringVar(&statePath, "state", "ssi-alloc.json", "allocation state file (render)")
	pf.StringVar(&secrets, "secrets", "ssi-secrets", "directory of the cluster's secrets (render)")

	check := &cobra.Command{
		Use:   "check",
		Short: "Validate a cluster definition file and print its warnings",
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
		Short: "Show the cluster: quorum, members by state, who holds each VIP",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			s, err := c.Cluster(cmd.Context())
			if err != nil {
				return err
			}
			if r.output == "json" {
				return json.NewEncoder(app.Stdout).Encode(s)
			}
			quorum := "NOT quorate"
			if s.Quorate {
				quorum = "quorate"
			}
			if s.ViewFrom == "" {
				quorum = "unknown (no core member reports)"
			}
			fmt.Fprintf(app.Stdout, "cluster %s: nodelist version %d, %d members, %s", s.Name, s.Version, len(s.Members), quorum)
			if s.ViewFrom != "" {
				fmt.Fprintf(app.Stdout, " (view of %s: joined %v, online %v)", s.ViewFrom, s.Joined, s.Online)
			}
			fmt.Fprintln(app.Stdout)
			by := map[cluster.State][]string{}
			for _, m := range s.Members {
				by[m.State] = append(by[m.State], m.Name)
			}
			for _, st := range []cluster.State{cluster.Enrolled, cluster.Joining, cluster.Failed, cluster.Leaving, cluster.Unreachable} {
				if len(by[st]) > 0 {
					fmt.Fprintf(app.Stdout, "%-12s %d: %s\n", st, len(by[st]), strings.Join(by[st], " "))
				}
			}
			for vip, h := range s.VIPHolders {
				note := ""
				if len(h) > 1 {
					note = "  (SPLIT BRAIN: more than one director holds it)"
				}
				fmt.Fprintf(app.Stdout, "vip %s held by %s%s\n", vip, strings.Join(h, ", "), note)
			}
			writeIPVS(app.Stdout, s)
			for _, w := range s.Warnings {
				fmt.Fprintln(app.Stdout, "warning:", w)
			}
			return nil
		},
	}
	members := &cobra.Command{
		Use:   "members",
		Short: "List the members: id, name, address, role, state and the check that failed",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			s, err := c.Cluster(cmd.Context())
			if err != nil {
				return err
			}
			if r.output == "json" {
				return json.NewEncoder(app.Stdout).Encode(s.Members)
			}
			tw := tabwriter.NewWriter(app.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tADDRESS\tROLE\tSTATE\tVERSION\tTIME\tHOME\tREPORTED\tCHECK")
			for _, m := range s.Members {
				rep := "-"
				if !m.Reported.IsZero() {
					rep = time.Since(m.Reported).Round(time.Second).String() + " ago"
				}
				chk := ""
				if m.Check != "" {
					chk = m.Check + ": " + m.Error
				}
				tm, home := "-", "-"
				if v, ok := cluster.MemberView(m); ok {
					tm, home = v.TimeText(), v.HomeText(s.Profile.NFSHome, m.Name == s.NFSServer)
				}
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", m.ID, m.Name, m.Addr, m.Role, m.State, m.Version, tm, home, rep, chk)
			}
			return tw.Flush()
		},
	}
	reload := &cobra.Command{
		Use:   "reload",
		Short: "Make the server read its cluster definition (and password files) again; members apply a changed one",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			res, err := c.ReloadCluster(cmd.Context())
			if err != nil {
				return err
			}
			if r.output == "json" {
				return json.NewEncoder(app.Stdout).Encode(res)
			}
			if res.Changed {
				fmt.Fprintf(app.Stdout, "definition changed: members apply it as nodelist version %d\n", res.Version)
			} else {
				fmt.Fprintf(app.Stdout, "definition unchanged (nodelist version %d)\n", res.Version)
			}
			return nil
		},
	}
	leave := &cobra.Command{
		Use:   "leave NODE",
		Short: "Take a node out of the cluster: its stack stops, the others drop it and purge it from pacemaker",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			m, err := c.LeaveCluster(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if r.output == "json" {
				return json.NewEncoder(app.Stdout).Encode(m)
			}
			fmt.Fprintf(app.Stdout, "%s (id %d) is leaving: its node service stops its stack, then the other members drop it\n", m.Name, m.ID)
			return nil
		},
	}
	var out string
	render := &cobra.Command{
		Use:   "render NODE --out DIR",
		Short: "Write a node's engine configuration and secrets under DIR (from files, without the server)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, warn, err := ssi.Load(defPath)
			if err != nil {
				return err
			}
			for _, w := range warn {
				app.Log.Warn("cluster definition", "file", defPath, "warning", w)
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
	cmd.AddCommand(check, show, members, reload, leave, render)
	return cmd
}

// writeIPVS prints the IPVS tables of the directors that hold a VIP, one
// real server a line, with its weight and connection counts.
func writeIPVS(w io.Writer, s *cluster.Snapshot) {
	holders := s.Holders()
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	header := false
	for _, m := range s.Members {
		v, ok := cluster.MemberView(m)
		if !ok || !holders[m.Name] {
			continue
		}
		for _, e := range v.IPVS {
			if !header {
				fmt.Fprintln(tw, "IPVS ON\tSERVICE\tREAL SERVER\tWEIGHT\tACTIVE\tINACTIVE")
				header = true
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\n", m.Name, e.Service, e.Real, e.Weight, e.Active, e.Inactive)
		}
	}
	tw.Flush()
}
