// Package dhcp is ESIR's DHCPv4 server for network boot. It knows protocols,
// not policy: for every PXE request it asks a pxe.Policy what the machine
// boots, and answers with the boot file that fits the client's firmware:
// the iPXE binary over TFTP for BIOS and UEFI PXE, an HTTP URL for UEFI HTTP
// boot, and the per-node iPXE script URL once iPXE itself asks (which breaks
// the chainload loop).
//
// Two modes:
//   - Full: hands out addresses from a pool (reservations by MAC, leases kept
//     in a file across restarts) with the usual options.
//   - Proxy: gives no addresses, only boot information to PXE clients, on
//     ports 67 and 4011, beside a site's own DHCP server.
//
// Relayed requests (giaddr set) are answered to the relay. Malformed packets,
// unknown architectures, pool exhaustion and floods from one MAC are dropped,
// logged and counted (Stats).
package dhcp

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/esir-project/esir/pxe"
	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/iana"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// Mode selects full or proxy DHCP.
type Mode int

// Modes.
const (
	Full Mode = iota
	Proxy
)

// ParseMode parses "full" or "proxy".
func ParseMode(s string) (Mode, error) {
	switch s {
	case "full":
		return Full, nil
	case "proxy":
		return Proxy, nil
	}
	return Full, fmt.Errorf("DHCP mode %q: want full or proxy", s)
}

// String returns "full" or "proxy".
func (m Mode) String() string {
	if m == Proxy {
		return "proxy"
	}
	return "full"
}

// Reservation pins an address (and optionally a host name) to a MAC.
type Reservation struct {
	MAC      net.HardwareAddr
	IP       net.IP
	Hostname string
}

// BootFiles names the iPXE binaries per firmware, as served by TFTP (and over
// HTTP for UEFI HTTP boot).
type BootFiles struct {
	BIOS  string // arch 0; default undionly.kpxe
	UEFI  string // arch 7, 9 (and 16 over HTTP); default ipxe.efi
	ARM64 string // arch 11 (and 19 over HTTP); default ipxe-arm64.efi
}

// Config configures a Server.
type Config struct {
	Mode      Mode
	Interface string // the interface to serve on (bound with SO_BINDTODEVICE)
	ServerIP  net.IP // this server's address there: server identifier and TFTP next-server

	// Full mode: the pool and the options handed out.
	PoolStart, PoolEnd net.IP
	SubnetMask         net.IPMask
	Router             net.IP
	DNS                []net.IP
	Domain             string
	NTP                []net.IP
	MTU                uint16
	LeaseTime          time.Duration // default 1h
	Reservations       []Reservation
	LeaseFile          string // where leases persist; empty keeps them in memory only

	Boot BootFiles
	// ScriptURL is where pxe.ScriptHandler is mounted, e.g.
	// http://198.18.0.1:8080/pxe/boot.ipxe; iPXE gets ScriptURL?mac=MAC.
	ScriptURL string
	// HTTPBootURL is the directory URL serving the iPXE binaries for UEFI
	// HTTP boot clients, e.g. http://198.18.0.1:8080/pxe/files.
	HTTPBootURL string

	Policy pxe.Policy
	Log    *slog.Logger

	// PerMACRate and PerMACBurst bound how many packets one MAC may have
	// answered per second; default 10/s with a burst of 20.
	PerMACRate  float64
	PerMACBurst int
}

// Stats counts what the server did. All fields are totals since start.
type Stats struct {
	Received, Malformed                     int64
	Discovers, Requests, Releases, Declines int64
	Informs                                 int64
	Offers, Acks, Naks                      int64
	Ignored                                 int64 // policy said ignore, or not for us
	UnknownArch                             int64
	PoolExhausted                           int64
	RateLimited                             int64
	PolicyErrors                            int64
	SendErrors                              int64
	LocalHTTPBoot                           int64 // HTTP boot attempts of local-disk nodes, offered pxe.LocalDiskFile
}

type counters struct {
	received, malformed, discovers, requests, releases, declines, informs atomic.Int64
	offers, acks, naks, ignored, unknownArch, exhausted, limited          atomic.Int64
	policyErrors, sendErrors, localHTTP                                   atomic.Int64
}

// Lease is one address handed out, as kept in the lease file.
type Lease struct {
	MAC      string    `json:"mac"`
	IP       string    `json:"ip"`
	Hostname string    `json:"hostname,omitempty"`
	Expires  time.Time `json:"expires"`
}

type lease struct {
	mac     string
	ip      uint32
	expires time.Time
	offered bool // an offer not yet requested
}

// Server is a DHCPv4 server. Create it with New.
type Server struct {
	cfg      Config
	log      *slog.Logger
	serverIP net.IP

	start, end uint32
	reserved   map[string]Reservation // by MAC
	reservedIP map[uint32]bool

	mu      sync.Mutex
	byMAC   map[string]*lease
	byIP    map[uint32]*lease
	next    uint32
	dirty   bool
	limits  map[string]*rate.Limiter
	saveErr error

	c counters
}

const offerHold = 30 * time.Second

func ip4(ip net.IP) (uint32, bool) {
	v := ip.To4()
	if v == nil {
		return 0, false
	}
	return binary.BigEndian.Uint32(v), true
}

func ipOf(n uint32) net.IP {
	b := make(net.IP, 4)
	binary.BigEndian.PutUint32(b, n)
	return b
}

// New validates cfg and returns a server, with the leases of cfg.LeaseFile
// loaded when it exists.
func New(cfg Config) (*Server, error) {
	if cfg.Policy == nil {
		return nil, errors.New("dhcp: a boot policy is required")
	}
	if cfg.ServerIP.To4() == nil {
		return nil, fmt.Errorf("dhcp: server address %q is not IPv4", cfg.ServerIP)
	}
	if cfg.Boot.BIOS == "" {
		cfg.Boot.BIOS = "undionly.kpxe"
	}
	if cfg.Boot.UEFI == "" {
		cfg.Boot.UEFI = "ipxe.efi"
	}
	if cfg.Boot.ARM64 == "" {
		cfg.Boot.ARM64 = "ipxe-arm64.efi"
	}
	if cfg.LeaseTime <= 0 {
		cfg.LeaseTime = time.Hour
	}
	if cfg.PerMACRate <= 0 {
		cfg.PerMACRate = 10
	}
	if cfg.PerMACBurst <= 0 {
		cfg.PerMACBurst = 20
	}
	s := &Server{
		cfg: cfg, log: cfg.Log, serverIP: cfg.ServerIP.To4(),
		reserved: map[string]Reservation{}, reservedIP: map[uint32]bool{},
		byMAC: map[string]*lease{}, byIP: map[uint32]*lease{}, limits: map[string]*rate.Limiter{},
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	if cfg.Mode == Full {
		var ok1, ok2 bool
		s.start, ok1 = ip4(cfg.PoolStart)
		s.end, ok2 = ip4(cfg.PoolEnd)
		if !ok1 || !ok2 || s.end < s.start {
			return nil, fmt.Errorf("dhcp: pool %v-%v is not an IPv4 range", cfg.PoolStart, cfg.PoolEnd)
		}
		if len(cfg.SubnetMask) != 4 {
			return nil, errors.New("dhcp: full mode needs an IPv4 subnet mask")
		}
		for _, r := range cfg.Reservations {
			n, ok := ip4(r.IP)
			if !ok || len(r.MAC) != 6 {
				return nil, fmt.Errorf("dhcp: reservation %v -> %v is invalid", r.MAC, r.IP)
			}
			s.reserved[r.MAC.String()] = r
			s.reservedIP[n] = true
		}
		s.next = s.start
		if cfg.LeaseFile != "" {
			if err := s.load(); err != nil {
				return nil, err
			}
		}
	}
	return s, nil
}

func (s *Server) load() error {
	b, err := os.ReadFile(s.cfg.LeaseFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("dhcp: read lease file: %w", err)
	}
	var ls []Lease
	if err := json.Unmarshal(b, &ls); err != nil {
		return fmt.Errorf("dhcp: lease file %s: %w", s.cfg.LeaseFile, err)
	}
	now := time.Now()
	for i, l := range ls {
		mac, err := net.ParseMAC(l.MAC)
		n, ok := ip4(net.ParseIP(l.IP))
		if err != nil || !ok {
			return fmt.Errorf("dhcp: lease file %s: entry %d (%s %s) is invalid", s.cfg.LeaseFile, i, l.MAC, l.IP)
		}
		if l.Expires.Before(now) {
			continue
		}
		le := &lease{mac: mac.String(), ip: n, expires: l.Expires}
		s.byMAC[le.mac] = le
		s.byIP[n] = le
	}
	return nil
}

// Leases returns the committed, unexpired leases sorted by address.
func (s *Server) Leases() []Lease {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.leasesLocked()
}

func (s *Server) leasesLocked() []Lease {
	now := time.Now()
	var out []Lease
	for _, l := range s.byMAC {
		if l.offered || l.expires.Before(now) {
			continue
		}
		out = append(out, Lease{MAC: l.mac, IP: ipOf(l.ip).String(), Hostname: s.reserved[l.mac].Hostname, Expires: l.expires.UTC()})
	}
	sort.Slice(out, func(i, j int) bool {
		a, _ := ip4(net.ParseIP(out[i].IP))
		b, _ := ip4(net.ParseIP(out[j].IP))
		return a < b
	})
	return out
}

// Flush writes the leases to the lease file (atomically) if they changed.
func (s *Server) Flush() error {
	if s.cfg.LeaseFile == "" {
		return nil
	}
	s.mu.Lock()
	if !s.dirty {
		s.mu.Unlock()
		return nil
	}
	ls := s.leasesLocked()
	s.dirty = false
	s.mu.Unlock()
	if ls == nil {
		ls = []Lease{}
	}
	b, err := json.MarshalIndent(ls, "", "  ")
	if err != nil {
		return err
	}
	dir := filepath.Dir(s.cfg.LeaseFile)
	tmp, err := os.CreateTemp(dir, ".leases-*")
	if err != nil {
		return fmt.Errorf("dhcp: write lease file %s: %w", s.cfg.LeaseFile, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(b, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("dhcp: write lease file %s: %w", s.cfg.LeaseFile, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("dhcp: sync lease file %s: %w", s.cfg.LeaseFile, err)
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), s.cfg.LeaseFile); err != nil {
		return fmt.Errorf("dhcp: replace lease file %s: %w", s.cfg.LeaseFile, err)
	}
	return nil
}

// Stats returns the counters.
func (s *Server) Stats() Stats {
	c := &s.c
	return Stats{
		Received: c.received.Load(), Malformed: c.malformed.Load(),
		Discovers: c.discovers.Load(), Requests: c.requests.Load(), Releases: c.releases.Load(),
		Declines: c.declines.Load(), Informs: c.informs.Load(),
		Offers: c.offers.Load(), Acks: c.acks.Load(), Naks: c.naks.Load(),
		Ignored: c.ignored.Load(), UnknownArch: c.unknownArch.Load(), PoolExhausted: c.exhausted.Load(),
		RateLimited: c.limited.Load(), PolicyErrors: c.policyErrors.Load(), SendErrors: c.sendErrors.Load(),
		LocalHTTPBoot: c.localHTTP.Load(),
	}
}

// Listen opens a UDP socket on port, bound to iface (SO_BINDTODEVICE) and able
// to broadcast. Unlike server4's sockets it sets neither SO_REUSEADDR nor
// SO_REUSEPORT, so a second DHCP daemon on the same port fails instead of
// silently sharing the packets.
// The socket belongs to the network namespace of the calling thread.
func Listen(iface string, port int) (*net.UDPConn, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.IPPROTO_UDP)
	if err != nil {
		return nil, fmt.Errorf("dhcp: socket: %w", err)
	}
	f := os.NewFile(uintptr(fd), "dhcp")
	defer f.Close()
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_BROADCAST, 1); err != nil {
		return nil, fmt.Errorf("dhcp: SO_BROADCAST: %w", err)
	}
	if iface != "" {
		if err := unix.BindToDevice(fd, iface); err != nil {
			return nil, fmt.Errorf("dhcp: bind to interface %s: %w", iface, err)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Port: port}); err != nil {
		return nil, fmt.Errorf("dhcp: bind port %d on %s: %w", port, iface, err)
	}
	c, err := net.FilePacketConn(f)
	if err != nil {
		return nil, fmt.Errorf("dhcp: %w", err)
	}
	return c.(*net.UDPConn), nil
}

// Serve listens on cfg.Interface (port 67, and 4011 in proxy mode) and serves
// until ctx ends.
func (s *Server) Serve(ctx context.Context) error {
	ports := []int{dhcpv4.ServerPort}
	if s.cfg.Mode == Proxy {
		ports = append(ports, 4011)
	}
	var conns []*net.UDPConn
	for _, p := range ports {
		c, err := Listen(s.cfg.Interface, p)
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			return err
		}
		conns = append(conns, c)
	}
	return s.ServeConns(ctx, conns...)
}

// ServeConns serves on already opened sockets (see Listen) until ctx ends,
// then closes them and flushes the leases.
func (s *Server) ServeConns(ctx context.Context, conns ...*net.UDPConn) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, len(conns))
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errc <- s.serveConn(ctx, c)
		}()
	}
	go func() {
		<-ctx.Done()
		for _, c := range conns {
			c.Close()
		}
	}()
	flushDone := make(chan struct{})
	go func() {
		defer close(flushDone)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if err := s.Flush(); err != nil {
					s.log.Error("dhcp: lease file", "err", err)
				}
			}
		}
	}()
	err := <-errc
	cancel()
	wg.Wait()
	<-flushDone
	if ferr := s.Flush(); ferr != nil && err == nil {
		err = ferr
	}
	if ctx.Err() != nil && errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

func (s *Server) serveConn(ctx context.Context, c *net.UDPConn) error {
	port := c.LocalAddr().(*net.UDPAddr).Port
	buf := make([]byte, 4096)
	for {
		n, peer, err := c.ReadFromUDP(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("dhcp: read on port %d: %w", port, err)
		}
		req, err := dhcpv4.FromBytes(buf[:n])
		s.c.received.Add(1)
		if err != nil {
			s.c.malformed.Add(1)
			s.log.Debug("dhcp: malformed packet", "from", peer, "err", err)
			continue
		}
		reply, dst := s.Handle(ctx, req, port, peer)
		if reply == nil {
			continue
		}
		if _, err := c.WriteToUDP(reply.ToBytes(), dst); err != nil {
			s.c.sendErrors.Add(1)
			s.log.Warn("dhcp: send", "to", dst, "type", reply.MessageType(), "err", err)
		}
	}
}

func (s *Server) allow(mac string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.limits[mac]
	if l == nil {
		if len(s.limits) >= 65536 {
			s.limits = map[string]*rate.Limiter{}
		}
		l = rate.NewLimiter(rate.Limit(s.cfg.PerMACRate), s.cfg.PerMACBurst)
		s.limits[mac] = l
	}
	return l.Allow()
}

func isPXEClass(req *dhcpv4.DHCPv4) (pxeClient, httpClient bool) {
	cls := req.ClassIdentifier()
	return strings.HasPrefix(cls, "PXEClient"), strings.HasPrefix(cls, "HTTPClient")
}

func isIPXE(req *dhcpv4.DHCPv4) bool {
	if v := req.Options.Get(dhcpv4.OptionUserClassInformation); v != nil {
		if string(v) == "iPXE" {
			return true
		}
		for _, u := range req.UserClass() {
			if u == "iPXE" {
				return true
			}
		}
	}
	return false
}

// bootInfo is what goes into a reply for a PXE client.
type bootInfo struct {
	file     string
	tftp     bool // siaddr/option 66 point at our TFTP server
	class    string
	option43 bool
}

// boot decides the boot information for a request, or reports why none
// (false: no answer at all). An empty file with true means: an address (in
// full mode) but nothing to boot.
func (s *Server) boot(ctx context.Context, req *dhcpv4.DHCPv4) (bootInfo, bool) {
	pxeClient, httpClient := isPXEClass(req)
	ipxe := isIPXE(req)
	if !pxeClient && !httpClient && !ipxe {
		return bootInfo{}, false
	}
	var arch uint16
	if archs := req.ClientArch(); len(archs) > 0 {
		arch = uint16(archs[0])
	} else if req.Options.Has(dhcpv4.OptionClientSystemArchitectureType) {
		s.c.unknownArch.Add(1)
		s.log.Warn("dhcp: malformed client architecture, no offer", "mac", req.ClientHWAddr.String())
		return bootInfo{}, false
	}
	fw, ok := pxe.FirmwareOf(arch)
	if !ok {
		s.c.unknownArch.Add(1)
		s.log.Warn("dhcp: unknown client architecture, no offer", "mac", req.ClientHWAddr.String(), "arch", iana.Arch(arch).String())
		return bootInfo{}, false
	}
	m := pxe.Machine{MAC: req.ClientHWAddr, Arch: arch, Firmware: fw, IPXE: ipxe}
	d, err := s.cfg.Policy.Boot(ctx, m)
	if err != nil {
		s.c.policyErrors.Add(1)
		s.log.Error("dhcp: boot policy", "mac", req.ClientHWAddr.String(), "err", err)
		return bootInfo{}, false
	}
	if d.Action == pxe.Ignore {
		s.c.ignored.Add(1)
		s.log.Debug("dhcp: policy ignores machine", "mac", req.ClientHWAddr.String())
		return bootInfo{}, false
	}
	if d.Action == pxe.LocalDisk && fw == pxe.FirmwareUEFIHTTP && !ipxe {
		// UEFI firmware tries HTTP boot after PXE (or instead of it). An
		// offer without a boot URI does not end that attempt: EDK2 keeps
		// asking for one through its DHCP retries, 60 s. A node that boots
		// its disk is offered a URI the server answers with 404, so the
		// attempt fails at once and the firmware moves on to the disk.
		s.c.localHTTP.Add(1)
		s.log.Debug("dhcp: local-disk node, failing HTTP boot offer", "mac", req.ClientHWAddr.String())
		return bootInfo{file: strings.TrimSuffix(s.cfg.HTTPBootURL, "/") + "/" + pxe.LocalDiskFile, class: "HTTPClient"}, true
	}
	bi := bootInfo{class: "PXEClient", option43: true}
	switch {
	case ipxe:
		bi.file = pxe.ScriptURL(s.cfg.ScriptURL, req.ClientHWAddr)
		bi.option43 = false
	case fw == pxe.FirmwareUEFIHTTP:
		f := s.cfg.Boot.UEFI
		if arch == 19 {
			f = s.cfg.Boot.ARM64
		}
		bi.file = strings.TrimSuffix(s.cfg.HTTPBootURL, "/") + "/" + f
		bi.class = "HTTPClient"
		bi.option43 = false
	case fw == pxe.FirmwareBIOS:
		bi.file, bi.tftp = s.cfg.Boot.BIOS, true
	case arch == 11:
		bi.file, bi.tftp = s.cfg.Boot.ARM64, true
	default:
		bi.file, bi.tftp = s.cfg.Boot.UEFI, true
	}
	return bi, true
}

func (s *Server) reply(req *dhcpv4.DHCPv4, mt dhcpv4.MessageType) *dhcpv4.DHCPv4 {
	r := &dhcpv4.DHCPv4{
		OpCode: dhcpv4.OpcodeBootReply, HWType: req.HWType, TransactionID: req.TransactionID,
		Flags: req.Flags, GatewayIPAddr: req.GatewayIPAddr, ClientHWAddr: req.ClientHWAddr,
		ClientIPAddr: net.IPv4zero, YourIPAddr: net.IPv4zero, ServerIPAddr: net.IPv4zero,
		Options: dhcpv4.Options{},
	}
	if r.GatewayIPAddr == nil {
		r.GatewayIPAddr = net.IPv4zero
	}
	r.UpdateOption(dhcpv4.OptMessageType(mt))
	r.UpdateOption(dhcpv4.OptServerIdentifier(s.serverIP))
	if v := req.Options.Get(dhcpv4.OptionRelayAgentInformation); v != nil {
		r.UpdateOption(dhcpv4.OptGeneric(dhcpv4.OptionRelayAgentInformation, v))
	}
	return r
}

func (s *Server) addBoot(r *dhcpv4.DHCPv4, bi bootInfo) {
	if bi.tftp {
		r.ServerIPAddr = s.serverIP
		r.UpdateOption(dhcpv4.OptTFTPServerName(s.serverIP.String()))
	}
	if len(bi.file) < 128 {
		r.BootFileName = bi.file
	}
	r.UpdateOption(dhcpv4.OptBootFileName(bi.file))
	r.UpdateOption(dhcpv4.OptClassIdentifier(bi.class))
	if bi.option43 {
		// PXE_DISCOVERY_CONTROL = 8: use the boot file, no boot server
		// discovery. OVMF refuses a PXEClient offer without option 43.
		r.UpdateOption(dhcpv4.OptGeneric(dhcpv4.OptionVendorSpecificInformation, []byte{6, 1, 8, 255}))
	}
}

// destination picks where a reply goes (RFC 2131 section 4.1).
func destination(req *dhcpv4.DHCPv4, r *dhcpv4.DHCPv4, peer *net.UDPAddr, port int) *net.UDPAddr {
	if port == 4011 && peer != nil {
		return peer
	}
	if g := req.GatewayIPAddr; g != nil && !g.IsUnspecified() {
		return &net.UDPAddr{IP: g, Port: dhcpv4.ServerPort}
	}
	if c := req.ClientIPAddr; c != nil && !c.IsUnspecified() && r.MessageType() != dhcpv4.MessageTypeNak {
		return &net.UDPAddr{IP: c, Port: dhcpv4.ClientPort}
	}
	return &net.UDPAddr{IP: net.IPv4bcast, Port: dhcpv4.ClientPort}
}

// Handle answers one request that arrived on port (67 or 4011) from peer and
// returns the reply with its destination, or nil when there is nothing to
// send. It never panics on malformed input.
func (s *Server) Handle(ctx context.Context, req *dhcpv4.DHCPv4, port int, peer *net.UDPAddr) (*dhcpv4.DHCPv4, *net.UDPAddr) {
	if req.OpCode != dhcpv4.OpcodeBootRequest || len(req.ClientHWAddr) != 6 || req.HWType != iana.HWTypeEthernet {
		s.c.malformed.Add(1)
		return nil, nil
	}
	mac := req.ClientHWAddr.String()
	if !s.allow(mac) {
		if n := s.c.limited.Add(1); n == 1 || n%100 == 0 {
			s.log.Warn("dhcp: rate limit, dropping", "mac", mac, "dropped_total", n)
		}
		return nil, nil
	}
	var r *dhcpv4.DHCPv4
	if s.cfg.Mode == Proxy {
		r = s.handleProxy(ctx, req, port)
	} else {
		r = s.handleFull(ctx, req)
	}
	if r == nil {
		return nil, nil
	}
	return r, destination(req, r, peer, port)
}

func (s *Server) handleProxy(ctx context.Context, req *dhcpv4.DHCPv4, port int) *dhcpv4.DHCPv4 {
	mt := req.MessageType()
	switch {
	case mt == dhcpv4.MessageTypeDiscover && port != 4011:
		s.c.discovers.Add(1)
	case mt == dhcpv4.MessageTypeRequest && port == 4011:
		s.c.requests.Add(1)
	case mt == dhcpv4.MessageTypeRequest || mt == dhcpv4.MessageTypeInform:
		// Requests on 67 go to the site's DHCP server.
		return nil
	default:
		return nil
	}
	bi, ok := s.boot(ctx, req)
	if !ok || bi.file == "" {
		return nil
	}
	var r *dhcpv4.DHCPv4
	if mt == dhcpv4.MessageTypeDiscover {
		r = s.reply(req, dhcpv4.MessageTypeOffer)
		s.c.offers.Add(1)
	} else {
		r = s.reply(req, dhcpv4.MessageTypeAck)
		r.ClientIPAddr = req.ClientIPAddr
		s.c.acks.Add(1)
	}
	bi.class = "PXEClient" // proxyDHCP always answers as PXEClient
	s.addBoot(r, bi)
	return r
}

func (s *Server) handleFull(ctx context.Context, req *dhcpv4.DHCPv4) *dhcpv4.DHCPv4 {
	if g := req.GatewayIPAddr; g != nil && !g.IsUnspecified() {
		n, _ := ip4(g)
		if !s.inSubnet(n) {
			s.c.ignored.Add(1)
			s.log.Warn("dhcp: relayed request from a subnet without a pool", "relay", g, "mac", req.ClientHWAddr.String())
			return nil
		}
	}
	pxeClient, httpClient := isPXEClass(req)
	wantsBoot := pxeClient || httpClient || isIPXE(req)
	var bi bootInfo
	if wantsBoot {
		var ok bool
		if bi, ok = s.boot(ctx, req); !ok {
			return nil
		}
	}
	switch req.MessageType() {
	case dhcpv4.MessageTypeDiscover:
		s.c.discovers.Add(1)
		ip, ok := s.offer(req)
		if !ok {
			return nil
		}
		r := s.reply(req, dhcpv4.MessageTypeOffer)
		r.YourIPAddr = ip
		s.addOptions(r, req)
		if wantsBoot && bi.file != "" {
			s.addBoot(r, bi)
		}
		s.c.offers.Add(1)
		return r
	case dhcpv4.MessageTypeRequest:
		s.c.requests.Add(1)
		if sid := req.ServerIdentifier(); sid != nil && !sid.Equal(s.serverIP) {
			s.dropOffer(req.ClientHWAddr.String())
			return nil // the client took another server's offer
		}
		want := req.RequestedIPAddress()
		if want == nil || want.IsUnspecified() {
			want = req.ClientIPAddr
		}
		ip, ok := s.commit(req.ClientHWAddr.String(), want)
		if !ok {
			n, _ := ip4(want)
			if req.ServerIdentifier() == nil && !s.inSubnet(n) {
				return nil // INIT-REBOOT on another network: stay silent
			}
			s.c.naks.Add(1)
			r := s.reply(req, dhcpv4.MessageTypeNak)
			r.SetBroadcast()
			return r
		}
		r := s.reply(req, dhcpv4.MessageTypeAck)
		r.ClientIPAddr = req.ClientIPAddr
		r.YourIPAddr = ip
		s.addOptions(r, req)
		if wantsBoot && bi.file != "" {
			s.addBoot(r, bi)
		}
		s.c.acks.Add(1)
		return r
	case dhcpv4.MessageTypeRelease:
		s.c.releases.Add(1)
		s.release(req.ClientHWAddr.String(), req.ClientIPAddr)
		return nil
	case dhcpv4.MessageTypeDecline:
		s.c.declines.Add(1)
		s.decline(req.ClientHWAddr.String(), req.RequestedIPAddress())
		return nil
	case dhcpv4.MessageTypeInform:
		s.c.informs.Add(1)
		r := s.reply(req, dhcpv4.MessageTypeAck)
		r.ClientIPAddr = req.ClientIPAddr
		s.addOptions(r, req)
		r.Options.Del(dhcpv4.OptionIPAddressLeaseTime)
		if wantsBoot && bi.file != "" {
			s.addBoot(r, bi)
		}
		s.c.acks.Add(1)
		return r
	}
	s.c.ignored.Add(1)
	return nil
}

func (s *Server) addOptions(r, req *dhcpv4.DHCPv4) {
	c := &s.cfg
	r.UpdateOption(dhcpv4.OptSubnetMask(c.SubnetMask))
	r.UpdateOption(dhcpv4.OptIPAddressLeaseTime(c.LeaseTime))
	r.UpdateOption(dhcpv4.OptRenewTimeValue(c.LeaseTime / 2))
	r.UpdateOption(dhcpv4.OptRebindingTimeValue(c.LeaseTime * 7 / 8))
	if c.Router != nil {
		r.UpdateOption(dhcpv4.OptRouter(c.Router))
	}
	if len(c.DNS) > 0 {
		r.UpdateOption(dhcpv4.OptDNS(c.DNS...))
	}
	if c.Domain != "" {
		r.UpdateOption(dhcpv4.OptDomainName(c.Domain))
	}
	if len(c.NTP) > 0 {
		r.UpdateOption(dhcpv4.OptNTPServers(c.NTP...))
	}
	if c.MTU > 0 {
		r.UpdateOption(dhcpv4.OptGeneric(dhcpv4.OptionInterfaceMTU, []byte{byte(c.MTU >> 8), byte(c.MTU)}))
	}
	if res, ok := s.reserved[req.ClientHWAddr.String()]; ok && res.Hostname != "" {
		r.UpdateOption(dhcpv4.OptHostName(res.Hostname))
	}
}

func (s *Server) inSubnet(n uint32) bool {
	m := binary.BigEndian.Uint32(s.cfg.SubnetMask)
	return n&m == s.start&m
}

func (s *Server) inPool(n uint32) bool { return n >= s.start && n <= s.end }

// free reports whether n can go to mac. Callers hold s.mu.
func (s *Server) freeFor(n uint32, mac string, now time.Time) bool {
	if s.reservedIP[n] {
		r, ok := s.reserved[mac]
		if !ok {
			return false
		}
		rn, _ := ip4(r.IP)
		return rn == n
	}
	l := s.byIP[n]
	return l == nil || l.mac == mac || l.expires.Before(now)
}

func (s *Server) put(mac string, n uint32, exp time.Time, offered bool) {
	if old := s.byMAC[mac]; old != nil && old.ip != n {
		if s.byIP[old.ip] == old {
			delete(s.byIP, old.ip)
		}
	}
	if other := s.byIP[n]; other != nil && other.mac != mac && s.byMAC[other.mac] == other {
		delete(s.byMAC, other.mac)
	}
	l := &lease{mac: mac, ip: n, expires: exp, offered: offered}
	s.byMAC[mac] = l
	s.byIP[n] = l
	if !offered {
		s.dirty = true
	}
}

func (s *Server) offer(req *dhcpv4.DHCPv4) (net.IP, bool) {
	mac := req.ClientHWAddr.String()
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	pick := func(n uint32) net.IP {
		l := s.byMAC[mac]
		if l != nil && l.ip == n && !l.offered {
			return ipOf(n) // keep the committed lease; the REQUEST renews it
		}
		s.put(mac, n, now.Add(offerHold), true)
		return ipOf(n)
	}
	if r, ok := s.reserved[mac]; ok {
		n, _ := ip4(r.IP)
		return pick(n), true
	}
	if l := s.byMAC[mac]; l != nil && s.inPool(l.ip) {
		return pick(l.ip), true
	}
	if n, ok := ip4(req.RequestedIPAddress()); ok && s.inPool(n) && s.freeFor(n, mac, now) {
		return pick(n), true
	}
	size := s.end - s.start + 1
	for i := uint32(0); i < size; i++ {
		n := s.next
		s.next++
		if s.next > s.end || s.next < s.start {
			s.next = s.start
		}
		if s.freeFor(n, mac, now) {
			return pick(n), true
		}
	}
	if c := s.c.exhausted.Add(1); c == 1 || c%100 == 0 {
		s.log.Warn("dhcp: address pool exhausted, no offer", "mac", mac, "pool", fmt.Sprintf("%v-%v", s.cfg.PoolStart, s.cfg.PoolEnd), "exhausted_total", c)
	}
	return nil, false
}

func (s *Server) commit(mac string, want net.IP) (net.IP, bool) {
	n, ok := ip4(want)
	if !ok {
		return nil, false
	}
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if r, ok := s.reserved[mac]; ok {
		rn, _ := ip4(r.IP)
		if rn != n {
			return nil, false
		}
	} else if !s.inPool(n) || !s.freeFor(n, mac, now) {
		return nil, false
	}
	s.put(mac, n, now.Add(s.cfg.LeaseTime), false)
	return ipOf(n), true
}

func (s *Server) dropOffer(mac string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if l := s.byMAC[mac]; l != nil && l.offered {
		delete(s.byMAC, mac)
		if s.byIP[l.ip] == l {
			delete(s.byIP, l.ip)
		}
	}
}

func (s *Server) release(mac string, ip net.IP) {
	n, _ := ip4(ip)
	s.mu.Lock()
	defer s.mu.Unlock()
	if l := s.byMAC[mac]; l != nil && l.ip == n {
		delete(s.byMAC, mac)
		if s.byIP[n] == l {
			delete(s.byIP, n)
		}
		s.dirty = true
	}
}

func (s *Server) decline(mac string, ip net.IP) {
	n, ok := ip4(ip)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.inPool(n) {
		return
	}
	// Someone else uses the address: keep it out of the pool for a lease time.
	if l := s.byMAC[mac]; l != nil && l.ip == n {
		delete(s.byMAC, mac)
	}
	s.byIP[n] = &lease{mac: "declined", ip: n, expires: time.Now().Add(s.cfg.LeaseTime)}
	s.log.Warn("dhcp: address declined by client (in use elsewhere)", "mac", mac, "ip", ip)
}
