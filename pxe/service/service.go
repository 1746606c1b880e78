// Package service runs ESIR's network-boot servers together, as `esir pxe
// serve` does before the deployment server exists: DHCP (full or proxy mode,
// or none), TFTP for the iPXE binaries, and HTTP for the per-node iPXE
// scripts, the netboot kernel and initramfs (with Range) and the iPXE
// binaries for UEFI HTTP boot. The boot policy is handed in.
package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/esir-project/esir/pxe"
	"github.com/esir-project/esir/pxe/dhcp"
	"github.com/esir-project/esir/pxe/tftp"
)

// HTTP paths the service serves.
const (
	ScriptPath = "/pxe/boot.ipxe" // ?mac=MAC
	FilesPath  = "/pxe/files/"    // the netboot environment (BootDir)
	IPXEPath   = "/pxe/ipxe/"     // the iPXE binaries (TFTPRoot), for UEFI HTTP boot
)

// Config configures Run.
type Config struct {
	// DHCP, when non-nil, runs a DHCP server. Its Policy, ScriptURL,
	// HTTPBootURL and Log are filled in by Run when empty.
	DHCP *dhcp.Config
	// TFTPListen is the TFTP address (":69"); empty disables TFTP.
	TFTPListen string
	// TFTPRoot is a directory of iPXE binaries; empty serves Debian's
	// (tftp.DebianFiles).
	TFTPRoot string
	// HTTPListen is the HTTP address (":8080").
	HTTPListen string
	// HTTPURL is the base URL nodes reach the HTTP server at
	// (http://198.18.0.1:8080).
	HTTPURL string
	// BootDir holds the netboot environment (vmlinuz, initrd.img).
	BootDir string
	Policy  pxe.Policy
	Log     *slog.Logger
	// Ready, when set, is called once every listener is open.
	Ready func()
}

// KernelURL and InitrdURL return where the service serves the netboot
// kernel and initramfs, for the policy's decisions.
func KernelURL(base string) string { return strings.TrimSuffix(base, "/") + FilesPath + "vmlinuz" }

// InitrdURL returns the initramfs URL under base.
func InitrdURL(base string) string { return strings.TrimSuffix(base, "/") + FilesPath + "initrd.img" }

// Run serves until ctx ends or a server fails. Listeners open before
// anything is served, so a port in use fails at once.
func Run(ctx context.Context, cfg Config) error {
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	if cfg.Policy == nil {
		return errors.New("pxe service: no boot policy")
	}
	var ts *tftp.Server
	var err error
	if cfg.TFTPRoot == "" {
		files, ferr := tftp.DebianFiles()
		if ferr != nil {
			return ferr
		}
		ts, err = tftp.NewFiles(files, log)
	} else {
		ts, err = tftp.New(cfg.TFTPRoot, log)
	}
	if err != nil {
		return err
	}
	defer ts.Close()
	base := strings.TrimSuffix(cfg.HTTPURL, "/")

	mux := http.NewServeMux()
	mux.Handle(ScriptPath, &pxe.ScriptHandler{Policy: cfg.Policy, Log: log})
	if cfg.BootDir != "" {
		h, err := pxe.FileHandler(cfg.BootDir, log)
		if err != nil {
			return err
		}
		mux.Handle(FilesPath, http.StripPrefix(FilesPath, h))
	}
	mux.Handle(IPXEPath, http.StripPrefix(IPXEPath, ts))
	hl, err := net.Listen("tcp", cfg.HTTPListen)
	if err != nil {
		return fmt.Errorf("pxe service: HTTP listen %s: %w", cfg.HTTPListen, err)
	}
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	var tconn net.PacketConn
	if cfg.TFTPListen != "" {
		if tconn, err = net.ListenPacket("udp4", cfg.TFTPListen); err != nil {
			hl.Close()
			return fmt.Errorf("pxe service: TFTP listen %s: %w", cfg.TFTPListen, err)
		}
	}

	var ds *dhcp.Server
	var dconns []*net.UDPConn
	if cfg.DHCP != nil {
		dc := *cfg.DHCP
		if dc.Policy == nil {
			dc.Policy = cfg.Policy
		}
		if dc.ScriptURL == "" {
			dc.ScriptURL = base + ScriptPath
		}
		if dc.HTTPBootURL == "" {
			dc.HTTPBootURL = base + strings.TrimSuffix(IPXEPath, "/")
		}
		if dc.Log == nil {
			dc.Log = log
		}
		if ds, err = dhcp.New(dc); err != nil {
			hl.Close()
			if tconn != nil {
				tconn.Close()
			}
			return err
		}
		ports := []int{67}
		if dc.Mode == dhcp.Proxy {
			ports = append(ports, 4011)
		}
		for _, p := range ports {
			c, err := dhcp.Listen(dc.Interface, p)
			if err != nil {
				hl.Close()
				if tconn != nil {
					tconn.Close()
				}
				for _, c := range dconns {
					c.Close()
				}
				return err
			}
			dconns = append(dconns, c)
		}
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 3)
	n := 1
	go func() {
		err := hs.Serve(hl)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		}
		errc <- err
	}()
	if tconn != nil {
		n++
		go func() { errc <- ts.Serve(ctx, tconn) }()
	}
	if ds != nil {
		n++
		go func() { errc <- ds.ServeConns(ctx, dconns...) }()
	}
	log.Info("pxe service up", "http", hl.Addr().String(), "url", base, "tftp", cfg.TFTPListen, "dhcp", cfg.DHCP != nil)
	if cfg.Ready != nil {
		cfg.Ready()
	}
	var first error
	select {
	case <-ctx.Done():
	case first = <-errc:
		n--
	}
	cancel()
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer scancel()
	hs.Shutdown(sctx)
	for ; n > 0; n-- {
		if err := <-errc; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// ipxeHandler serves the TFTP server's files over HTTP (UEFI HTTP boot).
