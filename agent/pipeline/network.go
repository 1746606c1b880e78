package pipeline

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/insomniacslk/dhcp/dhcpv4/nclient4"
	"github.com/jsimonetti/rtnetlink"
	"golang.org/x/sys/unix"
)

// Lease is the network configuration DHCP gave the boot NIC.
type Lease struct {
	Interface string       // the NIC's name (whatever the kernel called it)
	Address   netip.Prefix // address with prefix length
	Router    netip.Addr   // default gateway; invalid when none
	DNS       []netip.Addr
	Domain    string
	Server    netip.Addr // the DHCP server that answered
}

// FindNIC returns the name of the interface whose MAC is mac, waiting up to
// wait for it to appear (drivers may still be probing). NICs are identified
// by MAC only: names depend on driver load order.
func FindNIC(ctx context.Context, mac net.HardwareAddr, wait time.Duration) (string, error) {
	deadline := time.Now().Add(wait)
	for {
		ifs, err := net.Interfaces()
		if err != nil {
			return "", fmt.Errorf("network: list interfaces: %w", err)
		}
		var seen []string
		for _, i := range ifs {
			if strings.EqualFold(i.HardwareAddr.String(), mac.String()) {
				return i.Name, nil
			}
			if len(i.HardwareAddr) > 0 {
				seen = append(seen, i.Name+"="+i.HardwareAddr.String())
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("network: no interface has MAC %s after %s (interfaces: %s)", mac, wait, strings.Join(seen, ", "))
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("network: waiting for the NIC with MAC %s: %w", mac, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// linkUp sets the interface up and waits up to wait for its carrier.
func linkUp(ctx context.Context, name string, wait time.Duration) error {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return fmt.Errorf("network: %s: %w", name, err)
	}
	c, err := rtnetlink.Dial(nil)
	if err != nil {
		return fmt.Errorf("network: rtnetlink: %w", err)
	}
	defer c.Close()
	if err := c.Link.Set(&rtnetlink.LinkMessage{Family: unix.AF_UNSPEC, Index: uint32(ifi.Index),
		Flags: unix.IFF_UP, Change: unix.IFF_UP}); err != nil {
		return fmt.Errorf("network: set %s up: %w", name, err)
	}
	deadline := time.Now().Add(wait)
	for {
		b, err := os.ReadFile("/sys/class/net/" + name + "/carrier")
		if err == nil && strings.TrimSpace(string(b)) == "1" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("network: %s has no link (carrier) after %s: is the cable in?", name, wait)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("network: waiting for %s's link: %w", name, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// DHCP brings the interface up, asks for a lease with nclient4 (retrying
// with backoff until ctx ends) and configures the address and default
// route. When resolvConf is set, it writes the lease's DNS servers there.
func DHCP(ctx context.Context, name string, resolvConf string, log *slog.Logger) (*Lease, error) {
	if err := linkUp(ctx, name, 30*time.Second); err != nil {
		return nil, err
	}
	var lease *nclient4.Lease
	err := retry(ctx, log, "dhcp on "+name, func() error {
		c, err := nclient4.New(name, nclient4.WithTimeout(4*time.Second), nclient4.WithRetry(2))
		if err != nil {
			return fmt.Errorf("dhcp client on %s: %w", name, err)
		}
		defer c.Close()
		lease, err = c.Request(ctx)
		if err != nil {
			return fmt.Errorf("dhcp on %s: %w", name, err)
		}
		return nil
	}, Backoff{})
	if err != nil {
		return nil, err
	}
	ack := lease.ACK
	l := &Lease{Interface: name, Domain: ack.DomainName()}
	ip, ok := netip.AddrFromSlice(ack.YourIPAddr.To4())
	if !ok || !ip.IsValid() || ip.IsUnspecified() {
		return nil, fmt.Errorf("dhcp on %s: the ACK from %s carries no address", name, ack.ServerIPAddr)
	}
	bits := 24
	if m := ack.SubnetMask(); m != nil {
		bits, _ = m.Size()
	}
	l.Address = netip.PrefixFrom(ip, bits)
	if s, ok := netip.AddrFromSlice(ack.ServerIdentifier().To4()); ok {
		l.Server = s
	}
	if rs := ack.Router(); len(rs) > 0 {
		l.Router, _ = netip.AddrFromSlice(rs[0].To4())
	}
	for _, d := range ack.DNS() {
		if a, ok := netip.AddrFromSlice(d.To4()); ok {
			l.DNS = append(l.DNS, a)
		}
	}
	if err := configure(name, l); err != nil {
		return nil, err
	}
	if resolvConf != "" && len(l.DNS) > 0 {
		if err := writeResolvConf(resolvConf, l); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// configure puts the lease's address on the interface and adds the default
// route.
func configure(name string, l *Lease) error {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return fmt.Errorf("network: %s: %w", name, err)
	}
	c, err := rtnetlink.Dial(nil)
	if err != nil {
		return fmt.Errorf("network: rtnetlink: %w", err)
	}
	defer c.Close()
	ip := net.IP(l.Address.Addr().AsSlice())
	mask := net.CIDRMask(l.Address.Bits(), 32)
	brd := make(net.IP, 4)
	for i := range brd {
		brd[i] = ip[i] | ^mask[i]
	}
	err = c.Address.New(&rtnetlink.AddressMessage{Family: unix.AF_INET, PrefixLength: uint8(l.Address.Bits()),
		Scope: unix.RT_SCOPE_UNIVERSE, Index: uint32(ifi.Index),
		Attributes: &rtnetlink.AddressAttributes{Address: ip, Local: ip, Broadcast: brd}})
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("network: add %s to %s: %w", l.Address, name, err)
	}
	if !l.Router.IsValid() {
		return nil
	}
	err = c.Route.Replace(&rtnetlink.RouteMessage{Family: unix.AF_INET, Table: unix.RT_TABLE_MAIN,
		Protocol: unix.RTPROT_DHCP, Scope: unix.RT_SCOPE_UNIVERSE, Type: unix.RTN_UNICAST,
		Attributes: rtnetlink.RouteAttributes{Gateway: net.IP(l.Router.AsSlice()), OutIface: uint32(ifi.Index)}})
	if err != nil {
		return fmt.Errorf("network: default route via %s on %s: %w", l.Router, name, err)
	}
	return nil
}

func writeResolvConf(path string, l *Lease) error {
	var b strings.Builder
	if l.Domain != "" {
		fmt.Fprintf(&b, "search %s\n", l.Domain)
	}
	for _, d := range l.DNS {
		fmt.Fprintf(&b, "nameserver %s\n", d)
	}
	if err := writeAtomic(path, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("network: %w", err)
	}
	return nil
}

// writeAtomic writes data to path through a temporary file and a rename.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+"-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
