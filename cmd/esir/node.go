package main

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/progress"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/client"
	"github.com/esir-project/esir/server/deploy"
	"github.com/spf13/cobra"
)

func newNodeCmd(app *cli.App) *cobra.Command {
	var r remote
	cmd := &cobra.Command{
		Use:   "node",
		Short: "List, inspect, label and remove the server's nodes",
		Example: `  esir node ls --state installed -l rack=a
  esir node ls --sort state --limit 50 --offset 100
  esir node show node001
  esir node label 52:54:00:12:34:56 rack=a role=compute
  esir node rm 52:54:00:12:34:56`,
	}
	r.addFlags(cmd)
	var state string
	var labels []string
	var q client.NodeQuery
	ls := &cobra.Command{
		Use:   "ls",
		Short: "List nodes",
		Long: `List nodes, by node number unless --sort says otherwise. Every matching node is
listed (the server's pages are fetched in turn) unless --limit asks for one page;
a page's table ends with the position of the page and the number of matches.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			q.State, q.Labels = state, labels
			var nodes []api.NodeView
			total := -1
			if q.Limit > 0 {
				p, err := c.NodesPage(cmd.Context(), q)
				if err != nil {
					return err
				}
				nodes, total = p.Nodes, p.Total
			} else if nodes, err = c.AllNodes(cmd.Context(), q); err != nil {
				return err
			}
			if r.json() {
				return json.NewEncoder(app.Stdout).Encode(nodes)
			}
			tw := tabwriter.NewWriter(app.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "HOSTNAME\tMAC\tSTATE\tIMAGE\tHARDWARE\tLABELS")
			for _, n := range nodes {
				st := string(n.State)
				if n.State == deploy.Failed && n.Reason != "" {
					st += " (" + n.Reason + ")"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", n.Hostname, n.MAC, st, dash(n.Image), hardware(n), labelString(n.Labels))
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if total >= 0 {
				first := q.Offset + 1
				if len(nodes) == 0 {
					first = q.Offset
				}
				_, err = fmt.Fprintf(app.Stdout, "(nodes %d-%d of %d)\n", first, q.Offset+len(nodes), total)
			}
			return err
		},
	}
	ls.Flags().StringVar(&state, "state", "", "only nodes in this state")
	ls.Flags().StringVarP(&q.Query, "query", "q", "", "only nodes whose hostname, MAC, image or KEY=VALUE label contains this text")
	ls.Flags().StringVar(&q.Sort, "sort", "", "order by number, hostname, mac, state, image, hardware, updated or changed")
	ls.Flags().BoolVar(&q.Desc, "desc", false, "reverse the order")
	ls.Flags().IntVar(&q.Limit, "limit", 0, "list one page of at most this many nodes (0: every node)")
	ls.Flags().IntVar(&q.Offset, "offset", 0, "skip this many nodes of the order first")
	ls.Flags().StringArrayVarP(&labels, "label", "l", nil, "only nodes with this label KEY=VALUE (repeatable)")
	show := &cobra.Command{
		Use:   "show MAC|HOSTNAME",
		Short: "Show a node: inventory, state, event log",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			mac, err := resolveNode(cmd, &r, args[0])
			if err != nil {
				return err
			}
			d, err := c.Node(cmd.Context(), mac)
			if err != nil {
				return err
			}
			if r.json() {
				return json.NewEncoder(app.Stdout).Encode(d)
			}
			w := app.Stdout
			fmt.Fprintf(w, "Hostname:  %s (node %d)\nMAC:       %s\nState:     %s\n", d.Hostname, d.Number, d.MAC, d.State)
			if d.Reason != "" {
				fmt.Fprintf(w, "Reason:    %s\n", d.Reason)
			}
			fmt.Fprintf(w, "Image:     %s\nLabels:    %s\nHardware:  %s\n", dash(d.Image), labelString(d.Labels), hardware(d.NodeView))
			if d.ActiveRollout != 0 {
				fmt.Fprintf(w, "Rollout:   %d\n", d.ActiveRollout)
			}
			if inv := d.Inventory; inv != nil {
				for _, dk := range inv.Disks {
					fmt.Fprintf(w, "Disk:      %s %s %s serial %s\n", dk.Name, progress.Bytes(dk.SizeBytes), dk.Model, dash(dk.Serial))
				}
				for _, n := range inv.NICs {
					fmt.Fprintf(w, "NIC:       %s %s %s\n", n.Name, n.MAC, n.Driver)
				}
				if len(inv.Modules) > 0 {
					fmt.Fprintf(w, "Modules:   %s\n", strings.Join(inv.Modules, " "))
				}
			}
			fmt.Fprintln(w, "Events:")
			for _, e := range d.Events {
				fmt.Fprintf(w, "  %s  %-10s -> %-10s %s\n", e.Time.Local().Format(time.DateTime), dash(string(e.From)), e.To, e.Reason)
			}
			if len(d.LogTail) > 0 {
				fmt.Fprintln(w, "Agent log (tail):")
				for _, l := range d.LogTail {
					fmt.Fprintf(w, "  %s\n", l)
				}
			}
			return nil
		},
	}
	label := &cobra.Command{
		Use:   "label MAC|HOSTNAME KEY=VALUE... | KEY-...",
		Short: "Set (KEY=VALUE) or remove (KEY-) a node's labels",
		Args:  cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			mac, err := resolveNode(cmd, &r, args[0])
			if err != nil {
				return err
			}
			req := api.LabelRequest{Set: map[string]string{}}
			for _, a := range args[1:] {
				if k, ok := strings.CutSuffix(a, "-"); ok && !strings.Contains(a, "=") {
					req.Remove = append(req.Remove, k)
					continue
				}
				m, err := deploy.ParseLabels(a)
				if err != nil {
					return err
				}
				for k, v := range m {
					req.Set[k] = v
				}
			}
			n, err := c.Label(cmd.Context(), mac, req)
			if err != nil {
				return err
			}
			if r.json() {
				return json.NewEncoder(app.Stdout).Encode(n)
			}
			fmt.Fprintf(app.Stdout, "%s: %s\n", n.Hostname, labelString(n.Labels))
			return nil
		},
	}
	rm := &cobra.Command{
		Use:   "rm MAC|HOSTNAME...",
		Short: "Remove nodes (refused while in an active rollout)",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			for _, a := range args {
				mac, err := resolveNode(cmd, &r, a)
				if err != nil {
					return err
				}
				if err := c.RemoveNode(cmd.Context(), mac); err != nil {
					return fmt.Errorf("node %s: %w", a, err)
				}
			}
			return nil
		},
	}
	cmd.AddCommand(ls, show, label, rm)
	return cmd
}

// resolveNode turns a MAC or hostname into a MAC.
func resolveNode(cmd *cobra.Command, r *remote, arg string) (string, error) {
	if m, err := deploy.NormalizeMAC(arg); err == nil {
		return m, nil
	}
	c, err := r.client()
	if err != nil {
		return "", err
	}
	// The query narrows the listing to hostnames containing arg.
	nodes, err := c.AllNodes(cmd.Context(), client.NodeQuery{Query: arg})
	if err != nil {
		return "", err
	}
	for _, n := range nodes {
		if n.Hostname == arg {
			return n.MAC, nil
		}
	}
	return "", fmt.Errorf("node %s: no node has this MAC or hostname", arg)
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func labelString(m map[string]string) string {
	l := make([]string, 0, len(m))
	for k, v := range m {
		l = append(l, k+"="+v)
	}
	if len(l) == 0 {
		return "-"
	}
	sort.Strings(l)
	return strings.Join(l, ",")
}

func hardware(n api.NodeView) string { return dash(n.Hardware) }
