package enroll

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/ssi"
	ssienroll "github.com/esir-project/esir/ssi/enroll"
)

// Follower is the node service's part in an SSI cluster: it applies each
// bundle version the server hands out (install, start or reload, verify,
// reconcile pacemaker on core members), reports the engines' verdict and
// its membership view, and leaves when told to.
type Follower struct {
	Client *agentapi.Client
	MAC    string
	Node   *ssienroll.Node
	Log    *slog.Logger
	// OnToken is called with a renewed token (to persist it).
	OnToken func(token string)
	// Heartbeat is how often the full view is reported (default 10 s);
	// Watch how often a core member checks corosync's membership for a
	// change it reports at once (default 250 ms: three light corosync
	// queries, on the core members only).
	Heartbeat, Watch time.Duration
	// Retry is how long a failed enrollment waits before trying again
	// (default 10 s).
	Retry time.Duration
}

// errLeft is returned by Follow when the server no longer knows the node
// as a member.
var errLeft = errors.New("left the cluster")

// Follow runs until ctx ends, the node has left the cluster on the
// server's word (nil), or the server no longer lists it (IsLeft).
func (f *Follower) Follow(ctx context.Context) error {
	if f.Heartbeat <= 0 {
		f.Heartbeat = 10 * time.Second
	}
	if f.Watch <= 0 {
		f.Watch = 250 * time.Millisecond
	}
	if f.Retry <= 0 {
		f.Retry = 10 * time.Second
	}
	if f.Log == nil {
		f.Log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	asgs := make(chan *agentapi.SSIAssignment, 1)
	pollErr := make(chan error, 1)
	go func() { pollErr <- f.poll(ctx, asgs) }()

	var (
		cur      *agentapi.SSIAssignment
		b        *ssi.Bundle
		applied  = -1 // version applied successfully
		failedAt time.Time
		lastKey  string
		lastSent time.Time
		// An enrollment runs beside the loop, so that a newer version
		// (another node joined meanwhile) interrupts it: the members must
		// all reach the same nodelist to form one membership.
		stopApply context.CancelFunc
		applyDone chan bool
		applyVer  int
	)
	startApply := func() {
		actx, stop := context.WithCancel(ctx)
		done := make(chan bool, 1)
		a, nb := cur, b
		stopApply, applyDone, applyVer = stop, done, a.Version
		go func() { done <- f.apply(actx, a, nb) }()
	}
	abortApply := func() {
		if stopApply != nil {
			stopApply()
			<-applyDone
			stopApply, applyDone = nil, nil
		}
	}
	defer abortApply()
	watch := time.NewTicker(f.Watch)
	defer watch.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-pollErr:
			return err
		case ok := <-applyDone:
			stopApply()
			stopApply, applyDone = nil, nil
			if ok {
				applied, failedAt = applyVer, time.Time{}
			} else {
				failedAt = time.Now()
			}
			lastSent, lastKey = time.Now(), ""
		case a := <-asgs:
			var nb ssi.Bundle
			if err := json.Unmarshal(a.Bundle, &nb); err != nil {
				f.Log.Error("ssi: bundle from the server does not decode", "version", a.Version, "err", err)
				continue
			}
			cur, b = a, &nb
			if a.Action == agentapi.SSILeave {
				abortApply()
				return f.leave(ctx, cur, b)
			}
			if a.Version != applied {
				if stopApply != nil {
					f.Log.Info("ssi: a newer nodelist version arrived: applying it instead", "was", applyVer, "version", a.Version)
				}
				abortApply()
				startApply()
			}
		case <-watch.C:
			if b == nil || stopApply != nil {
				continue
			}
			if !failedAt.IsZero() {
				if time.Since(failedAt) >= f.Retry {
					startApply()
				}
				continue
			}
			// A core member reports a change in corosync's membership at
			// once; everything else rides on the heartbeat.
			key := lastKey
			if b.Member.Role == ssi.Core && slices.Contains(b.Services, "corosync") {
				if m, err := f.Node.Status(ctx); err == nil {
					key = fmt.Sprint(m.Joined, m.Quorate, m.Nodelist)
				} else {
					key = "error: " + err.Error()
				}
			}
			if key == lastKey && time.Since(lastSent) < f.Heartbeat {
				continue
			}
			lastKey, lastSent = key, time.Now()
			if b.Member.Role == ssi.Core {
				if err := f.Node.Reconcile(ctx, b); err != nil {
					f.Log.Warn("ssi: reconcile pacemaker", "err", err)
				}
			}
			v, err := f.Node.View(ctx, b)
			f.report(ctx, cur.Version, v, err)
			if err != nil {
				// A check that held at enrollment fails now (an engine
				// died, a peer went away): enrollment is idempotent and
				// starts only what is not running, so it runs again
				// after Retry, until the checks hold.
				f.Log.Warn("ssi: a check failed after enrollment: enrolling again", "in", f.Retry, "err", err)
				failedAt = time.Now()
			}
		}
	}
}

// poll long-polls the server for the node's assignment and passes each one
// on; it ends with nil when the server no longer knows the node as a member.
func (f *Follower) poll(ctx context.Context, out chan *agentapi.SSIAssignment) error {
	version, action := -1, ""
	wait := time.Second
	for ctx.Err() == nil {
		a, err := f.Client.SSI(ctx, version, 25*time.Second)
		if err != nil {
			if agentapi.IsStatus(err, 404) {
				f.Log.Info("ssi: the server no longer lists this node as a cluster member", "err", err)
				return errLeft
			}
			if agentapi.IsStatus(err, 401) || agentapi.IsStatus(err, 403) {
				return fmt.Errorf("ssi assignment: refused: %w", err)
			}
			if agentapi.IsStatus(err, 503) {
				// The cluster waits for nodes its definition names.
				f.Log.Info("ssi: the cluster is not ready for this node yet", "err", err)
				select {
				case <-ctx.Done():
				case <-time.After(2 * time.Second):
				}
				continue
			}
			f.Log.Warn("ssi: server not reachable, retrying", "in", wait, "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(wait):
			}
			wait = min(2*wait, 30*time.Second)
			continue
		}
		wait = time.Second
		if a.Token != "" {
			f.Client.Token = a.Token
			if f.OnToken != nil {
				f.OnToken(a.Token)
			}
		}
		if a.Version == version && a.Action == action {
			continue // the wait ended without a change
		}
		version, action = a.Version, a.Action
		select {
		case <-out: // a newer assignment replaces one not yet taken
		default:
		}
		out <- a
		if a.Action == agentapi.SSILeave {
			// The server answers a leaving node at once: stop asking.
			<-ctx.Done()
			return ctx.Err()
		}
	}
	return ctx.Err()
}

// apply enrolls the node with b and reports the verdict; it returns whether
// every check passed.
func (f *Follower) apply(ctx context.Context, a *agentapi.SSIAssignment, b *ssi.Bundle) bool {
	log := f.Log.With("cluster", a.Cluster, "version", a.Version, "node", b.Member.Name, "role", b.Member.Role)
	start := time.Now()
	m, err := f.Node.Enroll(ctx, b)
	if err == nil && b.Member.Role == ssi.Core {
		err = f.Node.Reconcile(ctx, b)
	}
	if err != nil {
		if ctx.Err() != nil {
			return false // interrupted by a newer version or the end
		}
		log.Error("ssi: not enrolled", "err", err)
		f.report(ctx, a.Version, m, err)
		return false
	}
	if v, verr := f.Node.View(ctx, b); verr == nil {
		m = v
	}
	log.Info("ssi: enrolled", "took", time.Since(start).Round(time.Millisecond))
	f.report(ctx, a.Version, m, nil)
	return true
}

// report sends the verdict: enrolled with the view, or the failed check.
func (f *Follower) report(ctx context.Context, version int, m ssienroll.Membership, err error) {
	st := agentapi.SSIStatus{MAC: f.MAC, Version: version, State: agentapi.SSIEnrolled}
	if view, jerr := json.Marshal(m); jerr == nil {
		st.View = view
	}
	if err != nil {
		st.State, st.Check, st.Error = agentapi.SSIFailed, "enroll", err.Error()
		var ce *ssienroll.CheckError
		if errors.As(err, &ce) {
			st.Check = ce.Check
		}
	}
	if _, err := f.Client.SSIStatus(ctx, st); err != nil {
		f.Log.Warn("ssi: report to the server", "state", st.State, "err", err)
	}
}

// leave stops the node's stack and confirms, so the server drops it from
// the nodelist.
func (f *Follower) leave(ctx context.Context, a *agentapi.SSIAssignment, b *ssi.Bundle) error {
	f.Log.Info("ssi: leaving the cluster", "cluster", a.Cluster, "node", b.Member.Name)
	if err := f.Node.Leave(ctx, b); err != nil {
		// The server removes the node after its leave timeout anyway; say
		// why the stack did not stop.
		f.Log.Error("ssi: leave", "err", err)
		return fmt.Errorf("leave cluster %s: %w", a.Cluster, err)
	}
	if _, err := f.Client.SSIStatus(ctx, agentapi.SSIStatus{MAC: f.MAC, Version: a.Version, State: agentapi.SSILeft}); err != nil {
		return fmt.Errorf("leave cluster %s: confirm: %w", a.Cluster, err)
	}
	f.Log.Info("ssi: left the cluster", "cluster", a.Cluster)
	return nil
}

// IsLeft reports whether Follow ended because the node is no longer a
// member.
func IsLeft(err error) bool { return errors.Is(err, errLeft) }
