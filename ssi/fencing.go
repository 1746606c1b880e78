package ssi

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Fencing says how pacemaker fences (STONITH) the members: by each node's BMC
// through a fence agent (Debian's fence-agents), or by sbd with a watchdog
// and, optionally, a shared disk. It is used only with profile.pacemaker and
// profile.fencing on; profile.fencing off is the loudly logged test switch.
type Fencing struct {
	// Action is what fencing does to a node: reboot (the default, also
	// "") or off (the node stays down until someone powers it on); off
	// becomes each device's pcmk_reboot_action.
	Action string `yaml:"action"`
	// BMCs are the members' BMCs, one per node name.
	BMCs []BMC `yaml:"bmcs"`
	// SBD fences through sbd (storage-based death), instead of or beside
	// the BMCs.
	SBD *SBD `yaml:"sbd"`
}

// BMC is one node's baseboard management controller, as the inventory
// knows it.
type BMC struct {
	Node string `yaml:"node"` // the node it powers
	// Agent is the fence agent: fence_ipmilan (default) or fence_redfish.
	Agent   string `yaml:"agent"`
	Address string `yaml:"address"` // the BMC's IP address or DNS name
	// Port is the BMC's port; 0: the agent's default (623/udp for IPMI,
	// 443 for Redfish).
	Port     uint16 `yaml:"port"`
	Username string `yaml:"username"`
	// Password is the BMC's password; give it here or in PasswordFile,
	// a file the server keeps (mode 0600; a relative path is relative to
	// the definition's directory). It never appears in logs or in the
	// cluster's status.
	Password     Secret `yaml:"password"`
	PasswordFile string `yaml:"password_file"`
	// Lanplus selects IPMI 2.0 (RMCP+) for fence_ipmilan; default true.
	Lanplus *bool `yaml:"lanplus"`
	// Options are further parameters for the agent (for example
	// ssl_insecure: "1" or systems_uri for fence_redfish).
	Options map[string]string `yaml:"options"`
}

// SBD is sbd's configuration: a watchdog device on every node and,
// optionally, a shared disk (poison-pill fencing); without a disk the
// nodes self-fence through the watchdog when they lose quorum
// (pacemaker's stonith-watchdog-timeout).
type SBD struct {
	Device          string `yaml:"device"`           // shared disk, like /dev/disk/by-id/...; "" for watchdog-only sbd
	Watchdog        string `yaml:"watchdog"`         // default /dev/watchdog
	WatchdogTimeout int    `yaml:"watchdog_timeout"` // seconds; default 5
}

// Secret is a string that prints as "<secret>" (in logs, %v, %s, JSON).
type Secret string

// String hides the secret.
func (Secret) String() string { return "<secret>" }

// GoString hides the secret.
func (Secret) GoString() string { return "<secret>" }

// MarshalJSON hides the secret.
func (Secret) MarshalJSON() ([]byte, error) { return []byte(`"<secret>"`), nil }

// Fence agents ESIR renders devices for.
const (
	AgentIPMI    = "fence_ipmilan"
	AgentRedfish = "fence_redfish"
	agentSBD     = "fence_sbd"
)

// FenceDevice is one pacemaker fencing resource (class stonith) the
// reconciling core member keeps in the CIB.
type FenceDevice struct {
	ID    string `json:"id"`    // resource id: fence-<node>, or stonith-sbd
	Agent string `json:"agent"` // fence agent (stonith type)
	// Node is the node the device fences (its pcmk_host_list); the
	// device must never run there. "" for sbd, which fences every node
	// on its disk.
	Node   string            `json:"node"`
	Params map[string]string `json:"params"` // instance attributes
}

// FenceDeviceID is the resource id of node's BMC fencing device.
func FenceDeviceID(node string) string { return "fence-" + node }

// sbdDeviceID is the resource id of sbd's fencing device (with a shared
// disk).
const sbdDeviceID = "stonith-sbd"

// fencePasswordPath is where a core node keeps the password of node's BMC
// (root, 0600): the device's password_script reads it, so the password
// stays out of the CIB.
func fencePasswordPath(node string) string { return "/etc/pacemaker/esir-fence-" + node + ".password" }

// FencePasswordPattern matches every BMC password file (filepath.Match):
// the node side removes those its bundle no longer has.
const FencePasswordPattern = "/etc/pacemaker/esir-fence-*.password"

// hostRE matches a DNS name.
var hostRE = regexp.MustCompile(`^([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)*[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$`)

// optionRE matches a fence agent parameter name.
var optionRE = regexp.MustCompile(`^[a-z][a-z0-9_]{0,63}$`)

// reservedOptions are the parameters ESIR sets itself.
var reservedOptions = []string{"ip", "ipport", "username", "password", "password_script", "lanplus", "plug",
	"pcmk_host_list", "pcmk_host_map", "pcmk_host_check", "pcmk_reboot_action", "devices", "action"}

// printable reports whether s has no control characters (pacemaker hands
// parameters to agents as name=value lines).
func printable(s string) bool {
	return !strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f })
}

func (f *Fencing) setDefaults() {
	if f.Action == "" {
		f.Action = "reboot"
	}
	for i := range f.BMCs {
		b := &f.BMCs[i]
		if b.Agent == "" {
			b.Agent = AgentIPMI
		}
		if b.Lanplus == nil && b.Agent == AgentIPMI {
			t := true
			b.Lanplus = &t
		}
	}
	if f.SBD != nil {
		if f.SBD.Watchdog == "" {
			f.SBD.Watchdog = "/dev/watchdog"
		}
		if f.SBD.WatchdogTimeout == 0 {
			f.SBD.WatchdogTimeout = 5
		}
	}
}

// validateFencing checks the fencing section and returns its warnings; bad
// collects errors naming the field.
func (c *Cluster) validateFencing(bad func(field, format string, a ...any)) []string {
	f := &c.Fencing
	var warn []string
	used := c.Profile.Fencing && c.Profile.Pacemaker
	if !used && (len(f.BMCs) > 0 || f.SBD != nil) {
		warn = append(warn, "fencing: BMCs or sbd are given but profile.fencing (with profile.pacemaker) is off: nothing is fenced")
	}
	if used && len(f.BMCs) == 0 && f.SBD == nil {
		bad("fencing", "profile.fencing is on but neither fencing.bmcs nor fencing.sbd says how to fence a node: "+
			"give each node's BMC or an sbd device (or switch profile.fencing off, for a test cluster only)")
	}
	if f.Action != "" && f.Action != "reboot" && f.Action != "off" { // "": reboot
		bad("fencing.action", "%q: reboot or off", f.Action)
	}
	nodes := map[string]int{}
	for i, b := range f.BMCs {
		fld := fmt.Sprintf("fencing.bmcs[%d]", i)
		if !nameRE.MatchString(b.Node) {
			bad(fld+".node", "%q is not a node name", b.Node)
		} else if j, dup := nodes[b.Node]; dup {
			bad(fld+".node", "%s already has a BMC in fencing.bmcs[%d]", b.Node, j)
		}
		nodes[b.Node] = i
		if b.Agent != AgentIPMI && b.Agent != AgentRedfish {
			bad(fld+".agent", "%q: %s or %s", b.Agent, AgentIPMI, AgentRedfish)
		}
		if err := checkBMCAddress(b.Address); err != nil {
			bad(fld+".address", "%v", err)
		}
		if b.Username == "" || !printable(b.Username) {
			bad(fld+".username", "%q: need the BMC user's name, without control characters", b.Username)
		}
		switch {
		case b.Password == "":
			bad(fld+".password", "missing: give password or password_file")
		case !printable(string(b.Password)):
			bad(fld+".password", "contains control characters (a newline?)")
		}
		if b.Lanplus != nil && b.Agent != AgentIPMI {
			bad(fld+".lanplus", "only for %s", AgentIPMI)
		}
		for _, k := range slices.Sorted(maps.Keys(b.Options)) {
			switch {
			case !optionRE.MatchString(k):
				bad(fld+".options", "%q is not a fence agent parameter name", k)
			case slices.Contains(reservedOptions, k):
				bad(fld+".options."+k, "ESIR sets it from the BMC's fields")
			case !printable(b.Options[k]):
				bad(fld+".options."+k, "contains control characters")
			}
		}
	}
	if s := f.SBD; s != nil {
		if s.Device != "" && (!strings.HasPrefix(s.Device, "/dev/") || strings.ContainsAny(s.Device, " \t\n;")) {
			bad("fencing.sbd.device", "%q: need a shared disk's path under /dev, like /dev/disk/by-id/...", s.Device)
		}
		if !strings.HasPrefix(s.Watchdog, "/dev/") || strings.ContainsAny(s.Watchdog, " \t\n;") {
			bad("fencing.sbd.watchdog", "%q: need the watchdog device's path, like /dev/watchdog", s.Watchdog)
		}
		if s.WatchdogTimeout < 1 || s.WatchdogTimeout > 120 {
			bad("fencing.sbd.watchdog_timeout", "%d: 1..120 seconds", s.WatchdogTimeout)
		}
	}
	return warn
}

// checkBMCAddress refuses what cannot be another machine's BMC.
func checkBMCAddress(a string) error {
	if a == "" {
		return errors.New("missing: the BMC's IP address or DNS name")
	}
	if ip, err := netip.ParseAddr(a); err == nil {
		if ip.IsUnspecified() || ip.IsLoopback() || ip.IsMulticast() || ip.Zone() != "" {
			return fmt.Errorf("%s cannot be a BMC's address", a)
		}
		return nil
	}
	if strings.Trim(a, "0123456789.") == "" || !hostRE.MatchString(a) || len(a) > 253 {
		return fmt.Errorf("%q is neither an IP address nor a DNS name", a)
	}
	return nil
}

// loadPasswordFiles reads the BMC passwords kept in files beside the
// definition (dir). A file others may read is refused.
func (f *Fencing) loadPasswordFiles(dir string) error {
	var errs []error
	for i := range f.BMCs {
		b := &f.BMCs[i]
		if b.PasswordFile == "" {
			continue
		}
		fld := fmt.Sprintf("fencing.bmcs[%d].password_file", i)
		if b.Password != "" {
			errs = append(errs, fmt.Errorf("%s: give password or password_file, not both", fld))
			continue
		}
		path := b.PasswordFile
		if !filepath.IsAbs(path) {
			path = filepath.Join(dir, path)
		}
		st, err := os.Stat(path)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", fld, err))
			continue
		}
		if st.Mode().Perm()&0o077 != 0 {
			errs = append(errs, fmt.Errorf("%s: %s has mode %v, which lets others read it; want 0600", fld, path, st.Mode().Perm()))
			continue
		}
		data, err := os.ReadFile(path)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", fld, err))
			continue
		}
		b.Password = Secret(strings.TrimRight(string(data), "\r\n"))
	}
	return errors.Join(errs...)
}

// bmc returns node's BMC, if the definition names one.
func (f *Fencing) bmc(node string) (BMC, bool) {
	for _, b := range f.BMCs {
		if b.Node == node {
			return b, true
		}
	}
	return BMC{}, false
}

// fencingWarnings names the members pacemaker cannot fence: fencing on, no
// sbd, and no BMC for them. It is a warning, not an error: nodes join as
// they are installed, and a node without a BMC still runs; but while it is
// a member, a failure of it blocks the recovery of its resources (pacemaker
// waits for a fencing that cannot happen).
func (c *Cluster) fencingWarnings(s *State) []string {
	if !c.Profile.Fencing || !c.Profile.Pacemaker || c.Fencing.SBD != nil {
		return nil
	}
	var warn []string
	for _, m := range s.Members {
		if _, ok := c.Fencing.bmc(m.Name); !ok {
			warn = append(warn, fmt.Sprintf("fencing: %s member %s has no BMC in fencing.bmcs and there is no sbd: pacemaker cannot fence it, "+
				"and when it fails its resources are not recovered elsewhere", m.Role, m.Name))
		}
	}
	return warn
}

// addFencing gives a core member of a cluster running pacemaker with
// fencing on the fencing devices (one per member with a BMC, plus sbd's),
// the BMC passwords (0600 files under /etc/pacemaker that the devices read
// through password_script, so no password sits in the CIB), and every
// pacemaker member sbd's /etc/default/sbd.
func (b *Bundle) addFencing(c *Cluster, s *State, m Member) {
	p := c.Profile
	if !p.Pacemaker || !p.Fencing {
		return
	}
	f := c.Fencing
	if f.SBD != nil {
		var w strings.Builder
		fmt.Fprintf(&w, "# Written by ESIR for cluster %s. Do not edit.\n", c.Name)
		if f.SBD.Device != "" {
			fmt.Fprintf(&w, "SBD_DEVICE=%s\n", f.SBD.Device)
		}
		fmt.Fprintf(&w, "SBD_PACEMAKER=yes\nSBD_STARTMODE=always\nSBD_WATCHDOG_DEV=%s\nSBD_WATCHDOG_TIMEOUT=%d\n", f.SBD.Watchdog, f.SBD.WatchdogTimeout)
		b.add("/etc/default/sbd", 0o644, []byte(w.String()))
	}
	if m.Role != Core {
		return
	}
	for _, o := range slices.SortedFunc(slices.Values(s.Members), func(a, b Member) int { return a.ID - b.ID }) {
		bmc, ok := f.bmc(o.Name)
		if !ok {
			continue
		}
		params := map[string]string{
			"ip":              bmc.Address,
			"username":        bmc.Username,
			"password_script": "cat " + fencePasswordPath(o.Name),
			"pcmk_host_list":  o.Name,
		}
		if bmc.Port != 0 {
			params["ipport"] = strconv.Itoa(int(bmc.Port))
		}
		if bmc.Lanplus != nil && *bmc.Lanplus {
			params["lanplus"] = "1"
		}
		if f.Action == "off" {
			params["pcmk_reboot_action"] = "off"
		}
		maps.Copy(params, bmc.Options)
		b.FenceDevices = append(b.FenceDevices, FenceDevice{ID: FenceDeviceID(o.Name), Agent: bmc.Agent, Node: o.Name, Params: params})
		b.add(fencePasswordPath(o.Name), 0o600, []byte(bmc.Password))
	}
	if f.SBD != nil {
		if f.SBD.Device != "" {
			params := map[string]string{"devices": f.SBD.Device}
			if f.Action == "off" {
				params["pcmk_reboot_action"] = "off"
			}
			b.FenceDevices = append(b.FenceDevices, FenceDevice{ID: sbdDeviceID, Agent: agentSBD, Params: params})
		} else {
			// Watchdog-only sbd: pacemaker counts a lost node as fenced
			// once twice its watchdog timeout has passed (pacemaker's
			// documentation asks for at least the double).
			b.StonithWatchdogTimeout = strconv.Itoa(2*f.SBD.WatchdogTimeout) + "s"
		}
	}
}

// inlinePasswordWarning warns when the definition file at path holds a BMC
// password and others may read it.
func inlinePasswordWarning(c *Cluster, path string) string {
	inline := slices.ContainsFunc(c.Fencing.BMCs, func(b BMC) bool { return b.Password != "" && b.PasswordFile == "" })
	if !inline {
		return ""
	}
	if st, err := os.Stat(path); err == nil && st.Mode().Perm()&0o077 != 0 {
		return fmt.Sprintf("fencing.bmcs: BMC passwords sit in %s, which has mode %v: others may read them; make it 0600 or use password_file",
			path, st.Mode().Perm())
	}
	return ""
}
