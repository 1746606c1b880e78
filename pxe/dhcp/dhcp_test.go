package dhcp

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/esir-project/esir/pxe"
	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/iana"
)

var (
	srvIP   = net.IPv4(198, 18, 0, 1).To4()
	known   = net.HardwareAddr{0x52, 0x54, 0, 0x12, 0x34, 0x56}
	unknown = net.HardwareAddr{0x52, 0x54, 0, 0x99, 0x99, 0x99}
)

func testPolicy() *pxe.StaticPolicy {
	return &pxe.StaticPolicy{
		Kernel: "http://198.18.0.1/k", Initrd: "http://198.18.0.1/i",
		Nodes: map[string]pxe.Action{known.String(): pxe.Install},
	}
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newServer(t testing.TB, mode Mode, mod func(*Config)) *Server {
	t.Helper()
	cfg := Config{
		Mode: mode, ServerIP: srvIP,
		PoolStart: net.IPv4(198, 18, 0, 100), PoolEnd: net.IPv4(198, 18, 0, 199),
		SubnetMask: net.CIDRMask(24, 32), Router: srvIP, DNS: []net.IP{srvIP},
		Domain: "lab.test", NTP: []net.IP{srvIP}, MTU: 1400, LeaseTime: 10 * time.Minute,
		ScriptURL: "http://198.18.0.1:8080/pxe/boot.ipxe", HTTPBootURL: "http://198.18.0.1:8080/pxe/files",
		Policy: testPolicy(), Log: quiet(),
	}
	if mod != nil {
		mod(&cfg)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func discover(t testing.TB, mac net.HardwareAddr, mods ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
	t.Helper()
	d, err := dhcpv4.NewDiscovery(mac, mods...)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func pxeMods(arch iana.Arch) []dhcpv4.Modifier {
	return []dhcpv4.Modifier{
		dhcpv4.WithOption(dhcpv4.OptClassIdentifier("PXEClient:Arch:00000:UNDI:002001")),
		dhcpv4.WithOption(dhcpv4.OptClientArch(arch)),
	}
}

func TestBootFileByArchitecture(t *testing.T) {
	ipxeMods := append(pxeMods(iana.INTEL_X86PC), dhcpv4.WithGeneric(dhcpv4.OptionUserClassInformation, []byte("iPXE")))
	tests := []struct {
		name     string
		mac      net.HardwareAddr
		mods     []dhcpv4.Modifier
		wantNil  bool
		file     string
		class    string
		siaddr   bool
		option43 bool
	}{
		{name: "bios", mac: known, mods: pxeMods(iana.INTEL_X86PC), file: "undionly.kpxe", class: "PXEClient", siaddr: true, option43: true},
		{name: "uefi x64", mac: known, mods: pxeMods(iana.EFI_X86_64), file: "ipxe.efi", class: "PXEClient", siaddr: true, option43: true},
		{name: "uefi bc", mac: known, mods: pxeMods(iana.EFI_BC), file: "ipxe.efi", class: "PXEClient", siaddr: true, option43: true},
		{name: "arm64", mac: known, mods: pxeMods(iana.EFI_ARM64), file: "ipxe-arm64.efi", class: "PXEClient", siaddr: true, option43: true},
		{name: "uefi http", mac: known, mods: []dhcpv4.Modifier{
			dhcpv4.WithOption(dhcpv4.OptClassIdentifier("HTTPClient:Arch:00016")),
			dhcpv4.WithOption(dhcpv4.OptClientArch(iana.EFI_X86_64_HTTP))},
			file: "http://198.18.0.1:8080/pxe/files/ipxe.efi", class: "HTTPClient"},
		{name: "ipxe gets script", mac: known, mods: ipxeMods, file: "http://198.18.0.1:8080/pxe/boot.ipxe?mac=52:54:00:12:34:56", class: "PXEClient"},
		{name: "unknown arch", mac: known, mods: pxeMods(iana.EFI_IA32), wantNil: true},
		{name: "unknown mac, no discovery", mac: unknown, mods: pxeMods(iana.INTEL_X86PC), wantNil: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newServer(t, Full, nil)
			r, dst := s.Handle(context.Background(), discover(t, tt.mac, tt.mods...), 67, nil)
			if tt.wantNil {
				if r != nil {
					t.Fatalf("got a reply: %v", r.Summary())
				}
				return
			}
			if r == nil {
				t.Fatal("no reply")
			}
			if r.MessageType() != dhcpv4.MessageTypeOffer {
				t.Fatalf("type %v", r.MessageType())
			}
			if got := r.BootFileNameOption(); got != tt.file {
				t.Errorf("option 67 %q, want %q", got, tt.file)
			}
			if r.BootFileName != tt.file {
				t.Errorf("file field %q, want %q", r.BootFileName, tt.file)
			}
			if got := r.ClassIdentifier(); got != tt.class {
				t.Errorf("option 60 %q, want %q", got, tt.class)
			}
			if tt.siaddr != r.ServerIPAddr.Equal(srvIP) {
				t.Errorf("siaddr %v", r.ServerIPAddr)
			}
			if got := r.Options.Get(dhcpv4.OptionVendorSpecificInformation); tt.option43 != bytes.Equal(got, []byte{6, 1, 8, 255}) {
				t.Errorf("option 43 %x", got)
			}
			if !dst.IP.Equal(net.IPv4bcast) || dst.Port != 68 {
				t.Errorf("destination %v", dst)
			}
		})
	}
}

func TestUnknownArchitectureCounted(t *testing.T) {
	s := newServer(t, Full, nil)
	s.Handle(context.Background(), discover(t, known, pxeMods(iana.Arch(42))...), 67, nil)
	if got := s.Stats().UnknownArch; got != 1 {
		t.Fatalf("UnknownArch = %d", got)
	}
}

func TestDiscoveryBootsUnknownMACIntoInventory(t *testing.T) {
	s := newServer(t, Full, func(c *Config) {
		p := testPolicy()
		p.Discovery = true
		c.Policy = p
	})
	r, _ := s.Handle(context.Background(), discover(t, unknown, pxeMods(iana.INTEL_X86PC)...), 67, nil)
	if r == nil || r.BootFileNameOption() != "undionly.kpxe" {
		t.Fatalf("unknown MAC with discovery on got %v", r)
	}
}

func dora(t *testing.T, s *Server, mac net.HardwareAddr, mods ...dhcpv4.Modifier) *dhcpv4.DHCPv4 {
	t.Helper()
	ctx := context.Background()
	offer, _ := s.Handle(ctx, discover(t, mac, mods...), 67, nil)
	if offer == nil {
		t.Fatalf("%s: no offer", mac)
	}
	req, err := dhcpv4.NewRequestFromOffer(offer, mods...)
	if err != nil {
		t.Fatal(err)
	}
	ack, _ := s.Handle(ctx, req, 67, nil)
	if ack == nil || ack.MessageType() != dhcpv4.MessageTypeAck {
		t.Fatalf("%s: no ACK: %v", mac, ack)
	}
	if !ack.YourIPAddr.Equal(offer.YourIPAddr) {
		t.Fatalf("ACK %v differs from offer %v", ack.YourIPAddr, offer.YourIPAddr)
	}
	return ack
}

func TestFullModeOptionsLeasesAndReservations(t *testing.T) {
	leaseFile := filepath.Join(t.TempDir(), "leases.json")
	res := net.HardwareAddr{0x52, 0x54, 0, 0, 0, 7}
	mod := func(c *Config) {
		c.LeaseFile = leaseFile
		c.Reservations = []Reservation{{MAC: res, IP: net.IPv4(198, 18, 0, 150), Hostname: "node07"}}
	}
	s := newServer(t, Full, mod)
	a := dora(t, s, net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1})
	if got := a.YourIPAddr.String(); got != "198.18.0.100" {
		t.Errorf("first lease %s", got)
	}
	if a.SubnetMask().String() != "ffffff00" || !a.Router()[0].Equal(srvIP) || !a.DNS()[0].Equal(srvIP) ||
		a.DomainName() != "lab.test" || !a.NTPServers()[0].Equal(srvIP) || a.IPAddressLeaseTime(0) != 10*time.Minute {
		t.Errorf("options: %s", a.Summary())
	}
	if mtu := a.Options.Get(dhcpv4.OptionInterfaceMTU); !bytes.Equal(mtu, []byte{0x05, 0x78}) {
		t.Errorf("MTU option %x", mtu)
	}
	r := dora(t, s, res)
	if r.YourIPAddr.String() != "198.18.0.150" || r.HostName() != "node07" {
		t.Errorf("reservation got %s %q", r.YourIPAddr, r.HostName())
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	// A restarted server keeps the leases: the same client gets the same
	// address and a new one does not get it.
	s2 := newServer(t, Full, mod)
	if got := len(s2.Leases()); got != 2 {
		t.Fatalf("reloaded %d leases, want 2", got)
	}
	b := dora(t, s2, net.HardwareAddr{0x52, 0x54, 0, 0, 0, 2})
	if b.YourIPAddr.String() == "198.18.0.100" {
		t.Error("a reloaded lease was handed to another client")
	}
	again := dora(t, s2, net.HardwareAddr{0x52, 0x54, 0, 0, 0, 1})
	if again.YourIPAddr.String() != "198.18.0.100" {
		t.Errorf("client lost its lease across restart: %s", again.YourIPAddr)
	}
}

func TestRequestForForeignAddressIsNaked(t *testing.T) {
	s := newServer(t, Full, nil)
	req, err := dhcpv4.NewDiscovery(known, dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest),
		dhcpv4.WithOption(dhcpv4.OptRequestedIPAddress(net.IPv4(198, 18, 0, 20))),
		dhcpv4.WithOption(dhcpv4.OptServerIdentifier(srvIP)))
	if err != nil {
		t.Fatal(err)
	}
	r, _ := s.Handle(context.Background(), req, 67, nil)
	if r == nil || r.MessageType() != dhcpv4.MessageTypeNak {
		t.Fatalf("want NAK, got %v", r)
	}
}

func TestRelayedRequestAnsweredToRelay(t *testing.T) {
	s := newServer(t, Full, nil)
	relay := net.IPv4(198, 18, 0, 254).To4()
	d := discover(t, known, dhcpv4.WithRelay(relay))
	r, dst := s.Handle(context.Background(), d, 67, &net.UDPAddr{IP: relay, Port: 67})
	if r == nil {
		t.Fatal("no reply")
	}
	if !dst.IP.Equal(relay) || dst.Port != 67 || !r.GatewayIPAddr.Equal(relay) {
		t.Fatalf("reply to %v giaddr %v, want the relay %v:67", dst, r.GatewayIPAddr, relay)
	}
	// A relay on a subnet without a pool gets nothing.
	d2 := discover(t, known, dhcpv4.WithRelay(net.IPv4(198, 19, 5, 1)))
	if r, _ := s.Handle(context.Background(), d2, 67, nil); r != nil {
		t.Fatalf("answered a relay without pool: %v", r.Summary())
	}
}

func TestPoolExhaustionBounded(t *testing.T) {
	s := newServer(t, Full, func(c *Config) { c.PoolEnd = net.IPv4(198, 18, 0, 101) })
	for i := byte(1); i <= 3; i++ {
		r, _ := s.Handle(context.Background(), discover(t, net.HardwareAddr{2, 0, 0, 0, 0, i}), 67, nil)
		if (r == nil) != (i == 3) {
			t.Fatalf("client %d: reply %v", i, r)
		}
	}
	if s.Stats().PoolExhausted != 1 {
		t.Fatalf("PoolExhausted = %d", s.Stats().PoolExhausted)
	}
}

func TestFloodFromOneMACBounded(t *testing.T) {
	s := newServer(t, Full, func(c *Config) { c.PerMACRate, c.PerMACBurst = 1, 5 })
	answered := 0
	for i := 0; i < 200; i++ {
		if r, _ := s.Handle(context.Background(), discover(t, known), 67, nil); r != nil {
			answered++
		}
	}
	if answered > 6 || s.Stats().RateLimited < 190 {
		t.Fatalf("answered %d of 200, rate-limited %d", answered, s.Stats().RateLimited)
	}
	// Another MAC is unaffected.
	if r, _ := s.Handle(context.Background(), discover(t, unknown), 67, nil); r == nil {
		t.Fatal("second MAC starved by the first one's flood")
	}
}

func TestProxyMode(t *testing.T) {
	s := newServer(t, Proxy, nil)
	ctx := context.Background()
	// Plain DHCP clients are the site server's business.
	if r, _ := s.Handle(ctx, discover(t, known), 67, nil); r != nil {
		t.Fatalf("proxy answered a non-PXE client: %v", r.Summary())
	}
	offer, dst := s.Handle(ctx, discover(t, known, pxeMods(iana.EFI_X86_64)...), 67, nil)
	if offer == nil || offer.MessageType() != dhcpv4.MessageTypeOffer {
		t.Fatalf("no proxy offer: %v", offer)
	}
	if !offer.YourIPAddr.IsUnspecified() || offer.Options.Has(dhcpv4.OptionIPAddressLeaseTime) {
		t.Errorf("proxy offer carries an address: %s", offer.Summary())
	}
	if offer.BootFileNameOption() != "ipxe.efi" || offer.ClassIdentifier() != "PXEClient" || !dst.IP.Equal(net.IPv4bcast) {
		t.Errorf("proxy offer %s to %v", offer.Summary(), dst)
	}
	// The boot-server request on 4011 is answered to the sender.
	client := net.IPv4(198, 18, 0, 50).To4()
	req, err := dhcpv4.NewDiscovery(known, append(pxeMods(iana.EFI_X86_64),
		dhcpv4.WithMessageType(dhcpv4.MessageTypeRequest), dhcpv4.WithClientIP(client))...)
	if err != nil {
		t.Fatal(err)
	}
	peer := &net.UDPAddr{IP: client, Port: 68}
	ack, dst := s.Handle(ctx, req, 4011, peer)
	if ack == nil || ack.MessageType() != dhcpv4.MessageTypeAck || ack.BootFileNameOption() != "ipxe.efi" || dst != peer {
		t.Fatalf("4011 request: %v to %v", ack, dst)
	}
	// A REQUEST on 67 belongs to the site's server.
	if r, _ := s.Handle(ctx, req, 67, nil); r != nil {
		t.Fatalf("proxy answered a REQUEST on 67: %v", r.Summary())
	}
}

func TestListenRefusesSecondDaemon(t *testing.T) {
	c, err := Listen("", 0)
	if err != nil {
		t.Skipf("cannot open UDP socket: %v", err)
	}
	defer c.Close()
	port := c.LocalAddr().(*net.UDPAddr).Port
	if c2, err := Listen("", port); err == nil {
		c2.Close()
		t.Fatal("second listener on the same port succeeded (SO_REUSEPORT?)")
	}
}

func FuzzHandle(f *testing.F) {
	for _, mods := range [][]dhcpv4.Modifier{nil, pxeMods(iana.INTEL_X86PC), pxeMods(iana.EFI_ARM64_HTTP),
		append(pxeMods(iana.EFI_X86_64), dhcpv4.WithGeneric(dhcpv4.OptionUserClassInformation, []byte("iPXE")))} {
		d := discover(f, known, mods...)
		f.Add(d.ToBytes(), uint8(0))
		d.UpdateOption(dhcpv4.OptMessageType(dhcpv4.MessageTypeRequest))
		d.UpdateOption(dhcpv4.OptRequestedIPAddress(net.IPv4(198, 18, 0, 100)))
		f.Add(d.ToBytes(), uint8(1))
	}
	full := newServer(f, Full, func(c *Config) { c.PerMACRate = 1e9; c.PerMACBurst = 1 << 30 })
	proxy := newServer(f, Proxy, func(c *Config) { c.PerMACRate = 1e9; c.PerMACBurst = 1 << 30 })
	f.Fuzz(func(t *testing.T, data []byte, sel uint8) {
		req, err := dhcpv4.FromBytes(data)
		if err != nil {
			return
		}
		s, port := full, 67
		if sel&1 == 1 {
			s = proxy
		}
		if sel&2 == 2 {
			port = 4011
		}
		r, dst := s.Handle(context.Background(), req, port, &net.UDPAddr{IP: net.IPv4(198, 18, 0, 9), Port: 68})
		if r != nil {
			if dst == nil {
				t.Fatal("reply without destination")
			}
			if _, err := dhcpv4.FromBytes(r.ToBytes()); err != nil {
				t.Fatalf("reply does not parse: %v", err)
			}
		}
	})
}

// A node that boots its own disk: firmware PXE still gets iPXE (whose script
// says exit), and the UEFI HTTP boot attempt that follows gets a boot URI
// that is not served, so it fails at once and the firmware goes on to the
// disk (without a URI, EDK2 would keep asking for 60 s).
func TestLocalDiskNodeHTTPBootFailsFast(t *testing.T) {
	local := func(c *Config) {
		c.Policy = &pxe.StaticPolicy{Kernel: "http://198.18.0.1/k", Initrd: "http://198.18.0.1/i",
			Nodes: map[string]pxe.Action{known.String(): pxe.LocalDisk}}
	}
	httpMods := []dhcpv4.Modifier{
		dhcpv4.WithOption(dhcpv4.OptClassIdentifier("HTTPClient:Arch:00016")),
		dhcpv4.WithOption(dhcpv4.OptClientArch(iana.EFI_X86_64_HTTP)),
	}
	s := newServer(t, Full, local)
	r, _ := s.Handle(context.Background(), discover(t, known, httpMods...), 67, nil)
	if r == nil || r.MessageType() != dhcpv4.MessageTypeOffer || r.YourIPAddr.IsUnspecified() {
		t.Fatalf("full mode: want an address offer, got %v", r)
	}
	want := "http://198.18.0.1:8080/pxe/files/" + pxe.LocalDiskFile
	if f := r.BootFileNameOption(); f != want || r.ClassIdentifier() != "HTTPClient" {
		t.Fatalf("full mode: local-disk node offered HTTP boot %q class %q, want %q class HTTPClient", f, r.ClassIdentifier(), want)
	}
	if s.Stats().LocalHTTPBoot != 1 {
		t.Fatalf("LocalHTTPBoot = %d", s.Stats().LocalHTTPBoot)
	}
	r, _ = s.Handle(context.Background(), discover(t, known, pxeMods(iana.EFI_X86_64)...), 67, nil)
	if r == nil || r.BootFileNameOption() != "ipxe.efi" {
		t.Fatalf("firmware PXE of a local-disk node: want ipxe.efi, got %v", r)
	}
	p := newServer(t, Proxy, local)
	if r, _ := p.Handle(context.Background(), discover(t, known, httpMods...), 67, nil); r == nil || r.BootFileNameOption() != want {
		t.Fatalf("proxy mode: local-disk node's HTTP boot: want an offer of %q, got %v", want, r)
	}
}
