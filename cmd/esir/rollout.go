package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
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

func newRolloutCmd(app *cli.App) *cobra.Command {
	var r remote
	cmd := &cobra.Command{
		Use:   "rollout",
		Short: "Deploy an image onto nodes in batches and follow it",
		Example: `  esir rollout create --image compute:1.0 -l role=compute --batch 8 --canary 2 --watch
  esir rollout ls
  esir rollout watch 3
  esir rollout pause 3; esir rollout resume 3; esir rollout cancel 3`,
	}
	r.addFlags(cmd)
	cmd.AddCommand(newRolloutCreateCmd(app, &r), newRolloutLsCmd(app, &r), newRolloutShowCmd(app, &r),
		newRolloutWatchCmd(app, &r))
	for _, action := range []string{"pause", "resume", "cancel"} {
		cmd.AddCommand(&cobra.Command{
			Use:   action + " ID",
			Short: strings.ToUpper(action[:1]) + action[1:] + " a rollout",
			Args:  cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				id, err := rolloutID(args[0])
				if err != nil {
					return err
				}
				c, err := r.client()
				if err != nil {
					return err
				}
				v, err := c.RolloutAction(cmd.Context(), id, action)
				if err != nil {
					return err
				}
				if r.json() {
					return json.NewEncoder(app.Stdout).Encode(v)
				}
				fmt.Fprintf(app.Stdout, "rollout %d %s\n", v.ID, v.State)
				return nil
			},
		})
	}
	return cmd
}

func rolloutID(s string) (int64, error) {
	id, err := strconv.ParseInt(s, 10, 64)
	if err != nil || id < 1 {
		return 0, fmt.Errorf("rollout ID %q: want a positive number", s)
	}
	return id, nil
}

func newRolloutCreateCmd(app *cli.App, r *remote) *cobra.Command {
	var spec deploy.Spec
	var labels []string
	var backoff, timeout time.Duration
	var watch bool
	cmd := &cobra.Command{
		Use:   "create --image NAME[:VERSION] (--node MAC|HOSTNAME... | -l KEY=VALUE...)",
		Short: "Start a rollout",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			if spec.Selector.Labels, err = deploy.ParseLabels(labels...); err != nil {
				return err
			}
			spec.RetryBackoff, spec.NodeTimeout = deploy.Duration(backoff), deploy.Duration(timeout)
			v, err := c.CreateRollout(cmd.Context(), spec)
			if err != nil {
				return err
			}
			if watch {
				return watchRollout(cmd, app, r, c, v.ID)
			}
			if r.json() {
				return json.NewEncoder(app.Stdout).Encode(v)
			}
			fmt.Fprintf(app.Stdout, "rollout %d: %s onto %d node(s) in %d batch(es)\n", v.ID, v.Spec.Image, v.Summary.Total, v.Batches)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&spec.Image, "image", "", "image NAME[:VERSION] (newest version when omitted)")
	f.StringArrayVar(&spec.Selector.Names, "node", nil, "node MAC or hostname (repeatable)")
	f.StringArrayVarP(&labels, "label", "l", nil, "select nodes with label KEY=VALUE (repeatable)")
	f.IntVar(&spec.BatchSize, "batch", 10, "nodes installed at once")
	f.IntVar(&spec.Canary, "canary", 0, "size of a first batch that must succeed before the rest start")
	f.IntVar(&spec.FailureThreshold, "failure-threshold", 1, "failed nodes that pause the rollout")
	f.IntVar(&spec.MaxRetries, "retries", 2, "retries per node")
	f.DurationVar(&backoff, "retry-backoff", 30*time.Second, "first retry delay (doubles each retry)")
	f.DurationVar(&timeout, "node-timeout", time.Hour, "time a node may stay in one install state")
	f.BoolVar(&watch, "watch", false, "watch the rollout after creating it")
	return cmd
}

func newRolloutLsCmd(app *cli.App, r *remote) *cobra.Command {
	return &cobra.Command{
		Use:   "ls",
		Short: "List rollouts",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := r.client()
			if err != nil {
				return err
			}
			rs, err := c.Rollouts(cmd.Context())
			if err != nil {
				return err
			}
			if r.json() {
				return json.NewEncoder(app.Stdout).Encode(rs)
			}
			tw := tabwriter.NewWriter(app.Stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tIMAGE\tSTATE\tBATCH\tNODES\tDONE\tFAILED\tCREATED\tREASON")
			for _, v := range rs {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%d/%d\t%d\t%d\t%d\t%s\t%s\n", v.ID, v.Spec.Image, v.State, min(v.Batch+1, v.Batches), v.Batches,
					v.Summary.Total, v.Summary.Succeeded, v.Summary.Failed, v.Created.Local().Format(time.DateTime), dash(v.Reason))
			}
			return tw.Flush()
		},
	}
}

func newRolloutShowCmd(app *cli.App, r *remote) *cobra.Command {
	return &cobra.Command{
		Use:   "show ID",
		Short: "Show a rollout and its nodes",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := rolloutID(args[0])
			if err != nil {
				return err
			}
			c, err := r.client()
			if err != nil {
				return err
			}
			v, err := c.Rollout(cmd.Context(), id)
			if err != nil {
				return err
			}
			if r.json() {
				return json.NewEncoder(app.Stdout).Encode(v)
			}
			w := app.Stdout
			fmt.Fprintf(w, "Rollout %d: %s, %s", v.ID, v.Spec.Image, v.State)
			if v.Reason != "" {
				fmt.Fprintf(w, " (%s)", v.Reason)
			}
			fmt.Fprintf(w, "\nBatch %d of %d, size %d, canary %d, failure threshold %d, retries %d\n",
				min(v.Batch+1, v.Batches), v.Batches, v.Spec.BatchSize, v.Spec.Canary, v.Spec.FailureThreshold, v.Spec.MaxRetries)
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "BATCH\tHOSTNAME\tMAC\tSTATUS\tSTATE\tATTEMPTS\tPROGRESS\tERROR")
			for _, n := range v.Nodes {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%d\t%3.0f%%\t%s\n", n.Batch, n.Hostname, n.MAC, n.Status, n.State, n.Attempts, n.Fraction*100, dash(n.LastError))
			}
			return tw.Flush()
		},
	}
}

func newRolloutWatchCmd(app *cli.App, r *remote) *cobra.Command {
	return &cobra.Command{
		Use:   "watch ID",
		Short: "Draw live per-node progress bars and the overall ETA until the rollout ends",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := rolloutID(args[0])
			if err != nil {
				return err
			}
			c, err := r.client()
			if err != nil {
				return err
			}
			return watchRollout(cmd, app, r, c, id)
		},
	}
}

// watchRollout polls the rollout every second. On a terminal it redraws one
// bar per node in flight plus an overall line; elsewhere (or with -o json)
// it prints a line (a JSON object) when something changes.
func watchRollout(cmd *cobra.Command, app *cli.App, r *remote, c *client.Client, id int64) error {
	tty := false
	if f, ok := app.Stdout.(*os.File); ok {
		tty = progress.IsTerminal(f)
	}
	drawn := 0
	last := ""
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		v, err := c.Rollout(cmd.Context(), id)
		if err != nil {
			return err
		}
		switch {
		case r.json():
			b, _ := json.Marshal(v)
			if s := string(b); s != last {
				fmt.Fprintln(app.Stdout, s)
				last = s
			}
		case tty:
			lines := watchLines(v, 36)
			if drawn > 0 {
				fmt.Fprintf(app.Stdout, "\x1b[%dA", drawn)
			}
			for _, l := range lines {
				fmt.Fprintf(app.Stdout, "\x1b[2K%s\n", l)
			}
			for i := len(lines); i < drawn; i++ {
				fmt.Fprint(app.Stdout, "\x1b[2K\n")
			}
			drawn = max(drawn, len(lines))
		default:
			s := overallLine(v, 20)
			if s != last {
				fmt.Fprintln(app.Stdout, s)
				last = s
			}
		}
		if v.State.Final() {
			if v.State == deploy.RolloutCancelled {
				return errors.New("rollout cancelled")
			}
			if v.Summary.Failed > 0 {
				return fmt.Errorf("rollout %d completed with %d failed node(s)", v.ID, v.Summary.Failed)
			}
			return nil
		}
		select {
		case <-cmd.Context().Done():
			return cmd.Context().Err()
		case <-t.C:
		}
	}
}

func bar(f float64, width int) string {
	n := int(f*float64(width) + 0.5)
	n = min(max(n, 0), width)
	return "[" + strings.Repeat("#", n) + strings.Repeat(".", width-n) + "]"
}

func overallLine(v *api.RolloutView, width int) string {
	s := v.Summary
	eta := "ETA --"
	switch {
	case v.State.Final():
		eta = string(v.State)
	case v.State == deploy.RolloutPaused:
		eta = "paused: " + v.Reason
	case s.ETASeconds >= 0:
		eta = "ETA " + (time.Duration(s.ETASeconds) * time.Second).String()
	}
	return fmt.Sprintf("rollout %d %s %s %3.0f%%  %d/%d done, %d active, %d failed, batch %d/%d  %s",
		v.ID, v.Spec.Image, bar(s.Fraction, width), s.Fraction*100, s.Succeeded, s.Total, s.Active+s.Retrying, s.Failed,
		min(v.Batch+1, v.Batches), v.Batches, eta)
}

// watchLines renders the nodes in flight (and failures) and the overall line.
func watchLines(v *api.RolloutView, width int) []string {
	var lines []string
	for _, n := range v.Nodes {
		if n.Status != deploy.TargetActive && n.Status != deploy.TargetRetrying && n.Status != deploy.TargetFailed {
			continue
		}
		detail := n.State
		if p := n.Progress; p != nil {
			if p.Step != "" {
				detail += "/" + p.Step
			}
			if p.Total > 0 {
				detail += fmt.Sprintf(" %s/%s", progress.Bytes(p.Bytes), progress.Bytes(p.Total))
			}
			if p.Rate > 0 {
				detail += fmt.Sprintf(" %s/s", progress.Bytes(int64(p.Rate)))
			}
			if p.Peers > 0 {
				detail += fmt.Sprintf(" %d peers", p.Peers)
			}
		}
		if n.Status == deploy.TargetFailed || n.Status == deploy.TargetRetrying {
			detail = string(n.Status) + ": " + n.LastError
		}
		lines = append(lines, fmt.Sprintf("  %-12s %s %3.0f%%  %s", n.Hostname, bar(n.Fraction, width), n.Fraction*100, detail))
	}
	return append(lines, overallLine(v, width))
}
