package ssi

import (
	"fmt"
	"io/fs"
	"net/netip"
	"slices"
	"strings"
)

// File is one configuration file for a node. In JSON, Data is base64.
type File struct {
	Path  string      `json:"path"`  // absolute path on the node
	Mode  fs.FileMode `json:"mode"`  // permission bits
	Owner string      `json:"owner"` // user name; "" for root
	Group string      `json:"group"` // group name; "" for root
	Data  []byte      `json:"data"`
}

// Bundle is everything one node needs to join: its allocation, the nodelist
// version, the members, its files (secrets only the ones its role uses), the
// lines it adds to /etc/fstab, the VIPs it carries on lo as an IPVS real
// server or holds as a director, and the services to start, in order. The
// server sends it to the node as JSON; it decodes to an equal Bundle.
type Bundle struct {
	Cluster string   `json:"cluster"`
	Member  Member   `json:"member"`
	Version int      `json:"version"`
	Core    []Member `json:"core"`    // corosync voters, for the join's verification
	Members []Member `json:"members"` // every current member, in id order
	// Remotes are the remote members, on core nodes of a cluster running
	// pacemaker (nil elsewhere): a core node reconciles pacemaker's remote
	// resources with them (enroll.Node.Reconcile).
	Remotes []Member `json:"remotes"`
	// Fencing is the cluster's Profile.Fencing: STONITH stays enabled in
	// pacemaker; off, the reconciling core node disables it.
	Fencing      bool         `json:"fencing"`
	Files        []File       `json:"files"`
	FstabLines   []string     `json:"fstab_lines"`
	HomeMount    string       `json:"home_mount"`  // where the NFS home is mounted on this node ("" on its server, or without NFS home)
	HomeExport   string       `json:"home_export"` // the directory this node exports as the NFS home ("" unless it is the home's server)
	LoopbackVIPs []netip.Addr `json:"loopback_vips"`
	DirectorVIPs []netip.Addr `json:"director_vips"` // VIPs this node may hold as a VRRP director
	Services     []string     `json:"services"`

	// SSHAuthorizedKey is the cluster's SSH public key line (ending with
	// SSHKeyMark) the node keeps in root's authorized_keys beside the
	// administrator's; "" without clustershell.
	SSHAuthorizedKey string `json:"ssh_authorized_key,omitempty"`
	// FenceDevices are pacemaker's fencing devices, on core nodes of a
	// cluster running pacemaker with fencing on (nil elsewhere): the
	// reconciling core node keeps the CIB in line with them.
	FenceDevices []FenceDevice `json:"fence_devices,omitempty"`
	// StonithWatchdogTimeout is pacemaker's stonith-watchdog-timeout for
	// watchdog-only sbd ("" otherwise), on the same core nodes.
	StonithWatchdogTimeout string `json:"stonith_watchdog_timeout,omitempty"`
}

// Render builds node name's bundle from the definition, the allocation and the
// secrets.
func Render(c *Cluster, s *State, keys *Keys, name string) (*Bundle, error) {
	m, ok := s.Member(name)
	if !ok {
		return nil, fmt.Errorf("render: node %s is not a member of cluster %s", name, c.Name)
	}
	b := &Bundle{Cluster: c.Name, Member: m, Version: s.Version, Core: s.Core(), Fencing: c.Profile.Fencing,
		Members: slices.SortedFunc(slices.Values(s.Members), func(a, b Member) int { return a.ID - b.ID })}
	p := c.Profile
	if p.Pacemaker && m.Role == Core {
		for _, o := range b.Members {
			if o.Role == Remote {
				b.Remotes = append(b.Remotes, o)
			}
		}
	}
	if p.Corosync && m.Role == Core {
		b.add("/etc/corosync/corosync.conf", 0o644, corosyncConf(c, s))
		b.add("/etc/corosync/authkey", 0o400, keys.Corosync)
		b.Services = append(b.Services, "corosync")
	}
	if p.Pacemaker {
		b.Files = append(b.Files, File{Path: "/etc/pacemaker/authkey", Mode: 0o440, Owner: "hacluster", Group: "haclient", Data: keys.Pacemaker})
		if m.Role == Core {
			b.Services = append(b.Services, "pacemaker")
		} else {
			b.Services = append(b.Services, "pacemaker_remote")
		}
	}
	b.addFencing(c, s, m)
	if p.Chrony {
		b.add("/etc/chrony/chrony.conf", 0o644, chronyConf(c, s, m))
		b.Services = append(b.Services, "chrony")
	}
	if p.Keepalived {
		if err := b.addKeepalived(c, s, m); err != nil {
			return nil, err
		}
	}
	if p.NFSHome {
		srv, ok := s.Member(c.NFS.Server)
		switch {
		case !ok:
			return nil, fmt.Errorf("render %s: nfs.server %s is not a member", name, c.NFS.Server)
		case srv.Name == m.Name:
			b.add("/etc/exports.d/esir-home.exports", 0o644,
				fmt.Appendf(nil, "%s %s(rw,sync,no_subtree_check,root_squash)\n", c.NFS.Export, c.NFS.Clients.Masked()))
			b.Services = append(b.Services, "nfs-server")
			b.HomeExport = c.NFS.Export
		default:
			b.FstabLines = append(b.FstabLines,
				fmt.Sprintf("%s:%s %s nfs4 defaults,_netdev 0 0", srv.Addr, c.NFS.Export, c.NFS.Export))
			b.HomeMount = c.NFS.Export
		}
	}
	if p.ClusterShell {
		b.add("/etc/clustershell/groups.d/esir.yaml", 0o644, clushGroups(c, s))
		if err := b.addSSH(c, s, m, keys); err != nil {
			return nil, err
		}
	}
	return b, nil
}

func (b *Bundle) add(path string, mode fs.FileMode, data []byte) {
	b.Files = append(b.Files, File{Path: path, Mode: mode, Data: data})
}

// corosyncConf renders corosync.conf: corosync 3, knet, encrypted, the core
// nodes as the nodelist and votequorum.
func corosyncConf(c *Cluster, s *State) []byte {
	var w strings.Builder
	fmt.Fprintf(&w, "# Written by ESIR for cluster %s, nodelist version %d. Do not edit.\n", c.Name, s.Version)
	w.WriteString("totem {\n\tversion: 2\n")
	fmt.Fprintf(&w, "\tcluster_name: %s\n", c.Name)
	fmt.Fprintf(&w, "\tconfig_version: %d\n", s.Version)
	w.WriteString("\ttransport: knet\n\tcrypto_cipher: aes256\n\tcrypto_hash: sha256\n\tkeyfile: /etc/corosync/authkey\n")
	if c.TokenMS > 0 {
		fmt.Fprintf(&w, "\ttoken: %d\n", c.TokenMS)
	}
	w.WriteString("}\n\nnodelist {\n")
	core := s.Core()
	for _, m := range core {
		fmt.Fprintf(&w, "\tnode {\n\t\tring0_addr: %s\n\t\tname: %s\n\t\tnodeid: %d\n\t}\n", m.Addr, m.Name, m.ID)
	}
	w.WriteString("}\n\nquorum {\n\tprovider: corosync_votequorum\n")
	if c.CoreSize == 2 {
		// A designed two-node cluster; a larger one passing through two
		// members keeps plain majority quorum (two_node cannot change at runtime).
		w.WriteString("\ttwo_node: 1\n")
	}
	w.WriteString("}\n\nlogging {\n\tto_logfile: yes\n\tlogfile: /var/log/corosync/corosync.log\n\tto_syslog: yes\n\ttimestamp: on\n}\n")
	return []byte(w.String())
}

// chronyConf renders chrony.conf: core nodes follow the upstream sources,
// peer with each other, serve the cluster network and keep serving their own
// clock (orphan stratum) when upstream is gone; other nodes follow the core.
func chronyConf(c *Cluster, s *State, m Member) []byte {
	var w strings.Builder
	fmt.Fprintf(&w, "# Written by ESIR for cluster %s. Do not edit.\n", c.Name)
	if m.Role == Core {
		for _, src := range c.Time.Sources {
			fmt.Fprintf(&w, "server %s iburst\n", src)
		}
		for _, o := range s.Core() {
			if o.Name != m.Name {
				fmt.Fprintf(&w, "peer %s\n", o.Addr)
			}
		}
		fmt.Fprintf(&w, "allow %s\n", c.Time.Allow.Masked())
		w.WriteString("local stratum 10 orphan\n")
	} else {
		for _, o := range s.Core() {
			fmt.Fprintf(&w, "server %s iburst\n", o.Addr)
		}
	}
	w.WriteString("driftfile /var/lib/chrony/chrony.drift\nmakestep 1.0 3\nrtcsync\n")
	return []byte(w.String())
}

// directors returns a VIP's directors in priority order: the named ones, or
// the core members.
func directors(v VIP, s *State) ([]Member, error) {
	if len(v.Directors) == 0 {
		return s.Core(), nil
	}
	var out []Member
	for _, n := range v.Directors {
		m, ok := s.Member(n)
		if !ok {
			return nil, fmt.Errorf("vip %s: director %s is not a member", v.Name, n)
		}
		out = append(out, m)
	}
	return out, nil
}

// realServers returns a VIP's real servers: the named ones, or every member
// that is not one of its directors.
func realServers(v VIP, s *State, dirs []Member) ([]Member, error) {
	var out []Member
	if len(v.RealServers) > 0 {
		for _, n := range v.RealServers {
			m, ok := s.Member(n)
			if !ok {
				return nil, fmt.Errorf("vip %s: real server %s is not a member", v.Name, n)
			}
			out = append(out, m)
		}
		return out, nil
	}
	for _, m := range s.Members {
		if !slices.ContainsFunc(dirs, func(d Member) bool { return d.ID == m.ID }) {
			out = append(out, m)
		}
	}
	return out, nil
}

// addKeepalived adds keepalived.conf for a director (VRRP instance per VIP and
// an IPVS virtual_server in direct-routing mode per service) and, for a real
// server, the ARP sysctls and the VIP on lo.
func (b *Bundle) addKeepalived(c *Cluster, s *State, m Member) error {
	var conf strings.Builder
	director, real := false, false
	for _, v := range c.VIPs {
		dirs, err := directors(v, s)
		if err != nil {
			return err
		}
		rs, err := realServers(v, s, dirs)
		if err != nil {
			return err
		}
		if slices.ContainsFunc(rs, func(r Member) bool { return r.ID == m.ID }) {
			real = true
			b.LoopbackVIPs = append(b.LoopbackVIPs, v.Address.Addr())
		}
		prio := -1
		for i, d := range dirs {
			if d.ID == m.ID {
				prio = 150 - 10*i
			}
		}
		if prio < 0 {
			continue
		}
		b.DirectorVIPs = append(b.DirectorVIPs, v.Address.Addr())
		if !director {
			fmt.Fprintf(&conf, "# Written by ESIR for cluster %s. Do not edit.\n", c.Name)
			fmt.Fprintf(&conf, "global_defs {\n\trouter_id %s\n\tenable_script_security\n}\n", m.Name)
			director = true
		}
		fmt.Fprintf(&conf, "\nvrrp_instance %s {\n\tstate BACKUP\n\tinterface %s\n\tvirtual_router_id %d\n\tpriority %d\n\tadvert_int 1\n",
			v.Name, v.Interface, v.VRID, prio)
		fmt.Fprintf(&conf, "\tunicast_src_ip %s\n\tunicast_peer {\n", m.Addr)
		for _, d := range dirs {
			if d.ID != m.ID {
				fmt.Fprintf(&conf, "\t\t%s\n", d.Addr)
			}
		}
		fmt.Fprintf(&conf, "\t}\n\tvirtual_ipaddress {\n\t\t%s dev %s\n\t}\n}\n", v.Address, v.Interface)
		for _, svc := range v.Services {
			fmt.Fprintf(&conf, "\nvirtual_server %s %d {\n\tdelay_loop 5\n\tlb_algo %s\n\tlb_kind DR\n\tprotocol %s\n",
				v.Address.Addr(), svc.Port, svc.Scheduler, strings.ToUpper(svc.Protocol))
			for _, r := range rs {
				fmt.Fprintf(&conf, "\n\treal_server %s %d {\n\t\tweight 1\n", r.Addr, svc.Port)
				if svc.Protocol == "tcp" {
					fmt.Fprintf(&conf, "\t\tTCP_CHECK {\n\t\t\tconnect_timeout 3\n\t\t}\n")
				}
				conf.WriteString("\t}\n")
			}
			conf.WriteString("}\n")
		}
	}
	if director {
		b.add("/etc/keepalived/keepalived.conf", 0o644, []byte(conf.String()))
		b.Services = append(b.Services, "keepalived")
	}
	if real {
		b.add("/etc/sysctl.d/90-esir-ipvs-dr.conf", 0o644, []byte(
			"# Written by ESIR: an IPVS direct-routing real server answers for the VIP on lo\n"+
				"# but must never answer ARP for it.\n"+
				"net.ipv4.conf.all.arp_ignore = 1\nnet.ipv4.conf.all.arp_announce = 2\n"+
				"net.ipv4.conf.lo.arp_ignore = 1\nnet.ipv4.conf.lo.arp_announce = 2\n"))
	}
	return nil
}

// clushGroups renders clustershell's groups: all, core and remote.
func clushGroups(c *Cluster, s *State) []byte {
	names := func(ms []Member) string {
		var n []string
		for _, m := range ms {
			n = append(n, m.Name)
		}
		return strings.Join(n, ",")
	}
	var remote []Member
	for _, m := range s.Members {
		if m.Role == Remote {
			remote = append(remote, m)
		}
	}
	var w strings.Builder
	fmt.Fprintf(&w, "# Written by ESIR for cluster %s. Do not edit.\n%s:\n", c.Name, c.Name)
	fmt.Fprintf(&w, "    all: '%s'\n    core: '%s'\n    remote: '%s'\n", names(s.Members), names(s.Core()), names(remote))
	return []byte(w.String())
}
