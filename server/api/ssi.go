package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/auth"
	"github.com/esir-project/esir/server/cluster"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/store"
	"github.com/labstack/echo/v4"
)

// ssiMaxWait bounds an SSI assignment long poll.
const ssiMaxWait = 30 * time.Second

// SetCluster makes the API hand out SSI assignments of c (nil: no cluster).
// Call it before serving.
func (a *API) SetCluster(c *cluster.Service) { a.cluster = c }

// Cluster returns the SSI cluster, or nil.
func (a *API) Cluster() *cluster.Service { return a.cluster }

func (a *API) needCluster() error {
	if a.cluster == nil {
		return echo.NewHTTPError(http.StatusNotFound, "cluster: this server keeps no SSI cluster (set cluster_definition)")
	}
	return nil
}

// clusterError maps the cluster service's errors to statuses.
func clusterError(err error) error {
	switch {
	case errors.Is(err, cluster.ErrNotMember):
		return echo.NewHTTPError(http.StatusNotFound, err.Error())
	case errors.Is(err, cluster.ErrConflict):
		return echo.NewHTTPError(http.StatusConflict, err.Error())
	case errors.Is(err, cluster.ErrNotReady):
		return echo.NewHTTPError(http.StatusServiceUnavailable, err.Error())
	}
	return err
}

// ssiJoin allocates the enrolling node its SSI membership; the node stays
// installed until its node service reports that its engines agree.
func (a *API) ssiJoin(c echo.Context, n *deploy.Node, addr string) (cluster.Member, error) {
	ip, err := netip.ParseAddr(addr)
	if err != nil {
		return cluster.Member{}, badRequest("addr", "the node's cluster address is required to join cluster %s: %q: %v", a.cluster.Name(), addr, err)
	}
	m, err := a.cluster.Join(n.Hostname, n.MAC, ip)
	if err != nil {
		a.note(c, n.MAC, "cluster join refused: "+err.Error())
		return m, clusterError(err)
	}
	return m, nil
}

// note appends a note (no transition) to a node's event log.
func (a *API) note(c echo.Context, mac, reason string) {
	err := a.st.Update(c.Request().Context(), func(tx store.Tx) error {
		return tx.AddEvent(deploy.Event{MAC: mac, Time: a.now().UTC(), Reason: reason})
	})
	if err != nil {
		a.log.Warn("event note", "mac", mac, "err", err)
	}
}

// ssiAssignment answers a node service's GET ssi: with version >= 0 it
// waits (up to wait ms, at most ssiMaxWait) for a new nodelist version or a
// leave.
func (a *API) ssiAssignment(c echo.Context) error {
	if err := a.needCluster(); err != nil {
		return err
	}
	mac, err := nodeMAC(c, "")
	if err != nil {
		return err
	}
	version := -1
	if v := c.QueryParam("version"); v != "" {
		if version, err = strconv.Atoi(v); err != nil {
			return badRequest("version", "want an integer, got %q", v)
		}
	}
	wait := ssiMaxWait
	if v := c.QueryParam("wait"); v != "" {
		ms, err := strconv.Atoi(v)
		if err != nil || ms < 0 {
			return badRequest("wait", "want milliseconds, got %q", v)
		}
		wait = min(time.Duration(ms)*time.Millisecond, ssiMaxWait)
	}
	if version >= 0 {
		ctx, cancel := context.WithCancel(c.Request().Context())
		stop := context.AfterFunc(a.stopping, cancel)
		a.cluster.Wait(ctx, mac, version, wait)
		stop()
		cancel()
	}
	b, action, err := a.cluster.Assignment(mac)
	if err != nil {
		if errors.Is(err, cluster.ErrNotReady) {
			c.Response().Header().Set("Retry-After", "2")
		}
		return clusterError(err)
	}
	data, err := json.Marshal(b)
	if err != nil {
		return err
	}
	out := agentapi.SSIAssignment{Cluster: a.cluster.Name(), Action: action, Version: b.Version, Bundle: data}
	// A node service runs as long as the node: renew its token before it
	// expires.
	if cl, ok := c.Get(claimsKey).(auth.Claims); ok && cl.Expires.Sub(a.now()) < a.cfg.EnrollTokenTTL/2 {
		out.Token = a.signer.Issue(auth.Enroll, mac, a.now().Add(a.cfg.EnrollTokenTTL))
	}
	return c.JSON(http.StatusOK, out)
}

// ssiStatus records a node service's verdict. The node becomes enrolled on
// its first "enrolled" verdict; a failed check is logged on the node.
func (a *API) ssiStatus(c echo.Context) error {
	if err := a.needCluster(); err != nil {
		return err
	}
	var r agentapi.SSIStatus
	if err := bind(c, &r); err != nil {
		return err
	}
	mac, err := requestMAC(c, r.MAC)
	if err != nil {
		return err
	}
	prev, _ := a.cluster.MemberOf(mac)
	m, first, err := a.cluster.Report(mac, cluster.Report{Version: r.Version, State: r.State, Check: r.Check, Error: r.Error, View: r.View})
	if err != nil {
		return clusterError(err)
	}
	ack := agentapi.Ack{Applied: true, State: string(m.State)}
	switch {
	case r.State == agentapi.SSILeft:
		a.note(c, mac, fmt.Sprintf("left cluster %s: id %d retired, its stack stopped", a.cluster.Name(), prev.ID))
		ack.State = "left"
	case r.State == agentapi.SSIFailed && (prev.State != cluster.Failed || prev.Check != r.Check):
		a.note(c, mac, fmt.Sprintf("cluster %s: check %s failed at nodelist version %d: %s", a.cluster.Name(), r.Check, r.Version, r.Error))
	case first:
		err := a.st.Update(c.Request().Context(), func(tx store.Tx) error {
			n, err := tx.Node(mac)
			if errors.Is(err, store.ErrNotFound) {
				return nil // removed meanwhile: the cluster still has it until it leaves
			}
			if err != nil {
				return err
			}
			if n.State != deploy.Installed {
				return nil
			}
			ev, err := n.Transition(deploy.Enrolled, fmt.Sprintf("enrolled: %s member id %d of cluster %s, engines agree at nodelist version %d",
				m.Role, m.ID, a.cluster.Name(), r.Version), a.now().UTC())
			if err != nil {
				return err
			}
			if err := tx.AddEvent(ev); err != nil {
				return err
			}
			return tx.PutNode(n)
		})
		if err != nil {
			return err
		}
	}
	return c.JSON(http.StatusOK, ack)
}

// getCluster shows the cluster: members with role and state, quorum, VIP
// holders.
func (a *API) getCluster(c echo.Context) error {
	if err := a.needCluster(); err != nil {
		return err
	}
	return c.JSON(http.StatusOK, a.cluster.Snapshot())
}

// leaveCluster starts a member's leave.
// ReloadResult is what a cluster definition reload did.
type ReloadResult struct {
	Changed bool `json:"changed"` // the definition changed: members apply it
	Version int  `json:"version"` // the nodelist version now
}

// reloadCluster reads the definition file again (cluster.Service.Reload).
func (a *API) reloadCluster(c echo.Context) error {
	if err := a.needCluster(); err != nil {
		return err
	}
	v, changed, err := a.cluster.Reload()
	if err != nil {
		return echo.NewHTTPError(http.StatusUnprocessableEntity, err.Error())
	}
	return c.JSON(http.StatusOK, ReloadResult{Changed: changed, Version: v})
}

func (a *API) leaveCluster(c echo.Context) error {
	if err := a.needCluster(); err != nil {
		return err
	}
	m, err := a.cluster.Leave(c.Param("name"), "esir cluster leave")
	if err != nil {
		return clusterError(err)
	}
	if m.MAC != "" {
		a.note(c, m.MAC, fmt.Sprintf("leaving cluster %s (esir cluster leave)", a.cluster.Name()))
	}
	return c.JSON(http.StatusAccepted, m)
}
