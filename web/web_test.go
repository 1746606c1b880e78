package web

import (
	"testing"
	"time"

	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/deploy"
)

func TestFraction(t *testing.T) {
	half := &api.Progress{Bytes: 50, Total: 100}
	for _, tc := range []struct {
		st   deploy.State
		p    *api.Progress
		want float64
	}{
		{deploy.Discovered, nil, 0},
		{deploy.Assigned, nil, 0},
		{deploy.Booting, nil, 0.02},
		{deploy.Fetching, nil, 0.05},
		{deploy.Fetching, half, 0.35},
		{deploy.Fetching, &api.Progress{Bytes: 500, Total: 100}, 0.65},
		{deploy.Installing, half, 0.825},
		{deploy.Installed, nil, 1},
		{deploy.Enrolled, half, 1},
		{deploy.Failed, half, 0},
	} {
		if got := fraction(tc.st, tc.p); got < tc.want-1e-9 || got > tc.want+1e-9 {
			t.Errorf("fraction(%s, %+v) = %g, want %g", tc.st, tc.p, got, tc.want)
		}
	}
}

func TestSafeNext(t *testing.T) {
	for in, want := range map[string]string{
		"":                       "/ui/",
		"/ui/nodes?state=failed": "/ui/nodes?state=failed",
		"//evil.example/ui/":     "/ui/",
		"https://evil.example":   "/ui/",
		"/api/v1/nodes":          "/ui/",
		"/ui/\\evil":             "/ui/",
	} {
		if got := safeNext(in); got != want {
			t.Errorf("safeNext(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestSelectorForm(t *testing.T) {
	for _, tc := range []struct {
		names, labels string
		wantNames     int
		wantLabels    int
		wantErr       bool
	}{
		{"node001, node002\nnode003", "", 3, 0, false},
		{"52-54-00-00-00-01", "rack=r1,role=db", 1, 2, false},
		{"", "rack", 0, 0, true},
		{"", "", 0, 0, false},
	} {
		sel, errs := selector(tc.names, tc.labels)
		if len(sel.Names) != tc.wantNames || len(sel.Labels) != tc.wantLabels || (errs["labels"] != "") != tc.wantErr {
			t.Errorf("selector(%q, %q) = %+v, %v", tc.names, tc.labels, sel, errs)
		}
	}
	if sel, _ := selector("52-54-00-00-00-01", ""); sel.Names[0] != "52:54:00:00:00:01" {
		t.Errorf("MAC not normalised: %q", sel.Names[0])
	}
}

func TestHuman(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{humanDuration(-1), "—"}, {humanDuration(42), "42s"}, {humanDuration(200), "3m 20s"}, {humanDuration(7300), "2h 01m"},
		{humanBytes(512), "512 B"}, {humanBytes(3 << 20), "3.0 MiB"}, {humanRate(0), "—"},
		{ago(time.Unix(100, 0), time.Unix(40, 0)), "1m ago"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}

func TestTemplatesParse(t *testing.T) {
	pages, err := parsePages()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"login", "error", "dashboard", "nodes", "node", "images", "image", "rollouts", "rollout_new", "rollout", "swarm", "users", "cluster"} {
		if pages[name] == nil {
			t.Errorf("no template %s", name)
		}
	}
}
