package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"

	"github.com/esir-project/esir/pxe"
	"github.com/esir-project/esir/pxe/dhcp"
	"github.com/esir-project/esir/pxe/tftp"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/store"
	"github.com/labstack/echo/v4"
	"golang.org/x/sync/errgroup"
)

// policy answers pxe's question from the node's deployment state: unknown
// nodes boot the agent in inventory mode (or are ignored without
// discovery), nodes in a rollout boot the install environment with a fresh
// boot token, installed nodes boot their local disk.
type policy struct {
	cfg Config
	st  store.Store
	api *api.API
}

// Boot implements pxe.Policy.
func (p *policy) Boot(ctx context.Context, m pxe.Machine) (pxe.Decision, error) {
	mac := m.MAC.String()
	var action pxe.Action
	err := p.st.View(ctx, func(tx store.Tx) error {
		n, err := tx.Node(mac)
		switch {
		case errors.Is(err, store.ErrNotFound):
			action = pxe.Ignore
			if p.cfg.Discovery {
				action = pxe.Inventory
			}
			return nil
		case err != nil:
			return err
		}
		switch {
		case n.State.Active():
			action = pxe.Install
		case n.State == deploy.Installed || n.State == deploy.Enrolled:
			action = pxe.LocalDisk
		default:
			action = pxe.Inventory
		}
		return nil
	})
	if err != nil {
		return pxe.Decision{}, fmt.Errorf("boot policy for %s: %w", mac, err)
	}
	if action != pxe.Inventory && action != pxe.Install {
		return pxe.Decision{Action: action}, nil
	}
	if p.cfg.BootDir == "" {
		return pxe.Decision{}, fmt.Errorf("boot policy for %s: %s needs the agent's netboot files, and boot_dir is not set", mac, action)
	}
	tok, _ := p.api.IssueBootToken(mac)
	files := p.cfg.PublicURL + "/pxe/files/"
	return pxe.Decision{
		Action:  action,
		Kernel:  files + p.cfg.BootKernel,
		Initrd:  files + p.cfg.BootInitrd,
		Cmdline: pxe.AgentCmdline(p.cfg.PublicURL, tok, m.MAC, action, p.cfg.BootCmdline),
	}, nil
}

// mountBoot serves the iPXE script at /pxe/boot.ipxe, the netboot files at
// /pxe/files/ and the iPXE binaries (UEFI HTTP boot) at /pxe/ipxe/.
func (s *Server) mountBoot() error {
	pol := &policy{cfg: s.cfg, st: s.db, api: s.api}
	s.echo.GET("/pxe/boot.ipxe", echo.WrapHandler(&pxe.ScriptHandler{Policy: pol, Log: s.log}))
	if s.cfg.BootDir != "" {
		h, err := pxe.FileHandler(s.cfg.BootDir, s.log)
		if err != nil {
			return fmt.Errorf("boot_dir: %w", err)
		}
		s.echo.Any("/pxe/files/*", echo.WrapHandler(http.StripPrefix("/pxe/files", h)))
	}
	if s.cfg.TFTPListen != "" || s.cfg.DHCPInterface != "" {
		h, err := s.ipxeFiles()
		if err != nil {
			return err
		}
		s.echo.Any("/pxe/ipxe/*", echo.WrapHandler(http.StripPrefix("/pxe/ipxe", h)))
	}
	return nil
}

// startBoot starts DHCP and TFTP when configured.
func (s *Server) startBoot(ctx context.Context, g *errgroup.Group) error {
	pol := &policy{cfg: s.cfg, st: s.db, api: s.api}
	if s.cfg.TFTPListen != "" {
		ts, err := s.ipxeFiles()
		if err != nil {
			return err
		}
		pc, err := net.ListenPacket("udp4", s.cfg.TFTPListen)
		if err != nil {
			ts.Close()
			return fmt.Errorf("tftp_listen %s: %w", s.cfg.TFTPListen, err)
		}
		g.Go(func() error {
			defer ts.Close()
			return ts.Serve(ctx, pc)
		})
	}
	if s.cfg.DHCPInterface == "" {
		return nil
	}
	mode, err := dhcp.ParseMode(s.cfg.DHCPMode)
	if err != nil {
		return fmt.Errorf("dhcp_mode: %w", err)
	}
	dc := dhcp.Config{
		Mode: mode, Interface: s.cfg.DHCPInterface, ServerIP: net.ParseIP(s.cfg.DHCPServerIP),
		LeaseFile: s.cfg.DHCPLeaseFile, ScriptURL: s.cfg.PublicURL + "/pxe/boot.ipxe",
		HTTPBootURL: s.cfg.PublicURL + "/pxe/ipxe", Policy: pol, Log: s.log,
	}
	if mode == dhcp.Full {
		first, rest, ok := strings.Cut(s.cfg.DHCPRange, "-")
		last, prefix, ok2 := strings.Cut(rest, "/")
		_, ipn, err := net.ParseCIDR(first + "/" + prefix)
		if !ok || !ok2 || err != nil || net.ParseIP(last).To4() == nil {
			return fmt.Errorf("dhcp_range %q: want FIRST-LAST/PREFIX, e.g. 198.18.0.100-198.18.0.200/24", s.cfg.DHCPRange)
		}
		dc.PoolStart, dc.PoolEnd, dc.SubnetMask = net.ParseIP(first), net.ParseIP(last), ipn.Mask
		if s.cfg.DHCPRouter != "" {
			if dc.Router = net.ParseIP(s.cfg.DHCPRouter); dc.Router == nil {
				return fmt.Errorf("dhcp_router %q: not an IP address", s.cfg.DHCPRouter)
			}
		}
		for _, d := range strings.Split(s.cfg.DHCPDNS, ",") {
			if d = strings.TrimSpace(d); d == "" {
				continue
			}
			ip := net.ParseIP(d)
			if ip == nil {
				return fmt.Errorf("dhcp_dns %q: not an IP address", d)
			}
			dc.DNS = append(dc.DNS, ip)
		}
	}
	ds, err := dhcp.New(dc)
	if err != nil {
		return fmt.Errorf("dhcp on %s: %w", s.cfg.DHCPInterface, err)
	}
	// Bind now so a missing interface or a busy port fails at start.
	ports := []int{67}
	if mode == dhcp.Proxy {
		ports = append(ports, 4011)
	}
	var conns []*net.UDPConn
	for _, p := range ports {
		c, err := dhcp.Listen(s.cfg.DHCPInterface, p)
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			return fmt.Errorf("dhcp_interface %s port %d: %w", s.cfg.DHCPInterface, p, err)
		}
		conns = append(conns, c)
	}
	g.Go(func() error { return ds.ServeConns(ctx, conns...) })
	return nil
}

// ipxeFiles serves the iPXE binaries: from tftp_dir, or when it is empty
// Debian's ipxe package files (their symbolic links lead out of
// /usr/lib/ipxe, which a rooted directory server refuses).
func (s *Server) ipxeFiles() (*tftp.Server, error) {
	if s.cfg.TFTPDir == "" {
		files, err := tftp.DebianFiles()
		if err != nil {
			return nil, fmt.Errorf("tftp_dir: %w", err)
		}
		return tftp.NewFiles(files, s.log)
	}
	ts, err := tftp.New(s.cfg.TFTPDir, s.log)
	if err != nil {
		return nil, fmt.Errorf("tftp_dir %s: %w", s.cfg.TFTPDir, err)
	}
	return ts, nil
}
