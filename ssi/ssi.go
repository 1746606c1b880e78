// Package ssi describes an ESIR cluster's single-system-image node stack: the
// cluster definition (which engines run, how many corosync voters, virtual IPs,
// the shared home, time sources), the allocation of stable node ids and roles,
// the cluster's secrets, and the per-node rendering of every engine's
// configuration (corosync, pacemaker, chrony, keepalived, NFS, clustershell).
//
// ESIR builds none of the engines: it hands out identities and secrets and
// renders configuration. The node side (package ssi/enroll) installs what
// Render returns, starts the engines and asks them whether the node is a member.
package ssi

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"
)

// Profile switches the parts of the stack on and off.
type Profile struct {
	Corosync     bool `yaml:"corosync"`     // membership and quorum (corosync 3, knet, encrypted)
	Pacemaker    bool `yaml:"pacemaker"`    // pacemaker on core nodes, pacemaker-remote on the others
	Fencing      bool `yaml:"fencing"`      // STONITH; off only for tests, and Parse warns loudly
	Keepalived   bool `yaml:"keepalived"`   // VRRP + IPVS direct routing for the VIPs
	Chrony       bool `yaml:"chrony"`       // core nodes serve time, others follow them
	NFSHome      bool `yaml:"nfs_home"`     // /home exported by one node, mounted by the others
	ClusterShell bool `yaml:"clustershell"` // node groups for clush
}

// Service is one port balanced behind a VIP.
type Service struct {
	Port      uint16 `yaml:"port"`
	Protocol  string `yaml:"protocol"`  // tcp or udp; default tcp
	Scheduler string `yaml:"scheduler"` // IPVS scheduler (rr, wrr, lc, wlc, sh, ...); default wlc
}

// VIP is a cluster virtual address held by one director at a time (VRRP) and
// balanced across real servers by IPVS in direct-routing mode.
type VIP struct {
	Name        string       `yaml:"name"`
	Address     netip.Prefix `yaml:"address"`      // VIP with the prefix length of the node network
	VRID        int          `yaml:"vrid"`         // VRRP router id, 1..255, unique in the cluster
	Interface   string       `yaml:"interface"`    // director interface; default eth0
	Directors   []string     `yaml:"directors"`    // node names in priority order; default the core nodes
	RealServers []string     `yaml:"real_servers"` // node names; default every member that is not a director
	Services    []Service    `yaml:"services"`
}

// NFS describes the shared home.
type NFS struct {
	Server  string       `yaml:"server"`  // node name that exports the directory
	Export  string       `yaml:"export"`  // default /home
	Clients netip.Prefix `yaml:"clients"` // network allowed to mount it
}

// Time lists the core nodes' upstream time sources and the network they serve.
type Time struct {
	Sources []string     `yaml:"sources"` // upstream NTP servers for the core nodes (may be empty: core nodes then serve their own clock)
	Allow   netip.Prefix `yaml:"allow"`   // clients the core nodes serve
}

// Cluster is the cluster definition.
type Cluster struct {
	Name     string  `yaml:"name"`
	Profile  Profile `yaml:"profile"`
	CoreSize int     `yaml:"core_size"` // corosync voters; odd (3 or 5); 1 allowed for tests
	TokenMS  int     `yaml:"token_ms"`  // corosync totem token timeout; 0: corosync's default (3000)
	VIPs     []VIP   `yaml:"vips"`
	NFS      NFS     `yaml:"nfs"`
	Time     Time    `yaml:"time"`
	Fencing  Fencing `yaml:"fencing"` // how pacemaker fences a node (profile.fencing)
}

// Digest identifies what the definition says, passwords included (not its
// comments or layout): two definitions with one digest render the same
// bundles. The server bumps the nodelist version when it changes, so that
// every member applies the new definition.
func (c *Cluster) Digest() string {
	h := sha256.New()
	data, err := json.Marshal(c) // passwords show as "<secret>": added below
	if err != nil {
		panic(err) // plain types: cannot fail
	}
	h.Write(data)
	for _, b := range c.Fencing.BMCs {
		fmt.Fprintf(h, "\x00%s\x00%s", b.Node, string(b.Password))
	}
	return hex.EncodeToString(h.Sum(nil))
}

// Load reads and validates a cluster definition file. Warnings are returned
// beside a valid definition (for example an even core size).
func Load(path string) (*Cluster, []string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster definition: %w", err)
	}
	c, warn, err := parse(data, filepath.Dir(path))
	if err != nil {
		return nil, nil, fmt.Errorf("cluster definition %s: %w", path, err)
	}
	if w := inlinePasswordWarning(c, path); w != "" {
		warn = append(warn, w)
	}
	return c, warn, nil
}

// Parse decodes a cluster definition (YAML; unknown fields are refused) and
// validates it. Relative password files are read from the current
// directory.
func Parse(data []byte) (*Cluster, []string, error) {
	return parse(data, ".")
}

// parse is Parse reading relative password files from dir.
func parse(data []byte, dir string) (*Cluster, []string, error) {
	var c Cluster
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		return nil, nil, fmt.Errorf("decode: %w", err)
	}
	c.setDefaults()
	if err := c.Fencing.loadPasswordFiles(dir); err != nil {
		return nil, nil, err
	}
	warn, err := c.Validate()
	if err != nil {
		return nil, nil, err
	}
	return &c, warn, nil
}

func (c *Cluster) setDefaults() {
	for i := range c.VIPs {
		v := &c.VIPs[i]
		if v.Interface == "" {
			v.Interface = "eth0"
		}
		for j := range v.Services {
			s := &v.Services[j]
			if s.Protocol == "" {
				s.Protocol = "tcp"
			}
			if s.Scheduler == "" {
				s.Scheduler = "wlc"
			}
		}
	}
	if c.NFS.Export == "" {
		c.NFS.Export = "/home"
	}
	c.Fencing.setDefaults()
}

// nameRE matches cluster, node and VIP names (they become host names and
// corosync node names).
var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

var ifaceRE = regexp.MustCompile(`^[a-zA-Z0-9._-]{1,15}$`)

// validScheduler reports whether s names an IPVS scheduler.
func validScheduler(s string) bool {
	switch s {
	case "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh":
		return true
	}
	return false
}

// Validate checks the definition and returns warnings for a valid but
// questionable one. Errors name the field.
func (c *Cluster) Validate() ([]string, error) {
	var warn []string
	var errs []error
	bad := func(field, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, a...)))
	}
	if !nameRE.MatchString(c.Name) {
		bad("name", "%q is not a cluster name (lower-case letters, digits and '-', at most 63)", c.Name)
	}
	switch {
	case c.CoreSize < 1:
		bad("core_size", "%d: need at least 1 corosync voter", c.CoreSize)
	case c.CoreSize > 16:
		bad("core_size", "%d: corosync's full membership must stay small (3 or 5); other nodes join as pacemaker-remote members", c.CoreSize)
	case c.CoreSize == 1:
		warn = append(warn, "core_size: 1 voter has no failover; use it for tests only")
	case c.CoreSize%2 == 0:
		warn = append(warn, fmt.Sprintf("core_size: %d is even: a split in half loses quorum on both sides; use an odd size or add a quorum device (corosync-qdevice)", c.CoreSize))
	}
	if c.TokenMS < 0 || (c.TokenMS > 0 && c.TokenMS < 100) {
		bad("token_ms", "%d: give 0 (corosync's default) or at least 100 ms", c.TokenMS)
	}
	if c.Profile.Pacemaker && !c.Profile.Corosync {
		bad("profile.pacemaker", "pacemaker needs profile.corosync")
	}
	if c.Profile.Pacemaker && !c.Profile.Fencing {
		warn = append(warn, "profile.fencing: STONITH is DISABLED; pacemaker cannot recover safely from a hung node; test clusters only")
	}
	if c.Profile.Keepalived && len(c.VIPs) == 0 {
		bad("vips", "profile.keepalived is on but no VIP is defined")
	}
	vrids := map[int]string{}
	for i, v := range c.VIPs {
		f := fmt.Sprintf("vips[%d]", i)
		if !nameRE.MatchString(v.Name) {
			bad(f+".name", "%q is not a name", v.Name)
		}
		if !v.Address.IsValid() || !v.Address.Addr().Is4() {
			bad(f+".address", "need an IPv4 address with prefix length, like 198.18.0.100/24")
		}
		if v.VRID < 1 || v.VRID > 255 {
			bad(f+".vrid", "%d: VRRP router ids are 1..255", v.VRID)
		} else if o, dup := vrids[v.VRID]; dup {
			bad(f+".vrid", "%d is already used by vip %q", v.VRID, o)
		}
		vrids[v.VRID] = v.Name
		if !ifaceRE.MatchString(v.Interface) {
			bad(f+".interface", "%q is not an interface name", v.Interface)
		}
		if len(v.Services) == 0 {
			bad(f+".services", "no service to balance")
		}
		for j, s := range v.Services {
			sf := fmt.Sprintf("%s.services[%d]", f, j)
			if s.Port == 0 {
				bad(sf+".port", "missing")
			}
			if s.Protocol != "tcp" && s.Protocol != "udp" {
				bad(sf+".protocol", "%q: tcp or udp", s.Protocol)
			}
			if !validScheduler(s.Scheduler) {
				bad(sf+".scheduler", "%q is not an IPVS scheduler", s.Scheduler)
			}
		}
		if len(v.Directors) > 0 && len(v.RealServers) > 0 {
			// Directors named by default (the core members) are known
			// only once nodes joined: AllocationWarnings.
			warn = append(warn, bounceWarnings(i, v, v.Directors, v.RealServers)...)
		}
	}
	if c.Profile.NFSHome {
		if !nameRE.MatchString(c.NFS.Server) {
			bad("nfs.server", "%q: name the node that exports the home", c.NFS.Server)
		}
		if !strings.HasPrefix(c.NFS.Export, "/") || strings.ContainsAny(c.NFS.Export, " \t\n") {
			bad("nfs.export", "%q: need an absolute path without blanks", c.NFS.Export)
		}
		if !c.NFS.Clients.IsValid() {
			bad("nfs.clients", "need the network allowed to mount, like 198.18.0.0/24")
		}
	}
	if c.Profile.Chrony {
		for i, s := range c.Time.Sources {
			if s == "" || strings.ContainsAny(s, " \t\n") {
				bad(fmt.Sprintf("time.sources[%d]", i), "%q is not a host name or address", s)
			}
		}
		if !c.Time.Allow.IsValid() {
			bad("time.allow", "need the network the core nodes serve, like 198.18.0.0/24")
		}
	}
	warn = append(warn, c.validateFencing(bad)...)
	return warn, errors.Join(errs...)
}

// consistentScheduler reports whether IPVS scheduler s picks the same real
// server for a packet on every director that has the same real servers: the
// hashing schedulers (sh and mh hash the source address, dh the
// destination). The others pick per connection from the director's own
// counters and rotation.
func consistentScheduler(s string) bool {
	switch s {
	case "sh", "mh", "dh":
		return true
	}
	return false
}

// bounceWarnings warns about VIP v (vips[i]) when it has two directors or
// more, one of them is also a real server (named in rs), and a service's
// scheduler picks per connection. keepalived loads the IPVS table on every
// director, master or backup: a connection the VRRP master forwards to a
// backup director that is a real server meets that director's IPVS, which
// balances it again and may send it on to another node, where it dies. The
// lab lost 7 to 11 of 24 connections this way with rr; sh lost none.
func bounceWarnings(i int, v VIP, dirs, rs []string) []string {
	if len(dirs) < 2 {
		return nil
	}
	var both []string
	for _, d := range dirs {
		if slices.Contains(rs, d) && !slices.Contains(both, d) {
			both = append(both, d)
		}
	}
	if len(both) == 0 {
		return nil
	}
	who := fmt.Sprintf("directors %s are also its real servers", strings.Join(both, ", "))
	if len(both) == 1 {
		who = fmt.Sprintf("director %s is also one of its real servers", both[0])
	}
	var warn []string
	for _, svc := range v.Services {
		if consistentScheduler(svc.Scheduler) {
			continue
		}
		warn = append(warn, fmt.Sprintf("vips[%d] %s (%s): %s, and port %d/%s uses IPVS scheduler %s, which picks a real server per connection: "+
			"a backup director's IPVS balances again the connections the VRRP master forwards to it and sends some to another node, where they fail "+
			"(the lab lost 7 to 11 of 24 connections with rr); use scheduler sh (or mh) for this service, or directors that are not real servers",
			i, v.Name, v.Address.Addr(), who, svc.Port, svc.Protocol, svc.Scheduler))
	}
	return warn
}

// AllocationWarnings returns the warnings that depend on which nodes joined
// as well as on the definition, beside the ones Validate gives: a VIP whose
// directors default to the core members while its real servers are named:
// once two core members joined and one of them is a named real server, it
// warns as bounceWarnings says; and, with fencing on, each member pacemaker
// cannot fence (no BMC, no sbd) by name.
func (c *Cluster) AllocationWarnings(s *State) []string {
	var warn []string
	for i, v := range c.VIPs {
		if len(v.Directors) > 0 || len(v.RealServers) == 0 {
			continue // Validate's warning, or directors that are never real servers
		}
		var dirs []string
		for _, m := range s.Core() {
			dirs = append(dirs, m.Name)
		}
		warn = append(warn, bounceWarnings(i, v, dirs, v.RealServers)...)
	}
	return append(warn, c.fencingWarnings(s)...)
}
