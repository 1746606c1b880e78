package deploy

import (
	"encoding/json"
	"errors"
	"testing"
	"time"
)

func TestTransitions(t *testing.T) {
	legal := map[State][]State{
		Discovered: {Assigned},
		Assigned:   {Booting, Failed, Discovered},
		Booting:    {Booting, Fetching, Failed},
		Fetching:   {Booting, Installing, Failed},
		Installing: {Booting, Installed, Failed},
		Installed:  {Enrolled, Assigned, Failed},
		Enrolled:   {Assigned},
		Failed:     {Assigned, Discovered},
	}
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, from := range States {
		for _, to := range States {
			want := false
			for _, l := range legal[from] {
				if l == to {
					want = true
				}
			}
			t.Run(string(from)+"->"+string(to), func(t *testing.T) {
				if got := CanTransition(from, to); got != want {
					t.Fatalf("CanTransition = %v, want %v", got, want)
				}
				n := &Node{MAC: "02:00:00:00:00:01", State: from}
				ev, err := n.Transition(to, "because", now)
				if !want {
					var te *TransitionError
					if !errors.As(err, &te) || te.From != from || te.To != to {
						t.Fatalf("illegal transition: err = %v, want *TransitionError", err)
					}
					if n.State != from {
						t.Fatalf("refused transition changed state to %s", n.State)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				if n.State != to || ev.From != from || ev.To != to || !ev.Time.Equal(now) || !n.Changed.Equal(now) {
					t.Fatalf("node %+v event %+v", n, ev)
				}
				if (to == Failed) != (n.Reason == "because") {
					t.Fatalf("reason %q after -> %s", n.Reason, to)
				}
			})
		}
	}
	if CanTransition("bogus", Assigned) || State("bogus").Valid() {
		t.Fatal("unknown state accepted")
	}
}

func TestActive(t *testing.T) {
	active := map[State]bool{Assigned: true, Booting: true, Fetching: true, Installing: true}
	for _, s := range States {
		if s.Active() != active[s] {
			t.Errorf("%s.Active() = %v", s, s.Active())
		}
	}
}

func TestPlan(t *testing.T) {
	macs := []string{"e", "d", "c", "b", "a", "f", "g"}
	tests := []struct {
		name          string
		canary, batch int
		batches       []int
		n             int
	}{
		{"no canary", 0, 3, []int{0, 0, 0, 1, 1, 1, 2}, 3},
		{"canary 1", 1, 3, []int{0, 1, 1, 1, 2, 2, 2}, 3},
		{"canary 2 batch 10", 2, 10, []int{0, 0, 1, 1, 1, 1, 1}, 2},
		{"batch 1", 0, 1, []int{0, 1, 2, 3, 4, 5, 6}, 7},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ts, n := Plan(macs, tt.canary, tt.batch)
			if n != tt.n {
				t.Fatalf("batches = %d, want %d", n, tt.n)
			}
			for i, tg := range ts {
				if tg.Batch != tt.batches[i] || tg.Status != TargetPending {
					t.Fatalf("target %d = %+v, want batch %d", i, tg, tt.batches[i])
				}
				if i > 0 && ts[i-1].MAC > tg.MAC {
					t.Fatal("targets not sorted")
				}
			}
		})
	}
	if ts, n := Plan(nil, 1, 3); len(ts) != 0 || n != 0 {
		t.Fatal("empty plan has batches")
	}
}

func TestSpecValidate(t *testing.T) {
	sel := Selector{Labels: map[string]string{"rack": "a"}}
	tests := []struct {
		spec  Spec
		field string
	}{
		{Spec{Selector: sel}, "image"},
		{Spec{Image: "x"}, "selector"},
		{Spec{Image: "x", Selector: Selector{Labels: map[string]string{"bad key!": "v"}}}, "selector.labels"},
		{Spec{Image: "x", Selector: sel, BatchSize: -1}, "batch_size"},
		{Spec{Image: "x", Selector: sel, Canary: -1}, "canary"},
		{Spec{Image: "x", Selector: sel, FailureThreshold: -2}, "failure_threshold"},
		{Spec{Image: "x", Selector: sel, MaxRetries: 101}, "max_retries"},
		{Spec{Image: "x", Selector: sel, RetryBackoff: -1}, "retry_backoff"},
		{Spec{Image: "x", Selector: sel, NodeTimeout: -1}, "node_timeout"},
		{Spec{Image: "x", Selector: sel}, ""},
	}
	for _, tt := range tests {
		err := tt.spec.Validate()
		var fe *FieldError
		switch {
		case tt.field == "" && err != nil:
			t.Errorf("%+v: %v", tt.spec, err)
		case tt.field != "" && (!errors.As(err, &fe) || fe.Field != tt.field):
			t.Errorf("%+v: err = %v, want field %s", tt.spec, err, tt.field)
		}
	}
	s := Spec{Image: "x", Selector: sel}
	s.Validate()
	if s.BatchSize != 10 || s.FailureThreshold != 1 || time.Duration(s.RetryBackoff) != 30*time.Second || time.Duration(s.NodeTimeout) != time.Hour {
		t.Fatalf("defaults not filled: %+v", s)
	}
}

func TestSelector(t *testing.T) {
	n := &Node{MAC: "02:00:00:00:00:01", Hostname: "node001", Labels: map[string]string{"rack": "a", "role": "compute"}}
	tests := []struct {
		sel  Selector
		want bool
	}{
		{Selector{}, false},
		{Selector{Names: []string{"node001"}}, true},
		{Selector{Names: []string{"02:00:00:00:00:01"}}, true},
		{Selector{Names: []string{"node002"}}, false},
		{Selector{Labels: map[string]string{"rack": "a"}}, true},
		{Selector{Labels: map[string]string{"rack": "a", "role": "storage"}}, false},
		{Selector{Names: []string{"node001"}, Labels: map[string]string{"rack": "b"}}, false},
	}
	for _, tt := range tests {
		if got := tt.sel.Match(n); got != tt.want {
			t.Errorf("%+v.Match = %v, want %v", tt.sel, got, tt.want)
		}
	}
}

func TestParsing(t *testing.T) {
	if m, err := NormalizeMAC("52-54-00-AB-CD-EF"); err != nil || m != "52:54:00:ab:cd:ef" {
		t.Fatalf("NormalizeMAC = %q, %v", m, err)
	}
	for _, bad := range []string{"", "zz", "00:11:22:33:44:55:66:77"} {
		if _, err := NormalizeMAC(bad); err == nil {
			t.Errorf("NormalizeMAC(%q) accepted", bad)
		}
	}
	if m, err := ParseLabels("rack=a,role=compute", "zone=z1"); err != nil || len(m) != 3 || m["zone"] != "z1" {
		t.Fatalf("ParseLabels = %v, %v", m, err)
	}
	for _, bad := range []string{"noequals", "=v", "k=v w"} {
		if _, err := ParseLabels(bad); err == nil {
			t.Errorf("ParseLabels(%q) accepted", bad)
		}
	}
	if ValidHostname("Node_1") == nil || ValidHostname("node-1") != nil {
		t.Fatal("ValidHostname")
	}
	var d struct{ D Duration }
	for in, want := range map[string]time.Duration{`{"D":"1m30s"}`: 90 * time.Second, `{"D":2.5}`: 2500 * time.Millisecond} {
		if err := json.Unmarshal([]byte(in), &d); err != nil || time.Duration(d.D) != want {
			t.Errorf("%s -> %v, %v", in, time.Duration(d.D), err)
		}
	}
	if err := json.Unmarshal([]byte(`{"D":"soon"}`), &d); err == nil {
		t.Error("bad duration accepted")
	}
	b, _ := json.Marshal(struct{ D Duration }{Duration(time.Minute)})
	if string(b) != `{"D":"1m0s"}` {
		t.Errorf("marshal = %s", b)
	}
}
