package main

import (
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/deploy"
)

func TestWatchLines(t *testing.T) {
	r := &deploy.Rollout{ID: 3, Spec: deploy.Spec{Image: "img:1"}, State: deploy.RolloutRunning, Batch: 0, Batches: 2, Created: time.Now()}
	v := &api.RolloutView{Rollout: r, Summary: api.Summary{Total: 3, Active: 1, Succeeded: 1, Failed: 1, Fraction: 0.5, ETASeconds: 90}, Nodes: []api.TargetView{
		{Target: deploy.Target{MAC: "a", Status: deploy.TargetSucceeded}, Hostname: "node001", Fraction: 1},
		{Target: deploy.Target{MAC: "b", Status: deploy.TargetActive}, Hostname: "node002", State: "fetching", Fraction: 0.5,
			Progress: &api.Progress{Bytes: 32 << 20, Total: 64 << 20, Rate: 10 << 20, Peers: 3}},
		{Target: deploy.Target{MAC: "c", Status: deploy.TargetFailed, LastError: "unpack: digest mismatch"}, Hostname: "node003", Fraction: 1},
	}}
	lines := watchLines(v, 10)
	if len(lines) != 3 {
		t.Fatalf("lines %q: want the active node, the failed node and the overall line", lines)
	}
	for i, want := range []string{"node002      [#####.....]  50%  fetching 32.0 MiB/64.0 MiB 10.0 MiB/s 3 peers", "node003", "failed: unpack: digest mismatch"} {
		if !strings.Contains(lines[min(i, 1)], want) {
			t.Errorf("line %q lacks %q", lines[min(i, 1)], want)
		}
	}
	if o := lines[2]; !strings.Contains(o, "rollout 3 img:1 [#####.....]  50%  1/3 done, 1 active, 1 failed, batch 1/2  ETA 1m30s") {
		t.Errorf("overall %q", o)
	}
	r.State, r.Reason = deploy.RolloutPaused, "canary failed"
	if o := overallLine(v, 10); !strings.HasSuffix(o, "paused: canary failed") {
		t.Errorf("paused %q", o)
	}
}
