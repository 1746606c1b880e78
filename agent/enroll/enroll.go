// Package enroll is ESIR's node service on an installed system: at boot it
// reports the node's identity and hardware to the server with the enroll
// token the installer left in /etc/esir/node.json, retrying with backoff
// until the server answers, and the server marks the node enrolled.
package enroll

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/esir-project/esir/server/agentapi"
)

// ConfigPath is where the installer writes the node service's Config.
const ConfigPath = "/etc/esir/node.json"

// Marker starts the console line printed once the server has answered.
const Marker = "esir-node: enrolled"

// Config is what the installer leaves for the node service.
type Config struct {
	Server   string `json:"server"`
	Token    string `json:"enroll_token"`
	MAC      string `json:"mac"`
	Hostname string `json:"hostname"`
	Image    string `json:"image"`
	// Addr is the node's cluster address; empty: its address on the route
	// to the server.
	Addr string `json:"addr,omitempty"`
}

// ReadConfig reads and checks a node service configuration.
func ReadConfig(path string) (Config, error) {
	var c Config
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("node service config: %w", err)
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("node service config %s: %w", path, err)
	}
	if c.Server == "" || c.MAC == "" {
		return c, fmt.Errorf("node service config %s: server and mac are required", path)
	}
	return c, nil
}

// Run enrolls the node, retrying with exponential backoff (1 s up to 1 min)
// until the server accepts or ctx ends.
func Run(ctx context.Context, cfg Config, log *slog.Logger) (*agentapi.Ack, error) {
	cl := &agentapi.Client{Server: cfg.Server, Token: cfg.Token}
	host, _ := os.Hostname()
	if host == "" {
		host = cfg.Hostname
	}
	req := agentapi.EnrollRequest{MAC: cfg.MAC, Hostname: host, Image: cfg.Image, Inventory: Inventory("/")}
	req.Addr = cfg.Addr
	if req.Addr == "" {
		if a, err := LocalAddr(cfg.Server); err == nil {
			req.Addr = a.String()
		} else {
			log.Warn("enroll: no local address towards the server", "server", cfg.Server, "err", err)
		}
	}
	wait := time.Second
	for attempt := 1; ; attempt++ {
		ack, err := cl.Enroll(ctx, req)
		if err == nil {
			return ack, nil
		}
		if agentapi.IsStatus(err, 401) || agentapi.IsStatus(err, 403) || agentapi.IsStatus(err, 400) {
			return nil, fmt.Errorf("enroll at %s: refused: %w", cfg.Server, err)
		}
		log.Warn("enroll: server not reachable, retrying", "server", cfg.Server, "attempt", attempt, "in", wait, "err", err)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("enroll at %s: %w (last error: %v)", cfg.Server, ctx.Err(), err)
		case <-time.After(wait):
		}
		wait = min(2*wait, time.Minute)
	}
}

// LocalAddr returns this node's address on the route to server (a URL): the
// address the node reaches the server and, in an SSI cluster, its peers by.
// It sends nothing (a UDP socket is only connected).
func LocalAddr(server string) (netip.Addr, error) {
	u, err := url.Parse(server)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("server URL %q: %w", server, err)
	}
	port := u.Port()
	if port == "" {
		port = "80"
	}
	c, err := net.Dial("udp", net.JoinHostPort(u.Hostname(), port))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("route to %s: %w", u.Host, err)
	}
	defer c.Close()
	ap, err := netip.ParseAddrPort(c.LocalAddr().String())
	if err != nil {
		return netip.Addr{}, fmt.Errorf("route to %s: %w", u.Host, err)
	}
	return ap.Addr().Unmap(), nil
}

// SaveConfig writes the node service's configuration atomically (0600).
func SaveConfig(path string, c Config) error {
	data, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("node service config: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(append(data, '\n'))
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("node service config %s: %w", path, err)
	}
	return nil
}

// Inventory describes the running system's hardware from /proc and /sys
// under root.
func Inventory(root string) agentapi.Inventory {
	inv := agentapi.Inventory{Arch: runtime.GOARCH}
	if b, err := os.ReadFile(filepath.Join(root, "proc/sys/kernel/osrelease")); err == nil {
		inv.Kernel = strings.TrimSpace(string(b))
	}
	if _, err := os.Stat(filepath.Join(root, "sys/firmware/efi")); err == nil {
		inv.Firmware = "uefi"
	} else {
		inv.Firmware = "bios"
	}
	dmi := func(n string) string {
		b, _ := os.ReadFile(filepath.Join(root, "sys/class/dmi/id", n))
		return strings.TrimSpace(string(b))
	}
	inv.Vendor, inv.Product, inv.Serial = dmi("sys_vendor"), dmi("product_name"), dmi("product_serial")
	if b, err := os.ReadFile(filepath.Join(root, "proc/meminfo")); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "MemTotal:" {
				kb, _ := strconv.ParseInt(f[1], 10, 64)
				inv.MemoryBytes = kb * 1024
			}
		}
	}
	if b, err := os.ReadFile(filepath.Join(root, "proc/cpuinfo")); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(l, ":")
			if !ok {
				continue
			}
			switch strings.TrimSpace(k) {
			case "model name":
				inv.CPU.Model = strings.TrimSpace(v)
			case "processor":
				inv.CPU.Threads++
			}
		}
	}
	if b, err := os.ReadFile(filepath.Join(root, "proc/modules")); err == nil {
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			if f := strings.Fields(l); len(f) > 0 {
				inv.Modules = append(inv.Modules, f[0])
			}
		}
		sort.Strings(inv.Modules)
	}
	blocks, _ := os.ReadDir(filepath.Join(root, "sys/block"))
	for _, e := range blocks {
		n := e.Name()
		if strings.HasPrefix(n, "loop") || strings.HasPrefix(n, "ram") || strings.HasPrefix(n, "zram") {
			continue
		}
		dir := filepath.Join(root, "sys/block", n)
		attr := func(a string) string { b, _ := os.ReadFile(filepath.Join(dir, a)); return strings.TrimSpace(string(b)) }
		sectors, _ := strconv.ParseInt(attr("size"), 10, 64)
		serial := attr("device/serial")
		if serial == "" {
			serial = attr("serial")
		}
		inv.Disks = append(inv.Disks, agentapi.Disk{Name: n, Path: "/dev/" + n, Model: attr("device/model"), Serial: serial,
			SizeBytes: sectors * 512, Rotational: attr("queue/rotational") == "1", Removable: attr("removable") == "1"})
	}
	nets, _ := os.ReadDir(filepath.Join(root, "sys/class/net"))
	for _, e := range nets {
		n := e.Name()
		dir := filepath.Join(root, "sys/class/net", n)
		if _, err := os.Stat(filepath.Join(dir, "device")); err != nil {
			continue // virtual
		}
		attr := func(a string) string { b, _ := os.ReadFile(filepath.Join(dir, a)); return strings.TrimSpace(string(b)) }
		drv, _ := os.Readlink(filepath.Join(dir, "device/driver"))
		speed, _ := strconv.Atoi(attr("speed"))
		inv.NICs = append(inv.NICs, agentapi.NIC{Name: n, MAC: attr("address"), Driver: filepath.Base(drv), Speed: speed, Link: attr("carrier") == "1"})
	}
	return inv
}
