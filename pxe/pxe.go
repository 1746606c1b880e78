// Package pxe holds what ESIR's network-boot servers share and the HTTP side
// of network boot: the boot Policy a server implements ("what does this
// machine boot now?"), the iPXE script handler that turns the policy's
// Decision into a script, and a static policy for standalone use.
//
// The protocol servers live in subpackages that know no policy: pxe/dhcp
// (DHCPv4 full and proxy mode), pxe/tftp (read-only TFTP for iPXE binaries)
// and pxe/netboot (the agent's netboot environment: kernel plus initramfs).
package pxe

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path"
	"sort"
	"strings"
	"sync/atomic"
)

// Firmware is the kind of boot firmware a machine runs, as told by the DHCP
// client architecture (option 93).
type Firmware int

// Firmware kinds.
const (
	FirmwareUnknown  Firmware = iota
	FirmwareBIOS              // legacy PXE ROM (arch 0)
	FirmwareUEFI              // UEFI PXE (arch 7, 9, 11)
	FirmwareUEFIHTTP          // UEFI HTTP boot (arch 16, 19)
)

// String returns the firmware's short name.
func (f Firmware) String() string {
	switch f {
	case FirmwareBIOS:
		return "bios"
	case FirmwareUEFI:
		return "uefi"
	case FirmwareUEFIHTTP:
		return "uefi-http"
	}
	return "unknown"
}

// Machine is what the boot servers know about a machine asking to boot.
type Machine struct {
	MAC      net.HardwareAddr
	Arch     uint16   // DHCP option 93 client architecture (first value)
	Firmware Firmware // derived from Arch
	IPXE     bool     // the request comes from iPXE (user class "iPXE", or the HTTP script request)
}

// Action is what a machine should do when it network-boots.
type Action int

// Actions a Policy can decide.
const (
	// Ignore: do not answer the machine at all.
	Ignore Action = iota
	// Inventory: boot the agent in inventory mode (unknown machine, discovery on).
	Inventory
	// Install: boot the agent's install environment.
	Install
	// LocalDisk: leave network boot (iPXE `exit`) so the firmware boots the local disk.
	LocalDisk
)

// LocalDiskFile is the boot file UEFI HTTP boot offers name for a node that
// boots its local disk. No such file is served: the firmware's HTTP boot
// attempt ends with a 404 at once, where an offer without a boot URI would
// keep it asking through its DHCP retries (60 s in EDK2), and the firmware
// goes on to the disk. (Firmware PXE gets iPXE, whose script says exit.)
const LocalDiskFile = "esir-boots-local-disk"

// String returns the action's name as used in files and logs.
func (a Action) String() string {
	switch a {
	case Inventory:
		return "inventory"
	case Install:
		return "install"
	case LocalDisk:
		return "local"
	}
	return "ignore"
}

// ParseAction parses the names String returns.
func ParseAction(s string) (Action, error) {
	switch strings.ToLower(s) {
	case "ignore":
		return Ignore, nil
	case "inventory":
		return Inventory, nil
	case "install":
		return Install, nil
	case "local", "localdisk", "exit":
		return LocalDisk, nil
	}
	return Ignore, fmt.Errorf("unknown boot action %q: want ignore, inventory, install or local", s)
}

// Decision is a Policy's answer. Inventory and Install need Kernel and Initrd
// (URLs the firmware fetches over HTTP) and a kernel command line.
type Decision struct {
	Action  Action
	Kernel  string
	Initrd  string
	Cmdline string
}

// Policy decides what a machine boots. The deployment server implements it;
// the protocol servers only ask. Boot must be safe for concurrent use and
// quick: the DHCP server calls it for every PXE request.
type Policy interface {
	Boot(ctx context.Context, m Machine) (Decision, error)
}

// FirmwareOf maps a DHCP client architecture (RFC 4578 / IANA) to the firmware
// kind ESIR serves, and reports false for architectures it has no boot file for.
func FirmwareOf(arch uint16) (Firmware, bool) {
	switch arch {
	case 0:
		return FirmwareBIOS, true
	case 7, 9, 11:
		return FirmwareUEFI, true
	case 16, 19:
		return FirmwareUEFIHTTP, true
	}
	return FirmwareUnknown, false
}

// AgentCmdline builds the kernel command line the agent reads: the esir.* keys
// followed by extra (console= and the like). Empty values are left out.
func AgentCmdline(server, token string, mac net.HardwareAddr, mode Action, extra string) string {
	var parts []string
	if server != "" {
		parts = append(parts, "esir.server="+server)
	}
	if token != "" {
		parts = append(parts, "esir.token="+token)
	}
	if len(mac) > 0 {
		parts = append(parts, "esir.mac="+mac.String())
	}
	if mode == Inventory || mode == Install {
		parts = append(parts, "esir.mode="+mode.String())
	}
	if extra = strings.TrimSpace(extra); extra != "" {
		parts = append(parts, extra)
	}
	return strings.Join(parts, " ")
}

// Script renders the iPXE script for a decision. Ignore and LocalDisk give a
// script that exits with a failure status, so the firmware moves on to the
// next boot device (the local disk): UEFI boot managers (EDK2's BDS) stop at
// a boot option that returns success and show their menu instead. The initrd is named "initrd" and the command line carries
// initrd=initrd, which EFI kernels booted by iPXE need to find it.
func Script(d Decision) (string, error) {
	switch d.Action {
	case Ignore, LocalDisk:
		return "#!ipxe\necho ESIR: booting from local disk\nexit 1\n", nil
	case Inventory, Install:
		if d.Kernel == "" || d.Initrd == "" {
			return "", fmt.Errorf("boot script for %s: kernel and initrd URLs are required", d.Action)
		}
		for _, s := range []string{d.Kernel, d.Initrd, d.Cmdline} {
			if strings.ContainsAny(s, "\n\r") {
				return "", fmt.Errorf("boot script: newline in %q", s)
			}
		}
		cmdline := "initrd=initrd"
		if d.Cmdline != "" {
			cmdline += " " + d.Cmdline
		}
		return fmt.Sprintf("#!ipxe\necho ESIR: %s environment\nkernel %s %s\ninitrd --name initrd %s\nboot\n",
			d.Action, d.Kernel, cmdline, d.Initrd), nil
	}
	return "", fmt.Errorf("boot script: unknown action %d", d.Action)
}

// ScriptHandler serves per-node iPXE scripts: GET ...?mac=MAC[&arch=N]. The
// DHCP server hands iPXE this URL with the MAC filled in.
type ScriptHandler struct {
	Policy Policy
	Log    *slog.Logger

	served atomic.Int64
}

// ServeHTTP answers one script request.
func (h *ScriptHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	log := h.Log
	if log == nil {
		log = slog.Default()
	}
	q := r.URL.Query()
	mac, err := net.ParseMAC(q.Get("mac"))
	if err != nil || len(mac) != 6 {
		http.Error(w, fmt.Sprintf("boot script: parameter mac %q is not a MAC address", q.Get("mac")), http.StatusBadRequest)
		return
	}
	m := Machine{MAC: mac, IPXE: true}
	if a := q.Get("arch"); a != "" {
		var n uint16
		if _, err := fmt.Sscan(a, &n); err != nil {
			http.Error(w, fmt.Sprintf("boot script: parameter arch %q is not a number", a), http.StatusBadRequest)
			return
		}
		m.Arch = n
		m.Firmware, _ = FirmwareOf(n)
	}
	d, err := h.Policy.Boot(r.Context(), m)
	if err != nil {
		log.Error("boot policy failed", "mac", mac.String(), "err", err)
		http.Error(w, "boot policy failed", http.StatusInternalServerError)
		return
	}
	s, err := Script(d)
	if err != nil {
		log.Error("boot script", "mac", mac.String(), "err", err)
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	h.served.Add(1)
	log.Info("boot script", "mac", mac.String(), "action", d.Action)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	io.WriteString(w, s)
}

// Served returns how many scripts the handler has served.
func (h *ScriptHandler) Served() int64 { return h.served.Load() }

// FileHandler serves the files of one directory (kernels, initramfs images,
// iPXE binaries) read-only with Range support, refusing any path that leaves
// the directory (symbolic links included).
func FileHandler(dir string, log *slog.Logger) (http.Handler, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return nil, fmt.Errorf("boot files: open %s: %w", dir, err)
	}
	if log == nil {
		log = slog.Default()
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		name := strings.TrimPrefix(path.Clean("/"+r.URL.Path), "/")
		if name == "" {
			http.NotFound(w, r)
			return
		}
		f, err := root.Open(name)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				log.Warn("boot file refused", "path", r.URL.Path, "remote", r.RemoteAddr, "err", err)
			}
			http.NotFound(w, r)
			return
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil || !st.Mode().IsRegular() {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(w, r, name, st.ModTime(), f)
	}), nil
}

// NodeEntry is one machine in a StaticPolicy file.
type NodeEntry struct {
	MAC    string `json:"mac"`
	Action string `json:"action"` // ignore, inventory, install or local
}

// StaticPolicy is a Policy read from flags or a file, for `esir pxe serve`
// until the deployment server takes over: listed MACs get their action;
// unknown MACs get inventory when Discovery is on and are ignored otherwise.
// Inventory and install boot the same netboot environment (Kernel, Initrd)
// with the mode on the command line.
type StaticPolicy struct {
	Kernel    string // kernel URL
	Initrd    string // initramfs URL
	Server    string // esir.server value
	Extra     string // extra kernel arguments (console=...)
	Discovery bool
	Nodes     map[string]Action // lower-case MAC -> action
}

// LoadNodes reads a JSON list of NodeEntry from file into p.Nodes.
func (p *StaticPolicy) LoadNodes(file string) error {
	b, err := os.ReadFile(file)
	if err != nil {
		return fmt.Errorf("node list: %w", err)
	}
	var entries []NodeEntry
	if err := json.Unmarshal(b, &entries); err != nil {
		return fmt.Errorf("node list %s: %w", file, err)
	}
	if p.Nodes == nil {
		p.Nodes = map[string]Action{}
	}
	for i, e := range entries {
		mac, err := net.ParseMAC(e.MAC)
		if err != nil {
			return fmt.Errorf("node list %s: entry %d: mac %q: %w", file, i, e.MAC, err)
		}
		a, err := ParseAction(e.Action)
		if err != nil {
			return fmt.Errorf("node list %s: entry %d (%s): %w", file, i, mac, err)
		}
		p.Nodes[mac.String()] = a
	}
	return nil
}

// Boot implements Policy.
func (p *StaticPolicy) Boot(_ context.Context, m Machine) (Decision, error) {
	a, known := p.Nodes[m.MAC.String()]
	if !known {
		if !p.Discovery {
			return Decision{Action: Ignore}, nil
		}
		a = Inventory
	}
	d := Decision{Action: a}
	if a == Inventory || a == Install {
		d.Kernel, d.Initrd = p.Kernel, p.Initrd
		d.Cmdline = AgentCmdline(p.Server, "", m.MAC, a, p.Extra)
	}
	return d, nil
}

// MACs returns the listed MACs, sorted.
func (p *StaticPolicy) MACs() []string {
	out := make([]string, 0, len(p.Nodes))
	for m := range p.Nodes {
		out = append(out, m)
	}
	sort.Strings(out)
	return out
}

// ScriptURL returns the URL of the boot script for mac under base, the URL
// ScriptHandler is mounted at (for example http://198.18.0.1:8080/pxe/boot.ipxe).
func ScriptURL(base string, mac net.HardwareAddr) string {
	return base + "?mac=" + mac.String()
}
