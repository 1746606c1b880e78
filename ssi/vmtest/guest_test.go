package vmtest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// dialNS opens a TCP connection to addr from inside network namespace ns: the
// socket is made on an OS thread that entered ns, so it belongs to ns while
// the test process stays where it is. The thread goes back to the test's own
// namespace before it is unlocked. It must not end instead: QEMU, started
// with a parent-death signal, dies with the thread that forked it, and a
// thread that ends locked may be that thread (the Go scheduler reuses them).
func dialNS(ctx context.Context, ns, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		own, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("own network namespace: %w", err)}
			return
		}
		defer own.Close()
		f, err := os.Open(filepath.Join("/run/netns", ns))
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("network namespace %s: %w", ns, err)}
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: fmt.Errorf("enter network namespace %s: %w", ns, err)}
			return
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if unix.Setns(int(own.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

// guestRunner runs commands in a guest through its control shell; it is the
// ssi/enroll Runner of a node that is a QEMU guest. Connections start in the
// client namespace ns.
type guestRunner struct {
	ns   string
	addr netip.AddrPort
}

// shQuote quotes s for sh.
func shQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// Run runs name with args in the guest and returns its combined output. A
// command that does not finish within 30 s (or ctx) fails.
func (g guestRunner) Run(ctx context.Context, name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmdline := shQuote(guestPath(name))
	for _, a := range args {
		cmdline += " " + shQuote(a)
	}
	wrap := func(err error) error {
		return fmt.Errorf("guest %s: %s %s: %w", g.addr.Addr(), name, strings.Join(args, " "), err)
	}
	c, err := dialNS(ctx, g.ns, g.addr.String())
	if err != nil {
		return nil, wrap(err)
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	c.SetDeadline(dl)
	// The shell reads its script from the connection: commands get
	// /dev/null as stdin so they cannot eat the rest of it. Daemons that
	// fork (keepalived, httpd) reopen their stdio on /dev/null, so the
	// connection ends when the shell does.
	script := cmdline + " </dev/null 2>&1\necho \"ESIR-RC=$?\"\n"
	if _, err := io.WriteString(c, script); err != nil {
		return nil, wrap(err)
	}
	c.(*net.TCPConn).CloseWrite()
	out, err := io.ReadAll(c)
	if err != nil {
		return out, wrap(err)
	}
	i := bytes.LastIndex(out, []byte("ESIR-RC="))
	if i < 0 {
		return out, wrap(fmt.Errorf("no exit status in %q", out))
	}
	body, rc := out[:i], out[i+len("ESIR-RC="):]
	code, err := strconv.Atoi(strings.TrimSpace(string(rc)))
	if err == nil && code != 0 {
		err = fmt.Errorf("exit status %d: %s", code, bytes.TrimSpace(body))
	}
	if err != nil {
		return body, wrap(err)
	}
	return body, nil
}

// guestPath returns the guest's path of a command that was copied from the
// host (hostBinaries), and other names as they are. Debian's busybox-static
// sh runs its own applet for every name it has, whatever PATH says: without
// the path, `mount /home` would be busybox's mount, which mounts an nfs4
// fstab line without mount.nfs4 (and as NFSv4.0), unlike a Debian node.
func guestPath(name string) string {
	if strings.Contains(name, "/") {
		return name
	}
	for _, b := range hostBinaries {
		if path.Base(b.dst) == name {
			return "/" + b.dst
		}
	}
	return name
}

// virtualServers parses `ipvsadm -Ln`: each virtual service ("TCP
// 198.18.0.100:80") with its real servers' addresses, in listed order.
func virtualServers(out []byte) map[string][]netip.AddrPort {
	vs := map[string][]netip.AddrPort{}
	cur := ""
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 2 && (f[0] == "TCP" || f[0] == "UDP"):
			cur = f[0] + " " + f[1]
			vs[cur] = nil
		case len(f) >= 2 && f[0] == "->" && cur != "":
			if ap, err := netip.ParseAddrPort(f[1]); err == nil {
				vs[cur] = append(vs[cur], ap)
			}
		}
	}
	return vs
}

// client asks the VIP's service who answers, over a new connection each
// time, from the client namespace.
type client struct {
	http *http.Client
	url  string
}

func newClient(ns string, vip netip.AddrPort) *client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return dialNS(ctx, ns, addr)
		},
		DisableKeepAlives: true,
	}
	return &client{http: &http.Client{Transport: tr, Timeout: 5 * time.Second}, url: "http://" + vip.String() + "/"}
}

// who makes one connection and returns the answering real server's name.
func (c *client) who(ctx context.Context) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.url, nil)
	if err != nil {
		return "", err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: %s", c.url, resp.Status)
	}
	return strings.TrimSpace(string(b)), nil
}

// spread makes n connections one after the other and counts the answers by
// real server; every connection must be answered.
func (c *client) spread(ctx context.Context, n int) (map[string]int, error) {
	counts := map[string]int{}
	for i := range n {
		name, err := c.who(ctx)
		if err != nil {
			return counts, fmt.Errorf("connection %d of %d: %w", i+1, n, err)
		}
		counts[name]++
	}
	return counts, nil
}
