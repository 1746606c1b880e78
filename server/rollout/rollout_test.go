package rollout_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/auth"
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

type images struct{}

func (images) Push(context.Context, io.Reader) (api.ImageInfo, error) {
	return api.ImageInfo{}, fmt.Errorf("push: %w", api.ErrImageExists)
}

func (images) Canonical(_ context.Context, ref string) (string, error) {
	if strings.HasPrefix(ref, "img") {
		return "img:1.0", nil
	}
	return "", fmt.Errorf("image %s: %w", ref, store.ErrNotFound)
}
func (images) List(context.Context) ([]api.ImageInfo, error) { return nil, nil }
func (images) Info(context.Context, string) (api.ImageInfo, error) {
	return api.ImageInfo{Ref: "img:1.0"}, nil
}
func (images) Assign(_ context.Context, ref, base string) (agentapi.Image, error) {
	return agentapi.Image{Ref: ref, Name: "img", Version: "1.0"}, nil
}

// cluster is a server (API + scheduler on a fake clock) and n simulated
// agents that registered in inventory mode.
type cluster struct {
	t      *testing.T
	st     store.Store
	sched  *rollout.Scheduler
	clock  *clock
	agents []*fleet.Agent
}

func newCluster(t *testing.T, n int) *cluster {
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
	a, err := api.New(st, sched, signer, images{}, api.Config{PublicURL: "http://esir.test", Discovery: true}, log, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(a.Echo(nil))
	t.Cleanup(srv.Close)
	c := &cluster{t: t, st: st, sched: sched, clock: clk}
	for i := 1; i <= n; i++ {
		mac := fleet.MAC(i)
		ag := fleet.New(srv.URL, signer.Issue(auth.Boot, mac, clk.now().Add(24*time.Hour)), mac, nil)
		if r, err := ag.Register(ctx); err != nil || r.Mode != agentapi.ModeInventory {
			t.Fatalf("register %s: %+v %v", mac, r, err)
		}
		c.agents = append(c.agents, ag)
	}
	return c
}

func (c *cluster) step() {
	c.t.Helper()
	if err := c.sched.Step(context.Background()); err != nil {
		c.t.Fatal(err)
	}
}

func (c *cluster) create(spec deploy.Spec) *deploy.Rollout {
	c.t.Helper()
	if spec.Image == "" {
		spec.Image = "img"
	}
	if spec.Selector.Empty() {
		spec.Selector.Names = []string{}
		for _, a := range c.agents {
			spec.Selector.Names = append(spec.Selector.Names, a.MAC)
		}
	}
	r, err := c.sched.Create(context.Background(), spec)
	if err != nil {
		c.t.Fatal(err)
	}
	return r
}

func (c *cluster) rollout(id int64) *deploy.Rollout {
	c.t.Helper()
	var r *deploy.Rollout
	if err := c.st.View(context.Background(), func(tx store.Tx) error {
		var err error
		r, err = tx.Rollout(id)
		return err
	}); err != nil {
		c.t.Fatal(err)
	}
	return r
}

func (c *cluster) node(i int) *deploy.Node {
	c.t.Helper()
	var n *deploy.Node
	if err := c.st.View(context.Background(), func(tx store.Tx) error {
		var err error
		n, err = tx.Node(c.agents[i].MAC)
		return err
	}); err != nil {
		c.t.Fatal(err)
	}
	return n
}

// states returns each agent's node state, in order.
func (c *cluster) states() string {
	var s []string
	for i := range c.agents {
		s = append(s, string(c.node(i).State))
	}
	return strings.Join(s, " ")
}

// boot makes every assigned node's agent register (it PXE-booted) and
// returns the agents that got an install assignment.
func (c *cluster) boot() []*fleet.Agent {
	c.t.Helper()
	var out []*fleet.Agent
	for i, a := range c.agents {
		if c.node(i).State != deploy.Assigned {
			continue
		}
		r, err := a.Register(context.Background())
		if err != nil || r.Mode != agentapi.ModeInstall {
			c.t.Fatalf("boot %s: %+v %v", a.MAC, r, err)
		}
		out = append(out, a)
	}
	return out
}

func (c *cluster) install(as ...*fleet.Agent) {
	c.t.Helper()
	for _, a := range as {
		if err := a.Install(context.Background()); err != nil {
			c.t.Fatal(err)
		}
	}
}

func (c *cluster) fail(as ...*fleet.Agent) {
	c.t.Helper()
	for _, a := range as {
		if _, err := a.Progress(context.Background(), agentapi.PhaseFetching, 1, 100); err != nil {
			c.t.Fatal(err)
		}
		if _, err := a.Finish(context.Background(), false, "unpack", "digest mismatch"); err != nil {
			c.t.Fatal(err)
		}
	}
}

func TestCanarySuccess(t *testing.T) {
	c := newCluster(t, 5)
	r := c.create(deploy.Spec{Canary: 1, BatchSize: 2})
	if r.Batches != 3 {
		t.Fatalf("batches %d", r.Batches)
	}
	c.step()
	if got := c.states(); got != "assigned discovered discovered discovered discovered" {
		t.Fatalf("canary start: %s", got)
	}
	canary := c.boot()
	c.step() // nothing moves while the canary installs
	if got := c.states(); got != "booting discovered discovered discovered discovered" {
		t.Fatalf("canary booting: %s", got)
	}
	c.install(canary...)
	c.step()
	if got := c.states(); got != "installed assigned assigned discovered discovered" {
		t.Fatalf("after canary: %s", got)
	}
	c.install(c.boot()...)
	c.step()
	c.install(c.boot()...)
	c.step()
	r = c.rollout(r.ID)
	if r.State != deploy.RolloutCompleted || r.Reason != "5 succeeded, 0 failed" {
		t.Fatalf("rollout %s (%s)", r.State, r.Reason)
	}
	for _, a := range c.agents {
		if ack, err := a.Enroll(context.Background()); err != nil || ack.State != "enrolled" {
			t.Fatalf("enroll %s: %+v %v", a.MAC, ack, err)
		}
	}
	if got := c.states(); got != strings.TrimSpace(strings.Repeat("enrolled ", 5)) {
		t.Fatalf("final: %s", got)
	}
}

func TestCanaryFailure(t *testing.T) {
	c := newCluster(t, 4)
	r := c.create(deploy.Spec{Canary: 1, BatchSize: 3, FailureThreshold: 5})
	c.step()
	c.fail(c.boot()...)
	c.step()
	r = c.rollout(r.ID)
	if r.State != deploy.RolloutPaused || !strings.Contains(r.Reason, "canary failed") {
		t.Fatalf("rollout %s (%s)", r.State, r.Reason)
	}
	c.step()
	if got := c.states(); got != "failed discovered discovered discovered" {
		t.Fatalf("the rest started after a failed canary: %s", got)
	}
	n := c.node(0)
	if !strings.Contains(n.Reason, "unpack: digest mismatch") {
		t.Fatalf("failed reason %q", n.Reason)
	}
	// The administrator accepts the failure and resumes.
	if _, err := c.sched.Resume(context.Background(), r.ID); err != nil {
		t.Fatal(err)
	}
	c.step()
	if got := c.states(); got != "failed assigned assigned assigned" {
		t.Fatalf("after resume: %s", got)
	}
	c.install(c.boot()...)
	c.step()
	r = c.rollout(r.ID)
	if r.State != deploy.RolloutCompleted || r.Reason != "3 succeeded, 1 failed" {
		t.Fatalf("rollout %s (%s)", r.State, r.Reason)
	}
}

func TestThresholdPause(t *testing.T) {
	c := newCluster(t, 6)
	r := c.create(deploy.Spec{BatchSize: 3, FailureThreshold: 2})
	c.step()
	as := c.boot()
	c.fail(as[0])
	c.step()
	if r = c.rollout(r.ID); r.State != deploy.RolloutRunning {
		t.Fatalf("paused after 1 failure: %s", r.Reason)
	}
	c.fail(as[1])
	c.install(as[2])
	c.step()
	r = c.rollout(r.ID)
	if r.State != deploy.RolloutPaused || !strings.Contains(r.Reason, "failure threshold reached: 2") {
		t.Fatalf("rollout %s (%s)", r.State, r.Reason)
	}
	c.step()
	if got := c.states(); got != "failed failed installed discovered discovered discovered" {
		t.Fatalf("next batch started while paused: %s", got)
	}
	if _, err := c.sched.Resume(context.Background(), r.ID); err != nil {
		t.Fatal(err)
	}
	c.step()
	as = c.boot()
	if len(as) != 3 {
		t.Fatalf("second batch: %d nodes", len(as))
	}
	// One new failure is below the threshold again (accepted failures do not count).
	c.fail(as[0])
	c.install(as[1:]...)
	c.step()
	r = c.rollout(r.ID)
	if r.State != deploy.RolloutCompleted || r.Reason != "3 succeeded, 3 failed" {
		t.Fatalf("rollout %s (%s)", r.State, r.Reason)
	}
}

func TestRetriesWithBackoff(t *testing.T) {
	c := newCluster(t, 1)
	r := c.create(deploy.Spec{MaxRetries: 2, RetryBackoff: deploy.Duration(10 * time.Second), FailureThreshold: 1})
	c.step()
	c.fail(c.boot()...)
	c.step()
	r = c.rollout(r.ID)
	tg := r.Targets[0]
	if tg.Status != deploy.TargetRetrying || tg.Attempts != 1 || !tg.NextTry.Equal(c.clock.now().Add(10*time.Second)) || r.State != deploy.RolloutRunning {
		t.Fatalf("after first failure: %+v, rollout %s", tg, r.State)
	}
	c.clock.add(9 * time.Second)
	c.step()
	if c.node(0).State != deploy.Failed {
		t.Fatal("retried before the backoff")
	}
	c.clock.add(time.Second)
	c.step()
	if c.node(0).State != deploy.Assigned || c.rollout(r.ID).Targets[0].Attempts != 2 {
		t.Fatalf("no retry after backoff: %s", c.node(0).State)
	}
	c.fail(c.boot()...)
	c.step()
	tg = c.rollout(r.ID).Targets[0]
	if !tg.NextTry.Equal(c.clock.now().Add(20 * time.Second)) {
		t.Fatalf("second backoff: next try %v, want +20s", tg.NextTry.Sub(c.clock.now()))
	}
	c.clock.add(20 * time.Second)
	c.step()
	c.install(c.boot()...)
	c.step()
	r = c.rollout(r.ID)
	if r.State != deploy.RolloutCompleted || r.Targets[0].Status != deploy.TargetSucceeded || r.Targets[0].Attempts != 3 {
		t.Fatalf("rollout %s %+v", r.State, r.Targets[0])
	}
	// Retries exhausted: the node fails for good.
	c2 := newCluster(t, 1)
	r = c2.create(deploy.Spec{MaxRetries: 1, RetryBackoff: deploy.Duration(time.Second), FailureThreshold: 5})
	for range 2 {
		c2.step()
		c2.fail(c2.boot()...)
		c2.step()
		c2.clock.add(time.Minute)
	}
	c2.step()
	r = c2.rollout(r.ID)
	if r.Targets[0].Status != deploy.TargetFailed || r.Targets[0].Attempts != 2 || r.State != deploy.RolloutCompleted {
		t.Fatalf("exhausted: %s %+v", r.State, r.Targets[0])
	}
}

func TestCancel(t *testing.T) {
	c := newCluster(t, 3)
	r := c.create(deploy.Spec{BatchSize: 2})
	c.step()
	as := c.boot()
	c.install(as[0])
	if _, err := c.sched.Cancel(context.Background(), r.ID); err != nil {
		t.Fatal(err)
	}
	c.step()
	r = c.rollout(r.ID)
	if r.State != deploy.RolloutCancelled {
		t.Fatalf("state %s", r.State)
	}
	got := []deploy.TargetStatus{r.Targets[0].Status, r.Targets[1].Status, r.Targets[2].Status}
	if got[0] != deploy.TargetSucceeded {
		t.Fatalf("installed node's target %s", got[0])
	}
	if got[1] != deploy.TargetCancelled || got[2] != deploy.TargetCancelled {
		t.Fatalf("targets %v", got)
	}
	if s := c.states(); s != "installed failed discovered" {
		t.Fatalf("states after cancel: %s", s)
	}
	if !strings.Contains(c.node(1).Reason, "cancelled") {
		t.Fatalf("reason %q", c.node(1).Reason)
	}
	// The cancelled node's agent finds its install over.
	if ack, err := as[1].Progress(context.Background(), agentapi.PhaseFetching, 5, 10); err != nil || ack.Applied || ack.State != "failed" {
		t.Fatalf("agent after cancel: %+v %v", ack, err)
	}
	if _, err := c.sched.Cancel(context.Background(), r.ID); err == nil {
		t.Fatal("cancelled twice")
	}
	// The nodes are free for a new rollout.
	r2 := c.create(deploy.Spec{})
	c.step()
	if s := c.states(); s != "assigned assigned assigned" {
		t.Fatalf("new rollout: %s (rollout %d)", s, r2.ID)
	}
}

func TestNodeTimeout(t *testing.T) {
	c := newCluster(t, 1)
	r := c.create(deploy.Spec{NodeTimeout: deploy.Duration(time.Minute), FailureThreshold: 1})
	c.step()
	c.clock.add(2 * time.Minute) // the node never boots
	c.step()
	n := c.node(0)
	if n.State != deploy.Failed || !strings.Contains(n.Reason, "timeout: assigned") {
		t.Fatalf("node %s (%s)", n.State, n.Reason)
	}
	if r = c.rollout(r.ID); r.State != deploy.RolloutPaused {
		t.Fatalf("rollout %s", r.State)
	}
}

func TestConflict(t *testing.T) {
	c := newCluster(t, 2)
	c.create(deploy.Spec{Selector: deploy.Selector{Names: []string{c.agents[0].MAC}}})
	if _, err := c.sched.Create(context.Background(), deploy.Spec{Image: "img", Selector: deploy.Selector{Names: []string{c.agents[0].MAC, c.agents[1].MAC}}}); err == nil || !strings.Contains(err.Error(), "active rollout") {
		t.Fatalf("overlap: %v", err)
	}
}
