package enroll

import (
	"bufio"
	"bytes"
	"context"
	"strconv"
	"strings"
)

// IPVSEntry is one real server of a virtual service in a director's IPVS
// table.
type IPVSEntry struct {
	Service  string `json:"service"` // "TCP 198.18.0.100:80 wlc"
	Real     string `json:"real"`    // "198.18.0.3:80"
	Forward  string `json:"forward"` // Route (direct routing), Masq, Tunnel, Local
	Weight   int    `json:"weight"`
	Active   int    `json:"active"`   // active connections
	Inactive int    `json:"inactive"` // inactive connections
}

// IPVS reads the node's IPVS table (`ipvsadm -Ln`). A node without IPVS
// (no ip_vs module, no ipvsadm) has an empty table and no error: the table is
// informative; the VIP checks are what decide membership.
func (n *Node) IPVS(ctx context.Context) []IPVSEntry {
	out, err := n.Run.Run(ctx, "ipvsadm", "-Ln")
	if err != nil {
		return nil
	}
	return parseIPVS(out)
}

// parseIPVS reads `ipvsadm -Ln`:
//
//	IP Virtual Server version 1.2.1 (size=4096)
//	Prot LocalAddress:Port Scheduler Flags
//	  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
//	TCP  198.18.0.100:80 wlc
//	  -> 198.18.0.3:80                Route   1      0          0
func parseIPVS(out []byte) []IPVSEntry {
	var es []IPVSEntry
	svc := ""
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 3 && (f[0] == "TCP" || f[0] == "UDP" || f[0] == "SCTP" || f[0] == "FWM"):
			svc = strings.Join(f[:3], " ")
		case len(f) == 6 && f[0] == "->" && svc != "" && f[1] != "RemoteAddress:Port":
			w, err1 := strconv.Atoi(f[3])
			a, err2 := strconv.Atoi(f[4])
			i, err3 := strconv.Atoi(f[5])
			if err1 != nil || err2 != nil || err3 != nil {
				continue
			}
			es = append(es, IPVSEntry{Service: svc, Real: f[1], Forward: f[2], Weight: w, Active: a, Inactive: i})
		}
	}
	return es
}
