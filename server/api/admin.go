package api

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/esir-project/esir/server/auth"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/store"
	"github.com/labstack/echo/v4"
)

// NodeView is a node as the API shows it, with live progress.
type NodeView struct {
	*deploy.Node
	Progress *Progress `json:"progress,omitempty"`
}

// NodeDetail is one node with its event log.
type NodeDetail struct {
	NodeView
	ActiveRollout int64          `json:"active_rollout,omitempty"`
	Events        []deploy.Event `json:"events"`
}

// AddNodeRequest pre-registers a node.
type AddNodeRequest struct {
	MAC      string            `json:"mac"`
	Hostname string            `json:"hostname,omitempty"`
	Labels   map[string]string `json:"labels,omitempty"`
}

// LabelRequest changes a node's labels.
type LabelRequest struct {
	Set    map[string]string `json:"set,omitempty"`
	Remove []string          `json:"remove,omitempty"`
}

// BootTokenRequest asks for a boot token.
type BootTokenRequest struct {
	TTL deploy.Duration `json:"ttl,omitempty"`
}

// TokenResponse carries a freshly made token (shown once).
type TokenResponse struct {
	ID      string    `json:"id,omitempty"`
	Name    string    `json:"name,omitempty"`
	Token   string    `json:"token"`
	Expires time.Time `json:"expires,omitzero"`
}

// CreateTokenRequest names a new admin token.
type CreateTokenRequest struct {
	Name string `json:"name"`
}

// TargetView is one node of a rollout with its live state.
type TargetView struct {
	deploy.Target
	Hostname string    `json:"hostname"`
	State    string    `json:"state"`
	Reason   string    `json:"reason,omitempty"`
	Fraction float64   `json:"fraction"`
	Progress *Progress `json:"progress,omitempty"`
}

// Summary counts a rollout's targets.
type Summary struct {
	Total     int     `json:"total"`
	Pending   int     `json:"pending"`
	Active    int     `json:"active"`
	Retrying  int     `json:"retrying"`
	Succeeded int     `json:"succeeded"`
	Failed    int     `json:"failed"`
	Cancelled int     `json:"cancelled"`
	Fraction  float64 `json:"fraction"`
	// ETASeconds estimates the time left from the pace so far (-1: unknown).
	ETASeconds float64 `json:"eta_seconds"`
}

// RolloutView is a rollout with its nodes' live state.
type RolloutView struct {
	*deploy.Rollout
	Summary Summary      `json:"summary"`
	Nodes   []TargetView `json:"nodes,omitempty"`
}

func (a *API) nodeView(n *deploy.Node) NodeView {
	v := NodeView{Node: n}
	if p, ok := a.live.Get(n.MAC); ok && n.State.Active() && p.Assignment == n.Assignment {
		v.Progress = &p
	}
	return v
}

func macParam(c echo.Context) (string, error) {
	m, err := deploy.NormalizeMAC(c.Param("mac"))
	if err != nil {
		return "", badRequest("mac", "%v", err)
	}
	return m, nil
}

// Node listings are paged: DefaultPageSize nodes unless ?limit= says
// otherwise, at most MaxPageSize.
const (
	DefaultPageSize = 500
	MaxPageSize     = 5000
)

// TotalCountHeader carries the number of nodes a paged listing matches.
const TotalCountHeader = "X-Total-Count"

// intParam reads a non-negative integer query parameter (def when absent).
func intParam(c echo.Context, name string, def, maxv int) (int, error) {
	s := c.QueryParam(name)
	if s == "" {
		return def, nil
	}
	v, err := strconv.Atoi(s)
	if err != nil || v < 0 {
		return 0, badRequest(name, "want a non-negative integer, got %q", s)
	}
	if maxv > 0 && v > maxv {
		return 0, badRequest(name, "at most %d, got %d", maxv, v)
	}
	return v, nil
}

// listNodes answers GET /nodes: a JSON array of one page of nodes, with the
// number of matching nodes in X-Total-Count and the neighbouring pages in a
// Link header (rel="next", rel="prev"), as RFC 8288 writes it.
//
// Query: state, label (repeated K=V), q (substring of hostname, MAC, image
// or K=V label), sort (a store.SortKeys column), order (asc|desc), limit
// (1..MaxPageSize, default DefaultPageSize), offset, inventory (true:
// full nodes with inventory and log tail).
func (a *API) listNodes(c echo.Context) error {
	var f store.NodeFilter
	if s := c.QueryParam("state"); s != "" {
		if !deploy.State(s).Valid() {
			return badRequest("state", "unknown state %q", s)
		}
		f.State = deploy.State(s)
	}
	if ls := c.QueryParams()["label"]; len(ls) > 0 {
		m, err := deploy.ParseLabels(ls...)
		if err != nil {
			return badRequest("label", "%v", err)
		}
		f.Labels = m
	}
	f.Query = strings.TrimSpace(c.QueryParam("q"))
	if s := c.QueryParam("sort"); s != "" {
		if !slices.Contains(store.SortKeys(), s) {
			return badRequest("sort", "want one of %s, got %q", strings.Join(store.SortKeys(), ", "), s)
		}
		f.Sort = s
	}
	switch c.QueryParam("order") {
	case "", "asc":
	case "desc":
		f.Desc = true
	default:
		return badRequest("order", "want asc or desc, got %q", c.QueryParam("order"))
	}
	var err error
	if f.Limit, err = intParam(c, "limit", DefaultPageSize, MaxPageSize); err != nil {
		return err
	}
	if f.Limit == 0 {
		return badRequest("limit", "must be at least 1")
	}
	if f.Offset, err = intParam(c, "offset", 0, 0); err != nil {
		return err
	}
	switch c.QueryParam("inventory") {
	case "", "false", "0":
		f.Brief = true
	case "true", "1":
	default:
		return badRequest("inventory", "want true or false, got %q", c.QueryParam("inventory"))
	}
	var nodes []*deploy.Node
	var total int
	if err := a.st.View(c.Request().Context(), func(tx store.Tx) error {
		var err error
		if nodes, err = tx.Nodes(f); err != nil {
			return err
		}
		if f.Offset == 0 && len(nodes) < f.Limit {
			total = len(nodes) // the whole listing fits this page
			return nil
		}
		total, err = tx.CountMatching(f)
		return err
	}); err != nil {
		return err
	}
	out := make([]NodeView, 0, len(nodes))
	for _, n := range nodes {
		out = append(out, a.nodeView(n))
	}
	h := c.Response().Header()
	h.Set(TotalCountHeader, strconv.Itoa(total))
	if l := pageLinks(c.Request().URL, f.Offset, f.Limit, total); l != "" {
		h.Set("Link", l)
	}
	return c.JSON(http.StatusOK, out)
}

// pageLinks renders the Link header of a page at offset of size limit.
func pageLinks(u *url.URL, offset, limit, total int) string {
	link := func(off int, rel string) string {
		q := u.Query()
		q.Set("offset", strconv.Itoa(off))
		q.Set("limit", strconv.Itoa(limit))
		return "<" + u.Path + "?" + q.Encode() + `>; rel="` + rel + `"`
	}
	var parts []string
	if offset+limit < total {
		parts = append(parts, link(offset+limit, "next"))
	}
	if offset > 0 {
		parts = append(parts, link(max(offset-limit, 0), "prev"))
	}
	return strings.Join(parts, ", ")
}

func (a *API) addNode(c echo.Context) error {
	var req AddNodeRequest
	if err := bind(c, &req); err != nil {
		return err
	}
	mac, err := deploy.NormalizeMAC(req.MAC)
	if err != nil {
		return badRequest("mac", "%v", err)
	}
	if req.Hostname != "" {
		if err := deploy.ValidHostname(req.Hostname); err != nil {
			return badRequest("hostname", "%v", err)
		}
	}
	for k, v := range req.Labels {
		if err := deploy.ValidLabel(k, v); err != nil {
			return badRequest("labels", "%v", err)
		}
	}
	var n *deploy.Node
	err = a.st.Update(c.Request().Context(), func(tx store.Tx) error {
		if _, err := tx.Node(mac); err == nil {
			return echo.NewHTTPError(http.StatusConflict, "mac: node "+mac+" already exists")
		} else if !errors.Is(err, store.ErrNotFound) {
			return err
		}
		if req.Hostname != "" {
			if err := a.hostnameFree(tx, req.Hostname, mac); err != nil {
				return err
			}
		}
		n, err = a.newNode(tx, mac, req.Hostname, "added by administrator")
		if err != nil {
			return err
		}
		for k, v := range req.Labels {
			n.Labels[k] = v
		}
		return tx.PutNode(n)
	})
	if err != nil {
		return err
	}
	return c.JSON(http.StatusCreated, a.nodeView(n))
}

func (a *API) hostnameFree(tx store.Tx, host, mac string) error {
	nodes, err := tx.Nodes(store.NodeFilter{Query: host, Brief: true})
	if err != nil {
		return err
	}
	for _, o := range nodes {
		if o.Hostname == host && o.MAC != mac {
			return echo.NewHTTPError(http.StatusConflict, "hostname: "+host+" is already used by "+o.MAC)
		}
	}
	return nil
}

// newNode makes (but does not store) a discovered node with the next number.
func (a *API) newNode(tx store.Tx, mac, hostname, reason string) (*deploy.Node, error) {
	num, err := tx.NextNodeNumber()
	if err != nil {
		return nil, err
	}
	now := a.now().UTC()
	if hostname == "" {
		hostname = fmt.Sprintf(a.cfg.HostnamePattern, num)
	}
	n := &deploy.Node{MAC: mac, Hostname: hostname, Number: num, Labels: map[string]string{}, State: deploy.Discovered,
		Created: now, Updated: now, Changed: now}
	if err := tx.AddEvent(deploy.Event{MAC: mac, Time: now, To: deploy.Discovered, Reason: reason}); err != nil {
		return nil, err
	}
	return n, nil
}

func (a *API) getNode(c echo.Context) error {
	mac, err := macParam(c)
	if err != nil {
		return err
	}
	var d NodeDetail
	err = a.st.View(c.Request().Context(), func(tx store.Tx) error {
		n, err := tx.Node(mac)
		if err != nil {
			return err
		}
		d.NodeView = a.nodeView(n)
		if d.ActiveRollout, err = tx.ActiveRollout(mac); err != nil {
			return err
		}
		d.Events, err = tx.Events(mac, 50)
		return err
	})
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, d)
}

func (a *API) deleteNode(c echo.Context) error {
	mac, err := macParam(c)
	if err != nil {
		return err
	}
	err = a.st.Update(c.Request().Context(), func(tx store.Tx) error {
		if _, err := tx.Node(mac); err != nil {
			return err
		}
		id, err := tx.ActiveRollout(mac)
		if err != nil {
			return err
		}
		if id != 0 {
			return echo.NewHTTPError(http.StatusConflict, fmt.Sprintf("node %s is in active rollout %d", mac, id))
		}
		return tx.DeleteNode(mac)
	})
	if err != nil {
		return err
	}
	a.live.reset(mac)
	if a.cluster != nil {
		// The node leaves the cluster in the engines' order: its node
		// service stops its stack, then the others drop it.
		if m, ok := a.cluster.MemberOf(mac); ok {
			if _, err := a.cluster.Leave(m.Name, "node removed (esir node rm)"); err != nil {
				return clusterError(err)
			}
		}
	}
	return c.NoContent(http.StatusNoContent)
}

func (a *API) labelNode(c echo.Context) error {
	mac, err := macParam(c)
	if err != nil {
		return err
	}
	var req LabelRequest
	if err := bind(c, &req); err != nil {
		return err
	}
	if len(req.Set) == 0 && len(req.Remove) == 0 {
		return badRequest("set", "nothing to set or remove")
	}
	for k, v := range req.Set {
		if err := deploy.ValidLabel(k, v); err != nil {
			return badRequest("set", "%v", err)
		}
	}
	for _, k := range req.Remove {
		if err := deploy.ValidLabel(k, ""); err != nil {
			return badRequest("remove", "%v", err)
		}
	}
	var n *deploy.Node
	err = a.st.Update(c.Request().Context(), func(tx store.Tx) error {
		var err error
		if n, err = tx.Node(mac); err != nil {
			return err
		}
		for _, k := range req.Remove {
			delete(n.Labels, k)
		}
		for k, v := range req.Set {
			n.Labels[k] = v
		}
		n.Updated = a.now().UTC()
		return tx.PutNode(n)
	})
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, a.nodeView(n))
}

func (a *API) nodeEvents(c echo.Context) error {
	mac, err := macParam(c)
	if err != nil {
		return err
	}
	limit := 100
	if s := c.QueryParam("limit"); s != "" {
		if limit, err = strconv.Atoi(s); err != nil || limit < 1 || limit > 10000 {
			return badRequest("limit", "want a number from 1 to 10000, got %q", s)
		}
	}
	var evs []deploy.Event
	err = a.st.View(c.Request().Context(), func(tx store.Tx) error {
		if _, err := tx.Node(mac); err != nil {
			return err
		}
		evs, err = tx.Events(mac, limit)
		return err
	})
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, evs)
}

func (a *API) bootToken(c echo.Context) error {
	mac, err := macParam(c)
	if err != nil {
		return err
	}
	var req BootTokenRequest
	if c.Request().ContentLength != 0 {
		if err := bind(c, &req); err != nil {
			return err
		}
	}
	ttl := time.Duration(req.TTL)
	if ttl < 0 || ttl > 30*24*time.Hour {
		return badRequest("ttl", "want between 0 and 720h, got %s", ttl)
	}
	if ttl == 0 {
		ttl = a.cfg.BootTokenTTL
	}
	exp := a.now().Add(ttl)
	return c.JSON(http.StatusOK, TokenResponse{Token: a.signer.Issue(auth.Boot, mac, exp), Expires: exp.UTC()})
}

func (a *API) listImages(c echo.Context) error {
	imgs, err := a.images.List(c.Request().Context())
	if err != nil {
		return err
	}
	if imgs == nil {
		imgs = []ImageInfo{}
	}
	return c.JSON(http.StatusOK, imgs)
}

func (a *API) getImage(c echo.Context) error {
	ref := c.Param("ref")
	if strings.TrimSpace(ref) == "" {
		return badRequest("ref", "required")
	}
	info, err := a.images.Info(c.Request().Context(), ref)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusOK, info)
}

func (a *API) pushImage(c echo.Context) error {
	if c.Request().ContentLength == 0 {
		return echo.NewHTTPError(http.StatusBadRequest, "body: an image export stream (esir image export) is required")
	}
	info, err := a.images.Push(c.Request().Context(), c.Request().Body)
	if err != nil {
		return err
	}
	return c.JSON(http.StatusCreated, info)
}

func idParam(c echo.Context) (int64, error) {
	id, err := strconv.ParseInt(c.Param("id"), 10, 64)
	if err != nil || id < 1 {
		return 0, badRequest("id", "want a rollout number, got %q", c.Param("id"))
	}
	return id, nil
}

func (a *API) listRollouts(c echo.Context) error {
	var states []deploy.RolloutState
	if s := c.QueryParam("state"); s != "" {
		for _, v := range strings.Split(s, ",") {
			st := deploy.RolloutState(v)
			switch st {
			case deploy.RolloutRunning, deploy.RolloutPaused, deploy.RolloutCancelled, deploy.RolloutCompleted:
			default:
				return badRequest("state", "unknown rollout state %q", v)
			}
			states = append(states, st)
		}
	}
	var out []RolloutView
	err := a.st.View(c.Request().Context(), func(tx store.Tx) error {
		rs, err := tx.Rollouts(states...)
		if err != nil {
			return err
		}
		for _, r := range rs {
			full, err := tx.Rollout(r.ID)
			if err != nil {
				return err
			}
			v, err := a.rolloutView(tx, full)
			if err != nil {
				return err
			}
			v.Nodes, v.Targets = nil, nil
			out = append(out, v)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if out == nil {
		out = []RolloutView{}
	}
	return c.JSON(http.StatusOK, out)
}

func (a *API) rolloutView(tx store.Tx, r *deploy.Rollout) (RolloutView, error) {
	v := RolloutView{Rollout: r}
	s := &v.Summary
	s.Total = len(r.Targets)
	var frac float64
	for _, t := range r.Targets {
		tv := TargetView{Target: t}
		n, err := tx.Node(t.MAC)
		switch {
		case errors.Is(err, store.ErrNotFound):
			tv.State = "removed"
		case err != nil:
			return v, err
		default:
			tv.Hostname, tv.State, tv.Reason = n.Hostname, string(n.State), n.Reason
			if t.Status == deploy.TargetActive && n.Rollout == r.ID {
				if p, ok := a.live.Get(t.MAC); ok && p.Assignment == n.Assignment {
					tv.Progress = &p
				}
				tv.Fraction = fraction(n.State, tv.Progress)
			}
		}
		switch t.Status {
		case deploy.TargetPending:
			s.Pending++
		case deploy.TargetActive:
			s.Active++
		case deploy.TargetRetrying:
			s.Retrying++
		case deploy.TargetSucceeded:
			s.Succeeded++
			tv.Fraction = 1
		case deploy.TargetFailed:
			s.Failed++
			tv.Fraction = 1
		case deploy.TargetCancelled:
			s.Cancelled++
			tv.Fraction = 1
		}
		frac += tv.Fraction
		v.Nodes = append(v.Nodes, tv)
	}
	s.ETASeconds = -1
	if s.Total > 0 {
		s.Fraction = frac / float64(s.Total)
		elapsed := a.now().Sub(r.Created).Seconds()
		switch {
		case r.State.Final():
			s.ETASeconds = 0
		case s.Fraction > 0.001 && r.State == deploy.RolloutRunning:
			s.ETASeconds = elapsed * (1 - s.Fraction) / s.Fraction
		}
	}
	return v, nil
}

func (a *API) createRollout(c echo.Context) error {
	var spec deploy.Spec
	if err := bind(c, &spec); err != nil {
		return err
	}
	for i, n := range spec.Selector.Names {
		if m, err := deploy.NormalizeMAC(n); err == nil {
			spec.Selector.Names[i] = m
		}
	}
	r, err := a.sched.Create(c.Request().Context(), spec)
	if err != nil {
		return err
	}
	return a.showRollout(c, http.StatusCreated, r.ID)
}

func (a *API) showRollout(c echo.Context, status int, id int64) error {
	var v RolloutView
	err := a.st.View(c.Request().Context(), func(tx store.Tx) error {
		r, err := tx.Rollout(id)
		if err != nil {
			return err
		}
		v, err = a.rolloutView(tx, r)
		return err
	})
	if err != nil {
		return err
	}
	return c.JSON(status, v)
}

func (a *API) getRollout(c echo.Context) error {
	id, err := idParam(c)
	if err != nil {
		return err
	}
	return a.showRollout(c, http.StatusOK, id)
}

func (a *API) pauseRollout(c echo.Context) error {
	id, err := idParam(c)
	if err != nil {
		return err
	}
	if _, err := a.sched.Pause(c.Request().Context(), id, ""); err != nil {
		return err
	}
	return a.showRollout(c, http.StatusOK, id)
}

func (a *API) resumeRollout(c echo.Context) error {
	id, err := idParam(c)
	if err != nil {
		return err
	}
	if _, err := a.sched.Resume(c.Request().Context(), id); err != nil {
		return err
	}
	return a.showRollout(c, http.StatusOK, id)
}

func (a *API) cancelRollout(c echo.Context) error {
	id, err := idParam(c)
	if err != nil {
		return err
	}
	if _, err := a.sched.Cancel(c.Request().Context(), id); err != nil {
		return err
	}
	return a.showRollout(c, http.StatusOK, id)
}

func (a *API) listTokens(c echo.Context) error {
	var ts []store.Token
	if err := a.st.View(c.Request().Context(), func(tx store.Tx) error {
		var err error
		ts, err = tx.Tokens()
		return err
	}); err != nil {
		return err
	}
	if ts == nil {
		ts = []store.Token{}
	}
	return c.JSON(http.StatusOK, ts)
}

func (a *API) createToken(c echo.Context) error {
	var req CreateTokenRequest
	if err := bind(c, &req); err != nil {
		return err
	}
	req.Name = strings.TrimSpace(req.Name)
	if req.Name == "" || len(req.Name) > 64 {
		return badRequest("name", "want 1-64 characters")
	}
	tok, err := CreateAdminToken(c.Request().Context(), a.st, req.Name, a.now())
	if err != nil {
		return err
	}
	return c.JSON(http.StatusCreated, tok)
}

func (a *API) deleteToken(c echo.Context) error {
	id := c.Param("id")
	err := a.st.Update(c.Request().Context(), func(tx store.Tx) error {
		ts, err := tx.Tokens()
		if err != nil {
			return err
		}
		if len(ts) == 1 && ts[0].ID == id {
			return echo.NewHTTPError(http.StatusConflict, "token "+id+" is the last admin token; create another first")
		}
		return tx.DeleteToken(id)
	})
	if err != nil {
		return err
	}
	return c.NoContent(http.StatusNoContent)
}
