package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/esir-project/esir/server/cluster"
)

// TestWriteIPVS prints the IPVS table of the member holding the VIP only: a
// leaving director's last view, still listing its table, is left out.
func TestWriteIPVS(t *testing.T) {
	view := func(v cluster.View) json.RawMessage {
		data, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	table := []cluster.IPVSEntry{{Service: "TCP 198.18.0.50:80 wlc", Real: "198.18.0.101:80", Weight: 1, Active: 3, Inactive: 7}}
	s := &cluster.Snapshot{
		Members: []cluster.Member{
			{Name: "node01", State: cluster.Leaving, View: view(cluster.View{VIPs: []string{"198.18.0.50"}, IPVS: table})},
			{Name: "node02", State: cluster.Enrolled, View: view(cluster.View{VIPs: []string{"198.18.0.50"}, IPVS: table})},
			{Name: "node03", State: cluster.Enrolled},
		},
		VIPHolders: map[string][]string{"198.18.0.50": {"node02"}},
	}
	var b strings.Builder
	writeIPVS(&b, s)
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "IPVS ON") ||
		strings.Join(strings.Fields(lines[1]), " ") != "node02 TCP 198.18.0.50:80 wlc 198.18.0.101:80 1 3 7" {
		t.Fatalf("IPVS table:\n%s\nwant a header and node02's one real server", b.String())
	}
	b.Reset()
	s.VIPHolders = nil
	if writeIPVS(&b, s); b.Len() != 0 {
		t.Errorf("no VIP holder, yet:\n%s", b.String())
	}
}
