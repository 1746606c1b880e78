package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/deploy"
)

func open(t *testing.T, path string) *SQLite {
	t.Helper()
	s, err := OpenSQLite(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestOpenMigrateReopen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "sub", "esir.db")
	s := open(t, path)
	v, err := s.SchemaVersion(ctx)
	if err != nil || v != len(migrations()) {
		t.Fatalf("schema version %d, %v", v, err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("database mode %v, %v; want 0600", fi.Mode().Perm(), err)
	}
	var mode string
	if err := s.r.QueryRow(`PRAGMA journal_mode`).Scan(&mode); err != nil || mode != "wal" {
		t.Fatalf("journal_mode %q, %v", mode, err)
	}
	if err := s.Update(ctx, func(tx Tx) error { return tx.SetMeta("k", "v") }); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s2 := open(t, path)
	if v, _ := s2.SchemaVersion(ctx); v != len(migrations()) {
		t.Fatalf("reopened schema version %d", v)
	}
	s2.View(ctx, func(tx Tx) error {
		if v, err := tx.Meta("k"); v != "v" || err != nil {
			t.Fatalf("meta after reopen %q %v", v, err)
		}
		return nil
	})
	// A database from a newer server is refused.
	if _, err := s2.w.Exec(`INSERT INTO schema_migrations(version, applied) VALUES (999, 0)`); err != nil {
		t.Fatal(err)
	}
	s2.Close()
	if _, err := OpenSQLite(ctx, path); err == nil {
		t.Fatal("newer schema accepted")
	}
}

func TestNodesEventsRollouts(t *testing.T) {
	ctx := context.Background()
	s := open(t, filepath.Join(t.TempDir(), "esir.db"))
	now := time.Now().UTC().Truncate(time.Microsecond)
	err := s.Update(ctx, func(tx Tx) error {
		for i, mac := range []string{"02:00:00:00:00:01", "02:00:00:00:00:02"} {
			num, err := tx.NextNodeNumber()
			if err != nil || num != i+1 {
				t.Fatalf("next number %d %v", num, err)
			}
			n := &deploy.Node{MAC: mac, Hostname: "n" + string(rune('1'+i)), Number: num, Labels: map[string]string{"rack": "a"},
				State: deploy.Discovered, Created: now, Updated: now, Changed: now,
				Inventory: &agentapi.Inventory{MemoryBytes: 1 << 30}, LogTail: []string{"hello"}}
			if i == 1 {
				n.Labels["rack"] = "b"
			}
			if err := tx.PutNode(n); err != nil {
				return err
			}
			if err := tx.AddEvent(deploy.Event{MAC: mac, Time: now, To: deploy.Discovered, Reason: "test"}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	s.View(ctx, func(tx Tx) error {
		n, err := tx.Node("02:00:00:00:00:01")
		if err != nil || n.Inventory.MemoryBytes != 1<<30 || n.LogTail[0] != "hello" || !n.Created.Equal(now) {
			t.Fatalf("node %+v %v", n, err)
		}
		if st, err := s.NodeStatus(ctx, "02:00:00:00:00:01"); err != nil || st.State != deploy.Discovered || !st.Changed.Equal(now) {
			t.Fatalf("status %+v %v", st, err)
		}
		if _, err := s.NodeStatus(ctx, "02:00:00:00:00:09"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("missing node status: %v", err)
		}
		if _, err := tx.Node("02:00:00:00:00:09"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("missing node: %v", err)
		}
		ns, err := tx.Nodes(NodeFilter{Labels: map[string]string{"rack": "b"}})
		if err != nil || len(ns) != 1 || ns[0].Number != 2 {
			t.Fatalf("label filter %v %v", ns, err)
		}
		ns, _ = tx.Nodes(NodeFilter{State: deploy.Installed})
		if len(ns) != 0 {
			t.Fatal("state filter")
		}
		c, err := tx.CountNodes()
		if err != nil || c[deploy.Discovered] != 2 {
			t.Fatalf("count %v %v", c, err)
		}
		evs, err := tx.Events("02:00:00:00:00:01", 10)
		if err != nil || len(evs) != 1 || evs[0].Reason != "test" {
			t.Fatalf("events %v %v", evs, err)
		}
		return nil
	})
	// A failing transaction leaves nothing behind.
	boom := errors.New("boom")
	err = s.Update(ctx, func(tx Tx) error {
		if err := tx.DeleteNode("02:00:00:00:00:01"); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v", err)
	}
	r := &deploy.Rollout{Spec: deploy.Spec{Image: "img:1"}, State: deploy.RolloutRunning, Batches: 1, Created: now, Updated: now,
		Targets: []deploy.Target{{MAC: "02:00:00:00:00:01", Status: deploy.TargetPending}}}
	err = s.Update(ctx, func(tx Tx) error {
		if _, err := tx.Node("02:00:00:00:00:01"); err != nil {
			t.Fatal("rolled-back delete happened")
		}
		if err := tx.CreateRollout(r); err != nil {
			return err
		}
		id, err := tx.ActiveRollout("02:00:00:00:00:01")
		if err != nil || id != r.ID {
			t.Fatalf("active rollout %d %v", id, err)
		}
		tg := r.Targets[0]
		tg.Status, tg.Attempts, tg.NextTry = deploy.TargetSucceeded, 2, now
		if err := tx.PutTarget(r.ID, tg); err != nil {
			return err
		}
		if err := tx.PutTarget(r.ID, deploy.Target{MAC: "02:00:00:00:00:07"}); !errors.Is(err, ErrNotFound) {
			t.Fatalf("unknown target: %v", err)
		}
		r.State = deploy.RolloutCompleted
		return tx.PutRollout(r)
	})
	if err != nil {
		t.Fatal(err)
	}
	s.View(ctx, func(tx Tx) error {
		got, err := tx.Rollout(r.ID)
		if err != nil || got.State != deploy.RolloutCompleted || got.Targets[0].Attempts != 2 || !got.Targets[0].NextTry.Equal(now) || got.Spec.Image != "img:1" {
			t.Fatalf("rollout %+v %v", got, err)
		}
		if id, _ := tx.ActiveRollout("02:00:00:00:00:01"); id != 0 {
			t.Fatal("completed rollout still active")
		}
		if _, err := tx.Rollout(99); !errors.Is(err, ErrNotFound) {
			t.Fatalf("missing rollout: %v", err)
		}
		rs, _ := tx.Rollouts(deploy.RolloutRunning)
		if len(rs) != 0 {
			t.Fatal("state filter on rollouts")
		}
		return nil
	})
}

func TestTokens(t *testing.T) {
	ctx := context.Background()
	s := open(t, filepath.Join(t.TempDir(), "esir.db"))
	put := func(id, hash string) error {
		return s.Update(ctx, func(tx Tx) error {
			return tx.PutToken(Token{ID: id, Name: "n" + id, Hash: hash, Created: time.Now()})
		})
	}
	if err := put("a", "h1"); err != nil {
		t.Fatal(err)
	}
	if err := put("b", "h1"); err == nil {
		t.Fatal("duplicate hash accepted")
	}
	s.View(ctx, func(tx Tx) error {
		tk, err := tx.TokenByHash("h1")
		if err != nil || tk.ID != "a" {
			t.Fatalf("%v %v", tk, err)
		}
		if _, err := tx.TokenByHash("nope"); !errors.Is(err, ErrNotFound) {
			t.Fatal(err)
		}
		return nil
	})
	if err := s.Update(ctx, func(tx Tx) error { return tx.DeleteToken("zz") }); !errors.Is(err, ErrNotFound) {
		t.Fatal(err)
	}
}

func TestWriteErrorReported(t *testing.T) {
	ctx := context.Background()
	s := open(t, filepath.Join(t.TempDir(), "esir.db"))
	// Writes in a read-only transaction fail and the error reaches the caller.
	err := s.View(ctx, func(tx Tx) error { return tx.SetMeta("k", "v") })
	if err == nil {
		t.Fatal("write in a read-only transaction succeeded")
	}
	s.Close()
	if err := s.Update(ctx, func(tx Tx) error { return tx.SetMeta("k", "v") }); err == nil {
		t.Fatal("write to a closed database succeeded")
	}
}

// pagedFleet stores nine nodes: number i, hostname h<10-i> (reverse order),
// every third failed, rack label a|b|c, image img-even|img-odd.
func pagedFleet(t *testing.T, s *SQLite) {
	t.Helper()
	now := time.Unix(1700000000, 0).UTC()
	err := s.Update(context.Background(), func(tx Tx) error {
		for i := 1; i <= 9; i++ {
			st := deploy.Discovered
			if i%3 == 0 {
				st = deploy.Failed
			}
			img := "img-odd"
			if i%2 == 0 {
				img = "img-even"
			}
			n := &deploy.Node{MAC: fmt.Sprintf("52:54:00:00:00:%02x", i), Hostname: fmt.Sprintf("h%d", 10-i), Number: i,
				Labels: map[string]string{"rack": string(rune('a' + i%3))}, State: st, Image: img,
				Created: now, Updated: now.Add(time.Duration(i) * time.Second), Changed: now}
			if err := tx.PutNode(n); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestNodesPagedSortedFiltered(t *testing.T) {
	s := open(t, filepath.Join(t.TempDir(), "esir.db"))
	pagedFleet(t, s)
	numbers := func(ns []*deploy.Node) []int {
		var out []int
		for _, n := range ns {
			out = append(out, n.Number)
		}
		return out
	}
	tests := []struct {
		name  string
		f     NodeFilter
		want  []int
		total int
	}{
		{"all by number", NodeFilter{}, []int{1, 2, 3, 4, 5, 6, 7, 8, 9}, 9},
		{"first page", NodeFilter{Limit: 4}, []int{1, 2, 3, 4}, 9},
		{"second page", NodeFilter{Limit: 4, Offset: 4}, []int{5, 6, 7, 8}, 9},
		{"last page, short", NodeFilter{Limit: 4, Offset: 8}, []int{9}, 9},
		{"past the end", NodeFilter{Limit: 4, Offset: 20}, nil, 9},
		{"offset without limit", NodeFilter{Offset: 7}, []int{8, 9}, 9},
		{"descending", NodeFilter{Desc: true, Limit: 3}, []int{9, 8, 7}, 9},
		{"by hostname", NodeFilter{Sort: "hostname", Limit: 3}, []int{9, 8, 7}, 9},
		{"by state, ties by number", NodeFilter{Sort: "state"}, []int{1, 2, 4, 5, 7, 8, 3, 6, 9}, 9},
		{"by state descending", NodeFilter{Sort: "state", Desc: true, Limit: 4}, []int{9, 6, 3, 8}, 9},
		{"by image", NodeFilter{Sort: "image", Limit: 5}, []int{2, 4, 6, 8, 1}, 9},
		{"by updated descending", NodeFilter{Sort: "updated", Desc: true, Limit: 2}, []int{9, 8}, 9},
		{"state filter, paged", NodeFilter{State: deploy.Failed, Limit: 2, Offset: 1}, []int{6, 9}, 3},
		{"label filter", NodeFilter{Labels: map[string]string{"rack": "b"}}, []int{1, 4, 7}, 3},
		{"query hostname", NodeFilter{Query: "H3"}, []int{7}, 1},
		{"query mac", NodeFilter{Query: "00:0a"}, nil, 0},
		{"query mac found", NodeFilter{Query: "00:00:09"}, []int{9}, 1},
		{"query image", NodeFilter{Query: "EVEN", Limit: 2}, []int{2, 4}, 4},
		{"query label key=value", NodeFilter{Query: "rack=c"}, []int{2, 5, 8}, 3},
		{"query and state", NodeFilter{Query: "img-odd", State: deploy.Failed}, []int{3, 9}, 2},
		{"query with LIKE wildcards is literal", NodeFilter{Query: "h%"}, nil, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, brief := range []bool{false, true} {
				f := tt.f
				f.Brief = brief
				var got []*deploy.Node
				var total int
				err := s.View(context.Background(), func(tx Tx) error {
					var err error
					if got, err = tx.Nodes(f); err != nil {
						return err
					}
					total, err = tx.CountMatching(f)
					return err
				})
				if err != nil {
					t.Fatal(err)
				}
				if g := numbers(got); fmt.Sprint(g) != fmt.Sprint(tt.want) {
					t.Errorf("brief=%v: numbers %v, want %v", brief, g, tt.want)
				}
				if total != tt.total {
					t.Errorf("brief=%v: total %d, want %d", brief, total, tt.total)
				}
				for _, n := range got {
					if n.Labels["rack"] == "" || n.Hostname == "" || n.Image == "" {
						t.Errorf("brief=%v: node %d read incompletely: %+v", brief, n.Number, n)
					}
				}
			}
		})
	}
	err := s.View(context.Background(), func(tx Tx) error {
		_, err := tx.Nodes(NodeFilter{Sort: "nope"})
		return err
	})
	if err == nil || !strings.Contains(err.Error(), `sort: unknown column "nope"`) {
		t.Fatalf("unknown sort column: %v", err)
	}
}

// The status cache follows commits, ignores rolled-back writes and deletes,
// and is rebuilt from the database on reopen.
func TestNodeStatusCache(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "esir.db")
	s := open(t, path)
	pagedFleet(t, s)
	mac := "52:54:00:00:00:01"
	changed := time.Unix(1700000100, 5).In(time.FixedZone("x", 3600))
	err := s.Update(ctx, func(tx Tx) error {
		n, err := tx.Node(mac)
		if err != nil {
			return err
		}
		n.State, n.Rollout, n.Assignment, n.Changed = deploy.Booting, 7, "r7-a", changed
		return tx.PutNode(n)
	})
	if err != nil {
		t.Fatal(err)
	}
	st, err := s.NodeStatus(ctx, mac)
	if err != nil || st.State != deploy.Booting || st.Rollout != 7 || st.Assignment != "r7-a" || !st.Changed.Equal(changed) || st.Changed.Location() != time.UTC {
		t.Fatalf("after commit: %+v, %v", st, err)
	}
	boom := errors.New("boom")
	err = s.Update(ctx, func(tx Tx) error {
		n, err := tx.Node(mac)
		if err != nil {
			return err
		}
		n.State = deploy.Failed
		if err := tx.PutNode(n); err != nil {
			return err
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatal(err)
	}
	if st, _ := s.NodeStatus(ctx, mac); st.State != deploy.Booting {
		t.Fatalf("after rollback: state %s, want booting", st.State)
	}
	if err := s.Update(ctx, func(tx Tx) error { return tx.DeleteNode("52:54:00:00:00:02") }); err != nil {
		t.Fatal(err)
	}
	if _, err := s.NodeStatus(ctx, "52:54:00:00:00:02"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("deleted node: %v", err)
	}
	s.Close()
	s2 := open(t, path)
	for _, tc := range []struct {
		mac   string
		state deploy.State
	}{{mac, deploy.Booting}, {"52:54:00:00:00:03", deploy.Failed}, {"52:54:00:00:00:04", deploy.Discovered}} {
		st, err := s2.NodeStatus(ctx, tc.mac)
		if err != nil || st.State != tc.state {
			t.Errorf("reopened %s: %+v, %v; want %s", tc.mac, st, err, tc.state)
		}
	}
	if st, _ := s2.NodeStatus(ctx, mac); st.Assignment != "r7-a" || !st.Changed.Equal(changed) {
		t.Errorf("reopened %s: %+v", mac, st)
	}
	if _, err := s2.NodeStatus(ctx, "52:54:00:00:00:02"); !errors.Is(err, ErrNotFound) {
		t.Errorf("reopened, deleted node: %v", err)
	}
}
