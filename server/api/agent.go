package api

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/auth"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/store"
	"github.com/labstack/echo/v4"
)

// logTailMax bounds the log lines kept per node.
const logTailMax = 100

func newAssignmentID(rollout int64) string {
	b := make([]byte, 6)
	rand.Read(b)
	return fmt.Sprintf("r%d-%s", rollout, hex.EncodeToString(b))
}

func normBodyMAC(field, m string) (string, error) {
	if m == "" {
		return "", nil
	}
	n, err := deploy.NormalizeMAC(m)
	if err != nil {
		return "", badRequest(field, "%v", err)
	}
	return n, nil
}

// requestMAC checks the body's "mac" field and that the caller's token is
// bound to that node.
func requestMAC(c echo.Context, body string) (string, error) {
	bm, err := normBodyMAC("mac", body)
	if err != nil {
		return "", err
	}
	return nodeMAC(c, bm)
}

func (a *API) register(c echo.Context) error {
	var req agentapi.RegisterRequest
	if err := bind(c, &req); err != nil {
		return err
	}
	mac, err := requestMAC(c, req.MAC)
	if err != nil {
		return err
	}
	if req.Inventory.MemoryBytes < 0 {
		return badRequest("inventory.memory_bytes", "must not be negative")
	}
	for i, d := range req.Inventory.Disks {
		if d.SizeBytes < 0 {
			return badRequest(fmt.Sprintf("inventory.disks[%d].size_bytes", i), "must not be negative")
		}
	}
	inv := req.Inventory
	return a.assign(c, mac, &inv)
}

func (a *API) assignment(c echo.Context) error {
	mac, err := nodeMAC(c, "")
	if err != nil {
		return err
	}
	return a.assign(c, mac, nil)
}

// assign answers register (inv set) and assignment polls (inv nil). A node
// that is assigned, or registers again in the middle of an install (it
// rebooted), moves to booting with a fresh assignment.
func (a *API) assign(c echo.Context, mac string, inv *agentapi.Inventory) error {
	ctx := c.Request().Context()
	now := a.now().UTC()
	var resp agentapi.RegisterResponse
	err := a.st.Update(ctx, func(tx store.Tx) error {
		n, err := tx.Node(mac)
		if errors.Is(err, store.ErrNotFound) {
			if !a.cfg.Discovery {
				return echo.NewHTTPError(http.StatusForbidden, "mac: node "+mac+" is unknown and discovery is off")
			}
			if n, err = a.newNode(tx, mac, "", "discovered by agent"); err != nil {
				return err
			}
		} else if err != nil {
			return err
		}
		if inv != nil {
			n.Inventory = inv
			n.Updated = now
		}
		resp = agentapi.RegisterResponse{Hostname: n.Hostname, Number: n.Number, PollSeconds: a.cfg.PollSeconds}
		switch n.State {
		case deploy.Assigned, deploy.Booting, deploy.Fetching, deploy.Installing:
			reason := "agent registered"
			if n.State != deploy.Assigned {
				reason = fmt.Sprintf("agent registered again during %s (node rebooted): fresh assignment", n.State)
			}
			asg, err := a.buildAssignment(c, tx, n)
			if err != nil {
				ev, terr := n.Transition(deploy.Failed, err.Error(), now)
				if terr != nil {
					return terr
				}
				if err := tx.PutNode(n); err != nil {
					return err
				}
				resp.Mode = agentapi.ModeInventory
				return tx.AddEvent(ev)
			}
			ev, err := n.Transition(deploy.Booting, reason, now)
			if err != nil {
				return err
			}
			if a.cluster != nil {
				// A reinstall: the node netbooted, so its stack is down;
				// the other members drop it from the nodelist now.
				if m, ok := a.cluster.MemberOf(mac); ok {
					if err := a.cluster.Remove(m.Name, "reinstall"); err != nil {
						return err
					}
					if err := tx.AddEvent(deploy.Event{MAC: mac, Time: now, Reason: fmt.Sprintf("left cluster %s for its reinstall: id %d retired", a.cluster.Name(), m.ID)}); err != nil {
						return err
					}
				}
			}
			n.Assignment, n.Phase = asg.ID, agentapi.PhaseBooting
			if err := tx.AddEvent(ev); err != nil {
				return err
			}
			resp.Mode, resp.Assignment = agentapi.ModeInstall, asg
		case deploy.Installed, deploy.Enrolled:
			resp.Mode = agentapi.ModeLocal
		default:
			resp.Mode = agentapi.ModeInventory
		}
		return tx.PutNode(n)
	})
	if err != nil {
		return err
	}
	if resp.Assignment != nil {
		a.live.reset(mac)
		a.sched.Wake()
	}
	return c.JSON(http.StatusOK, resp)
}

func (a *API) buildAssignment(c echo.Context, tx store.Tx, n *deploy.Node) (*agentapi.Assignment, error) {
	img, err := a.images.Assign(c.Request().Context(), n.Image, a.cfg.PublicURL)
	if err != nil {
		return nil, fmt.Errorf("image %s unavailable: %w", n.Image, err)
	}
	disk := a.cfg.Disk
	// The rollout's disk layout overrides the server's default.
	r, err := tx.RolloutInfo(n.Rollout)
	if err != nil {
		return nil, err
	}
	if r.Spec.Disk != nil {
		disk = *r.Spec.Disk
	}
	exp := a.now().Add(a.cfg.EnrollTokenTTL)
	return &agentapi.Assignment{
		ID:             newAssignmentID(n.Rollout),
		Rollout:        n.Rollout,
		Image:          img,
		Disk:           disk,
		Hostname:       n.Hostname,
		Number:         n.Number,
		Network:        a.cfg.Network,
		Server:         a.cfg.PublicURL,
		EnrollToken:    a.signer.Issue(auth.Enroll, n.MAC, exp),
		AuthorizedKeys: a.cfg.AuthorizedKeys,
	}, nil
}

// phaseState maps an agent phase to the node state.
func phaseState(phase string) (deploy.State, bool) {
	switch phase {
	case agentapi.PhaseBooting:
		return deploy.Booting, true
	case agentapi.PhaseFetching:
		return deploy.Fetching, true
	case agentapi.PhaseInstalling:
		return deploy.Installing, true
	}
	return "", false
}

// order ranks the install states so stale phases can be recognised.
func order(s deploy.State) int {
	switch s {
	case deploy.Booting:
		return 1
	case deploy.Fetching:
		return 2
	case deploy.Installing:
		return 3
	case deploy.Installed:
		return 4
	case deploy.Enrolled:
		return 5
	}
	return 0
}

// advance walks n forward along booting -> fetching -> installing ->
// installed until it reaches to, logging each transition.
func advance(tx store.Tx, n *deploy.Node, to deploy.State, reason string, now time.Time) error {
	chain := []deploy.State{deploy.Booting, deploy.Fetching, deploy.Installing, deploy.Installed}
	for _, s := range chain {
		if order(s) <= order(n.State) || order(s) > order(to) {
			continue
		}
		ev, err := n.Transition(s, reason, now)
		if err != nil {
			return err
		}
		if err := tx.AddEvent(ev); err != nil {
			return err
		}
	}
	return nil
}

func appendTail(tail []string, lines ...string) []string {
	for _, l := range lines {
		if len(l) > 1024 {
			l = l[:1024]
		}
		tail = append(tail, l)
	}
	if len(tail) > logTailMax {
		tail = append([]string(nil), tail[len(tail)-logTailMax:]...)
	}
	return tail
}

// current checks that the request is about the node's current assignment.
func current(n *deploy.Node, asg string) error {
	if asg == "" {
		return badRequest("assignment", "required")
	}
	if n.Assignment != asg {
		return echo.NewHTTPError(http.StatusConflict, fmt.Sprintf("assignment: %s is not node %s's current assignment", asg, n.MAC))
	}
	return nil
}

func (a *API) events(c echo.Context) error {
	var b agentapi.EventBatch
	if err := bind(c, &b); err != nil {
		return err
	}
	mac, err := requestMAC(c, b.MAC)
	if err != nil {
		return err
	}
	if len(b.Events) == 0 {
		return badRequest("events", "at least one event is required")
	}
	if len(b.Events) > 1000 {
		return badRequest("events", "at most 1000 events per batch")
	}
	for i, ev := range b.Events {
		if _, ok := phaseState(ev.Phase); !ok {
			return badRequest(fmt.Sprintf("events[%d].phase", i), "want booting, fetching or installing, got %q", ev.Phase)
		}
		if ev.Bytes < 0 || ev.Total < 0 || ev.Rate < 0 || ev.Peers < 0 {
			return badRequest(fmt.Sprintf("events[%d]", i), "bytes, total, rate and peers must not be negative")
		}
	}
	now := a.now().UTC()
	ctx := c.Request().Context()
	a.metrics.agentEvents.Add(int64(len(b.Events)))
	// Fast path: progress within the current phase needs no write.
	ns, err := a.st.NodeStatus(ctx, mac)
	if err != nil {
		return err
	}
	if err := current(&deploy.Node{MAC: mac, Assignment: ns.Assignment}, b.Assignment); err != nil {
		return err
	}
	n := &deploy.Node{MAC: mac, State: ns.State, Assignment: ns.Assignment}
	needWrite := false
	applied := false
	for _, ev := range b.Events {
		st, _ := phaseState(ev.Phase)
		if order(st) > order(n.State) || len(ev.Log) > 0 {
			needWrite = true
		}
	}
	if !needWrite {
		for _, ev := range b.Events {
			st, _ := phaseState(ev.Phase)
			if st == n.State && a.live.apply(mac, b.Assignment, ev, now) {
				applied = true
			}
		}
		return c.JSON(http.StatusOK, agentapi.Ack{Applied: applied, State: string(n.State)})
	}
	changed := false
	err = a.st.Update(ctx, func(tx store.Tx) error {
		var err error
		if n, err = tx.Node(mac); err != nil {
			return err
		}
		if err := current(n, b.Assignment); err != nil {
			return err
		}
		if !n.State.Active() {
			return nil
		}
		dirty := false
		for _, ev := range b.Events {
			if !a.live.apply(mac, b.Assignment, ev, now) {
				continue // a repeat
			}
			applied = true
			st, _ := phaseState(ev.Phase)
			if order(st) > order(n.State) {
				reason := "agent: " + ev.Phase
				if ev.Step != "" {
					reason += " (" + ev.Step + ")"
				}
				if err := advance(tx, n, st, reason, now); err != nil {
					return err
				}
				n.Phase = ev.Phase
				dirty, changed = true, true
			}
			if len(ev.Log) > 0 {
				n.LogTail = appendTail(n.LogTail, ev.Log...)
				dirty = true
			}
		}
		if !dirty {
			return nil
		}
		n.Updated = now
		return tx.PutNode(n)
	})
	if err != nil {
		return err
	}
	if changed {
		a.sched.Wake()
	}
	return c.JSON(http.StatusOK, agentapi.Ack{Applied: applied, State: string(n.State)})
}

func (a *API) report(c echo.Context) error {
	var r agentapi.Report
	if err := bind(c, &r); err != nil {
		return err
	}
	mac, err := requestMAC(c, r.MAC)
	if err != nil {
		return err
	}
	if !r.Success && strings.TrimSpace(r.Reason) == "" {
		return badRequest("reason", "required when success is false")
	}
	now := a.now().UTC()
	var ack agentapi.Ack
	err = a.st.Update(c.Request().Context(), func(tx store.Tx) error {
		n, err := tx.Node(mac)
		if err != nil {
			return err
		}
		if err := current(n, r.Assignment); err != nil {
			return err
		}
		ack.State = string(n.State)
		if !n.State.Active() {
			ack.Note = "already " + string(n.State) + ": report changes nothing"
			return nil
		}
		if len(r.LogTail) > 0 {
			n.LogTail = appendTail(n.LogTail, r.LogTail...)
		}
		if r.Success {
			if err := advance(tx, n, deploy.Installed, "agent: installed", now); err != nil {
				return err
			}
		} else {
			reason := r.Reason
			if r.Step != "" {
				reason = r.Step + ": " + reason
			}
			ev, err := n.Transition(deploy.Failed, reason, now)
			if err != nil {
				return err
			}
			if err := tx.AddEvent(ev); err != nil {
				return err
			}
		}
		ack.Applied, ack.State = true, string(n.State)
		return tx.PutNode(n)
	})
	if err != nil {
		return err
	}
	if ack.Applied {
		a.sched.Wake()
	}
	return c.JSON(http.StatusOK, ack)
}

func (a *API) enroll(c echo.Context) error {
	var r agentapi.EnrollRequest
	if err := bind(c, &r); err != nil {
		return err
	}
	mac, err := requestMAC(c, r.MAC)
	if err != nil {
		return err
	}
	now := a.now().UTC()
	var ack agentapi.Ack
	var node *deploy.Node
	err = a.st.Update(c.Request().Context(), func(tx store.Tx) error {
		n, err := tx.Node(mac)
		if err != nil {
			return err
		}
		node = n
		ack.State = string(n.State)
		switch n.State {
		case deploy.Enrolled:
			ack.Note = "already enrolled"
			return nil
		case deploy.Installed:
		default:
			return echo.NewHTTPError(http.StatusConflict, fmt.Sprintf("node %s is %s, not installed: cannot enroll", mac, n.State))
		}
		if r.Inventory.MemoryBytes > 0 || len(r.Inventory.Disks) > 0 {
			inv := r.Inventory
			n.Inventory = &inv
		}
		if a.cluster != nil {
			// Enrolled only once the node's engines agree (ssiStatus).
			ack.Note = "joining cluster " + a.cluster.Name()
			return tx.PutNode(n)
		}
		reason := "enrolled at first boot"
		if r.Hostname != "" && r.Hostname != n.Hostname {
			reason += fmt.Sprintf(" (reports hostname %q)", r.Hostname)
		}
		ev, err := n.Transition(deploy.Enrolled, reason, now)
		if err != nil {
			return err
		}
		if err := tx.AddEvent(ev); err != nil {
			return err
		}
		ack.Applied, ack.State = true, string(n.State)
		return tx.PutNode(n)
	})
	if err != nil {
		return err
	}
	if a.cluster != nil {
		prev, was := a.cluster.MemberOf(mac)
		m, err := a.ssiJoin(c, node, r.Addr)
		if err != nil {
			return err
		}
		if !was || prev.ID != m.ID || prev.Addr != m.Addr {
			a.note(c, mac, fmt.Sprintf("joining cluster %s as %s member id %d at %s (nodelist version %d)",
				a.cluster.Name(), m.Role, m.ID, m.Addr, a.cluster.Snapshot().Version))
		}
		ack.Applied, ack.Cluster = true, a.cluster.Name()
	}
	return c.JSON(http.StatusOK, ack)
}
