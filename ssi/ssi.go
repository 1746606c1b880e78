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
	"errors"
	"fmt"
	"net/netip"
	"os"
	"regexp"
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
}

// Load reads and validates a cluster definition file. Warnings are returned
// beside a valid definition (for example an even core size).
func Load(path string) (*Cluster, []string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster definition: %w", err)
	}
	c, warn, err := Parse(data)
	if err != nil {
		return nil, nil, fmt.Errorf("cluster definition %s: %w", path, err)
	}
	return c, warn, nil
}

// Parse decodes a cluster definition (YAML; unknown fields are refused) and
// validates it.
func Parse(data []byte) (*Cluster, []string, error) {
	var c Cluster
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		return nil, nil, fmt.Errorf("decode: %w", err)
	}
	c.setDefaults()
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
	return warn, errors.Join(errs...)
}
