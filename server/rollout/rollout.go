// Package rollout schedules the deployment of an image onto nodes: it turns a
// rollout's spec into batches (a canary batch first when asked), assigns the
// nodes of the current batch, watches their state, retries failed nodes with
// exponential backoff, pauses the rollout when the canary fails or failures
// reach the threshold, and completes it when every node is done.
//
// The scheduler keeps no state of its own: everything lives in the store and
// each Step re-reads it, so a server restarted after a crash resumes every
// rollout where it was.
package rollout

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/store"
)

// Errors returned (wrapped) by the scheduler's operations.
var (
	// ErrConflict: a selected node is already in an active rollout, or the
	// rollout's state forbids the operation.
	ErrConflict = errors.New("conflict")
	// ErrNoNodes: the selector matched no node.
	ErrNoNodes = errors.New("selector matches no node")
)

// Images resolves an image reference NAME[:VERSION] to its canonical
// NAME:VERSION, returning an error wrapping store.ErrNotFound when unknown.
type Images interface {
	Canonical(ctx context.Context, ref string) (string, error)
}

// Scheduler drives rollouts stored in a store.Store.
type Scheduler struct {
	st     store.Store
	images Images
	log    *slog.Logger
	now    func() time.Time
	wake   chan struct{}
	// Interval is how often Run steps without being woken.
	Interval time.Duration
}

// New returns a scheduler over st. now is the clock (time.Now when nil).
func New(st store.Store, images Images, log *slog.Logger, now func() time.Time) *Scheduler {
	if now == nil {
		now = time.Now
	}
	return &Scheduler{st: st, images: images, log: log, now: now, wake: make(chan struct{}, 1), Interval: time.Second}
}

// Wake asks Run to step soon (a node changed state).
func (s *Scheduler) Wake() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Run steps every Interval and whenever woken, until ctx ends. Step errors
// are logged, never swallowed silently, and retried at the next step.
func (s *Scheduler) Run(ctx context.Context) {
	t := time.NewTicker(s.Interval)
	defer t.Stop()
	for {
		if err := s.Step(ctx); err != nil && ctx.Err() == nil {
			s.log.Error("rollout step failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.wake:
		}
	}
}

// Create validates spec, resolves its image and selector, and stores a new
// running rollout. Unknown images or named nodes give errors wrapping
// store.ErrNotFound; a node already in an active rollout gives ErrConflict.
func (s *Scheduler) Create(ctx context.Context, spec deploy.Spec) (*deploy.Rollout, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	img, err := s.images.Canonical(ctx, spec.Image)
	if err != nil {
		return nil, err
	}
	spec.Image = img
	now := s.now().UTC()
	var r *deploy.Rollout
	err = s.st.Update(ctx, func(tx store.Tx) error {
		// Selectors match names and labels: brief rows carry both.
		nodes, err := tx.Nodes(store.NodeFilter{Brief: true})
		if err != nil {
			return err
		}
		for _, name := range spec.Selector.Names {
			found := false
			for _, n := range nodes {
				if (deploy.Selector{Names: []string{name}}).Match(n) {
					found = true
					break
				}
			}
			if !found {
				return fmt.Errorf("node %s: %w", name, store.ErrNotFound)
			}
		}
		var macs []string
		for _, n := range nodes {
			if !spec.Selector.Match(n) {
				continue
			}
			id, err := tx.ActiveRollout(n.MAC)
			if err != nil {
				return err
			}
			if id != 0 {
				return fmt.Errorf("node %s (%s) is in active rollout %d: %w", n.Hostname, n.MAC, id, ErrConflict)
			}
			if n.State.Active() {
				return fmt.Errorf("node %s (%s) is %s: %w", n.Hostname, n.MAC, n.State, ErrConflict)
			}
			macs = append(macs, n.MAC)
		}
		if len(macs) == 0 {
			return ErrNoNodes
		}
		targets, batches := deploy.Plan(macs, spec.Canary, spec.BatchSize)
		r = &deploy.Rollout{Spec: spec, State: deploy.RolloutRunning, Batches: batches, Created: now, Updated: now, Targets: targets}
		return tx.CreateRollout(r)
	})
	if err != nil {
		return nil, err
	}
	s.log.Info("rollout created", "rollout", r.ID, "image", spec.Image, "nodes", len(r.Targets), "batches", r.Batches)
	s.Wake()
	return r, nil
}

// Pause stops a running rollout from starting more nodes.
func (s *Scheduler) Pause(ctx context.Context, id int64, reason string) (*deploy.Rollout, error) {
	if reason == "" {
		reason = "paused by administrator"
	}
	return s.change(ctx, id, func(tx store.Tx, r *deploy.Rollout) error {
		if r.State != deploy.RolloutRunning {
			return fmt.Errorf("rollout %d is %s, not running: %w", id, r.State, ErrConflict)
		}
		r.State, r.Reason = deploy.RolloutPaused, reason
		return nil
	})
}

// Resume restarts a paused rollout. Failures counted so far are accepted:
// the failure threshold counts only new ones, and a failed canary no longer
// holds the rest back.
func (s *Scheduler) Resume(ctx context.Context, id int64) (*deploy.Rollout, error) {
	return s.change(ctx, id, func(tx store.Tx, r *deploy.Rollout) error {
		if r.State != deploy.RolloutPaused {
			return fmt.Errorf("rollout %d is %s, not paused: %w", id, r.State, ErrConflict)
		}
		r.State, r.Reason = deploy.RolloutRunning, ""
		r.FailuresAccepted = count(r.Targets, deploy.TargetFailed)
		return nil
	})
}

// Cancel ends a rollout: pending nodes are never started and nodes in the
// middle of an install are marked failed.
func (s *Scheduler) Cancel(ctx context.Context, id int64) (*deploy.Rollout, error) {
	return s.change(ctx, id, func(tx store.Tx, r *deploy.Rollout) error {
		if r.State.Final() {
			return fmt.Errorf("rollout %d is already %s: %w", id, r.State, ErrConflict)
		}
		now := s.now().UTC()
		reason := fmt.Sprintf("rollout %d cancelled", id)
		for i := range r.Targets {
			t := &r.Targets[i]
			if t.Status.Done() {
				continue
			}
			if t.Status == deploy.TargetActive {
				n, err := tx.Node(t.MAC)
				if err != nil && !errors.Is(err, store.ErrNotFound) {
					return err
				}
				if n != nil && n.Rollout == id && (n.State == deploy.Installed || n.State == deploy.Enrolled) {
					// It finished before the cancel: count it as done.
					t.Status, t.Finished, t.LastError = deploy.TargetSucceeded, now, ""
					if err := tx.PutTarget(id, *t); err != nil {
						return err
					}
					continue
				}
				if n != nil && n.Rollout == id && n.State.Active() {
					if err := transition(tx, n, deploy.Failed, reason, now); err != nil {
						return err
					}
				}
			}
			t.Status, t.Finished, t.LastError = deploy.TargetCancelled, now, reason
			if err := tx.PutTarget(id, *t); err != nil {
				return err
			}
		}
		r.State, r.Reason = deploy.RolloutCancelled, "cancelled by administrator"
		return nil
	})
}

func (s *Scheduler) change(ctx context.Context, id int64, fn func(store.Tx, *deploy.Rollout) error) (*deploy.Rollout, error) {
	var r *deploy.Rollout
	err := s.st.Update(ctx, func(tx store.Tx) error {
		var err error
		if r, err = tx.Rollout(id); err != nil {
			return err
		}
		if err := fn(tx, r); err != nil {
			return err
		}
		r.Updated = s.now().UTC()
		return tx.PutRollout(r)
	})
	if err != nil {
		return nil, err
	}
	s.log.Info("rollout changed", "rollout", id, "state", r.State, "reason", r.Reason)
	s.Wake()
	return r, nil
}

// Step reconciles every running or paused rollout once, each in its own
// transaction.
func (s *Scheduler) Step(ctx context.Context) error {
	var ids []int64
	err := s.st.View(ctx, func(tx store.Tx) error {
		rs, err := tx.Rollouts(deploy.RolloutRunning, deploy.RolloutPaused)
		for _, r := range rs {
			ids = append(ids, r.ID)
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("rollout step: %w", err)
	}
	var errs []error
	for i := len(ids) - 1; i >= 0; i-- { // oldest first
		if err := s.st.Update(ctx, func(tx store.Tx) error { return s.stepOne(tx, ids[i]) }); err != nil {
			errs = append(errs, fmt.Errorf("rollout %d: %w", ids[i], err))
		}
	}
	return errors.Join(errs...)
}

func count(ts []deploy.Target, st deploy.TargetStatus) int {
	n := 0
	for _, t := range ts {
		if t.Status == st {
			n++
		}
	}
	return n
}

func transition(tx store.Tx, n *deploy.Node, to deploy.State, reason string, now time.Time) error {
	ev, err := n.Transition(to, reason, now)
	if err != nil {
		return err
	}
	if err := tx.PutNode(n); err != nil {
		return err
	}
	return tx.AddEvent(ev)
}

func (s *Scheduler) stepOne(tx store.Tx, id int64) error {
	r, err := tx.Rollout(id)
	if err != nil {
		return err
	}
	now := s.now().UTC()
	orig := *r
	// The nodes this rollout holds, read once.
	held, err := tx.NodeStatuses(r.ID)
	if err != nil {
		return err
	}
	nodes := make(map[string]*store.NodeStatus, len(held))
	for i := range held {
		nodes[held[i].MAC] = &held[i]
	}
	// 1. Follow the nodes in flight.
	for i := range r.Targets {
		t := &r.Targets[i]
		before := *t
		switch t.Status {
		case deploy.TargetActive:
			if err := s.follow(tx, r, t, nodes[t.MAC], now); err != nil {
				return err
			}
		case deploy.TargetRetrying:
			if r.State == deploy.RolloutRunning && !now.Before(t.NextTry) {
				if err := s.start(tx, r, t, now); err != nil {
					return err
				}
			}
		}
		if *t != before {
			if err := tx.PutTarget(r.ID, *t); err != nil {
				return err
			}
		}
	}
	// 2. Pause on failures.
	failed := count(r.Targets, deploy.TargetFailed)
	if r.State == deploy.RolloutRunning && failed-r.FailuresAccepted >= r.Spec.FailureThreshold {
		r.State = deploy.RolloutPaused
		r.Reason = fmt.Sprintf("failure threshold reached: %d node(s) failed (threshold %d)", failed-r.FailuresAccepted, r.Spec.FailureThreshold)
	}
	// 3. Advance through finished batches.
	for r.State == deploy.RolloutRunning && r.Batch < r.Batches && batchDone(r.Targets, r.Batch) {
		if r.Spec.Canary > 0 && r.Batch == 0 {
			cf := 0
			for _, t := range r.Targets {
				if t.Batch == 0 && t.Status == deploy.TargetFailed {
					cf++
				}
			}
			if cf > r.FailuresAccepted {
				r.State = deploy.RolloutPaused
				r.Reason = fmt.Sprintf("canary failed: %d of %d canary node(s) failed", cf, r.Spec.Canary)
				break
			}
		}
		r.Batch++
	}
	if r.State == deploy.RolloutRunning && r.Batch >= r.Batches && allDone(r.Targets) {
		r.State = deploy.RolloutCompleted
		r.Reason = fmt.Sprintf("%d succeeded, %d failed", count(r.Targets, deploy.TargetSucceeded), failed)
	}
	// 4. Start the current batch's pending nodes.
	if r.State == deploy.RolloutRunning {
		for i := range r.Targets {
			t := &r.Targets[i]
			if t.Batch != r.Batch || t.Status != deploy.TargetPending {
				continue
			}
			if err := s.start(tx, r, t, now); err != nil {
				return err
			}
			if err := tx.PutTarget(r.ID, *t); err != nil {
				return err
			}
		}
	}
	if r.State != orig.State || r.Batch != orig.Batch || r.Reason != orig.Reason {
		r.Updated = now
		if err := tx.PutRollout(r); err != nil {
			return err
		}
		s.log.Info("rollout progress", "rollout", r.ID, "state", r.State, "batch", r.Batch, "batches", r.Batches, "reason", r.Reason)
	}
	return nil
}

func batchDone(ts []deploy.Target, b int) bool {
	for _, t := range ts {
		if t.Batch == b && !t.Status.Done() {
			return false
		}
	}
	return true
}

func allDone(ts []deploy.Target) bool {
	for _, t := range ts {
		if !t.Status.Done() {
			return false
		}
	}
	return true
}

// follow updates an active target from its node's state.
// n is the node's status when this rollout holds it, nil otherwise.
func (s *Scheduler) follow(tx store.Tx, r *deploy.Rollout, t *deploy.Target, n *store.NodeStatus, now time.Time) error {
	if n == nil {
		var err error
		n, err = tx.NodeStatus(t.MAC)
		if errors.Is(err, store.ErrNotFound) {
			t.Status, t.Finished, t.LastError = deploy.TargetFailed, now, "node removed"
			return nil
		}
		if err != nil {
			return err
		}
	}
	if n.Rollout != r.ID {
		t.Status, t.Finished, t.LastError = deploy.TargetFailed, now, fmt.Sprintf("node taken by rollout %d", n.Rollout)
		return nil
	}
	if n.State.Active() && now.Sub(n.Changed) > time.Duration(r.Spec.NodeTimeout) {
		full, err := tx.Node(t.MAC)
		if err != nil {
			return err
		}
		reason := fmt.Sprintf("timeout: %s for more than %s", n.State, time.Duration(r.Spec.NodeTimeout))
		if err := transition(tx, full, deploy.Failed, reason, now); err != nil {
			return err
		}
		n.State, n.Reason = full.State, full.Reason
	}
	switch n.State {
	case deploy.Installed, deploy.Enrolled:
		t.Status, t.Finished, t.LastError = deploy.TargetSucceeded, now, ""
	case deploy.Failed:
		t.LastError = n.Reason
		if t.Attempts <= r.Spec.MaxRetries {
			backoff := time.Duration(r.Spec.RetryBackoff) << min(t.Attempts-1, 16)
			t.Status, t.NextTry = deploy.TargetRetrying, now.Add(backoff)
			s.log.Warn("node failed, will retry", "rollout", r.ID, "node", n.MAC, "attempt", t.Attempts, "retry_in", backoff, "reason", n.Reason)
		} else {
			t.Status, t.Finished = deploy.TargetFailed, now
			s.log.Warn("node failed", "rollout", r.ID, "node", n.MAC, "attempts", t.Attempts, "reason", n.Reason)
		}
	}
	return nil
}

// start assigns the target's node to the rollout.
func (s *Scheduler) start(tx store.Tx, r *deploy.Rollout, t *deploy.Target, now time.Time) error {
	n, err := tx.Node(t.MAC)
	if errors.Is(err, store.ErrNotFound) {
		t.Status, t.Finished, t.LastError = deploy.TargetFailed, now, "node removed"
		return nil
	}
	if err != nil {
		return err
	}
	if n.State.Active() && n.Rollout != r.ID {
		t.Status, t.Finished, t.LastError = deploy.TargetFailed, now, fmt.Sprintf("node busy in rollout %d", n.Rollout)
		return nil
	}
	t.Attempts++
	reason := fmt.Sprintf("rollout %d attempt %d: image %s", r.ID, t.Attempts, r.Spec.Image)
	ev := deploy.Event{MAC: n.MAC, Time: now, From: n.State, To: deploy.Assigned, Reason: reason}
	if n.State != deploy.Assigned {
		if ev, err = n.Transition(deploy.Assigned, reason, now); err != nil {
			return err
		}
	}
	n.Rollout, n.Image, n.Assignment, n.Phase = r.ID, r.Spec.Image, "", ""
	n.Changed = now
	if err := tx.PutNode(n); err != nil {
		return err
	}
	if err := tx.AddEvent(ev); err != nil {
		return err
	}
	t.Status, t.Started, t.NextTry = deploy.TargetActive, now, time.Time{}
	return nil
}
