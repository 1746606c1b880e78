package lab

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/esir-project/esir/server/cluster"
	"github.com/esir-project/esir/ssi"
	"gopkg.in/yaml.v3"
)

func TestClusterDefinition(t *testing.T) {
	nodes, err := Plan("lab", 3, FirmwareMixed, HardwareMixed, DefaultDiskBytes)
	if err != nil {
		t.Fatal(err)
	}
	def, err := ClusterDefinition("lab", nodes, "")
	if err != nil {
		t.Fatal(err)
	}
	// What the server reads back is what lab up wrote.
	b, err := yaml.Marshal(def)
	if err != nil {
		t.Fatal(err)
	}
	got, warn, err := ssi.Parse(b)
	if err != nil {
		t.Fatalf("the server would refuse the definition: %v\n%s", err, b)
	}
	if len(warn) != 1 || !strings.Contains(warn[0], "STONITH is DISABLED") {
		t.Errorf("warnings %q, want only fencing's", warn)
	}
	if got.CoreSize != 3 || !got.Profile.Corosync || !got.Profile.Pacemaker || !got.Profile.Keepalived || !got.Profile.Chrony || got.Profile.Fencing {
		t.Errorf("definition %+v", got)
	}
	// Every node is a real server and a director holds the VIP; the
	// directors' IPVS picks by source address.
	s := ssi.NewState()
	for i, n := range nodes {
		if _, _, err := s.Join(n.Name, netip.MustParseAddr(fmt.Sprintf("198.18.0.%d", 100+i)), got.CoreSize); err != nil {
			t.Fatal(err)
		}
	}
	keys, err := ssi.LoadKeys(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		bd, err := ssi.Render(got, s, keys, n.Name)
		if err != nil {
			t.Fatalf("render %s: %v", n.Name, err)
		}
		if len(bd.LoopbackVIPs) != 1 || bd.LoopbackVIPs[0].String() != "198.18.0.50" {
			t.Errorf("%s: loopback VIPs %v", n.Name, bd.LoopbackVIPs)
		}
		var conf string
		for _, f := range bd.Files {
			if f.Path == "/etc/keepalived/keepalived.conf" {
				conf = string(f.Data)
			}
		}
		for _, want := range []string{"interface eth0", "virtual_router_id 51", "lb_algo sh", "lb_kind DR", "real_server 198.18.0.102 80"} {
			if !strings.Contains(conf, want) {
				t.Errorf("%s: keepalived.conf lacks %q:\n%s", n.Name, want, conf)
			}
		}
	}

	one, err := ClusterDefinition("lab", nodes[:1], "rr")
	if err != nil || one.CoreSize != 1 || one.VIPs[0].Services[0].Scheduler != "rr" {
		t.Errorf("one node, rr: %+v, %v", one, err)
	}
	if _, err := ClusterDefinition("lab", nodes, "fastest"); err == nil {
		t.Error("an unknown scheduler was accepted")
	}
}

func TestClusterReady(t *testing.T) {
	m := func(name string, st cluster.State) cluster.Member { return cluster.Member{Name: name, State: st} }
	tests := []struct {
		name string
		s    *cluster.Snapshot
		want bool
	}{
		{"nil", nil, false},
		{"quorate, all enrolled", &cluster.Snapshot{Quorate: true, Members: []cluster.Member{m("a", cluster.Enrolled), m("b", cluster.Enrolled)}}, true},
		{"not quorate", &cluster.Snapshot{Members: []cluster.Member{m("a", cluster.Enrolled), m("b", cluster.Enrolled)}}, false},
		{"one joining", &cluster.Snapshot{Quorate: true, Members: []cluster.Member{m("a", cluster.Enrolled), m("b", cluster.Joining)}}, false},
		{"one missing", &cluster.Snapshot{Quorate: true, Members: []cluster.Member{m("a", cluster.Enrolled)}}, false},
	}
	for _, tt := range tests {
		if got := ClusterReady(tt.s, 2); got != tt.want {
			t.Errorf("%s: ClusterReady = %v, want %v", tt.name, got, tt.want)
		}
	}
}
