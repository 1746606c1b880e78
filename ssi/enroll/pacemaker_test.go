package enroll

import (
	"context"
	"encoding/xml"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/ssi"
)

func TestParseCIB(t *testing.T) {
	c, err := parseCIB(fixture(t, "cib-remote.xml"))
	if err != nil {
		t.Fatal(err)
	}
	if c.stonith != "false" {
		t.Errorf("stonith-enabled %q, want false", c.stonith)
	}
	if len(c.remotes) != 1 || c.remotes["r1"].server != "198.18.0.4" {
		t.Errorf("remotes %+v, want r1 at 198.18.0.4", c.remotes)
	}
	var names []string
	for _, nd := range c.knownNodes(crmStatus{}) {
		names = append(names, nd.Name+"="+nd.ID)
	}
	if !slices.Equal(names, []string{"p1=1", "p2=2", "p3=3", "r1=r1"}) {
		t.Errorf("known nodes %v", names)
	}
}

func TestRemoteXML(t *testing.T) {
	m := ssi.Member{ID: 7, Name: "r7", Addr: netip.MustParseAddr("198.18.0.7"), Role: ssi.Remote}
	x := remoteXML(m)
	c, err := parseCIB([]byte("<cib><configuration><resources>" + x + "</resources></configuration></cib>"))
	if err != nil || c.remotes["r7"].server != "198.18.0.7" {
		t.Fatalf("remoteXML %s reads back as %+v, %v", x, c.remotes, err)
	}
	var p struct {
		Attrs []struct {
			Name  string `xml:"name,attr"`
			Value string `xml:"value,attr"`
		} `xml:"instance_attributes>nvpair"`
		Ops []struct {
			Name     string `xml:"name,attr"`
			Interval string `xml:"interval,attr"`
		} `xml:"operations>op"`
	}
	if err := xml.Unmarshal([]byte(x), &p); err != nil {
		t.Fatal(err)
	}
	if len(p.Attrs) != 2 || p.Attrs[1].Name != "reconnect_interval" || len(p.Ops) != 1 || p.Ops[0].Name != "monitor" {
		t.Errorf("remoteXML = %s", x)
	}
	if !strings.Contains(x, `<instance_attributes id="r7-instance_attributes">`) {
		t.Errorf("instance_attributes without id: %s", x)
	}
}

// TestPlan checks the changes Reconcile decides on.
func TestPlan(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	addr := func(i byte) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, 0, i}) }
	core := func(i int, online bool) crmNode {
		return crmNode{Name: "p" + string(rune('0'+i)), ID: string(rune('0' + i)), Online: online, Type: "member"}
	}
	remote := func(name string, online bool) crmNode {
		return crmNode{Name: name, ID: name, Online: online, Type: "remote"}
	}
	b := bundle("p1", 1, ssi.Core, "corosync", "pacemaker")
	b.Remotes = []ssi.Member{{ID: 4, Name: "r1", Addr: addr(4), Role: ssi.Remote}, {ID: 5, Name: "r2", Addr: addr(5), Role: ssi.Remote}}
	b.Members = append(b.Members, b.Remotes...)
	cs := Membership{NodeID: 1, Joined: []int{1, 2, 3}, Nodelist: []int{1, 2, 3}, Quorate: true}
	settled := cibState{stonith: "false", remotes: map[string]cibRemote{"r1": {"198.18.0.4"}, "r2": {"198.18.0.5"}}}
	allOnline := crmStatus{Nodes: []crmNode{core(1, true), core(2, true), core(3, true), remote("r1", true), remote("r2", true)}}
	tests := []struct {
		name string
		b    func(*ssi.Bundle)
		cs   func(*Membership)
		ps   crmStatus
		cib  cibState
		want []string // commands, in order
	}{
		{name: "settled", ps: allOnline, cib: settled},
		{name: "new cluster", ps: crmStatus{Nodes: allOnline.Nodes[:3]}, cib: cibState{remotes: map[string]cibRemote{}},
			want: []string{"crm_attribute --type crm_config --name stonith-enabled --update false",
				"cibadmin --create --scope resources --xml-text " + remoteXML(b.Remotes[0]),
				"cibadmin --create --scope resources --xml-text " + remoteXML(b.Remotes[1])}},
		{name: "fencing on leaves stonith alone", b: func(b *ssi.Bundle) { b.Fencing = true }, ps: allOnline,
			cib: cibState{remotes: settled.remotes}},
		{name: "fencing turned on", b: func(b *ssi.Bundle) { b.Fencing = true }, ps: allOnline, cib: settled,
			want: []string{"crm_attribute --type crm_config --name stonith-enabled --delete"}},
		{name: "remote moved", b: func(b *ssi.Bundle) { b.Remotes[1].Addr = addr(9) }, ps: allOnline, cib: settled,
			want: []string{"crm_resource --resource r2 --set-parameter server --parameter-value 198.18.0.9"}},
		{name: "failed connection, recent", ps: crmStatus{Nodes: append(slices.Clone(allOnline.Nodes[:4]), remote("r2", false)),
			Failures: []crmFailure{{OpKey: "r2_start_0", Node: "p1", Change: "2026-12-03 11:59:55Z"}}}, cib: settled},
		{name: "failed connection, retried", ps: crmStatus{Nodes: append(slices.Clone(allOnline.Nodes[:4]), remote("r2", false)),
			Failures: []crmFailure{{OpKey: "r2_start_0", Node: "p1", Change: "2026-12-03 11:59:40Z"}, {OpKey: "r1_monitor_10000", Change: "2026-12-03 11:59:40Z"}}}, cib: settled,
			want: []string{"crm_resource --cleanup --resource r2"}},
		{name: "remote departed, connected", b: func(b *ssi.Bundle) { b.Remotes = b.Remotes[:1]; b.Members = b.Members[:4] }, ps: allOnline, cib: settled,
			want: []string{`cibadmin --delete --scope resources --xml-text <primitive id="r2"/>`}},
		{name: "remote departed, connection gone", b: func(b *ssi.Bundle) { b.Remotes = b.Remotes[:1]; b.Members = b.Members[:4] },
			ps: crmStatus{Nodes: append(slices.Clone(allOnline.Nodes[:4]), remote("r2", false))}, cib: cibState{stonith: "false", remotes: map[string]cibRemote{"r1": {"198.18.0.4"}}},
			want: []string{"crm_node --remove r2 --force"}},
		{name: "remote departed, still online", b: func(b *ssi.Bundle) { b.Remotes = b.Remotes[:1]; b.Members = b.Members[:4] },
			ps: allOnline, cib: cibState{stonith: "false", remotes: map[string]cibRemote{"r1": {"198.18.0.4"}}}},
		{name: "core departed, still in corosync's nodelist", b: func(b *ssi.Bundle) { b.Members = slices.Delete(b.Members, 2, 3) },
			ps: crmStatus{Nodes: []crmNode{core(1, true), core(2, true), core(3, false), remote("r1", true), remote("r2", true)}}, cib: settled},
		{name: "core departed, reloaded", b: func(b *ssi.Bundle) { b.Members = slices.Delete(b.Members, 2, 3) },
			cs: func(m *Membership) { m.Joined, m.Nodelist = []int{1, 2}, []int{1, 2} },
			ps: crmStatus{Nodes: []crmNode{core(1, true), core(2, true), core(3, false), remote("r1", true), remote("r2", true)}}, cib: settled,
			want: []string{"crm_node --remove p3 --force"}},
		{name: "core departed, only in the CIB", b: func(b *ssi.Bundle) { b.Members = slices.Delete(b.Members, 2, 3) },
			cs:   func(m *Membership) { m.Joined, m.Nodelist = []int{1, 2}, []int{1, 2} },
			ps:   crmStatus{Nodes: []crmNode{core(1, true), core(2, true), remote("r1", true), remote("r2", true)}},
			cib:  cibState{stonith: "false", remotes: settled.remotes, nodes: []crmNode{{Name: "p3", ID: "3"}}},
			want: []string{"crm_node --remove p3 --force"}},
		{name: "unknown node, online", ps: crmStatus{Nodes: append(slices.Clone(allOnline.Nodes), crmNode{Name: "x9", ID: "x9", Online: true, Type: "remote"})}, cib: settled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := *b
			b.Remotes, b.Members = slices.Clone(b.Remotes), slices.Clone(b.Members)
			if tt.b != nil {
				tt.b(&b)
			}
			cs := cs
			if tt.cs != nil {
				tt.cs(&cs)
			}
			var got []string
			for _, a := range plan(&b, cs, tt.ps, tt.cib, now) {
				got = append(got, strings.Join(a.args, " "))
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("plan:\n got %q\nwant %q", got, tt.want)
			}
		})
	}
	// A remote whose name cannot be a resource id is reported, not added.
	bad := *b
	bad.Remotes = []ssi.Member{{ID: 6, Name: "9r", Addr: addr(6), Role: ssi.Remote}}
	acts := plan(&bad, cs, allOnline, settled, now)
	if len(acts) != 1 || len(acts[0].args) != 0 || !strings.Contains(acts[0].warn, "9r cannot be a pacemaker resource id") {
		t.Errorf("remote 9r: %+v", acts)
	}
}

func TestReconciler(t *testing.T) {
	nodes := []crmNode{{Name: "p1", ID: "1", Online: false, Type: "member"}, {Name: "p2", ID: "2", Online: true, Type: "member"},
		{Name: "p3", ID: "3", Online: true, Type: "member"}, {Name: "1", ID: "1", Online: true, Type: "remote"}}
	if got := reconciler(Membership{Joined: []int{1, 2, 3}}, crmStatus{Nodes: nodes}); got != 2 {
		t.Errorf("reconciler = %d, want 2 (1 is joined in corosync but not online in pacemaker)", got)
	}
	if got := reconciler(Membership{Joined: []int{3}}, crmStatus{Nodes: nodes}); got != 3 {
		t.Errorf("reconciler = %d, want 3", got)
	}
	if got := reconciler(Membership{}, crmStatus{Nodes: nodes}); got != 0 {
		t.Errorf("reconciler = %d, want none", got)
	}
}

// TestReconcileActsOnce runs Reconcile on scripted engines: only the
// reconciling core member touches pacemaker, and not without quorum.
func TestReconcileActsOnce(t *testing.T) {
	quorum := func(id int, quorate string) string {
		return "Node ID:          " + string(rune('0'+id)) + "\nQuorate:          " + quorate + "\nExpected votes:   3\nTotal votes:      3\n"
	}
	members := "runtime.members.1.status (str) = joined\nruntime.members.2.status (str) = joined\nruntime.members.3.status (str) = joined\n"
	crm := string(fixture(t, "crm_mon-remote.xml"))
	for _, tt := range []struct {
		id      int
		quorate string
		acts    bool
	}{{1, "Yes", true}, {2, "Yes", false}, {1, "No", false}} {
		run := &script{table: map[string]func() ([]byte, error){
			"corosync-cmapctl -b runtime.members": answer(members),
			"corosync-cmapctl -b nodelist.node":   answer("nodelist.node.0.nodeid (u32) = 1\n"),
			"corosync-quorumtool":                 answer(quorum(tt.id, tt.quorate)),
			"crm_mon":                             answer(crm),
			"cibadmin --query":                    answer(string(fixture(t, "cib-remote.xml"))),
			"crm_attribute":                       answer(""),
			"cibadmin --create":                   answer(""),
		}}
		b := bundle("p"+string(rune('0'+tt.id)), tt.id, ssi.Core, "corosync", "pacemaker")
		b.Fencing = true
		b.Remotes = []ssi.Member{{ID: 4, Name: "r1", Addr: netip.MustParseAddr("198.18.0.4"), Role: ssi.Remote},
			{ID: 5, Name: "r2", Addr: netip.MustParseAddr("198.18.0.5"), Role: ssi.Remote}}
		b.Members = append(b.Members, b.Remotes...)
		n := &Node{Run: run}
		if err := n.Reconcile(context.Background(), b); err != nil {
			t.Fatalf("node %d: %v", tt.id, err)
		}
		var changes []string
		for _, l := range run.ran {
			if strings.HasPrefix(l, "crm_attribute") || strings.HasPrefix(l, "cibadmin --create") {
				changes = append(changes, l)
			}
		}
		want := []string(nil)
		if tt.acts {
			want = []string{"crm_attribute --type crm_config --name stonith-enabled --delete",
				"cibadmin --create --scope resources --xml-text " + remoteXML(b.Remotes[1])}
		}
		if !slices.Equal(changes, want) {
			t.Errorf("node %d, quorate %s: changes %q, want %q", tt.id, tt.quorate, changes, want)
		}
	}
}
