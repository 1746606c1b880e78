package store

import (
	"context"
	"errors"
	"os"
	"path/filepath"
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
