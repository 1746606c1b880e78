package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/server"
	"github.com/esir-project/esir/server/client"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

func newServerCmd(app *cli.App) *cobra.Command {
	var configFile string
	var printConfig bool
	flagCfg := server.DefaultConfig()
	cmd := &cobra.Command{
		Use:   "server [--config FILE] [flags]",
		Short: "Run the deployment server (API, agent protocol, boot, seeding)",
		Long: `The deployment server keeps the inventory and rollouts in an embedded SQLite
database, serves the administrator API and the agent protocol, seeds images over
BitTorrent with its tracker and web seed, and answers network boots (iPXE scripts;
DHCP and TFTP when configured).

Every setting is a key of the YAML config file, a flag and an environment
variable ESIR_<KEY>; flags beat the environment, which beats the file. On the
first start the server creates an admin token and prints it once.

SIGHUP (or "esir cluster reload") makes the server read its cluster definition
and password files again: a changed definition reaches every member as a new
nodelist version; one that does not load is refused and the running one stays.`,
		Example: `  esir server --config /etc/esir/server.yaml
  esir server --listen :8080 --data-dir /var/lib/esir/server --image-store /var/lib/esir
  ESIR_DHCP_INTERFACE=eth1 esir server --dhcp-server-ip 198.18.0.1 --print-config`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg := server.DefaultConfig()
			if configFile != "" {
				if err := cfg.LoadFile(configFile); err != nil {
					return err
				}
			}
			if err := cfg.ApplyEnv(os.LookupEnv); err != nil {
				return err
			}
			flagFields := flagCfg.Fields()
			for i, f := range cfg.Fields() {
				if fl := cmd.Flags().Lookup(f.Flag()); fl != nil && fl.Changed {
					if err := f.Set(flagValue(flagFields[i])); err != nil {
						return fmt.Errorf("--%s: %w", f.Flag(), err)
					}
				}
			}
			if printConfig {
				if err := cfg.Finish(); err != nil {
					return err
				}
				out, err := cfg.YAML()
				if err != nil {
					return err
				}
				_, err = app.Stdout.Write(out)
				return err
			}
			srv, err := server.New(cmd.Context(), cfg, app.Log)
			if err != nil {
				return err
			}
			hup := make(chan os.Signal, 1)
			signal.Notify(hup, syscall.SIGHUP)
			defer signal.Stop(hup)
			go reloadOnHangup(cmd.Context(), hup, srv, app.Log)
			return srv.Run(cmd.Context())
		},
	}
	cmd.Flags().StringVarP(&configFile, "config", "c", os.Getenv("ESIR_CONFIG"), "YAML config file (env ESIR_CONFIG)")
	cmd.Flags().BoolVar(&printConfig, "print-config", false, "print the effective configuration as YAML and exit")
	for _, f := range flagCfg.Fields() {
		usage := f.Usage + " (env " + f.Env() + ")"
		switch p := f.Ptr.(type) {
		case *string:
			cmd.Flags().StringVar(p, f.Flag(), *p, usage)
		case *bool:
			cmd.Flags().BoolVar(p, f.Flag(), *p, usage)
		default:
			cmd.Flags().Var(durationFlag{f}, f.Flag(), usage)
		}
	}
	return cmd
}

// durationFlag is a pflag.Value over a server config field.
type durationFlag struct{ f server.Field }

func (d durationFlag) String() string {
	if d.f.Ptr == nil {
		return ""
	}
	return flagValue(d.f)
}
func (d durationFlag) Set(s string) error { return d.f.Set(s) }
func (d durationFlag) Type() string       { return "duration" }

var _ pflag.Value = durationFlag{}

func flagValue(f server.Field) string {
	switch p := f.Ptr.(type) {
	case *string:
		return *p
	case *bool:
		return fmt.Sprint(*p)
	case interface{ String() string }:
		return p.String()
	}
	return fmt.Sprint(f.Ptr)
}

// remote holds the flags of commands that talk to a server's API.
type remote struct {
	server, token, output string
}

func (r *remote) addFlags(cmd *cobra.Command) {
	cmd.PersistentFlags().StringVar(&r.server, "server", "", "server URL (env ESIR_SERVER, or server: in ~/.config/esir/config)")
	cmd.PersistentFlags().StringVar(&r.token, "token", "", "admin token (env ESIR_TOKEN, or token: in ~/.config/esir/config)")
	cmd.PersistentFlags().StringVarP(&r.output, "output", "o", "table", "output format: table or json")
}

// client resolves the server URL and token: flags, then the environment,
// then the config file.
func (r *remote) client() (*client.Client, error) {
	if r.output != "table" && r.output != "json" {
		return nil, fmt.Errorf("--output %q: want table or json", r.output)
	}
	c := &client.Client{Server: r.server, Token: r.token}
	if c.Server == "" {
		c.Server = os.Getenv("ESIR_SERVER")
	}
	if c.Token == "" {
		c.Token = os.Getenv("ESIR_TOKEN")
	}
	if c.Server == "" || c.Token == "" {
		dir, err := os.UserConfigDir()
		if err == nil {
			s, err := client.ReadSettings(client.DefaultConfigPath(dir))
			if err != nil {
				return nil, err
			}
			if c.Server == "" {
				c.Server = s.Server
			}
			if c.Token == "" {
				c.Token = s.Token
			}
		}
	}
	if c.Server == "" {
		return nil, errors.New("no server: give --server, ESIR_SERVER or server: in ~/.config/esir/config")
	}
	if !strings.Contains(c.Server, "://") {
		c.Server = "http://" + c.Server
	}
	return c, nil
}

func (r *remote) json() bool { return r.output == "json" }

// reloadOnHangup reloads the server's cluster definition at every SIGHUP
// until ctx ends.
func reloadOnHangup(ctx context.Context, hup <-chan os.Signal, srv *server.Server, log *slog.Logger) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
		}
		c := srv.API().Cluster()
		if c == nil {
			log.Warn("SIGHUP: this server keeps no SSI cluster: nothing to reload")
			continue
		}
		v, changed, err := c.Reload()
		switch {
		case err != nil:
			log.Error("SIGHUP: cluster definition not reloaded", "err", err)
		case !changed:
			log.Info("SIGHUP: cluster definition unchanged", "cluster", c.Name(), "version", v)
		}
	}
}
