package api_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/cluster"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/fleet"
	"github.com/esir-project/esir/ssi"
)

const clusterDef = `name: lab
profile: {corosync: true, pacemaker: true, chrony: true}
core_size: 3
time: {allow: 198.18.0.0/24}
`

// installedNode takes fleet node i through a rollout to installed.
func installedNode(t *testing.T, e *env, i int) *fleet.Agent {
	t.Helper()
	ctx := context.Background()
	a := e.agent(i)
	if _, err := a.Register(ctx); err != nil {
		t.Fatal(err)
	}
	e.admin_("POST", "/api/v1/rollouts", deploy.Spec{Image: "img", Selector: deploy.Selector{Names: []string{a.MAC}}}, 201)
	e.step()
	if _, err := a.Register(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Install(ctx); err != nil {
		t.Fatal(err)
	}
	e.step()
	return a
}

func nodeState(t *testing.T, e *env, mac string) (deploy.State, []string) {
	d := decode[api.NodeDetail](t, e.admin_("GET", "/api/v1/nodes/"+mac, nil, 200))
	var notes []string
	for _, ev := range d.Events {
		notes = append(notes, ev.Reason)
	}
	return d.State, notes
}

// TestSSIProtocol drives the server side of SSI enrollment as node services
// would: a node with a cluster stays installed until its engines agree, a
// failed check is logged, leave waits for the node, node rm leaves.
func TestSSIProtocol(t *testing.T) {
	e := newEnv(t, true)
	ctx := context.Background()
	dir := t.TempDir()
	def := filepath.Join(dir, "cluster.yaml")
	if err := os.WriteFile(def, []byte(clusterDef), 0o644); err != nil {
		t.Fatal(err)
	}
	cl, err := cluster.Open(def, filepath.Join(dir, "ssi"), cluster.Options{Now: e.clock.now})
	if err != nil {
		t.Fatal(err)
	}
	e.api.SetCluster(cl)

	var nodes []*fleet.Agent
	var svc []*agentapi.Client
	for i := 1; i <= 4; i++ {
		a := installedNode(t, e, i)
		nodes = append(nodes, a)
		svc = append(svc, &agentapi.Client{Server: e.url, Token: a.Assignment.EnrollToken})
	}
	// Enrolling without a cluster address is refused, naming the field.
	wantMsg(t, e.call("POST", "/agent/v1/enroll", nodes[0].Assignment.EnrollToken, agentapi.EnrollRequest{MAC: nodes[0].MAC}, 400), "addr")
	// The enroll token may follow only its own node's SSI assignment.
	e.call("GET", "/agent/v1/ssi", nodes[0].Assignment.EnrollToken, nil, 404) // not a member yet

	for i, a := range nodes {
		ack, err := svc[i].Enroll(ctx, agentapi.EnrollRequest{MAC: a.MAC, Hostname: a.Assignment.Hostname, Addr: fmt.Sprintf("198.18.0.%d", i+1)})
		if err != nil || ack.Cluster != "lab" {
			t.Fatalf("enroll %s: %+v %v", a.MAC, ack, err)
		}
		if st, _ := nodeState(t, e, a.MAC); st != deploy.Installed {
			t.Fatalf("%s is %s right after enroll, want installed until its engines agree", a.MAC, st)
		}
	}
	// A second machine may not take an address in use.
	wantMsg(t, e.call("POST", "/agent/v1/enroll", nodes[3].Assignment.EnrollToken,
		agentapi.EnrollRequest{MAC: nodes[3].MAC, Addr: "198.18.0.1"}, 409), "198.18.0.1")

	asg, err := svc[3].SSI(ctx, -1, 0)
	if err != nil {
		t.Fatal(err)
	}
	var b ssi.Bundle
	if err := json.Unmarshal(asg.Bundle, &b); err != nil {
		t.Fatal(err)
	}
	if asg.Action != agentapi.SSIJoin || b.Member.Role != ssi.Remote || b.Member.Name != "node004" || asg.Version != b.Version {
		t.Fatalf("node004's assignment: %+v, member %+v", asg, b.Member)
	}
	for _, f := range b.Files {
		if strings.HasPrefix(f.Path, "/etc/corosync/") {
			t.Fatalf("a remote member got corosync's file %s", f.Path)
		}
	}

	// A failed check keeps the node installed and is logged on it.
	ver := asg.Version
	if _, err := svc[0].SSIStatus(ctx, agentapi.SSIStatus{MAC: nodes[0].MAC, Version: ver, State: agentapi.SSIFailed, Check: "quorum", Error: "partition is not quorate (1 of 3 votes)"}); err != nil {
		t.Fatal(err)
	}
	st, notes := nodeState(t, e, nodes[0].MAC)
	if st != deploy.Installed || !strings.Contains(strings.Join(notes, "\n"), "check quorum failed") {
		t.Fatalf("after a failed check: %s, events %q", st, notes)
	}
	for i, a := range nodes {
		view, _ := json.Marshal(map[string]any{"node_id": i + 1, "joined": []int{1, 2, 3}, "quorate": true})
		if _, err := svc[i].SSIStatus(ctx, agentapi.SSIStatus{MAC: a.MAC, Version: ver, State: agentapi.SSIEnrolled, View: view}); err != nil {
			t.Fatal(err)
		}
		if st, _ := nodeState(t, e, a.MAC); st != deploy.Enrolled {
			t.Fatalf("%s is %s after its engines agreed", a.MAC, st)
		}
	}
	snap := decode[cluster.Snapshot](t, e.admin_("GET", "/api/v1/cluster", nil, 200))
	if len(snap.Members) != 4 || !snap.Quorate || snap.ViewFrom == "" {
		t.Fatalf("cluster snapshot: %+v", snap)
	}

	// A waiting node service learns of a leave at once.
	got := make(chan *agentapi.SSIAssignment, 1)
	go func() {
		a, err := svc[2].SSI(ctx, ver, 20*time.Second)
		if err != nil {
			t.Error(err)
		}
		got <- a
	}()
	time.Sleep(100 * time.Millisecond)
	e.admin_("POST", "/api/v1/cluster/members/node003/leave", nil, 202)
	select {
	case a := <-got:
		if a == nil || a.Action != agentapi.SSILeave {
			t.Fatalf("node003 after leave: %+v", a)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the long poll did not return on leave")
	}
	if _, err := svc[2].SSIStatus(ctx, agentapi.SSIStatus{MAC: nodes[2].MAC, Version: ver, State: agentapi.SSILeft}); err != nil {
		t.Fatal(err)
	}
	snap = decode[cluster.Snapshot](t, e.admin_("GET", "/api/v1/cluster", nil, 200))
	if len(snap.Members) != 3 || snap.Version != ver+1 || len(snap.Retired) != 1 || snap.Retired[0] != 3 {
		t.Fatalf("after node003 left: %d members, version %d (want %d), retired %v", len(snap.Members), snap.Version, ver+1, snap.Retired)
	}
	if _, err := svc[2].SSI(ctx, -1, 0); !agentapi.IsStatus(err, 404) {
		t.Fatalf("a node that left still gets an assignment: %v", err)
	}
	// The other members see the new nodelist version.
	if a, err := svc[0].SSI(ctx, ver, time.Second); err != nil || a.Version != ver+1 {
		t.Fatalf("node001 after the leave: %+v %v", a, err)
	}

	// A reload of the edited definition hands the members a new version;
	// one that does not load is refused (422) naming the cluster.
	if r := decode[api.ReloadResult](t, e.admin_("POST", "/api/v1/cluster/reload", nil, 200)); r.Changed || r.Version != ver+1 {
		t.Fatalf("reload of the same definition: %+v", r)
	}
	if err := os.WriteFile(def, []byte(strings.Replace(clusterDef, "time: {allow: 198.18.0.0/24}", "time: {allow: 198.18.0.0/16}", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := decode[api.ReloadResult](t, e.admin_("POST", "/api/v1/cluster/reload", nil, 200)); !r.Changed || r.Version != ver+2 {
		t.Fatalf("reload of a changed definition: %+v, want changed at version %d", r, ver+2)
	}
	if a, err := svc[0].SSI(ctx, ver+1, time.Second); err != nil || a.Version != ver+2 {
		t.Fatalf("node001 after the reload: %+v %v", a, err)
	}
	if err := os.WriteFile(def, []byte("name: lab\ncore_size: [\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	wantMsg(t, e.admin_("POST", "/api/v1/cluster/reload", nil, 422), "cluster lab")

	// esir node rm of a member starts its leave.
	e.admin_("DELETE", "/api/v1/nodes/"+nodes[3].MAC, nil, 204)
	if a, err := svc[3].SSI(ctx, -1, 0); err != nil || a.Action != agentapi.SSILeave {
		t.Fatalf("node004 after node rm: %+v %v", a, err)
	}
	e.admin_("POST", "/api/v1/cluster/members/nobody/leave", nil, 404)
}
