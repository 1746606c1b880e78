package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"runtime/debug"
	"time"

	"github.com/esir-project/esir/agent/install"
	"github.com/esir-project/esir/agent/pipeline"
	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/swarm/havewire"
	"github.com/spf13/cobra"
)

func newRunCmd(app *cli.App) *cobra.Command {
	var (
		server, token, mac, diskFile, target, hardware, cmdline, agentBin string
		workDir, listen, haveMode, rack                                   string
		dhcp                                                              bool
		seedIdle, seedMax, webSeedAfter                                   time.Duration
	)
	cmd := &cobra.Command{
		Use:   "run --server URL --token T --mac MAC --disk FILE",
		Short: "Run the netboot pipeline as an ordinary process, aimed at a disk image file",
		Long: `run does what the netboot environment's /init does after mounting the kernel's
filesystems, as an ordinary process: it registers with the server as the node
--mac, takes its assignment (polling in inventory mode), fetches the image over
BitTorrent while installing it onto --disk FILE (through a loop device) or
--target DEVICE, sends progress events and log lines about once a second,
reports the result (installed, or the failed step with its device, cause and
log tail), keeps seeding, and prints the outcome as JSON. It loads no modules
and, unless --dhcp is given, leaves the network as it is. The exit status is
non-zero when the install failed.`,
		Example: `  esir-agent run --server http://198.18.0.1:8080 --token "$TOKEN" --mac 52:54:00:e5:00:01 \
      --disk node1.img --hardware machine-modaliases.txt --cmdline console=ttyS0,115200`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			hw, err := net.ParseMAC(mac)
			if err != nil {
				return fmt.Errorf("--mac %q: %w", mac, err)
			}
			mode, err := havewire.ParseMode(haveMode)
			if err != nil {
				return err
			}
			logs := pipeline.NewLogBuffer()
			cfg := pipeline.Config{Server: server, Token: token, MAC: hw, DHCP: dhcp, Disk: target,
				WorkDir: workDir, SwarmListen: listen, HaveMode: mode, Rack: rack, WebSeedAfter: webSeedAfter,
				Once: true, SeedIdle: seedIdle, SeedMax: seedMax, Logs: logs,
				Log: pipeline.NewLogger(app.Log.Handler(), logs), Version: version()}
			cfg.Install = install.Options{Cmdline: cmdline, Agent: agentBin}
			if cfg.Install.Agent == "" {
				if cfg.Install.Agent, err = os.Executable(); err != nil {
					return err
				}
			}
			if hardware != "" {
				if cfg.Install.Devices, err = readHardware(hardware); err != nil {
					return err
				}
			}
			switch {
			case diskFile != "" && target != "":
				return fmt.Errorf("give --disk FILE or --target DEVICE, not both")
			case diskFile != "":
				dev, detach, err := install.AttachFile(ctx, diskFile)
				if err != nil {
					return err
				}
				defer func() {
					if err := detach(); err != nil {
						app.Log.Error("detach disk image", "file", diskFile, "dev", dev, "err", err)
					}
				}()
				cfg.Disk = dev
			}
			out, err := pipeline.Run(ctx, cfg)
			if err != nil {
				return err
			}
			b, _ := json.MarshalIndent(out, "", "  ")
			fmt.Fprintln(app.Stdout, string(b))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&server, "server", "", "deployment server `URL`")
	f.StringVar(&token, "token", "", "the node's boot token")
	f.StringVar(&mac, "mac", "", "the node's boot NIC `MAC` (its identity)")
	f.StringVar(&diskFile, "disk", "", "disk image `FILE` to install onto (attached through a loop device)")
	f.StringVar(&target, "target", "", "block `DEVICE` to install onto (default: the assignment's disk rule)")
	f.StringVar(&hardware, "hardware", "", "`DIR` (a sysfs tree) or FILE (modalias list) of the machine the disk will boot in (default: this machine's /sys)")
	f.StringVar(&cmdline, "cmdline", "", "extra kernel command line for the installed system")
	f.StringVar(&agentBin, "agent", "", "static esir-agent `BINARY` to install (default: this program)")
	f.StringVar(&workDir, "work-dir", "", "`DIR` for the downloaded archive (default: the temporary directory)")
	f.StringVar(&listen, "listen", ":6881", "BitTorrent peer address")
	f.StringVar(&haveMode, "have-mode", "adaptive", "HAVE suppression: off, redundant or adaptive")
	f.StringVar(&rack, "rack", "", "rack label for the tracker's peer selection")
	f.BoolVar(&dhcp, "dhcp", false, "bring up the NIC whose MAC is --mac and configure it by DHCP first")
	f.DurationVar(&seedIdle, "seed-idle", 10*time.Second, "without the assignment's seed time: stop seeding after this long without uploads")
	f.DurationVar(&seedMax, "seed-max", 10*time.Minute, "without the assignment's seed time: seed at most this long")
	f.DurationVar(&webSeedAfter, "webseed-after", 0, "fall back to the server's web seed after this long without data (0: swarm's default)")
	for _, n := range []string{"server", "mac"} {
		_ = cmd.MarkFlagRequired(n)
	}
	return cmd
}

// version is the agent's build version: the module version, or the VCS
// revision it was built from.
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += " " + s.Value[:12]
		}
	}
	return v
}
