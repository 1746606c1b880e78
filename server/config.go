package server

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"
	"gopkg.in/yaml.v3"
)

// Config is everything `esir server` can be told. Each field is a key of
// the YAML config file, a flag (--key-with-dashes) and an environment
// variable (ESIR_KEY_IN_CAPS); flags beat the environment, which beats the
// file, which beats the defaults.
type Config struct {
	Listen          string        `yaml:"listen"`
	PublicURL       string        `yaml:"public_url"`
	DataDir         string        `yaml:"data_dir"`
	Database        string        `yaml:"database"`
	ImageStore      string        `yaml:"image_store"`
	TLSCert         string        `yaml:"tls_cert"`
	TLSKey          string        `yaml:"tls_key"`
	AdminTokenFile  string        `yaml:"admin_token_file"`
	BootTokenTTL    time.Duration `yaml:"boot_token_ttl"`
	EnrollTokenTTL  time.Duration `yaml:"enroll_token_ttl"`
	HostnamePattern string        `yaml:"hostname_pattern"`
	Discovery       bool          `yaml:"discovery"`
	SchedulerTick   time.Duration `yaml:"scheduler_tick"`
	ShutdownTimeout time.Duration `yaml:"shutdown_timeout"`
	// AuthorizedKeysFile is an authorized_keys file whose keys every node
	// ESIR installs gets in root's authorized_keys (empty: none).
	AuthorizedKeysFile string `yaml:"authorized_keys_file"`
	// SwarmListen is the seeder's BitTorrent address; empty disables seeding
	// (the web seed and tracker still work).
	SwarmListen string `yaml:"swarm_listen"`
	// SwarmUploadRate caps the seeder's upload in bytes per second (empty or
	// 0: unlimited), so nodes fetch most of an image from each other and the
	// server's link is not the deployment's bottleneck.
	SwarmUploadRate string `yaml:"swarm_upload_rate"`
	// BootDir holds the netboot kernel and initramfs (served at /pxe/files/).
	BootDir       string `yaml:"boot_dir"`
	BootKernel    string `yaml:"boot_kernel"`
	BootInitrd    string `yaml:"boot_initrd"`
	BootCmdline   string `yaml:"boot_cmdline"`
	DHCPInterface string `yaml:"dhcp_interface"`
	DHCPMode      string `yaml:"dhcp_mode"`
	DHCPServerIP  string `yaml:"dhcp_server_ip"`
	DHCPRange     string `yaml:"dhcp_range"`
	DHCPRouter    string `yaml:"dhcp_router"`
	DHCPDNS       string `yaml:"dhcp_dns"`
	DHCPLeaseFile string `yaml:"dhcp_lease_file"`
	TFTPListen    string `yaml:"tftp_listen"`
	TFTPDir       string `yaml:"tftp_dir"`
	// DebugListen serves Go's profiler (net/http/pprof) on its own
	// address, loopback only; empty disables it.
	DebugListen string `yaml:"debug_listen"`
	// ClusterDefinition is the SSI cluster definition file (ssi.Load); empty:
	// the server keeps no cluster and nodes are enrolled at first boot.
	ClusterDefinition string `yaml:"cluster_definition"`
	// ClusterLeaveTimeout is how long a leaving member may take to confirm
	// that its stack stopped before it is removed anyway.
	ClusterLeaveTimeout time.Duration `yaml:"cluster_leave_timeout"`
}

// AuthorizedKeys reads AuthorizedKeysFile (none when it is empty): one
// public key a line, blank lines and # comments skipped; a line that is not
// a public key is refused with its line number.
func (c *Config) AuthorizedKeys() ([]string, error) {
	if c.AuthorizedKeysFile == "" {
		return nil, nil
	}
	b, err := os.ReadFile(c.AuthorizedKeysFile)
	if err != nil {
		return nil, fmt.Errorf("authorized_keys_file: %w", err)
	}
	var keys []string
	n := 0
	for l := range strings.Lines(string(b)) {
		n++
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if _, _, _, _, err := ssh.ParseAuthorizedKey([]byte(l)); err != nil {
			return nil, fmt.Errorf("authorized_keys_file %s line %d: %w", c.AuthorizedKeysFile, n, err)
		}
		keys = append(keys, l)
	}
	return keys, nil
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{
		Listen:          ":8080",
		DataDir:         "/var/lib/esir/server",
		ImageStore:      "/var/lib/esir",
		BootTokenTTL:    2 * time.Hour,
		EnrollTokenTTL:  7 * 24 * time.Hour,
		HostnamePattern: "node%03d",
		Discovery:       true,
		SchedulerTick:   time.Second,
		ShutdownTimeout: 10 * time.Second,
		SwarmListen:     ":6881",
		BootKernel:      "vmlinuz",
		BootInitrd:      "initrd",
		BootCmdline:     "console=ttyS0,115200 console=tty0",
		DHCPMode:        "proxy",

		ClusterLeaveTimeout: 30 * time.Second,
	}
}

// Field describes one setting for flags and the environment.
type Field struct {
	// Key is the YAML key; the flag is Key with '-' for '_'.
	Key   string
	Usage string
	// Ptr points into the Config: *string, *bool or *time.Duration.
	Ptr any
}

// Flag returns the field's flag name.
func (f Field) Flag() string { return strings.ReplaceAll(f.Key, "_", "-") }

// Env returns the field's environment variable.
func (f Field) Env() string { return "ESIR_" + strings.ToUpper(f.Key) }

// Fields lists c's settings, pointing into c.
func (c *Config) Fields() []Field {
	return []Field{
		{"listen", "HTTP listen address (API, agent protocol, boot files, swarm)", &c.Listen},
		{"public_url", "URL agents reach this server at (default http://<first non-loopback address><listen>)", &c.PublicURL},
		{"data_dir", "directory for the database and server state", &c.DataDir},
		{"database", "SQLite database file (default <data_dir>/esir.db)", &c.Database},
		{"image_store", "image store directory", &c.ImageStore},
		{"tls_cert", "TLS certificate file (enables HTTPS with tls_key)", &c.TLSCert},
		{"tls_key", "TLS private key file", &c.TLSKey},
		{"admin_token_file", "on first start, also write the admin token to this file (0600)", &c.AdminTokenFile},
		{"boot_token_ttl", "lifetime of per-boot node tokens", &c.BootTokenTTL},
		{"enroll_token_ttl", "lifetime of first-boot enroll tokens", &c.EnrollTokenTTL},
		{"hostname_pattern", "hostname of new nodes from their number (fmt with one %d)", &c.HostnamePattern},
		{"discovery", "register unknown MACs in inventory mode (false: ignore them)", &c.Discovery},
		{"scheduler_tick", "how often the rollout scheduler reconciles", &c.SchedulerTick},
		{"shutdown_timeout", "how long graceful shutdown waits for requests", &c.ShutdownTimeout},
		{"authorized_keys_file", "authorized_keys file whose keys go into root's authorized_keys on every installed node", &c.AuthorizedKeysFile},
		{"swarm_listen", "BitTorrent seeder address (empty: no seeding)", &c.SwarmListen},
		{"swarm_upload_rate", "cap on the seeder's upload in bytes per second (empty: unlimited)", &c.SwarmUploadRate},
		{"boot_dir", "directory with the netboot kernel and initramfs, served at /pxe/files/", &c.BootDir},
		{"boot_kernel", "netboot kernel file name in boot_dir", &c.BootKernel},
		{"boot_initrd", "netboot initramfs file name in boot_dir", &c.BootInitrd},
		{"boot_cmdline", "extra kernel command line for the agent", &c.BootCmdline},
		{"dhcp_interface", "serve DHCP on this interface (empty: no DHCP)", &c.DHCPInterface},
		{"dhcp_mode", "DHCP mode: full or proxy", &c.DHCPMode},
		{"dhcp_server_ip", "this server's address on dhcp_interface", &c.DHCPServerIP},
		{"dhcp_range", "full mode address pool FIRST-LAST/PREFIX, e.g. 198.18.0.100-198.18.0.200/24", &c.DHCPRange},
		{"dhcp_router", "full mode router option", &c.DHCPRouter},
		{"dhcp_dns", "full mode DNS servers, comma-separated", &c.DHCPDNS},
		{"dhcp_lease_file", "full mode lease file (default <data_dir>/leases.json)", &c.DHCPLeaseFile},
		{"tftp_listen", "TFTP listen address, e.g. :69 (empty: no TFTP)", &c.TFTPListen},
		{"tftp_dir", "directory of iPXE binaries served over TFTP and HTTP (empty: Debian's ipxe package)", &c.TFTPDir},
		{"cluster_definition", "SSI cluster definition file: enrolling nodes join this cluster (empty: no cluster)", &c.ClusterDefinition},
		{"cluster_leave_timeout", "how long a leaving cluster member may take to stop its stack before it is removed anyway", &c.ClusterLeaveTimeout},
		{"debug_listen", "serve Go's profiler (/debug/pprof/) on this loopback address, e.g. 127.0.0.1:6060 (empty: off)", &c.DebugListen},
	}
}

// LoadFile reads a YAML config file over c. Unknown keys are errors.
func (c *Config) LoadFile(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(c); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("config %s: %w", path, err)
	}
	return nil
}

// Set assigns a field from text (flag or environment syntax).
func (f Field) Set(s string) error {
	switch p := f.Ptr.(type) {
	case *string:
		*p = s
	case *bool:
		v, err := strconv.ParseBool(s)
		if err != nil {
			return fmt.Errorf("%s: want true or false, got %q", f.Key, s)
		}
		*p = v
	case *time.Duration:
		v, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("%s: want a duration like 30s, got %q", f.Key, s)
		}
		*p = v
	default:
		return fmt.Errorf("%s: unsupported type %T", f.Key, f.Ptr)
	}
	return nil
}

// ApplyEnv sets every field whose environment variable lookup finds.
func (c *Config) ApplyEnv(lookup func(string) (string, bool)) error {
	for _, f := range c.Fields() {
		if v, ok := lookup(f.Env()); ok {
			if err := f.Set(v); err != nil {
				return fmt.Errorf("environment %s: %w", f.Env(), err)
			}
		}
	}
	return nil
}

// YAML renders the config as a YAML file would hold it.
func (c Config) YAML() ([]byte, error) {
	return yaml.Marshal(c)
}

// Finish validates the config and fills derived defaults.
func (c *Config) Finish() error {
	if c.DataDir == "" {
		return errors.New("data_dir: required")
	}
	if c.Database == "" {
		c.Database = filepath.Join(c.DataDir, "esir.db")
	}
	if c.ImageStore == "" {
		return errors.New("image_store: required")
	}
	host, port, err := net.SplitHostPort(c.Listen)
	if err != nil {
		return fmt.Errorf("listen %q: %w", c.Listen, err)
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		return errors.New("tls_cert and tls_key: give both or neither")
	}
	if c.PublicURL == "" {
		scheme := "http"
		if c.TLSCert != "" {
			scheme = "https"
		}
		if host == "" || host == "0.0.0.0" || host == "::" {
			host = firstAddress()
		}
		c.PublicURL = scheme + "://" + net.JoinHostPort(host, port)
	}
	u, err := url.Parse(c.PublicURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("public_url %q: want http(s)://HOST[:PORT]", c.PublicURL)
	}
	c.PublicURL = strings.TrimRight(c.PublicURL, "/")
	if c.BootTokenTTL <= 0 || c.EnrollTokenTTL <= 0 {
		return errors.New("boot_token_ttl and enroll_token_ttl: must be positive")
	}
	if c.SchedulerTick <= 0 {
		return errors.New("scheduler_tick: must be positive")
	}
	if c.DHCPInterface != "" {
		if net.ParseIP(c.DHCPServerIP).To4() == nil {
			return fmt.Errorf("dhcp_server_ip %q: an IPv4 address is required with dhcp_interface", c.DHCPServerIP)
		}
		if c.DHCPMode == "full" && c.DHCPRange == "" {
			return errors.New("dhcp_range: required in full DHCP mode")
		}
	}
	if c.DebugListen != "" {
		h, _, err := net.SplitHostPort(c.DebugListen)
		if err != nil {
			return fmt.Errorf("debug_listen %q: %w", c.DebugListen, err)
		}
		if ip := net.ParseIP(h); h != "localhost" && (ip == nil || !ip.IsLoopback()) {
			return fmt.Errorf("debug_listen %q: the profiler is served on a loopback address only", c.DebugListen)
		}
	}
	if _, err := c.SwarmUploadBytes(); err != nil {
		return err
	}
	if c.DHCPLeaseFile == "" {
		c.DHCPLeaseFile = filepath.Join(c.DataDir, "leases.json")
	}
	return nil
}

// firstAddress returns the first non-loopback IPv4 address, or 127.0.0.1.
func firstAddress() string {
	addrs, err := net.InterfaceAddrs()
	if err == nil {
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && !ipn.IP.IsLoopback() && ipn.IP.To4() != nil {
				return ipn.IP.String()
			}
		}
	}
	return "127.0.0.1"
}

// SwarmUploadBytes returns swarm_upload_rate in bytes per second (0:
// unlimited).
func (c Config) SwarmUploadBytes() (int64, error) {
	if c.SwarmUploadRate == "" {
		return 0, nil
	}
	n, err := strconv.ParseInt(c.SwarmUploadRate, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("swarm_upload_rate %q: want a number of bytes per second", c.SwarmUploadRate)
	}
	return n, nil
}
