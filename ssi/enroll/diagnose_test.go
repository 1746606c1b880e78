package enroll

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/ssi"
)

// TestAuthFailures reads corosync logs captured in namespaces with real
// corosync 3.1.7: a member whose peer has another authkey, the member with
// the other key, and a member cut off the network.
func TestAuthFailures(t *testing.T) {
	at := func(s string) time.Time {
		ts, err := time.Parse(corosyncStamp, s)
		if err != nil {
			t.Fatal(err)
		}
		return ts
	}
	for _, tt := range []struct {
		log  string
		now  time.Time
		want []string
	}{
		{"corosync-wrongkey.log", at("Dec 03 18:40:33"), []string{"198.18.0.3"}},
		{"corosync-wrongkey.log", time.Time{}, []string{"198.18.0.3"}},
		{"corosync-wrongkey.log", at("Dec 03 18:45:00"), nil}, // old news
		{"corosync-wrongkey-self.log", at("Dec 03 18:40:30"), []string{"198.18.0.1", "198.18.0.2"}},
		{"corosync-partition.log", at("Dec 03 18:40:45"), nil},
	} {
		got := authFailures(fixture(t, tt.log), tt.now)
		var want = map[netip.Addr]bool{}
		for _, a := range tt.want {
			want[netip.MustParseAddr(a)] = true
		}
		if len(got) != len(want) {
			t.Errorf("%s at %v: %v, want %v", tt.log, tt.now, got, want)
		}
		for a := range want {
			if !got[a] {
				t.Errorf("%s at %v: %v, want %v", tt.log, tt.now, got, want)
			}
		}
	}
	// A restarted corosync forgets what the one before it met.
	log := string(fixture(t, "corosync-wrongkey.log")) + "Dec 03 18:40:32 [16] n1 corosync notice  [MAIN  ] Corosync Cluster Engine 3.1.7 starting up\n"
	if got := authFailures([]byte(log), at("Dec 03 18:40:33")); len(got) != 0 {
		t.Errorf("failures before corosync restarted count: %v", got)
	}
}

// TestMembershipCause: a failed membership check names the members whose
// packets fail authentication, or says which link is down, from corosync's
// log and link status on the node.
func TestMembershipCause(t *testing.T) {
	for _, tt := range []struct {
		name, log, cfgtool, date string
		id                       int
		joined                   []int
		want                     string
	}{
		{name: "peer with another key", log: "corosync-wrongkey.log", cfgtool: "cfgtool-s-wrongkey.txt", date: "Dec 03 18:40:33", id: 1, joined: []int{1, 2},
			want: "packets from 198.18.0.3 (p3) fail authentication (wrong authkey?)"},
		{name: "this node with another key", log: "corosync-wrongkey-self.log", cfgtool: "cfgtool-s-partition.txt", date: "Dec 03 18:40:30", id: 3, joined: []int{3},
			want: "packets from 198.18.0.1 (p1), 198.18.0.2 (p2) fail authentication (wrong authkey on this node?)"},
		{name: "cut off", log: "corosync-partition.log", cfgtool: "cfgtool-s-partition.txt", date: "Dec 03 18:40:45", id: 3, joined: []int{3},
			want: "no core member reachable on link 0 (partition?)"},
		{name: "one peer cut off", log: "corosync-partition.log", cfgtool: "cfgtool-s-wrongkey.txt", date: "Dec 03 18:40:45", id: 1, joined: []int{1, 2},
			want: "p3 (198.18.0.3) not reachable on link 0 (partition?)"},
		{name: "failures long ago", log: "corosync-wrongkey.log", cfgtool: "cfgtool-s-wrongkey.txt", date: "Dec 03 19:40:00", id: 1, joined: []int{1, 2},
			want: "p3 (198.18.0.3) not reachable on link 0 (partition?)"},
		{name: "all joined", log: "corosync-wrongkey.log", cfgtool: "cfgtool-s-wrongkey.txt", date: "Dec 03 18:40:33", id: 1, joined: []int{1, 2, 3}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			run := &script{table: map[string]func() ([]byte, error){
				"tail -n 400 " + corosyncLogPath: answer(string(fixture(t, tt.log))),
				"date":                           answer(tt.date + "\n"),
				"corosync-cfgtool -s":            answer(string(fixture(t, tt.cfgtool))),
			}}
			n := &Node{Root: t.TempDir(), Run: run}
			b := bundle("p"+string(rune('0'+tt.id)), tt.id, ssi.Core, "corosync")
			m := Membership{NodeID: tt.id, Joined: tt.joined}
			if got := n.membershipCause(context.Background(), b, m); got != tt.want {
				t.Errorf("cause %q, want %q", got, tt.want)
			}
			// Through a failed membership check.
			err := n.explainMembership(context.Background(), b, m, named(failed(CheckMembership, "%d of 3 core members joined (%v)", len(tt.joined), tt.joined), b.Member.Name))
			var ce *CheckError
			if !errors.As(err, &ce) || ce.Check != CheckMembership || (tt.want != "" && !strings.HasSuffix(err.Error(), "; "+tt.want)) {
				t.Errorf("explained: %v", err)
			}
			// Other checks are left as they are.
			q := failed(CheckQuorum, "partition is not quorate")
			if err := n.explainMembership(context.Background(), b, m, q); err.Error() != "check quorum: partition is not quorate" {
				t.Errorf("quorum check explained: %v", err)
			}
		})
	}
}
