package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/auth"
	"github.com/esir-project/esir/server/client"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/fleet"
	"github.com/esir-project/esir/server/rollout"
	"github.com/esir-project/esir/server/store"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// images is a one-image catalogue standing in for the imaging store.
type images struct{}

func (images) Push(context.Context, io.Reader) (api.ImageInfo, error) {
	return api.ImageInfo{}, fmt.Errorf("push: %w", api.ErrImageExists)
}

func (images) Canonical(_ context.Context, ref string) (string, error) {
	if ref == "img" || ref == "img:1.0" {
		return "img:1.0", nil
	}
	return "", fmt.Errorf("image %s: %w", ref, store.ErrNotFound)
}
func (i images) List(ctx context.Context) ([]api.ImageInfo, error) {
	in, _ := i.Info(ctx, "img")
	return []api.ImageInfo{in}, nil
}
func (i images) Info(ctx context.Context, ref string) (api.ImageInfo, error) {
	r, err := i.Canonical(ctx, ref)
	if err != nil {
		return api.ImageInfo{}, err
	}
	return api.ImageInfo{Ref: r, Name: "img", Version: "1.0", CompressedSize: 64 << 20}, nil
}
func (i images) Assign(ctx context.Context, ref, base string) (agentapi.Image, error) {
	r, err := i.Canonical(ctx, ref)
	if err != nil {
		return agentapi.Image{}, err
	}
	return agentapi.Image{Ref: r, Name: "img", Version: "1.0", TorrentURL: base + "/swarm/images/" + r + "/torrent"}, nil
}

type env struct {
	t      testing.TB
	url    string
	admin  string
	clock  *clock
	sched  *rollout.Scheduler
	api    *api.API
	signer *auth.Signer
}

func newEnv(t testing.TB, discovery bool) *env {
	t.Helper()
	ctx := context.Background()
	st, err := store.OpenSQLite(ctx, filepath.Join(t.TempDir(), "esir.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	clk := &clock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	sched := rollout.New(st, images{}, log, clk.now)
	signer, _ := auth.NewSigner([]byte("0123456789abcdef0123456789abcdef"))
	a, err := api.New(st, sched, signer, images{}, api.Config{PublicURL: "http://esir.test", Discovery: discovery}, log, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(a.Echo(nil))
	t.Cleanup(srv.Close)
	tok, err := api.CreateAdminToken(ctx, st, "test", clk.now())
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, url: srv.URL, admin: tok.Token, clock: clk, sched: sched, api: a, signer: signer}
}

// call sends a request and checks the status; it returns the body.
func (e *env) call(method, path, token string, body any, want int) []byte {
	e.t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	default:
		j, _ := json.Marshal(b)
		r = bytes.NewReader(j)
	}
	req, _ := http.NewRequest(method, e.url+path, r)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		e.t.Fatalf("%s %s: status %d, want %d: %s", method, path, resp.StatusCode, want, data)
	}
	if want >= 400 && want != 499 {
		var m agentapi.Error
		if json.Unmarshal(data, &m) != nil || m.Message == "" {
			e.t.Fatalf("%s %s: error body without message: %s", method, path, data)
		}
	}
	return data
}

func (e *env) admin_(method, path string, body any, want int) []byte {
	e.t.Helper()
	return e.call(method, path, e.admin, body, want)
}

func (e *env) agent(i int) *fleet.Agent {
	mac := fleet.MAC(i)
	return fleet.New(e.url, e.signer.Issue(auth.Boot, mac, e.clock.now().Add(time.Hour)), mac, nil)
}

func (e *env) step() {
	e.t.Helper()
	if err := e.sched.Step(context.Background()); err != nil {
		e.t.Fatal(err)
	}
}

func decode[T any](t testing.TB, b []byte) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	return v
}

func wantMsg(t *testing.T, body []byte, sub string) {
	t.Helper()
	if !strings.Contains(string(body), sub) {
		t.Fatalf("message %s does not mention %q", body, sub)
	}
}

func TestHealthAndMetrics(t *testing.T) {
	e := newEnv(t, true)
	e.call("GET", "/healthz", "", nil, 200)
	e.admin_("GET", "/api/v1/nodes", nil, 200)
	m := string(e.call("GET", "/metrics", "", nil, 200))
	for _, want := range []string{`esir_nodes{state="discovered"} 0`, `esir_http_requests_total{route="/api/v1/nodes",method="GET",code="200"} 1`, "esir_http_request_duration_seconds_bucket"} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	e.call("GET", "/nowhere", "", nil, 404)
}

func TestAdminAuth(t *testing.T) {
	e := newEnv(t, true)
	boot := e.signer.Issue(auth.Boot, fleet.MAC(1), e.clock.now().Add(time.Hour))
	tests := []struct{ name, token string }{
		{"no token", ""},
		{"wrong token", "esir_not-a-real-token"},
		{"node token", boot},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := e.call("GET", "/api/v1/nodes", tt.token, nil, 401)
			wantMsg(t, b, "authorization")
		})
	}
}

func TestAgentAuth(t *testing.T) {
	e := newEnv(t, true)
	mac1, mac2 := fleet.MAC(1), fleet.MAC(2)
	reg := agentapi.RegisterRequest{MAC: mac1}
	e.call("POST", "/agent/v1/register", "", reg, 401)
	e.call("POST", "/agent/v1/register", "esirn_garbage", reg, 401)
	e.call("POST", "/agent/v1/register", e.admin, reg, 401)
	other := e.signer.Issue(auth.Boot, mac2, e.clock.now().Add(time.Hour))
	b := e.call("POST", "/agent/v1/register", other, reg, 403)
	wantMsg(t, b, "mac")
	e.call("POST", "/agent/v1/events", other, agentapi.EventBatch{MAC: mac1, Assignment: "x", Events: []agentapi.Event{{Phase: "booting"}}}, 403)
	e.call("POST", "/agent/v1/report", other, agentapi.Report{MAC: mac1, Assignment: "x", Success: true}, 403)
	expired := e.signer.Issue(auth.Boot, mac1, e.clock.now().Add(time.Minute))
	e.clock.add(2 * time.Minute)
	b = e.call("POST", "/agent/v1/register", expired, reg, 401)
	wantMsg(t, b, "expired")
	enroll := e.signer.Issue(auth.Enroll, mac1, e.clock.now().Add(time.Hour))
	b = e.call("POST", "/agent/v1/register", enroll, reg, 403)
	wantMsg(t, b, "enroll token")
	// Another node's token cannot read this node's assignment either: it
	// only ever sees its own node.
	resp := decode[agentapi.RegisterResponse](t, e.call("GET", "/agent/v1/assignment", other, nil, 200))
	if resp.Hostname != "node001" {
		t.Fatalf("assignment for token of %s: %+v", mac2, resp)
	}
	nodes := decode[[]api.NodeView](t, e.admin_("GET", "/api/v1/nodes", nil, 200))
	if len(nodes) != 1 || nodes[0].MAC != mac2 {
		t.Fatalf("nodes %+v", nodes)
	}
}

func TestDiscoveryOff(t *testing.T) {
	e := newEnv(t, false)
	a := e.agent(1)
	if _, err := a.Register(context.Background()); !agentapi.IsStatus(err, 403) {
		t.Fatalf("unknown MAC with discovery off: %v", err)
	}
	e.admin_("POST", "/api/v1/nodes", api.AddNodeRequest{MAC: a.MAC}, 201)
	if r, err := a.Register(context.Background()); err != nil || r.Mode != agentapi.ModeInventory {
		t.Fatalf("known MAC: %+v %v", r, err)
	}
}

func TestNodeEndpoints(t *testing.T) {
	e := newEnv(t, true)
	mac := "52:54:00:00:00:01"
	n := decode[api.NodeView](t, e.admin_("POST", "/api/v1/nodes", api.AddNodeRequest{MAC: "52-54-00-00-00-01", Hostname: "web1", Labels: map[string]string{"rack": "a"}}, 201))
	if n.MAC != mac || n.Hostname != "web1" || n.Number != 1 || n.State != deploy.Discovered {
		t.Fatalf("added %+v", n)
	}
	e.admin_("POST", "/api/v1/nodes", api.AddNodeRequest{MAC: mac}, 409)
	e.admin_("POST", "/api/v1/nodes", api.AddNodeRequest{MAC: "52:54:00:00:00:02", Hostname: "web1"}, 409)
	bad := []struct {
		body  string
		field string
	}{
		{`{"mac":"nope"}`, "mac"},
		{`{"mac":"52:54:00:00:00:03","hostname":"Bad_Name"}`, "hostname"},
		{`{"mac":"52:54:00:00:00:03","labels":{"k":"v v"}}`, "labels"},
		{`{"mac":"52:54:00:00:00:03","colour":"red"}`, "colour"},
		{`{"mac":5}`, "mac"},
		{`{"mac":`, "body"},
		{``, "body"},
		{`{"mac":"52:54:00:00:00:03"} {}`, "body"},
	}
	for _, b := range bad {
		wantMsg(t, e.admin_("POST", "/api/v1/nodes", b.body, 400), b.field)
	}
	e.admin_("POST", "/api/v1/nodes", api.AddNodeRequest{MAC: "52:54:00:00:00:02", Labels: map[string]string{"rack": "b"}}, 201)
	list := decode[[]api.NodeView](t, e.admin_("GET", "/api/v1/nodes", nil, 200))
	if len(list) != 2 || list[1].Hostname != "node002" {
		t.Fatalf("list %+v", list)
	}
	list = decode[[]api.NodeView](t, e.admin_("GET", "/api/v1/nodes?label=rack=b", nil, 200))
	if len(list) != 1 || list[0].Number != 2 {
		t.Fatalf("label filter %+v", list)
	}
	list = decode[[]api.NodeView](t, e.admin_("GET", "/api/v1/nodes?state=installed", nil, 200))
	if len(list) != 0 {
		t.Fatalf("state filter %+v", list)
	}
	wantMsg(t, e.admin_("GET", "/api/v1/nodes?state=sleeping", nil, 400), "state")
	wantMsg(t, e.admin_("GET", "/api/v1/nodes?label=rack", nil, 400), "label")

	d := decode[api.NodeDetail](t, e.admin_("GET", "/api/v1/nodes/52-54-00-00-00-01", nil, 200))
	if d.Hostname != "web1" || len(d.Events) != 1 || d.Events[0].To != deploy.Discovered {
		t.Fatalf("detail %+v", d)
	}
	e.admin_("GET", "/api/v1/nodes/52:54:00:00:00:09", nil, 404)
	wantMsg(t, e.admin_("GET", "/api/v1/nodes/xyz", nil, 400), "mac")

	n = decode[api.NodeView](t, e.admin_("PUT", "/api/v1/nodes/"+mac+"/labels", api.LabelRequest{Set: map[string]string{"role": "db"}, Remove: []string{"rack"}}, 200))
	if len(n.Labels) != 1 || n.Labels["role"] != "db" {
		t.Fatalf("labels %v", n.Labels)
	}
	wantMsg(t, e.admin_("PUT", "/api/v1/nodes/"+mac+"/labels", api.LabelRequest{}, 400), "set")
	wantMsg(t, e.admin_("PUT", "/api/v1/nodes/"+mac+"/labels", api.LabelRequest{Set: map[string]string{"": "x"}}, 400), "set")
	e.admin_("PUT", "/api/v1/nodes/52:54:00:00:00:09/labels", api.LabelRequest{Set: map[string]string{"a": "b"}}, 404)

	evs := decode[[]deploy.Event](t, e.admin_("GET", "/api/v1/nodes/"+mac+"/events?limit=5", nil, 200))
	if len(evs) != 1 {
		t.Fatalf("events %+v", evs)
	}
	wantMsg(t, e.admin_("GET", "/api/v1/nodes/"+mac+"/events?limit=0", nil, 400), "limit")
	e.admin_("GET", "/api/v1/nodes/52:54:00:00:00:09/events", nil, 404)

	tok := decode[api.TokenResponse](t, e.admin_("POST", "/api/v1/nodes/"+mac+"/boot-token", `{"ttl":"10m"}`, 200))
	if c, err := e.signer.Verify(tok.Token, e.clock.now()); err != nil || c.MAC != mac || c.Kind != auth.Boot || !c.Expires.Equal(e.clock.now().Add(10*time.Minute)) {
		t.Fatalf("boot token claims %+v %v", c, err)
	}
	wantMsg(t, e.admin_("POST", "/api/v1/nodes/"+mac+"/boot-token", `{"ttl":"-1m"}`, 400), "ttl")

	// A node in an active rollout cannot be removed.
	e.admin_("POST", "/api/v1/rollouts", deploy.Spec{Image: "img", Selector: deploy.Selector{Names: []string{"web1"}}}, 201)
	wantMsg(t, e.admin_("DELETE", "/api/v1/nodes/"+mac, nil, 409), "active rollout")
	e.admin_("DELETE", "/api/v1/nodes/52:54:00:00:00:02", nil, 204)
	e.admin_("DELETE", "/api/v1/nodes/52:54:00:00:00:02", nil, 404)
}

func TestImageEndpoints(t *testing.T) {
	e := newEnv(t, true)
	list := decode[[]api.ImageInfo](t, e.admin_("GET", "/api/v1/images", nil, 200))
	if len(list) != 1 || list[0].Ref != "img:1.0" {
		t.Fatalf("images %+v", list)
	}
	if in := decode[api.ImageInfo](t, e.admin_("GET", "/api/v1/images/img", nil, 200)); in.Version != "1.0" {
		t.Fatalf("image %+v", in)
	}
	e.admin_("GET", "/api/v1/images/other:2", nil, 404)
}

func TestRolloutEndpoints(t *testing.T) {
	e := newEnv(t, true)
	ctx := context.Background()
	for i := 1; i <= 3; i++ {
		a := e.agent(i)
		if _, err := a.Register(ctx); err != nil {
			t.Fatal(err)
		}
	}
	e.admin_("PUT", "/api/v1/nodes/"+fleet.MAC(1)+"/labels", api.LabelRequest{Set: map[string]string{"role": "web"}}, 200)
	bad := []struct {
		spec   string
		status int
		field  string
	}{
		{`{"selector":{"names":["node001"]}}`, 400, "image"},
		{`{"image":"img"}`, 400, "selector"},
		{`{"image":"img","selector":{"names":["node001"]},"batch_size":-1}`, 400, "batch_size"},
		{`{"image":"img","selector":{"names":["node001"]},"retry_backoff":"soon"}`, 400, "body"},
		{`{"image":"img","selector":{"names":["node001"]},"max_retries":"x"}`, 400, "max_retries"},
		{`{"image":"nope","selector":{"names":["node001"]}}`, 404, "nope"},
		{`{"image":"img","selector":{"names":["node009"]}}`, 404, "node009"},
		{`{"image":"img","selector":{"labels":{"role":"db"}}}`, 400, "selector"},
	}
	for _, b := range bad {
		wantMsg(t, e.admin_("POST", "/api/v1/rollouts", b.spec, b.status), b.field)
	}
	v := decode[api.RolloutView](t, e.admin_("POST", "/api/v1/rollouts", deploy.Spec{Image: "img", Selector: deploy.Selector{Names: []string{"node001", fleet.MAC(2)}}, BatchSize: 1}, 201))
	if v.ID != 1 || v.Spec.Image != "img:1.0" || v.Summary.Total != 2 || v.Batches != 2 || v.State != deploy.RolloutRunning {
		t.Fatalf("created %+v", v)
	}
	wantMsg(t, e.admin_("POST", "/api/v1/rollouts", deploy.Spec{Image: "img", Selector: deploy.Selector{Labels: map[string]string{"role": "web"}}}, 409), "active rollout")
	e.admin_("GET", "/api/v1/rollouts/7", nil, 404)
	wantMsg(t, e.admin_("GET", "/api/v1/rollouts/x", nil, 400), "id")
	e.step()
	v = decode[api.RolloutView](t, e.admin_("GET", "/api/v1/rollouts/1", nil, 200))
	if v.Summary.Active != 1 || v.Summary.Pending != 1 || len(v.Nodes) != 2 {
		t.Fatalf("after step %+v", v.Summary)
	}
	ls := decode[[]api.RolloutView](t, e.admin_("GET", "/api/v1/rollouts?state=running", nil, 200))
	if len(ls) != 1 || ls[0].Nodes != nil {
		t.Fatalf("ls %+v", ls)
	}
	wantMsg(t, e.admin_("GET", "/api/v1/rollouts?state=bogus", nil, 400), "state")
	e.admin_("POST", "/api/v1/rollouts/1/resume", nil, 409)
	v = decode[api.RolloutView](t, e.admin_("POST", "/api/v1/rollouts/1/pause", nil, 200))
	if v.State != deploy.RolloutPaused {
		t.Fatalf("pause: %s", v.State)
	}
	e.admin_("POST", "/api/v1/rollouts/1/pause", nil, 409)
	e.admin_("POST", "/api/v1/rollouts/1/resume", nil, 200)
	v = decode[api.RolloutView](t, e.admin_("POST", "/api/v1/rollouts/1/cancel", nil, 200))
	if v.State != deploy.RolloutCancelled || v.Summary.Cancelled != 2 {
		t.Fatalf("cancel: %+v", v.Summary)
	}
	e.admin_("POST", "/api/v1/rollouts/1/cancel", nil, 409)
	e.admin_("POST", "/api/v1/rollouts/9/pause", nil, 404)
}

func TestTokenEndpoints(t *testing.T) {
	e := newEnv(t, true)
	tok := decode[api.TokenResponse](t, e.admin_("POST", "/api/v1/tokens", api.CreateTokenRequest{Name: "ci"}, 201))
	if !strings.HasPrefix(tok.Token, auth.AdminPrefix) || tok.ID == "" {
		t.Fatalf("token %+v", tok)
	}
	e.call("GET", "/api/v1/nodes", tok.Token, nil, 200)
	wantMsg(t, e.admin_("POST", "/api/v1/tokens", api.CreateTokenRequest{}, 400), "name")
	list := e.admin_("GET", "/api/v1/tokens", nil, 200)
	if strings.Contains(string(list), tok.Token) || strings.Contains(string(list), "hash") {
		t.Fatalf("token list shows secrets: %s", list)
	}
	ts := decode[[]store.Token](t, list)
	if len(ts) != 2 {
		t.Fatalf("tokens %+v", ts)
	}
	e.call("DELETE", "/api/v1/tokens/"+tok.ID, tok.Token, nil, 204)
	e.call("GET", "/api/v1/nodes", tok.Token, nil, 401)
	e.admin_("DELETE", "/api/v1/tokens/"+tok.ID, nil, 404)
	wantMsg(t, e.admin_("DELETE", "/api/v1/tokens/"+ts[0].ID, nil, 409), "last admin token")
}

func TestAgentProtocol(t *testing.T) {
	e := newEnv(t, true)
	ctx := context.Background()
	a := e.agent(1)
	r, err := a.Register(ctx)
	if err != nil || r.Mode != agentapi.ModeInventory || r.Hostname != "node001" || r.Assignment != nil {
		t.Fatalf("register unknown: %+v %v", r, err)
	}
	d := decode[api.NodeDetail](t, e.admin_("GET", "/api/v1/nodes/"+a.MAC, nil, 200))
	if d.Inventory == nil || d.Inventory.Disks[0].Serial != "SIM-"+a.MAC {
		t.Fatalf("inventory not stored: %+v", d.Inventory)
	}
	brief := decode[[]api.NodeView](t, e.admin_("GET", "/api/v1/nodes", nil, 200))
	if brief[0].Inventory != nil || brief[0].Hardware != "2 CPUs, 4.0 GiB RAM, 1 disks 20.0 GiB" {
		t.Fatalf("brief listing: %+v %q", brief[0].Inventory, brief[0].Hardware)
	}
	full := decode[[]api.NodeView](t, e.admin_("GET", "/api/v1/nodes?inventory=true", nil, 200))
	if full[0].Inventory == nil || full[0].Inventory.MemoryBytes != 4<<30 {
		t.Fatalf("full listing: %+v", full[0].Inventory)
	}
	wantMsg(t, e.admin_("GET", "/api/v1/nodes?inventory=maybe", nil, 400), "inventory")
	// Validation of agent messages.
	tok := a.Client.Token
	wantMsg(t, e.call("POST", "/agent/v1/register", tok, `{"mac":"`+a.MAC+`","inventory":{"memory_bytes":-1}}`, 400), "inventory.memory_bytes")
	wantMsg(t, e.call("POST", "/agent/v1/register", tok, `{"mac":"x"}`, 400), "mac")
	wantMsg(t, e.call("POST", "/agent/v1/events", tok, agentapi.EventBatch{Assignment: "a"}, 400), "events")
	wantMsg(t, e.call("POST", "/agent/v1/events", tok, agentapi.EventBatch{Assignment: "a", Events: []agentapi.Event{{Phase: "dancing"}}}, 400), "events[0].phase")
	wantMsg(t, e.call("POST", "/agent/v1/events", tok, agentapi.EventBatch{Events: []agentapi.Event{{Phase: "booting"}}}, 400), "assignment")
	wantMsg(t, e.call("POST", "/agent/v1/report", tok, agentapi.Report{Assignment: "a"}, 400), "reason")
	wantMsg(t, e.call("POST", "/agent/v1/events", tok, agentapi.EventBatch{Assignment: "r1-x", Events: []agentapi.Event{{Phase: "booting"}}}, 409), "assignment")

	e.admin_("POST", "/api/v1/rollouts", deploy.Spec{Image: "img", Selector: deploy.Selector{Names: []string{a.MAC}}}, 201)
	e.step()
	r, err = a.Register(ctx)
	if err != nil || r.Mode != agentapi.ModeInstall || r.Assignment == nil || r.Assignment.Image.Ref != "img:1.0" ||
		r.Assignment.Hostname != "node001" || r.Assignment.Server != "http://esir.test" || r.Assignment.Disk.ESPMiB == 0 {
		t.Fatalf("register assigned: %+v %v", r, err)
	}
	first := r.Assignment.ID
	if ack, err := a.Progress(ctx, agentapi.PhaseFetching, 10, 100); err != nil || !ack.Applied || ack.State != "fetching" {
		t.Fatalf("fetching: %+v %v", ack, err)
	}
	// A repeated event changes nothing.
	if ack, err := a.Resend(ctx, agentapi.PhaseFetching, 10, 100); err != nil || ack.Applied {
		t.Fatalf("repeat: %+v %v", ack, err)
	}
	d = decode[api.NodeDetail](t, e.admin_("GET", "/api/v1/nodes/"+a.MAC, nil, 200))
	if d.Progress == nil || d.Progress.Bytes != 10 || d.Progress.Peers != 4 || d.Progress.Have == nil {
		t.Fatalf("live progress %+v", d.Progress)
	}
	// The node reboots mid-install: a fresh assignment, the old one is stale.
	r, err = a.Register(ctx)
	if err != nil || r.Assignment == nil || r.Assignment.ID == first {
		t.Fatalf("re-register: %+v %v", r, err)
	}
	d = decode[api.NodeDetail](t, e.admin_("GET", "/api/v1/nodes/"+a.MAC, nil, 200))
	if d.State != deploy.Booting {
		t.Fatalf("after reboot: %s", d.State)
	}
	stale := fleet.New(e.url, tok, a.MAC, nil)
	stale.Assignment = &agentapi.Assignment{ID: first}
	if _, err := stale.Progress(ctx, agentapi.PhaseInstalling, 1, 2); !agentapi.IsStatus(err, 409) {
		t.Fatalf("stale assignment: %v", err)
	}
	// Enrolling before installed is refused.
	if _, err := a.Enroll(ctx); !agentapi.IsStatus(err, 409) {
		t.Fatalf("early enroll: %v", err)
	}
	// A phase jump walks through the states it skips, with events.
	if _, err := a.Progress(ctx, agentapi.PhaseInstalling, 50, 100, "mkfs.ext4 /dev/vda2"); err != nil {
		t.Fatal(err)
	}
	if ack, err := a.Finish(ctx, true, "", ""); err != nil || !ack.Applied || ack.State != "installed" {
		t.Fatalf("report: %+v %v", ack, err)
	}
	if ack, err := a.Finish(ctx, true, "", ""); err != nil || ack.Applied {
		t.Fatalf("repeated report: %+v %v", ack, err)
	}
	if ack, err := a.Finish(ctx, false, "unpack", "boom"); err != nil || ack.Applied || ack.State != "installed" {
		t.Fatalf("late failure report changed an installed node: %+v %v", ack, err)
	}
	// The enroll token works only for enroll, and only for its own MAC.
	enrollTok := a.Assignment.EnrollToken
	e.call("POST", "/agent/v1/events", enrollTok, agentapi.EventBatch{Assignment: a.Assignment.ID, Events: []agentapi.Event{{Phase: "booting"}}}, 403)
	e.call("POST", "/agent/v1/enroll", enrollTok, agentapi.EnrollRequest{MAC: fleet.MAC(2)}, 403)
	if ack, err := a.Enroll(ctx); err != nil || !ack.Applied || ack.State != "enrolled" {
		t.Fatalf("enroll: %+v %v", ack, err)
	}
	if ack, err := a.Enroll(ctx); err != nil || ack.Applied {
		t.Fatalf("repeated enroll: %+v %v", ack, err)
	}
	if r, err := a.Register(ctx); err != nil || r.Mode != agentapi.ModeLocal {
		t.Fatalf("installed node registering: %+v %v", r, err)
	}
	d = decode[api.NodeDetail](t, e.admin_("GET", "/api/v1/nodes/"+a.MAC, nil, 200))
	var path []string
	for _, ev := range d.Events {
		path = append(path, string(ev.To))
	}
	want := "discovered assigned booting fetching booting fetching installing installed enrolled"
	if strings.Join(path, " ") != want {
		t.Fatalf("event log %q, want %q", strings.Join(path, " "), want)
	}
	if len(d.LogTail) == 0 || d.LogTail[0] != "mkfs.ext4 /dev/vda2" {
		t.Fatalf("log tail %q", d.LogTail)
	}
}

// BenchmarkAgentLoad measures the server side of the hot paths: progress
// reports from 1,000 assigned agents, and listing those 1,000 nodes.
func BenchmarkAgentLoad(b *testing.B) {
	e := newEnv(b, true)
	ctx := context.Background()
	var agents []*fleet.Agent
	var names []string
	for i := 1; i <= 1000; i++ {
		a := e.agent(i)
		if _, err := a.Register(ctx); err != nil {
			b.Fatal(err)
		}
		agents = append(agents, a)
		names = append(names, a.MAC)
	}
	e.admin_("POST", "/api/v1/rollouts", deploy.Spec{Image: "img", Selector: deploy.Selector{Names: names}, BatchSize: 1000}, 201)
	e.step()
	for _, a := range agents {
		if _, err := a.Register(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("report", func(b *testing.B) {
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				i++
				if _, err := agents[i%len(agents)].Progress(ctx, agentapi.PhaseBooting, 0, 0); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
	b.Run("list", func(b *testing.B) {
		for b.Loop() {
			e.admin_("GET", "/api/v1/nodes", nil, 200)
		}
	})
	b.Run("step", func(b *testing.B) {
		for b.Loop() {
			e.step()
		}
	})
}

func TestNodeListPages(t *testing.T) {
	e := newEnv(t, true)
	for i := 1; i <= 7; i++ {
		e.admin_("POST", "/api/v1/nodes", api.AddNodeRequest{MAC: fleet.MAC(i), Hostname: fmt.Sprintf("n%d", 8-i),
			Labels: map[string]string{"rack": fmt.Sprint(i % 2)}}, 201)
	}
	get := func(query string) ([]int, string, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", e.url+"/api/v1/nodes"+query, nil)
		req.Header.Set("Authorization", "Bearer "+e.admin)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			b, _ := io.ReadAll(resp.Body)
			t.Fatalf("GET %s: %d %s", query, resp.StatusCode, b)
		}
		var list []api.NodeView
		if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
			t.Fatal(err)
		}
		var nums []int
		for _, n := range list {
			nums = append(nums, n.Number)
		}
		return nums, resp.Header.Get(api.TotalCountHeader), resp.Header.Get("Link")
	}
	tests := []struct {
		query, nums, total, link string
	}{
		{"", "[1 2 3 4 5 6 7]", "7", ""},
		{"?limit=3", "[1 2 3]", "7", `</api/v1/nodes?limit=3&offset=3>; rel="next"`},
		{"?limit=3&offset=3", "[4 5 6]", "7", `</api/v1/nodes?limit=3&offset=6>; rel="next", </api/v1/nodes?limit=3&offset=0>; rel="prev"`},
		{"?limit=3&offset=6", "[7]", "7", `</api/v1/nodes?limit=3&offset=3>; rel="prev"`},
		{"?limit=3&offset=9", "[]", "7", `</api/v1/nodes?limit=3&offset=6>; rel="prev"`},
		{"?sort=hostname&limit=2", "[7 6]", "7", `</api/v1/nodes?limit=2&offset=2&sort=hostname>; rel="next"`},
		{"?order=desc&limit=2&label=rack=1", "[7 5]", "4", `</api/v1/nodes?label=rack%3D1&limit=2&offset=2&order=desc>; rel="next"`},
		{"?q=N3", "[5]", "1", ""},
		{"?q=rack=0&sort=mac&order=desc", "[6 4 2]", "3", ""},
	}
	for _, tt := range tests {
		nums, total, link := get(tt.query)
		if fmt.Sprint(nums) != tt.nums && !(tt.nums == "[]" && nums == nil) || total != tt.total || link != tt.link {
			t.Errorf("GET %s: nodes %v total %s link %q; want %s, %s, %q", tt.query, nums, total, link, tt.nums, tt.total, tt.link)
		}
	}
	for q, field := range map[string]string{"?limit=0": "limit", "?limit=-1": "limit", "?limit=x": "limit", "?limit=5001": "limit",
		"?offset=-3": "offset", "?sort=colour": "sort", "?order=up": "order"} {
		wantMsg(t, e.admin_("GET", "/api/v1/nodes"+q, nil, 400), field)
	}
	// The client pages through: every node once, in order, with small pages.
	c := &client.Client{Server: e.url, Token: e.admin}
	all, err := c.AllNodes(context.Background(), client.NodeQuery{Limit: 2, Sort: "hostname", Desc: true})
	if err != nil {
		t.Fatal(err)
	}
	var nums []int
	for _, n := range all {
		nums = append(nums, n.Number)
	}
	if fmt.Sprint(nums) != "[1 2 3 4 5 6 7]" {
		t.Fatalf("AllNodes by hostname descending in pages of 2: %v", nums)
	}
	p, err := c.NodesPage(context.Background(), client.NodeQuery{Limit: 2, Offset: 2, Labels: []string{"rack=0"}})
	if err != nil || p.Total != 3 || len(p.Nodes) != 1 || p.Nodes[0].Number != 6 {
		t.Fatalf("NodesPage: %+v, %v", p, err)
	}
}
