package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/lab"
	"github.com/esir-project/esir/lab/debianssi"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/cluster"
	"github.com/spf13/cobra"
)

func newLabCmd(app *cli.App) *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "lab",
		Short: "Run a virtual cluster of QEMU machines on this host and deploy onto it",
		Long: `The lab builds a virtual cluster on one Linux machine (as root): a network
namespace with a bridge, the ESIR server on it (DHCP, TFTP, HTTP boot, tracker,
seeding; its web console on a loopback port of this host), and QEMU virtual
machines with empty disks that PXE-boot through ESIR, fetch the image from each
other over BitTorrent, install it, reboot into it and enroll.`,
		Example: `  esir lab up --nodes 4
  esir lab status
  esir lab console node02
  esir lab down`,
	}
	def := os.Getenv("ESIR_LAB_DIR")
	if def == "" {
		def = lab.DefaultDir
	}
	cmd.PersistentFlags().StringVar(&dir, "dir", def, "lab state directory (env ESIR_LAB_DIR)")
	cmd.AddCommand(newLabUpCmd(app, &dir), newLabStatusCmd(app, &dir), newLabConsoleCmd(app, &dir),
		newLabDownCmd(app, &dir), newLabForwardCmd(app), newLabVIPCmd(app, &dir), newLabClushCmd(app, &dir))
	return cmd
}

func newLabUpCmd(app *cli.App, dir *string) *cobra.Command {
	opts := lab.Options{}
	var diskMiB int
	var agent string
	var noWatch bool
	var clusterWait time.Duration
	cmd := &cobra.Command{
		Use:   "up --nodes N [--firmware bios|uefi|mixed] [--hardware virtio|mixed] [--image NAME[:VERSION]]",
		Short: "Build the virtual cluster and deploy an image onto every node",
		Long: `up builds the sample image (busybox, Debian's kernel and modules) unless --image
names one in the lab's store (--image debian-ssi builds Debian 12 with the SSI
node stack when the store lacks it), builds the netboot environment, starts the server
and the virtual machines, pre-registers the machines by MAC, starts a rollout
onto all of them and follows it with a progress bar per node. The machines
keep running when up returns; take everything down with "esir lab down".

With debian-ssi the server also keeps an SSI cluster of all nodes (the first
three corosync voters; fencing off, as in a test cluster; VIP ` + lab.VIPAddr + ` with
HTTP on port 80 balanced by keepalived and IPVS): up then waits until every
node is enrolled in a quorate cluster and asks the VIP from several client
addresses which node answers (see "esir lab vip").`,
		Example: `  esir lab up --nodes 2
  esir lab up --nodes 4 --firmware uefi --hardware virtio
  esir lab up --nodes 3 --image compute:1.0 --dir /srv/lab`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			start := time.Now()
			defer func() {
				fmt.Fprintf(app.Stdout, "lab up took %.1fs\n", time.Since(start).Seconds())
			}()
			self, err := os.Executable()
			if err != nil {
				return err
			}
			if agent == "" {
				if agent, err = findAgent(); err != nil {
					return err
				}
			}
			opts.Dir, opts.Esir, opts.Agent, opts.Log = *dir, self, agent, app.Log
			opts.DiskBytes = int64(diskMiB) << 20
			fmt.Fprintf(app.Stdout, "building the lab in %s (%d nodes, firmware %s, hardware %s)...\n", opts.Dir, opts.Nodes, opts.Firmware, opts.Hardware)
			st, err := lab.Up(cmd.Context(), opts)
			if err != nil {
				return err
			}
			printLab(app.Stdout, st)
			if opts.NoRollout || noWatch {
				return nil
			}
			c, err := st.Client()
			if err != nil {
				return err
			}
			fmt.Fprintf(app.Stdout, "rollout %d of %s onto %d nodes:\n", st.Rollout, st.Image, len(st.Nodes))
			r := &remote{output: "table"}
			if err := watchRollout(cmd, app, r, c, st.Rollout); err != nil {
				return err
			}
			if err := labNodes(cmd, app, st); err != nil {
				return err
			}
			if st.Cluster == "" {
				return nil
			}
			return labCluster(cmd, app, st, clusterWait)
		},
	}
	f := cmd.Flags()
	f.IntVarP(&opts.Nodes, "nodes", "n", 2, "number of virtual machines")
	f.StringVar(&opts.Firmware, "firmware", lab.FirmwareMixed, "firmware: bios (SeaBIOS), uefi (OVMF) or mixed (alternating)")
	f.StringVar(&opts.Hardware, "hardware", lab.HardwareMixed, "hardware: virtio, or mixed (NICs e1000/virtio-net/e1000e, disks AHCI/NVMe/virtio-blk)")
	f.StringVar(&opts.Image, "image", "", "image NAME[:VERSION] in the lab's store (default: build and deploy "+lab.SampleImage+"); "+lab.DebianSSI+" is built (Debian 12 with the SSI stack) when the store lacks it")
	f.StringVar(&opts.DebianCache, "debian-cache", debianssi.DefaultCache, "where the "+lab.DebianSSI+" recipe keeps its debootstrapped tree and packages")
	f.StringVar(&opts.Mirror, "mirror", debianssi.DefaultMirror, "Debian mirror of the "+lab.DebianSSI+" recipe")
	f.StringVar(&opts.ImageStore, "store", "", "take --image from this image store instead of the lab's")
	f.StringVar(&opts.Name, "name", lab.DefaultName, "lab name (namespaces esir-NAME-*), 1-8 of [a-z0-9]")
	f.IntVar(&opts.MemoryMiB, "memory", lab.DefaultMemoryMiB, "memory per machine in MiB")
	f.IntVar(&diskMiB, "disk", lab.DefaultDiskBytes>>20, "disk size per machine in MiB")
	f.IntVar(&opts.ConsolePort, "console-port", 0, "loopback port for the web console (0: any free port)")
	f.StringVar(&agent, "agent", "", "static esir-agent binary (default: beside esir, then $PATH)")
	f.BoolVar(&opts.NoRollout, "no-rollout", false, "only boot the machines (inventory mode), start no rollout")
	f.BoolVar(&noWatch, "no-watch", false, "return once the rollout started instead of following it")
	f.BoolVar(&opts.NoCluster, "no-cluster", false, "deploy "+lab.DebianSSI+" without the SSI cluster")
	f.StringVar(&opts.VIPScheduler, "vip-scheduler", lab.DefaultVIPScheduler, "IPVS scheduler of the cluster VIP (sh keeps a connection a director forwarded to another director where it was sent)")
	f.DurationVar(&clusterWait, "cluster-wait", 20*time.Minute, "how long up waits for the SSI cluster to be quorate with every node enrolled")
	return cmd
}

// labCluster waits for the lab's SSI cluster, printing each change, then
// probes the VIP.
func labCluster(cmd *cobra.Command, app *cli.App, st *lab.State, wait time.Duration) error {
	c, err := st.Client()
	if err != nil {
		return err
	}
	start := time.Now()
	fmt.Fprintf(app.Stdout, "waiting for cluster %s (every node enrolled, quorate; up to %v)...\n", st.Cluster, wait)
	s, err := st.WaitCluster(cmd.Context(), c, wait, func(s *cluster.Snapshot) {
		fmt.Fprintf(app.Stdout, "  %6.1fs  %s\n", time.Since(start).Seconds(), lab.SnapshotLine(s))
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(app.Stdout, "cluster %s ready after %.1fs: %s\n", st.Cluster, time.Since(start).Seconds(), lab.SnapshotLine(s))
	if err := labVIP(cmd, app, st, 2); err != nil {
		return err
	}
	return labClush(cmd, app, st, s)
}

// labClush runs clush on the first core node (lab.State.Clush) and prints
// every node's answer and host key.
func labClush(cmd *cobra.Command, app *cli.App, st *lab.State, s *cluster.Snapshot) error {
	chk, err := st.Clush(cmd.Context(), s, 3*time.Minute)
	if chk != nil && chk.Answers != nil {
		fmt.Fprintf(app.Stdout, "clush on %s (logged in as root with the lab's administrator key): %s\n", chk.From, chk.Command)
		tw := tabwriter.NewWriter(app.Stdout, 0, 0, 2, ' ', 0)
		for _, n := range slices.Sorted(maps.Keys(chk.Answers)) {
			fmt.Fprintf(tw, "  %s:\t%s\thost key %s\n", n, chk.Answers[n], chk.HostKeys[n])
		}
		tw.Flush()
		for l := range strings.Lines(chk.Stderr) {
			fmt.Fprintf(app.Stdout, "  stderr: %s", strings.TrimRight(l, "\n")+"\n")
		}
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(app.Stdout, "clush from %s answered from all %d nodes in %.1fs (cluster key; %d distinct host keys made at first boot)\n",
		chk.From, len(chk.Answers), chk.Took.Seconds(), len(chk.HostKeys))
	return nil
}

func newLabClushCmd(app *cli.App, dir *string) *cobra.Command {
	return &cobra.Command{
		Use:   "clush",
		Short: "Run clush on the SSI cluster's first core node and check that every node answers",
		Long: `clush logs in to the lab cluster's first core node as root with the lab's
administrator key (admin-ssh-key in the lab directory) and runs
"clush -s CLUSTER -g all hostname" there: clush reaches every member over SSH
with the cluster key ESIR installed. It fails, naming the nodes, unless every
node answers with its own host name, or when two nodes share a host key.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := lab.Load(*dir)
			if err != nil {
				return err
			}
			c, err := st.Client()
			if err != nil {
				return err
			}
			s, err := c.Cluster(cmd.Context())
			if err != nil {
				return fmt.Errorf("cluster %s: %w", st.Cluster, err)
			}
			return labClush(cmd, app, st, s)
		},
	}
}

// labVIP probes the VIP and prints which node answered each client.
func labVIP(cmd *cobra.Command, app *cli.App, st *lab.State, perClient int) error {
	p, err := st.ProbeVIP(cmd.Context(), perClient)
	if err != nil {
		return err
	}
	total := p.Failed
	for _, n := range p.Answers {
		total += n
	}
	fmt.Fprintf(app.Stdout, "VIP %s:80, %d connections from %d client addresses:\n", p.VIP, total, len(p.ByClient)+len(p.Errors))
	tw := tabwriter.NewWriter(app.Stdout, 0, 0, 2, ' ', 0)
	for _, n := range slices.Sorted(maps.Keys(p.Answers)) {
		fmt.Fprintf(tw, "  %s\t%d\n", n, p.Answers[n])
	}
	if p.Failed > 0 {
		fmt.Fprintf(tw, "  failed\t%d\n", p.Failed)
	}
	tw.Flush()
	for _, e := range p.Errors {
		fmt.Fprintln(app.Stdout, "  error:", e)
	}
	if p.Nodes() < 2 || p.Failed > 0 {
		return fmt.Errorf("VIP %s: %d nodes answered, %d connections failed: no load leveling across the nodes", p.VIP, p.Nodes(), p.Failed)
	}
	fmt.Fprintf(app.Stdout, "VIP %s leveled connections across %d nodes\n", p.VIP, p.Nodes())
	return nil
}

func newLabVIPCmd(app *cli.App, dir *string) *cobra.Command {
	var perClient int
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "vip",
		Short: "Ask the SSI cluster's VIP (HTTP, port 80) from several client addresses which node answers",
		Long: `vip opens new HTTP connections to the lab cluster's VIP from each of the
client addresses lab up gave the lab's switch namespace and counts which node
answered (the debian-ssi image answers with its host name). It fails unless
more than one node answered and every connection was answered.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := lab.Load(*dir)
			if err != nil {
				return err
			}
			if asJSON {
				p, err := st.ProbeVIP(cmd.Context(), perClient)
				if err != nil {
					return err
				}
				return json.NewEncoder(app.Stdout).Encode(p)
			}
			return labVIP(cmd, app, st, perClient)
		},
	}
	cmd.Flags().IntVar(&perClient, "per-client", 2, "connections from each client address")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printLab(w io.Writer, st *lab.State) {
	fmt.Fprintf(w, "lab %q up: server %s in namespace %s\n", st.Name, st.ServerURL, st.Switch)
	fmt.Fprintf(w, "  web console: %s (sign in with the API token)\n", st.ConsoleURL)
	fmt.Fprintf(w, "  admin token: %s\n", st.TokenFile)
	fmt.Fprintf(w, "  CLI:         esir node ls --server %s --token $(cat %s)\n", st.ConsoleURL, st.TokenFile)
	for _, n := range st.Nodes {
		fmt.Fprintf(w, "  %s  %s  %-4s  %-14s %-10s  esir lab console %s\n", n.Name, n.MAC, n.Firmware, n.NIC, n.Disk, n.Name)
	}
	if st.Cluster != "" {
		fmt.Fprintf(w, "  SSI cluster %s (%s), VIP %s:80: esir cluster show --server %s --token $(cat %s); esir lab vip\n",
			st.Cluster, st.ClusterDef, st.VIP, st.ConsoleURL, st.TokenFile)
		fmt.Fprintf(w, "  SSH as root: ip netns exec %s ssh -i %s root@ADDRESS (esir cluster members lists them); esir lab clush\n",
			st.Switch, st.AdminKey())
	}
}

// labNodes prints each node's state, hostname and matched modules.
func labNodes(cmd *cobra.Command, app *cli.App, st *lab.State) error {
	c, err := st.Client()
	if err != nil {
		return err
	}
	nodes, err := c.Nodes(cmd.Context(), "", lab.LabelKey+"="+st.Name)
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(app.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tMAC\tSTATE\tPHASE\tMODULES\tREASON")
	for _, n := range nodes {
		mods := 0
		if n.Inventory != nil {
			mods = len(n.Inventory.Modules)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\n", n.Hostname, n.MAC, n.State, dash(n.Phase), mods, n.Reason)
	}
	return tw.Flush()
}

func newLabStatusCmd(app *cli.App, dir *string) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the lab's processes and its nodes' deployment state",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := lab.Load(*dir)
			if err != nil {
				return err
			}
			s := lab.Inspect(st)
			var nodes []api.NodeView
			if c, err := st.Client(); err == nil {
				nodes, _ = c.Nodes(cmd.Context(), "", lab.LabelKey+"="+st.Name)
			}
			if asJSON {
				return json.NewEncoder(app.Stdout).Encode(struct {
					Lab   lab.Status     `json:"lab"`
					Nodes []api.NodeView `json:"nodes"`
				}{s, nodes})
			}
			printLab(app.Stdout, st)
			fmt.Fprintf(app.Stdout, "  server running: %v, console forwarder running: %v, rollout %d\n", s.Server, s.Forwarder, st.Rollout)
			byMAC := map[string]api.NodeView{}
			for _, n := range nodes {
				byMAC[n.MAC] = n
			}
			tw := tabwriter.NewWriter(app.Stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "NODE\tVM\tSTATE\tPHASE\tREASON")
			for _, n := range st.Nodes {
				state, phase, reason := "?", "", ""
				if v, ok := byMAC[n.MAC]; ok {
					state, phase, reason = string(v.State), v.Phase, v.Reason
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", n.Name, s.VMs[n.Name], state, dash(phase), reason)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newLabConsoleCmd(app *cli.App, dir *string) *cobra.Command {
	var follow bool
	cmd := &cobra.Command{
		Use:   "console NODE",
		Short: "Print a node's serial console log (-f follows it)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := lab.Load(*dir)
			if err != nil {
				return err
			}
			nd, err := st.Node(args[0])
			if err != nil {
				return err
			}
			f, err := os.Open(nd.Serial)
			if err != nil {
				return fmt.Errorf("serial log of %s: %w", nd.Name, err)
			}
			defer f.Close()
			for {
				if _, err := io.Copy(app.Stdout, f); err != nil {
					return err
				}
				if !follow {
					return nil
				}
				select {
				case <-cmd.Context().Done():
					return nil
				case <-time.After(200 * time.Millisecond):
				}
			}
		},
	}
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing what the console writes")
	return cmd
}

func newLabDownCmd(app *cli.App, dir *string) *cobra.Command {
	var name string
	cmd := &cobra.Command{
		Use:   "down",
		Short: "Remove the lab: machines, server, namespaces, taps, disks (idempotent)",
		Long: `down kills the lab's virtual machines, server and console forwarder, deletes its
network namespaces (with their taps and veths) and its disks, logs and server
data. It works after a crash too, from the state directory and by the lab's
namespace names. The image store in the state directory is kept as a cache.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := lab.Down(cmd.Context(), *dir, name); err != nil {
				return err
			}
			fmt.Fprintf(app.Stdout, "lab in %s is down\n", *dir)
			return nil
		},
	}
	cmd.Flags().StringVar(&name, "name", lab.DefaultName, "lab name to purge when the state directory has no state")
	return cmd
}

// newLabForwardCmd is the console forwarder `lab up` starts detached: it
// receives the bound loopback socket as a file descriptor.
func newLabForwardCmd(app *cli.App) *cobra.Command {
	var fd int
	var netns, to string
	cmd := &cobra.Command{
		Use:    "forward --fd N --netns NS --to ADDR",
		Short:  "Carry connections from an inherited listening socket into a network namespace (used by lab up)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if fd < 3 || netns == "" || to == "" {
				return errors.New("give --fd (3 or more), --netns and --to")
			}
			f := os.NewFile(uintptr(fd), "console-listener")
			ln, err := net.FileListener(f)
			f.Close()
			if err != nil {
				return fmt.Errorf("--fd %d: %w", fd, err)
			}
			app.Log.Info("lab forwarder running", "listen", ln.Addr().String(), "netns", netns, "to", to)
			return lab.Forward(cmd.Context(), ln, netns, to, app.Log)
		},
	}
	cmd.Flags().IntVar(&fd, "fd", 0, "inherited listening socket")
	cmd.Flags().StringVar(&netns, "netns", "", "network namespace of the target")
	cmd.Flags().StringVar(&to, "to", "", "target HOST:PORT inside the namespace")
	return cmd
}
