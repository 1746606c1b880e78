package main

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/esir-project/esir/cmd/internal/cli"
	"github.com/esir-project/esir/pxe"
	"github.com/esir-project/esir/pxe/dhcp"
	"github.com/esir-project/esir/pxe/service"
	"github.com/esir-project/esir/pxe/tftp"
	"github.com/spf13/cobra"
)

func newPXECmd(app *cli.App) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pxe",
		Short: "Network-boot servers (DHCP, TFTP, HTTP boot) without the deployment server",
	}
	cmd.AddCommand(newPXEServeCmd(app))
	return cmd
}

// pxeFlags are the flags of `esir pxe serve`.
type pxeFlags struct {
	iface, serverIP, mode                      string
	poolStart, poolEnd, subnet, router, domain string
	dns, ntp, reserve                          []string
	mtu                                        uint16
	leaseTime                                  time.Duration
	leaseFile                                  string
	tftpListen, tftpRoot, httpListen, httpURL  string
	bootDir, nodes, serverURL, extra, undiFile string
	efiFile                                    string
	discovery                                  bool
}

func newPXEServeCmd(app *cli.App) *cobra.Command {
	var f pxeFlags
	cmd := &cobra.Command{
		Use:   "serve --interface IFACE --boot-dir DIR [--dhcp full|proxy|off] ...",
		Short: "Serve DHCP, TFTP and HTTP boot with a static policy",
		Long: `Serve runs the network-boot servers with a static boot policy: the MACs listed
in --nodes (a JSON list of {"mac": "...", "action": "install|inventory|local|ignore"})
get their action; other machines boot into inventory mode with --discovery and
are ignored without it. Inventory and install boot the netboot environment of
--boot-dir (see esir boot build) over HTTP, with esir.server=--server-url and
esir.mode on the kernel command line; "local" gets an iPXE script that exits
to the local disk.

DHCP runs in full mode (addresses from --pool-start..--pool-end, leases in
--lease-file) or proxy mode (boot information only, beside the site's DHCP
server), or not at all (--dhcp off). TFTP serves only the iPXE binaries.`,
		Example: `  esir pxe serve --interface eth0 --boot-dir /var/lib/esir/netboot/compute/1.0 \
      --pool-start 198.18.0.100 --pool-end 198.18.0.199 --subnet 198.18.0.0/24 --discovery
  esir pxe serve --interface eth0 --dhcp proxy --boot-dir ./netboot --nodes nodes.json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := f.config(app)
			if err != nil {
				return err
			}
			return service.Run(cmd.Context(), cfg)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.iface, "interface", "", "interface to serve DHCP on")
	fl.StringVar(&f.serverIP, "server-ip", "", "this server's address on --interface (default: its first IPv4)")
	fl.StringVar(&f.mode, "dhcp", "full", "DHCP mode: full, proxy or off")
	fl.StringVar(&f.poolStart, "pool-start", "", "first address of the pool (full mode)")
	fl.StringVar(&f.poolEnd, "pool-end", "", "last address of the pool (full mode)")
	fl.StringVar(&f.subnet, "subnet", "", "the pool's subnet, CIDR (full mode; default from --interface)")
	fl.StringVar(&f.router, "router", "", "default gateway handed out")
	fl.StringSliceVar(&f.dns, "dns", nil, "DNS servers handed out")
	fl.StringVar(&f.domain, "domain", "", "domain name handed out")
	fl.StringSliceVar(&f.ntp, "ntp", nil, "NTP servers handed out")
	fl.Uint16Var(&f.mtu, "mtu", 0, "interface MTU handed out (0: none)")
	fl.DurationVar(&f.leaseTime, "lease-time", time.Hour, "lease time")
	fl.StringVar(&f.leaseFile, "lease-file", "", "file the leases persist in (full mode)")
	fl.StringSliceVar(&f.reserve, "reserve", nil, "static reservation MAC=IP[/HOSTNAME] (repeatable)")
	fl.StringVar(&f.tftpListen, "tftp-listen", ":69", "TFTP address (empty: no TFTP)")
	fl.StringVar(&f.tftpRoot, "tftp-root", "", "directory with the iPXE binaries (default: Debian's ipxe package, "+tftp.DefaultRoot+")")
	fl.StringVar(&f.undiFile, "bios-file", "undionly.kpxe", "iPXE binary for BIOS PXE")
	fl.StringVar(&f.efiFile, "efi-file", "ipxe.efi", "iPXE binary for UEFI x86-64 (ipxe.efi or snponly.efi)")
	fl.StringVar(&f.httpListen, "http-listen", ":8080", "HTTP address for scripts, kernel and initramfs")
	fl.StringVar(&f.httpURL, "http-url", "", "URL nodes reach the HTTP server at (default http://SERVER-IP:PORT)")
	fl.StringVar(&f.bootDir, "boot-dir", "", "netboot environment directory (vmlinuz, initrd.img)")
	fl.StringVar(&f.nodes, "nodes", "", "JSON file of known nodes and their boot action")
	fl.BoolVar(&f.discovery, "discovery", false, "boot unknown machines into inventory mode (default: ignore them)")
	fl.StringVar(&f.serverURL, "server-url", "", "esir.server value on the agent's command line")
	fl.StringVar(&f.extra, "cmdline", "console=tty0 console=ttyS0,115200", "extra kernel command line")
	return cmd
}

func (f *pxeFlags) config(app *cli.App) (service.Config, error) {
	var cfg service.Config
	if f.bootDir == "" {
		return cfg, errors.New("--boot-dir is required (build one with: esir boot build)")
	}
	ip, ipnet, err := interfaceAddr(f.iface, f.serverIP)
	if err != nil {
		return cfg, err
	}
	_, port, err := net.SplitHostPort(f.httpListen)
	if err != nil {
		return cfg, fmt.Errorf("--http-listen %q: %w", f.httpListen, err)
	}
	base := f.httpURL
	if base == "" {
		base = "http://" + net.JoinHostPort(ip.String(), port)
	}
	pol := &pxe.StaticPolicy{Kernel: service.KernelURL(base), Initrd: service.InitrdURL(base),
		Server: f.serverURL, Extra: f.extra, Discovery: f.discovery}
	if f.nodes != "" {
		if err := pol.LoadNodes(f.nodes); err != nil {
			return cfg, err
		}
	}
	cfg = service.Config{TFTPListen: f.tftpListen, TFTPRoot: f.tftpRoot, HTTPListen: f.httpListen,
		HTTPURL: base, BootDir: f.bootDir, Policy: pol, Log: app.Log}
	if f.mode == "off" {
		return cfg, nil
	}
	mode, err := dhcp.ParseMode(f.mode)
	if err != nil {
		return cfg, fmt.Errorf("--dhcp: %w", err)
	}
	if f.iface == "" {
		return cfg, errors.New("--interface is required for DHCP (or --dhcp off)")
	}
	dc := &dhcp.Config{Mode: mode, Interface: f.iface, ServerIP: ip, LeaseTime: f.leaseTime,
		LeaseFile: f.leaseFile, Domain: f.domain, MTU: f.mtu,
		Boot: dhcp.BootFiles{BIOS: f.undiFile, UEFI: f.efiFile}}
	if mode == dhcp.Full {
		if dc.PoolStart = net.ParseIP(f.poolStart).To4(); dc.PoolStart == nil {
			return cfg, fmt.Errorf("--pool-start %q is not an IPv4 address", f.poolStart)
		}
		if dc.PoolEnd = net.ParseIP(f.poolEnd).To4(); dc.PoolEnd == nil {
			return cfg, fmt.Errorf("--pool-end %q is not an IPv4 address", f.poolEnd)
		}
		mask := ipnet.Mask
		if f.subnet != "" {
			_, n, err := net.ParseCIDR(f.subnet)
			if err != nil {
				return cfg, fmt.Errorf("--subnet: %w", err)
			}
			mask = n.Mask
		}
		dc.SubnetMask = mask
		if f.router != "" {
			if dc.Router = net.ParseIP(f.router).To4(); dc.Router == nil {
				return cfg, fmt.Errorf("--router %q is not an IPv4 address", f.router)
			}
		}
		if dc.DNS, err = parseIPs("--dns", f.dns); err != nil {
			return cfg, err
		}
		if dc.NTP, err = parseIPs("--ntp", f.ntp); err != nil {
			return cfg, err
		}
		for _, r := range f.reserve {
			res, err := parseReservation(r)
			if err != nil {
				return cfg, err
			}
			dc.Reservations = append(dc.Reservations, res)
		}
	}
	cfg.DHCP = dc
	return cfg, nil
}

func parseIPs(flag string, ss []string) ([]net.IP, error) {
	var out []net.IP
	for _, s := range ss {
		ip := net.ParseIP(s).To4()
		if ip == nil {
			return nil, fmt.Errorf("%s %q is not an IPv4 address", flag, s)
		}
		out = append(out, ip)
	}
	return out, nil
}

// parseReservation parses MAC=IP[/HOSTNAME].
func parseReservation(s string) (dhcp.Reservation, error) {
	m, rest, ok := strings.Cut(s, "=")
	if !ok {
		return dhcp.Reservation{}, fmt.Errorf("--reserve %q: want MAC=IP[/HOSTNAME]", s)
	}
	mac, err := net.ParseMAC(m)
	if err != nil {
		return dhcp.Reservation{}, fmt.Errorf("--reserve %q: %w", s, err)
	}
	ipStr, host, _ := strings.Cut(rest, "/")
	ip := net.ParseIP(ipStr).To4()
	if ip == nil {
		return dhcp.Reservation{}, fmt.Errorf("--reserve %q: %q is not an IPv4 address", s, ipStr)
	}
	return dhcp.Reservation{MAC: mac, IP: ip, Hostname: host}, nil
}

// interfaceAddr returns the server address: explicit, or the interface's
// first IPv4 address.
func interfaceAddr(iface, explicit string) (net.IP, *net.IPNet, error) {
	if explicit != "" {
		ip := net.ParseIP(explicit).To4()
		if ip == nil {
			return nil, nil, fmt.Errorf("--server-ip %q is not an IPv4 address", explicit)
		}
		return ip, &net.IPNet{IP: ip, Mask: net.CIDRMask(24, 32)}, nil
	}
	if iface == "" {
		return nil, nil, errors.New("give --interface or --server-ip")
	}
	ifc, err := net.InterfaceByName(iface)
	if err != nil {
		return nil, nil, fmt.Errorf("--interface %s: %w", iface, err)
	}
	addrs, err := ifc.Addrs()
	if err != nil {
		return nil, nil, fmt.Errorf("--interface %s: %w", iface, err)
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil {
			return n.IP.To4(), n, nil
		}
	}
	return nil, nil, fmt.Errorf("--interface %s has no IPv4 address", iface)
}
