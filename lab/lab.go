// Package lab builds ESIR's virtual cluster on one Linux machine: a netlab
// switch namespace with bridge br0, the real `esir server` running detached
// inside it (DHCP in full mode on br0, TFTP with Debian's iPXE, HTTP boot,
// tracker and seeding), its web console published on a loopback port of the
// host by a small forwarder process, and N detached QEMU guests (TCG,
// network-first boot order, an empty disk each, firmware and NIC/disk models
// varied) on taps of the bridge, all pre-registered by MAC and given a
// rollout of an image.
//
// Everything the lab starts is written down in STATE_DIR/state.json (process
// ids, namespace, taps, disks), so Down removes it all, also after a crash of
// `esir lab up`; Down also purges the lab's namespaces by name (netlab.Purge)
// and is idempotent.
//
// Layout of the state directory:
//
//	state.json      what is running (State)
//	store/          image store (kept by Down; the sample image is rebuilt by each up)
//	server/         the server's data directory (database, leases)
//	server.yaml     the server's configuration; server.log its output
//	cluster.yaml    the SSI cluster definition (images with the stack)
//	tftp/           copies of Debian's iPXE boot files
//	admin-token     the admin API token (0600)
//	admin-ssh-key   the lab administrator's SSH key (0600; .pub: root's
//	                authorized_keys on every node, via the server)
//	vms/            serial logs and UEFI variable stores
//	disks/          the nodes' disk files
package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/lab/debianssi"
	"github.com/esir-project/esir/netlab"
	"github.com/esir-project/esir/pxe/netboot"
	"github.com/esir-project/esir/sampleimage"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/client"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/vm"
)

// Defaults of Options.
const (
	DefaultDir       = "/var/lib/esir-lab"
	DefaultName      = "lab"
	DefaultMemoryMiB = 1024
	DefaultDiskBytes = 2 << 30
	// SampleImage is the image built when Options.Image is empty.
	SampleImage = "sample:1"
	// DebianSSI is the image of Debian 12 with the SSI node stack that
	// the lab builds with its recipe (package lab/debianssi) when asked
	// for it and the store lacks it.
	DebianSSI = debianssi.Name
	// LabelKey is the node label the lab's rollout selects.
	LabelKey = "esir-lab"
)

// The lab's network: the server on the bridge, DHCP hands out the pool.
const (
	serverAddr = "198.18.0.1/24"
	dhcpRange  = "198.18.0.100-198.18.0.250/24"
	httpPort   = "8080"
	swarmPort  = "6881"
)

// DefaultServerUploadRate is the lab server's seeding cap (bytes per second):
// low enough that the lab's nodes visibly share pieces with each other.
const DefaultServerUploadRate = 1 << 20

// DebianSSIServerUploadRate is the server's default seeding cap for the
// debian-ssi image, about 140 MB compressed: at DefaultServerUploadRate the
// first copy alone would take over two minutes.
const DebianSSIServerUploadRate = 8 << 20

// isDebianSSI reports whether ref names the recipe's debian-ssi image.
func isDebianSSI(ref string) bool {
	name, version, _ := imaging.ParseRef(ref)
	return name == DebianSSI && (version == "" || version == debianssi.ImageVersion())
}

// Options describe a lab.
type Options struct {
	Dir      string // state directory (DefaultDir)
	Name     string // netlab name, 1-8 of [a-z0-9] (DefaultName)
	Nodes    int
	Firmware string // bios, uefi or mixed
	Hardware string // virtio or mixed
	// Image is the image to deploy, NAME[:VERSION] in the lab's store;
	// empty builds and deploys the sample image (SampleImage). debian-ssi
	// (DebianSSI) is built by its recipe when the store lacks it.
	Image string
	// DebianCache is the debian-ssi recipe's cache of its debootstrapped
	// tree and packages (default debianssi.DefaultCache); Mirror the Debian
	// mirror it downloads from (default debianssi.DefaultMirror).
	DebianCache, Mirror string
	// ImageStore is a store to take Image from (default: the lab's own).
	ImageStore string
	Esir       string // the esir binary the server runs from
	Agent      string // the static esir-agent binary for the netboot environment
	MemoryMiB  int
	DiskBytes  int64
	// DiskBytesOf overrides the disk size of single nodes by name.
	DiskBytesOf map[string]int64
	// ConsolePort is the host loopback port of the console (0: any free).
	ConsolePort int
	// ServerUploadRate caps the server's seeding in bytes per second, as a
	// server link shared by many nodes would: the nodes then fetch much of
	// the image from each other. 0 takes DefaultServerUploadRate; -1 means
	// unlimited.
	ServerUploadRate int64
	// NoRollout leaves the nodes pre-registered without a rollout: they
	// PXE-boot the agent in inventory mode.
	NoRollout bool
	// NoCluster deploys an image with the SSI stack (debian-ssi) without
	// the cluster: the server then keeps no cluster definition.
	NoCluster bool
	// VIPScheduler is the IPVS scheduler of the cluster's VIP (default
	// DefaultVIPScheduler, sh; see ClusterDefinition).
	VIPScheduler string
	Log          *slog.Logger
}

// State is what a running lab consists of; it is kept in Dir/state.json.
type State struct {
	Name       string `json:"name"`
	Dir        string `json:"dir"`
	Switch     string `json:"switch_netns"`
	ServerURL  string `json:"server_url"` // inside the lab network
	ConsoleURL string `json:"console_url"`
	TokenFile  string `json:"admin_token_file"`
	Esir       string `json:"esir"`
	ServerPID  int    `json:"server_pid"`
	ForwardPID int    `json:"forwarder_pid"`
	Image      string `json:"image"`
	Rollout    int64  `json:"rollout,omitempty"`
	MemoryMiB  int    `json:"memory_mib"`
	// ServerUploadRate is the server's seeding cap in bytes per second (<= 0: none).
	ServerUploadRate int64 `json:"server_upload_rate,omitempty"`
	// Cluster names the SSI cluster the server keeps (ClusterDefinition,
	// written to ClusterDef); VIP is its virtual address. Empty without.
	Cluster     string    `json:"cluster,omitempty"`
	ClusterDef  string    `json:"cluster_definition,omitempty"`
	VIP         string    `json:"vip,omitempty"`
	Nodes       []Node    `json:"nodes"`
	Created     time.Time `json:"created"`
	BootDir     string    `json:"boot_dir"`
	ImageStore  string    `json:"image_store"`
	ServerLog   string    `json:"server_log"`
	ForwardLog  string    `json:"forwarder_log"`
	ConsolePort int       `json:"console_port"`
}

const stateFile = "state.json"

// ipxeDir holds Debian's iPXE boot files (package ipxe).
const ipxeDir = "/usr/lib/ipxe"

func (st *State) vmDir() string   { return filepath.Join(st.Dir, "vms") }
func (st *State) diskDir() string { return filepath.Join(st.Dir, "disks") }

// Node returns the node named name (or with that MAC).
func (st *State) Node(name string) (*Node, error) {
	for i := range st.Nodes {
		if st.Nodes[i].Name == name || strings.EqualFold(st.Nodes[i].MAC, name) {
			return &st.Nodes[i], nil
		}
	}
	names := make([]string, len(st.Nodes))
	for i, n := range st.Nodes {
		names[i] = n.Name
	}
	return nil, fmt.Errorf("lab: no node %q (nodes: %s)", name, strings.Join(names, ", "))
}

// Token reads the admin token.
func (st *State) Token() (string, error) {
	b, err := os.ReadFile(st.TokenFile)
	if err != nil {
		return "", fmt.Errorf("lab: admin token: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// Client returns an API client of the lab's server through the console port.
func (st *State) Client() (*client.Client, error) {
	tok, err := st.Token()
	if err != nil {
		return nil, err
	}
	return &client.Client{Server: st.ConsoleURL, Token: tok}, nil
}

// Load reads the state of the lab in dir.
func Load(dir string) (*State, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("lab: no lab in %s (run esir lab up): %w", dir, err)
	}
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("lab: %s: %w", filepath.Join(dir, stateFile), err)
	}
	return &st, nil
}

// Save writes the state atomically.
func (st *State) Save() error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return writeAtomic(filepath.Join(st.Dir, stateFile), append(b, '\n'), 0o644)
}

func writeAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err == nil {
		err = f.Chmod(mode)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("lab: write %s: %w", path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("lab: write %s: %w", path, err)
	}
	return nil
}

// Available reports why the lab cannot run here, or nil.
func Available() error {
	if err := netlab.Available(); err != nil {
		return err
	}
	if err := vm.Available(vm.UEFI); err != nil {
		return err
	}
	for _, f := range []string{"undionly.kpxe", "ipxe.efi"} {
		if _, err := os.Stat(filepath.Join(ipxeDir, f)); err != nil {
			return fmt.Errorf("lab: %s missing (Debian package ipxe)", f)
		}
	}
	return nil
}

func (o *Options) fill() error {
	if o.Dir == "" {
		o.Dir = DefaultDir
	}
	if o.Name == "" {
		o.Name = DefaultName
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = DefaultMemoryMiB
	}
	if o.DiskBytes == 0 {
		o.DiskBytes = DefaultDiskBytes
	}
	if o.ServerUploadRate == 0 {
		o.ServerUploadRate = DefaultServerUploadRate
		if isDebianSSI(o.Image) {
			o.ServerUploadRate = DebianSSIServerUploadRate
		}
	}
	if o.Firmware == "" {
		o.Firmware = FirmwareMixed
	}
	if o.Hardware == "" {
		o.Hardware = HardwareMixed
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	for what, p := range map[string]string{"esir": o.Esir, "esir-agent": o.Agent} {
		if p == "" {
			return fmt.Errorf("lab: no %s binary given", what)
		}
		if _, err := os.Stat(p); err != nil {
			return fmt.Errorf("lab: %s binary: %w", what, err)
		}
	}
	abs, err := filepath.Abs(o.Dir)
	if err != nil {
		return err
	}
	o.Dir = abs
	return nil
}

// Up builds the lab and, unless opts.NoRollout, starts a rollout of the image
// onto every node. It returns once the VMs run and the rollout exists; watch
// it through State.Client. A lab already running in opts.Dir is an error;
// on failure everything Up started is removed again.
func Up(ctx context.Context, opts Options) (st *State, err error) {
	if err := opts.fill(); err != nil {
		return nil, err
	}
	if err := Available(); err != nil {
		return nil, err
	}
	if old, err := Load(opts.Dir); err == nil && old.running() {
		return nil, fmt.Errorf("lab: a lab is already up in %s (server pid %d): run esir lab down first", opts.Dir, old.ServerPID)
	}
	// Leftovers of a crashed run (processes, namespaces, disks) go first.
	if err := Down(ctx, opts.Dir, opts.Name); err != nil {
		return nil, err
	}
	log := opts.Log
	st = &State{
		Name: opts.Name, Dir: opts.Dir, Esir: opts.Esir, MemoryMiB: opts.MemoryMiB, ServerUploadRate: opts.ServerUploadRate, Created: time.Now().UTC(),
		TokenFile: filepath.Join(opts.Dir, "admin-token"), ServerLog: filepath.Join(opts.Dir, "server.log"),
		ForwardLog: filepath.Join(opts.Dir, "forwarder.log"),
	}
	for _, d := range []string{opts.Dir, st.vmDir(), st.diskDir()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("lab: %w", err)
		}
	}
	st.Nodes, err = Plan(opts.Name, opts.Nodes, opts.Firmware, opts.Hardware, opts.DiskBytes)
	if err != nil {
		return nil, err
	}
	for i := range st.Nodes {
		if b, ok := opts.DiskBytesOf[st.Nodes[i].Name]; ok {
			st.Nodes[i].DiskBytes = b
		}
		st.Nodes[i].DiskPath = filepath.Join(st.diskDir(), st.Nodes[i].Name+".img")
		st.Nodes[i].Serial = vm.SerialPath(vm.Config{Name: st.Nodes[i].Name, WorkDir: st.vmDir()})
	}
	defer func() {
		if err != nil {
			if derr := Down(context.Background(), opts.Dir, opts.Name); derr != nil {
				log.Error("lab: cleaning up after a failed up", "err", derr)
			}
		}
	}()

	// 1. The image and its netboot environment.
	st.ImageStore = opts.ImageStore
	if st.ImageStore == "" {
		st.ImageStore = filepath.Join(opts.Dir, "store")
	}
	img, err := prepareImage(ctx, st.ImageStore, opts, log)
	if err != nil {
		return nil, err
	}
	st.Image = img.Manifest.Ref()
	store, err := imaging.OpenStore(st.ImageStore)
	if err != nil {
		return nil, err
	}
	log.Info("lab: building the netboot environment", "image", st.Image)
	nb, err := netboot.ForImage(ctx, store, img, netboot.Options{Agent: opts.Agent, Log: log})
	if err != nil {
		return nil, fmt.Errorf("lab: netboot environment of %s: %w", st.Image, err)
	}
	st.BootDir = nb.Dir

	// 2. The network: switch namespace with br0 and the server's address.
	nl, err := netlab.New(ctx, opts.Name)
	if err != nil {
		return nil, err
	}
	st.Switch = nl.Switch
	if _, err := nl.SwitchHost(ctx, netip.MustParsePrefix(serverAddr)); err != nil {
		return nil, err
	}
	for _, nd := range st.Nodes {
		if err := nl.AddTap(ctx, nd.Tap); err != nil {
			return nil, err
		}
	}
	// An image with the SSI stack gets its cluster: the definition for the
	// server, client addresses to probe the VIP from.
	if name, _, _ := imaging.ParseRef(st.Image); name == DebianSSI && !opts.NoCluster {
		def, err := ClusterDefinition(st.Name, st.Nodes, opts.VIPScheduler)
		if err != nil {
			return nil, err
		}
		if err := st.writeCluster(def); err != nil {
			return nil, err
		}
		if err := st.addClientAddrs(ctx); err != nil {
			return nil, err
		}
		log.Info("lab: SSI cluster", "name", st.Cluster, "core", def.CoreSize, "vip", VIPAddr, "definition", st.ClusterDef)
	}
	if err := st.Save(); err != nil {
		return nil, err
	}

	// 3. The server, detached, inside the switch namespace; the console on
	// a loopback port of the host.
	if err := st.copyIPXE(); err != nil {
		return nil, err
	}
	if err := st.writeAdminKey(); err != nil {
		return nil, err
	}
	if err := st.writeServerConfig(); err != nil {
		return nil, err
	}
	if err := st.StartServer(ctx); err != nil {
		return nil, err
	}
	if err := st.startForwarder(opts.ConsolePort); err != nil {
		return nil, err
	}
	if err := st.Save(); err != nil {
		return nil, err
	}
	if err := st.WaitServer(ctx, 60*time.Second); err != nil {
		return nil, err
	}
	c, err := st.Client()
	if err != nil {
		return nil, err
	}
	if err := waitImage(ctx, c, st.Image); err != nil {
		return nil, err
	}

	// 4. Nodes pre-registered by MAC, then the rollout, then the machines
	// (a node must be assigned before its first PXE request, or it boots
	// into inventory mode).
	for _, nd := range st.Nodes {
		if _, err := c.AddNode(ctx, api.AddNodeRequest{MAC: nd.MAC, Hostname: nd.Name, Labels: map[string]string{LabelKey: st.Name}}); err != nil {
			return nil, fmt.Errorf("lab: register %s (%s): %w", nd.Name, nd.MAC, err)
		}
	}
	if !opts.NoRollout {
		r, err := c.CreateRollout(ctx, deploy.Spec{
			Image:            st.Image,
			Selector:         deploy.Selector{Labels: map[string]string{LabelKey: st.Name}},
			BatchSize:        len(st.Nodes),
			FailureThreshold: len(st.Nodes),
			MaxRetries:       1,
			RetryBackoff:     deploy.Duration(5 * time.Second),
			NodeTimeout:      deploy.Duration(40 * time.Minute),
		})
		if err != nil {
			return nil, fmt.Errorf("lab: create the rollout: %w", err)
		}
		st.Rollout = r.ID
		if err := waitAssigned(ctx, c, st); err != nil {
			return nil, err
		}
	}
	for i := range st.Nodes {
		if err := makeDisk(st.Nodes[i].DiskPath, st.Nodes[i].DiskBytes); err != nil {
			return nil, err
		}
		if err := st.StartNode(ctx, st.Nodes[i].Name); err != nil {
			return nil, err
		}
	}
	return st, st.Save()
}

// prepareImage returns the image to deploy, building the sample image into
// storeDir when no image is named, and debian-ssi when it is named and the
// store lacks it.
func prepareImage(ctx context.Context, storeDir string, opts Options, log *slog.Logger) (*imaging.Image, error) {
	store, err := imaging.OpenStore(storeDir)
	if err != nil {
		return nil, fmt.Errorf("lab: image store: %w", err)
	}
	ref := opts.Image
	if isDebianSSI(ref) {
		img, err := store.Get(debianssi.Ref())
		if errors.Is(err, imaging.ErrNotFound) {
			log.Info("lab: building the debian-ssi image (debootstrap once, then cached)", "cache", opts.DebianCache)
			img, err = debianssi.Build(ctx, store, debianssi.Options{Cache: opts.DebianCache, Mirror: opts.Mirror, Log: log})
		}
		if err != nil {
			return nil, fmt.Errorf("lab: --image %s: %w", ref, err)
		}
		return img, nil
	}
	if ref != "" {
		img, err := store.Get(ref)
		if err != nil {
			return nil, fmt.Errorf("lab: --image: %w", err)
		}
		if img.Manifest.Mode != imaging.ModeFile {
			return nil, fmt.Errorf("lab: --image %s is a %s-mode image; the lab deploys file-mode images", ref, img.Manifest.Mode)
		}
		return img, nil
	}
	// The sample is rebuilt on every up: it is deterministic, so an
	// unchanged tree gives the same archive, and a sample:1 left by an
	// older ESIR (a different sample tree) is never deployed by mistake.
	if _, err := store.Get(SampleImage); err == nil {
		if err := store.Remove(SampleImage); err != nil {
			return nil, fmt.Errorf("lab: replace the sample image: %w", err)
		}
	} else if !errors.Is(err, imaging.ErrNotFound) {
		return nil, fmt.Errorf("lab: sample image: %w", err)
	}
	k, err := vm.HostDebianKernel()
	if err != nil {
		return nil, err
	}
	log.Info("lab: building the sample image", "kernel", k.Version)
	tmp, err := os.MkdirTemp(storeDir, ".sample-tree-*")
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	defer os.RemoveAll(tmp)
	root := filepath.Join(tmp, "root")
	if err := sampleimage.Build(ctx, root, sampleimage.Options{Kernel: k, Modules: sampleimage.StorageNetFS}); err != nil {
		return nil, err
	}
	name, version, _ := imaging.ParseRef(SampleImage)
	img, err := store.Build(ctx, root, imaging.BuildOptions{Name: name, Version: version})
	if err != nil {
		return nil, fmt.Errorf("lab: build the sample image: %w", err)
	}
	return img, nil
}

func (st *State) writeServerConfig() error {
	ip := strings.Split(serverAddr, "/")[0]
	st.ServerURL = "http://" + net.JoinHostPort(ip, httpPort)
	cfg := map[string]string{
		"listen":           net.JoinHostPort(ip, httpPort),
		"public_url":       st.ServerURL,
		"data_dir":         filepath.Join(st.Dir, "server"),
		"image_store":      st.ImageStore,
		"admin_token_file": st.TokenFile,
		"swarm_listen":     net.JoinHostPort(ip, swarmPort),
		"boot_dir":         st.BootDir,
		"boot_kernel":      netboot.KernelFile,
		"boot_initrd":      netboot.InitrdFile,
		"boot_cmdline":     "console=ttyS0,115200",
		"dhcp_interface":   "br0",
		"dhcp_mode":        "full",
		"dhcp_server_ip":   ip,
		"dhcp_range":       dhcpRange,
		"tftp_listen":      net.JoinHostPort(ip, "69"),
		"tftp_dir":         st.tftpDir(),
		"hostname_pattern": "node%02d",
		"scheduler_tick":   "1s",
		// The lab administrator's key for root on every node (AdminKey).
		"authorized_keys_file": st.adminPubKey(),
	}
	if st.ClusterDef != "" {
		cfg["cluster_definition"] = st.ClusterDef
	}
	if st.ServerUploadRate > 0 {
		cfg["swarm_upload_rate"] = strconv.FormatInt(st.ServerUploadRate, 10)
	}
	var b strings.Builder
	b.WriteString("# Written by esir lab up.\n")
	for _, k := range []string{"listen", "public_url", "data_dir", "image_store", "admin_token_file", "swarm_listen",
		"boot_dir", "boot_kernel", "boot_initrd", "boot_cmdline", "dhcp_interface", "dhcp_mode", "dhcp_server_ip",
		"dhcp_range", "tftp_listen", "tftp_dir", "hostname_pattern", "scheduler_tick", "swarm_upload_rate", "cluster_definition",
		"authorized_keys_file"} {
		if cfg[k] == "" {
			continue
		}
		fmt.Fprintf(&b, "%s: %s\n", k, strconv.Quote(cfg[k]))
	}
	return writeAtomic(st.serverConfig(), []byte(b.String()), 0o644)
}

func (st *State) tftpDir() string { return filepath.Join(st.Dir, "tftp") }

// copyIPXE copies Debian's iPXE boot files into the lab's TFTP directory.
// Debian's /usr/lib/ipxe/ipxe.efi is a symlink to /boot/ipxe.efi, which a
// TFTP server rooted at /usr/lib/ipxe rightly refuses to follow.
func (st *State) copyIPXE() error {
	if err := os.MkdirAll(st.tftpDir(), 0o755); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	for _, name := range []string{"undionly.kpxe", "ipxe.efi", "snponly.efi"} {
		b, err := os.ReadFile(filepath.Join(ipxeDir, name))
		if errors.Is(err, os.ErrNotExist) && name == "snponly.efi" {
			continue
		}
		if err != nil {
			return fmt.Errorf("lab: iPXE boot file (Debian package ipxe): %w", err)
		}
		if err := writeAtomic(filepath.Join(st.tftpDir(), name), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

func (st *State) serverConfig() string { return filepath.Join(st.Dir, "server.yaml") }

// StartServer starts `esir server` detached inside the switch namespace,
// appending its output to ServerLog. Its database lives in the state
// directory, so a restarted server resumes where the last one stopped.
func (st *State) StartServer(ctx context.Context) error {
	logf, err := os.OpenFile(st.ServerLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("lab: server log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command("ip", "netns", "exec", st.Switch, st.Esir, "server", "--config", st.serverConfig())
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("lab: start esir server: %w", err)
	}
	st.ServerPID = cmd.Process.Pid
	go cmd.Wait() // reap it if it dies while this process lives
	return st.Save()
}

// KillServer kills the server at once (SIGKILL), as a crash would.
func (st *State) KillServer() error {
	if st.ServerPID == 0 {
		return nil
	}
	err := killPID(st.ServerPID, "server")
	st.ServerPID = 0
	if serr := st.Save(); err == nil {
		err = serr
	}
	return err
}

// WaitServer waits until the server answers /healthz through the console
// port; the error carries the server log's tail.
func (st *State) WaitServer(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	hc := &http.Client{Timeout: 3 * time.Second}
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, st.ConsoleURL+"/healthz", nil)
		resp, err := hc.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				if _, err := os.Stat(st.TokenFile); err == nil {
					return nil
				}
			}
		}
		if st.ServerPID != 0 && !alive(st.ServerPID) {
			return fmt.Errorf("lab: esir server exited; %s ends:\n%s", st.ServerLog, tailFile(st.ServerLog, 20))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lab: esir server not healthy at %s: %w; %s ends:\n%s", st.ConsoleURL, ctx.Err(), st.ServerLog, tailFile(st.ServerLog, 20))
		case <-time.After(300 * time.Millisecond):
		}
	}
}

// startForwarder binds the console's loopback port here and hands the
// socket to a detached `esir lab forward` process, which carries each
// connection into the switch namespace.
func (st *State) startForwarder(port int) error {
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("lab: console port %d: %w", port, err)
	}
	defer ln.Close()
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		return fmt.Errorf("lab: console port: %w", err)
	}
	defer f.Close()
	st.ConsolePort = ln.Addr().(*net.TCPAddr).Port
	st.ConsoleURL = "http://" + ln.Addr().String()
	logf, err := os.OpenFile(st.ForwardLog, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("lab: forwarder log: %w", err)
	}
	defer logf.Close()
	target := strings.TrimPrefix(st.ServerURL, "http://")
	cmd := exec.Command(st.Esir, "lab", "forward", "--fd", "3", "--netns", st.Switch, "--to", target)
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("lab: start the console forwarder: %w", err)
	}
	st.ForwardPID = cmd.Process.Pid
	go cmd.Wait()
	return nil
}

// StartNode starts (or restarts) a node's QEMU; its serial log starts empty.
func (st *State) StartNode(ctx context.Context, name string) error {
	nd, err := st.Node(name)
	if err != nil {
		return err
	}
	if nd.PID != 0 && alive(nd.PID) {
		return fmt.Errorf("lab: %s is running (pid %d)", nd.Name, nd.PID)
	}
	v, err := vm.Start(ctx, vmConfig(st, *nd))
	if err != nil {
		return fmt.Errorf("lab: start %s: %w", nd.Name, err)
	}
	nd.PID = v.PID()
	return st.Save()
}

// KillNode kills a node's QEMU at once (power cut).
func (st *State) KillNode(name string) error {
	nd, err := st.Node(name)
	if err != nil {
		return err
	}
	if nd.PID == 0 {
		return nil
	}
	err = killPID(nd.PID, "qemu")
	nd.PID = 0
	if serr := st.Save(); err == nil {
		err = serr
	}
	return err
}

// running reports whether the lab's server process is alive.
func (st *State) running() bool { return st.ServerPID != 0 && ownsPID(st.ServerPID, "server") }

func makeDisk(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("lab: disk %s: %w", path, err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return fmt.Errorf("lab: disk %s: %w", path, err)
	}
	return f.Close()
}

// waitImage waits until the server has published the image (it scans its
// store at start).
func waitImage(ctx context.Context, c *client.Client, ref string) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		imgs, err := c.Images(ctx)
		if err == nil {
			for _, im := range imgs {
				if im.Ref == ref || im.Name+":"+im.Version == ref {
					return nil
				}
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: the server does not list image %s (last error: %v)", ref, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// waitAssigned waits until the scheduler has assigned every node.
func waitAssigned(ctx context.Context, c *client.Client, st *State) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		nodes, err := c.Nodes(ctx, "", LabelKey+"="+st.Name)
		if err == nil {
			n := 0
			for _, nd := range nodes {
				if nd.State.Active() {
					n++
				}
			}
			if n == len(st.Nodes) {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: rollout %d did not assign all %d nodes within 30s (last error: %v)", st.Rollout, len(st.Nodes), err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// Down removes the lab in dir: kills the QEMU guests, the server and the
// forwarder recorded in its state, purges the namespaces of lab name (taps
// and veths go with them), and deletes the disks, serial logs, server data
// and state. The image store is kept (images given with --image stay). Down is
// idempotent and works without a state file (after a crash): then it purges
// by name.
func Down(ctx context.Context, dir, name string) error {
	var errs []error
	st, err := Load(dir)
	if err == nil {
		name = st.Name
		for _, nd := range st.Nodes {
			if nd.PID != 0 {
				errs = append(errs, killPID(nd.PID, "qemu"))
			}
		}
		if st.ServerPID != 0 {
			errs = append(errs, killPID(st.ServerPID, "server"))
		}
		if st.ForwardPID != 0 {
			errs = append(errs, killPID(st.ForwardPID, "forward"))
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	if name == "" {
		name = DefaultName
	}
	if err := netlab.Available(); err == nil {
		errs = append(errs, netlab.Purge(ctx, name))
	}
	for _, p := range []string{"disks", "vms", "server", "tftp", "server.yaml", "server.log", "forwarder.log", "admin-token",
		adminKeyFile, adminPubKeyFile, clusterFile, stateFile} {
		if err := os.RemoveAll(filepath.Join(dir, p)); err != nil {
			errs = append(errs, fmt.Errorf("lab: %w", err))
		}
	}
	return errors.Join(errs...)
}

// alive reports whether process pid exists (and is not a zombie).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z'
	}
	return true
}

// ownsPID reports whether pid is still a process of the lab: its command
// line names esir or qemu and contains word (pids are reused).
func ownsPID(pid int, word string) bool {
	if !alive(pid) {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	cl := strings.ReplaceAll(string(b), "\x00", " ")
	return (strings.Contains(cl, "esir") || strings.Contains(cl, "qemu")) && strings.Contains(cl, word)
}

// killPID sends SIGKILL to pid when it is still the lab's process, and
// waits up to 10 s for it to go.
func killPID(pid int, word string) error {
	if !ownsPID(pid, word) {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("lab: kill %s (pid %d): %w", word, pid, err)
	}
	for i := 0; i < 100 && alive(pid); i++ {
		time.Sleep(100 * time.Millisecond)
	}
	if alive(pid) {
		return fmt.Errorf("lab: %s (pid %d) still running after SIGKILL", word, pid)
	}
	return nil
}

func tailFile(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Status says which of the lab's processes are running.
type Status struct {
	Server    bool              `json:"server"`
	Forwarder bool              `json:"forwarder"`
	VMs       map[string]string `json:"vms"` // node name -> "running (pid N)" or "stopped"
}

// Inspect checks the lab's processes.
func Inspect(st *State) Status {
	s := Status{
		Server:    st.ServerPID != 0 && ownsPID(st.ServerPID, "server"),
		Forwarder: st.ForwardPID != 0 && ownsPID(st.ForwardPID, "forward"),
		VMs:       map[string]string{},
	}
	for _, n := range st.Nodes {
		s.VMs[n.Name] = "stopped"
		if n.PID != 0 && ownsPID(n.PID, "qemu") {
			s.VMs[n.Name] = fmt.Sprintf("running (pid %d)", n.PID)
		}
	}
	return s
}

// WaitConsole watches a node's serial log from byte offset from until a line
// matches re, and returns the line and the offset just past it. The error
// names the node and carries the console's tail.
func (st *State) WaitConsole(ctx context.Context, name string, re *regexp.Regexp, from int64) (string, int64, error) {
	nd, err := st.Node(name)
	if err != nil {
		return "", from, err
	}
	for {
		b, err := os.ReadFile(nd.Serial)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return "", from, fmt.Errorf("lab: console of %s: %w", nd.Name, err)
		}
		if int64(len(b)) < from {
			from = 0 // the VM was restarted: its log starts again
		}
		off := from
		for off < int64(len(b)) {
			i := strings.IndexByte(string(b[off:]), '\n')
			if i < 0 {
				break
			}
			line := strings.TrimRight(string(b[off:off+int64(i)]), "\r")
			off += int64(i) + 1
			if re.MatchString(line) {
				return line, off, nil
			}
		}
		from = off
		select {
		case <-ctx.Done():
			return "", from, fmt.Errorf("lab: %s: waiting for %q on the console: %w; console tail:\n%s", nd.Name, re, ctx.Err(), tailFile(nd.Serial, 25))
		case <-time.After(250 * time.Millisecond):
		}
	}
}
