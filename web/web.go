// Package web is ESIR's web console, served by `esir server` on its own echo
// application under /ui: a dashboard, the node inventory, images, rollouts
// (create, watch, pause, resume, cancel) and the swarm, as server-rendered
// pages with a little dependency-free JavaScript, live updates over
// Server-Sent Events and every asset embedded (no CDN: clusters are often
// air-gapped).
//
// The console reads and changes state through the server's own layers (the
// store, the rollout scheduler and the agents' live progress), never over
// HTTP. Users sign in with a password (bcrypt; an admin user is created on
// the first start) or an admin API token; sessions are HttpOnly,
// SameSite=Strict cookies with an expiry, and every state-changing request
// must carry the session's CSRF token.
package web

import (
	"bytes"
	"context"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/rollout"
	"github.com/esir-project/esir/server/store"
	"github.com/esir-project/esir/swarm"
	"github.com/labstack/echo/v4"
	"golang.org/x/crypto/bcrypt"
)

// Prefix is the path under which the console is served.
const Prefix = "/ui"

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

// Options configures the console.
type Options struct {
	// API is the server's API: its store, scheduler and live progress.
	API *api.API
	// Images is the server's image store.
	Images *imaging.Store
	// Seeder is the server's seeder, nil when it does not seed.
	Seeder *swarm.Server
	// DataDir receives the first admin password (file PasswordFile, 0600).
	DataDir string
	// Notice receives the first admin password once (the server's stderr).
	Notice io.Writer
	// SessionTTL is how long a sign-in lasts (default 12 h).
	SessionTTL time.Duration
	// UpdateInterval is the live updates' period, so the most messages a
	// browser gets per second is its inverse (default 250 ms: 4/s).
	UpdateInterval time.Duration
	Log            *slog.Logger
	// Now is the clock (time.Now when nil).
	Now func() time.Time
}

// Console serves the web console.
type Console struct {
	opts      Options
	api       *api.API
	st        store.Store
	log       *slog.Logger
	now       func() time.Time
	pages     map[string]*template.Template
	sessions  *sessions
	hub       *hub
	dummyHash []byte
}

// New prepares the console and creates the admin user on the first start.
func New(ctx context.Context, opts Options) (*Console, error) {
	if opts.API == nil {
		return nil, errors.New("web console: no API")
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.SessionTTL <= 0 {
		opts.SessionTTL = 12 * time.Hour
	}
	if opts.UpdateInterval <= 0 {
		opts.UpdateInterval = 250 * time.Millisecond
	}
	c := &Console{opts: opts, api: opts.API, st: opts.API.Store(), log: opts.Log.With("part", "web"), now: opts.Now}
	c.sessions = &sessions{m: map[string]*session{}, ttl: opts.SessionTTL, now: opts.Now}
	c.hub = newHub(c, opts.UpdateInterval)
	var err error
	if c.pages, err = parsePages(); err != nil {
		return nil, err
	}
	if c.dummyHash, err = bcrypt.GenerateFromPassword([]byte("no such user"), bcryptCost); err != nil {
		return nil, fmt.Errorf("web console: %w", err)
	}
	if err := c.firstAdmin(ctx); err != nil {
		return nil, fmt.Errorf("web console: %w", err)
	}
	return c, nil
}

// Mount prepares the console (New), adds its routes to e and runs its live
// updates until ctx ends.
func Mount(ctx context.Context, e *echo.Echo, opts Options) (*Console, error) {
	c, err := New(ctx, opts)
	if err != nil {
		return nil, err
	}
	c.Mount(e)
	go c.Run(ctx)
	return c, nil
}

// Run computes live updates and the transfer-rate history until ctx ends.
func (c *Console) Run(ctx context.Context) { c.hub.run(ctx) }

// Mount adds the console's routes to e.
func (c *Console) Mount(e *echo.Echo) {
	e.GET("/", func(ec echo.Context) error { return ec.Redirect(http.StatusSeeOther, Prefix+"/") })
	e.GET(Prefix, func(ec echo.Context) error { return ec.Redirect(http.StatusSeeOther, Prefix+"/") })
	static, _ := fs.Sub(staticFS, "static")
	e.GET(Prefix+"/static/*", echo.WrapHandler(http.StripPrefix(Prefix+"/static/", cacheFor(http.FileServerFS(static)))))
	pub := e.Group(Prefix, c.secureHeaders, c.errorPages)
	pub.GET("/login", c.loginPage)
	pub.POST("/login", c.login)
	g := e.Group(Prefix, c.secureHeaders, c.errorPages, c.requireSession)
	g.POST("/logout", c.logout)
	g.GET("/", c.dashboard)
	g.GET("/nodes", c.nodes)
	g.GET("/nodes/:mac", c.node)
	g.POST("/nodes/:mac/labels", c.labelNode)
	g.POST("/nodes/:mac/remove", c.removeNode)
	g.POST("/nodes/:mac/reinstall", c.reinstallNode)
	g.GET("/images", c.images)
	g.GET("/images/:ref", c.image)
	g.GET("/rollouts", c.rollouts)
	g.GET("/rollouts/new", c.newRollout)
	g.POST("/rollouts", c.createRollout)
	g.GET("/rollouts/:id", c.rollout)
	g.POST("/rollouts/:id/:action", c.rolloutAction)
	g.GET("/preview", c.preview)
	g.GET("/swarm", c.swarm)
	g.GET("/cluster", c.clusterPage)
	g.GET("/events", c.events)
	g.GET("/users", c.usersPage)
	g.POST("/users", c.addUser)
	g.POST("/users/:name/delete", c.deleteUser)
}

func cacheFor(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "public, max-age=300")
		h.ServeHTTP(w, r)
	})
}

// secureHeaders forbids framing and foreign scripts.
func (c *Console) secureHeaders(next echo.HandlerFunc) echo.HandlerFunc {
	return func(ec echo.Context) error {
		h := ec.Response().Header()
		h.Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'")
		h.Set("X-Frame-Options", "DENY")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "same-origin")
		h.Set("Cache-Control", "no-store")
		return next(ec)
	}
}

// errorPages shows errors of page requests as a page (not the API's JSON),
// so nothing ends on a blank screen.
func (c *Console) errorPages(next echo.HandlerFunc) echo.HandlerFunc {
	return func(ec echo.Context) error {
		err := next(ec)
		if err == nil || ec.Response().Committed {
			return err
		}
		req := ec.Request()
		if strings.Contains(req.Header.Get("Accept"), "application/json") || strings.Contains(req.Header.Get("Accept"), "text/event-stream") {
			return err
		}
		status, msg := http.StatusInternalServerError, err.Error()
		var he *echo.HTTPError
		switch {
		case errors.As(err, &he):
			status, msg = he.Code, fmt.Sprint(he.Message)
		case isNotFound(err):
			status = http.StatusNotFound
		}
		if status >= 500 {
			c.log.Error("console request failed", "path", req.URL.Path, "err", err)
		}
		return c.render(ec, status, "error", page{Title: http.StatusText(status), Data: errorPage{Status: status, Message: msg}})
	}
}

type errorPage struct {
	Status  int
	Message string
}

// page is what every template gets.
type page struct {
	Title string
	Nav   string
	User  string
	CSRF  string
	Topic string
	Data  any
}

func (c *Console) render(ec echo.Context, status int, name string, p page) error {
	if ss := sess(ec); ss != nil {
		p.User, p.CSRF = strings.TrimPrefix(ss.user, "token:"), ss.csrf
		if strings.HasPrefix(ss.user, "token:") {
			p.User = "API token " + p.User
		}
	}
	t := c.pages[name]
	if t == nil {
		return fmt.Errorf("web console: no template %q", name)
	}
	var b bytes.Buffer
	if err := t.ExecuteTemplate(&b, "layout", p); err != nil {
		return fmt.Errorf("render %s: %w", name, err)
	}
	return ec.HTMLBlob(status, b.Bytes())
}

func parsePages() (map[string]*template.Template, error) {
	funcs := template.FuncMap{
		"bytes":    humanBytes,
		"rate":     humanRate,
		"dur":      humanDuration,
		"pct":      func(f float64) string { return strconv.FormatFloat(f, 'f', 1, 64) },
		"ago":      func(t time.Time) string { return ago(time.Now(), t) },
		"when":     func(t time.Time) string { return t.Local().Format("2006-01-02 15:04:05") },
		"pathmac":  func(s string) string { return url.PathEscape(s) },
		"states":   func() []deploy.State { return deploy.States },
		"join":     strings.Join,
		"add":      func(a, b int) int { return a + b },
		"list3":    func(p nodeListPage, k, l string) thArgs { return thArgs{p, k, l} },
		"barWidth": func(f float64) template.CSS { return template.CSS(fmt.Sprintf("width:%.1f%%", min(max(f, 0), 100))) },
	}
	base, err := template.New("base").Funcs(funcs).ParseFS(templateFS, "templates/layout.html")
	if err != nil {
		return nil, fmt.Errorf("web templates: %w", err)
	}
	names, err := fs.Glob(templateFS, "templates/*.html")
	if err != nil {
		return nil, err
	}
	out := map[string]*template.Template{}
	for _, n := range names {
		name := strings.TrimSuffix(strings.TrimPrefix(n, "templates/"), ".html")
		if name == "layout" {
			continue
		}
		t, err := template.Must(base.Clone()).ParseFS(templateFS, n)
		if err != nil {
			return nil, fmt.Errorf("web template %s: %w", n, err)
		}
		out[name] = t
	}
	return out, nil
}

// dashboard shows nodes by state, active rollouts, the transfer rate and
// recent failures.
func (c *Console) dashboard(ec echo.Context) error {
	var d dashData
	ctx := ec.Request().Context()
	err := c.st.View(ctx, func(tx store.Tx) error {
		var err error
		d, err = c.dash(tx, &snapshot{now: c.now(), live: c.api.Live().Snapshot()})
		return err
	})
	if err != nil {
		return err
	}
	return c.render(ec, http.StatusOK, "dashboard", page{Title: "Dashboard", Nav: "dash", Topic: "dash", Data: dashView{dashData: d, SVG: chartSVG(d.Chart)}})
}

type dashView struct {
	dashData
	SVG template.HTML
}

// chartSVG draws the transfer-rate history; the page's script redraws it
// the same way as updates arrive.
func chartSVG(ch chartData) template.HTML {
	const w, h = 600.0, 160.0
	top := ch.Max
	if top <= 0 {
		top = 1
	}
	var pts strings.Builder
	n := len(ch.Rate)
	for i, v := range ch.Rate {
		x := w * float64(i) / float64(max(n-1, 1))
		y := h - h*v/top*0.9
		fmt.Fprintf(&pts, "%.1f,%.1f ", x, y)
	}
	return template.HTML(fmt.Sprintf(`<svg class="chart" id="rate-chart" viewBox="0 0 %g %g" preserveAspectRatio="none" role="img" aria-label="Cluster transfer rate, last 5 minutes"><polyline class="area" points="0,%g %s%g,%g"/><polyline class="line" points="%s"/></svg>`,
		w, h, h, pts.String(), w, h, pts.String()))
}

// nodeListPage is the node table's data.
type nodeListPage struct {
	Rows             []nodeRow
	Q, State, Sort   string
	Desc             bool
	Page, Pages, Per int
	Total, Matched   int
	First, Last      int
	PrevURL, NextURL string
	SortURL          map[string]string
	Counts           map[string]int
}

// thArgs are a sortable column header's arguments.
type thArgs struct {
	P    nodeListPage
	K, L string
}

// tableSorts are the node table's sortable columns; all but "progress"
// (live, in memory) are the store's columns.
func tableSorts() []string {
	return []string{"number", "hostname", "mac", "state", "image", "hardware", "progress"}
}

// nodes lists nodes: filtered by text and state, sorted by a column, in
// pages (thousands of nodes stay fast to render and to read).
func (c *Console) nodes(ec echo.Context) error {
	q := strings.TrimSpace(ec.QueryParam("q"))
	state := ec.QueryParam("state")
	if state != "" && !deploy.State(state).Valid() {
		state = ""
	}
	sortBy := ec.QueryParam("sort")
	if !slices.Contains(tableSorts(), sortBy) {
		sortBy = "number"
	}
	desc := ec.QueryParam("dir") == "desc"
	per, _ := strconv.Atoi(ec.QueryParam("per"))
	if per <= 0 {
		per = 100
	}
	per = min(per, 10000)
	pg, _ := strconv.Atoi(ec.QueryParam("page"))
	pg = max(pg, 1)
	p := nodeListPage{Q: q, State: state, Sort: sortBy, Desc: desc, Per: per, Counts: map[string]int{}}
	f := store.NodeFilter{State: deploy.State(state), Query: q, Brief: true, Sort: sortBy, Desc: desc}
	live := c.api.Live().Snapshot()
	err := c.st.View(ec.Request().Context(), func(tx store.Tx) error {
		counts, err := tx.CountNodes()
		if err != nil {
			return err
		}
		for st, n := range counts {
			p.Counts[string(st)] = n
			p.Total += n
		}
		if p.Matched, err = tx.CountMatching(f); err != nil {
			return err
		}
		p.Pages = max((p.Matched+per-1)/per, 1)
		p.Page = min(pg, p.Pages)
		from := (p.Page - 1) * per
		if sortBy == "progress" {
			// Progress is live, not stored: order every match in memory.
			f.Sort = ""
			nodes, err := tx.Nodes(f)
			if err != nil {
				return err
			}
			rows := make([]nodeRow, 0, len(nodes))
			for _, n := range nodes {
				rows = append(rows, rowOf(n, live))
			}
			sort.SliceStable(rows, func(i, j int) bool {
				if rows[i].Pct == rows[j].Pct {
					return rows[i].Number < rows[j].Number != desc
				}
				return rows[i].Pct < rows[j].Pct != desc
			})
			p.Rows = rows[min(from, len(rows)):min(from+per, len(rows))]
			return nil
		}
		f.Limit, f.Offset = per, from
		nodes, err := tx.Nodes(f)
		if err != nil {
			return err
		}
		p.Rows = make([]nodeRow, 0, len(nodes))
		for _, n := range nodes {
			p.Rows = append(p.Rows, rowOf(n, live))
		}
		return nil
	})
	if err != nil {
		return err
	}
	from := (p.Page - 1) * per
	p.First, p.Last = from+1, from+len(p.Rows)
	link := func(mod func(v url.Values)) string {
		v := url.Values{}
		if q != "" {
			v.Set("q", q)
		}
		if state != "" {
			v.Set("state", state)
		}
		v.Set("sort", sortBy)
		if desc {
			v.Set("dir", "desc")
		}
		if per != 100 {
			v.Set("per", strconv.Itoa(per))
		}
		mod(v)
		return Prefix + "/nodes?" + v.Encode()
	}
	if p.Page > 1 {
		p.PrevURL = link(func(v url.Values) { v.Set("page", strconv.Itoa(p.Page-1)) })
	}
	if p.Page < p.Pages {
		p.NextURL = link(func(v url.Values) { v.Set("page", strconv.Itoa(p.Page+1)) })
	}
	p.SortURL = map[string]string{}
	for _, k := range tableSorts() {
		p.SortURL[k] = link(func(v url.Values) {
			v.Set("sort", k)
			v.Del("dir")
			if k == sortBy && !desc {
				v.Set("dir", "desc")
			}
		})
	}
	return c.render(ec, http.StatusOK, "nodes", page{Title: "Nodes", Nav: "nodes", Topic: "nodes", Data: p})
}

// nodePage is one node's detail.
type nodePage struct {
	Row           nodeRow
	N             *deploy.Node
	Events        []eventRow
	ActiveRollout int64
	Images        []string
	Errors        map[string]string
	Notice        string
	Labels        []kv
}

type kv struct{ K, V string }

func (c *Console) node(ec echo.Context) error {
	return c.showNode(ec, http.StatusOK, nil)
}

func (c *Console) showNode(ec echo.Context, status int, errs map[string]string) error {
	mac, err := deploy.NormalizeMAC(ec.Param("mac"))
	if err != nil {
		return echo.NewHTTPError(http.StatusBadRequest, "node: "+err.Error())
	}
	p := nodePage{Errors: errs, Notice: ec.QueryParam("notice")}
	err = c.st.View(ec.Request().Context(), func(tx store.Tx) error {
		n, err := tx.Node(mac)
		if err != nil {
			return err
		}
		p.N = n
		p.Row = rowOf(n, c.api.Live().Snapshot())
		if p.ActiveRollout, err = tx.ActiveRollout(mac); err != nil {
			return err
		}
		evs, err := tx.Events(mac, 30)
		p.Events = eventRows(evs)
		return err
	})
	if isNotFound(err) {
		return echo.NewHTTPError(http.StatusNotFound, "Node "+mac+" does not exist (any more): it may have been removed.")
	}
	if err != nil {
		return err
	}
	for _, k := range sortedKeys(p.N.Labels) {
		p.Labels = append(p.Labels, kv{k, p.N.Labels[k]})
	}
	p.Images = c.imageRefs()
	return c.render(ec, status, "node", page{Title: p.N.Hostname, Nav: "nodes", Topic: "node/" + mac, Data: p})
}

func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func (c *Console) imageRefs() []string {
	if c.opts.Images == nil {
		return nil
	}
	ms, err := c.opts.Images.List()
	if err != nil {
		c.log.Warn("list images", "err", err)
		return nil
	}
	var out []string
	for _, m := range ms {
		if m.Mode == imaging.ModeFile {
			out = append(out, m.Ref())
		}
	}
	return out
}

func (c *Console) labelNode(ec echo.Context) error {
	mac, err := deploy.NormalizeMAC(ec.Param("mac"))
	if err != nil {
		return echo.NewHTTPError(http.StatusBadRequest, "node: "+err.Error())
	}
	set, err := deploy.ParseLabels(ec.FormValue("set"))
	if err != nil {
		return c.showNode(ec, http.StatusBadRequest, map[string]string{"set": err.Error()})
	}
	remove := strings.Fields(strings.ReplaceAll(ec.FormValue("remove"), ",", " "))
	if len(set) == 0 && len(remove) == 0 {
		return c.showNode(ec, http.StatusBadRequest, map[string]string{"set": "Give labels to set (key=value) or keys to remove."})
	}
	err = c.st.Update(ec.Request().Context(), func(tx store.Tx) error {
		n, err := tx.Node(mac)
		if err != nil {
			return err
		}
		for _, k := range remove {
			delete(n.Labels, k)
		}
		for k, v := range set {
			n.Labels[k] = v
		}
		n.Updated = c.now().UTC()
		return tx.PutNode(n)
	})
	if err != nil {
		return err
	}
	c.log.Info("node labels changed", "node", mac, "by", sess(ec).user)
	return ec.Redirect(http.StatusSeeOther, Prefix+"/nodes/"+mac+"?notice="+url.QueryEscape("Labels saved."))
}

func (c *Console) removeNode(ec echo.Context) error {
	mac, err := deploy.NormalizeMAC(ec.Param("mac"))
	if err != nil {
		return echo.NewHTTPError(http.StatusBadRequest, "node: "+err.Error())
	}
	var active int64
	err = c.st.Update(ec.Request().Context(), func(tx store.Tx) error {
		if _, err := tx.Node(mac); err != nil {
			return err
		}
		var err error
		if active, err = tx.ActiveRollout(mac); err != nil || active != 0 {
			return err
		}
		return tx.DeleteNode(mac)
	})
	if err != nil {
		return err
	}
	if active != 0 {
		return c.showNode(ec, http.StatusConflict, map[string]string{"remove": fmt.Sprintf("The node is in active rollout %d; cancel it first.", active)})
	}
	c.log.Info("node removed", "node", mac, "by", sess(ec).user)
	return ec.Redirect(http.StatusSeeOther, Prefix+"/nodes")
}

// reinstallNode starts a one-node rollout.
func (c *Console) reinstallNode(ec echo.Context) error {
	mac, err := deploy.NormalizeMAC(ec.Param("mac"))
	if err != nil {
		return echo.NewHTTPError(http.StatusBadRequest, "node: "+err.Error())
	}
	spec := deploy.Spec{Image: ec.FormValue("image"), Selector: deploy.Selector{Names: []string{mac}}, BatchSize: 1}
	r, err := c.api.Scheduler().Create(ec.Request().Context(), spec)
	if err != nil {
		field, msg := specError(err)
		if field == "" {
			return err
		}
		if field != "image" {
			field = "reinstall"
		}
		return c.showNode(ec, http.StatusBadRequest, map[string]string{field: msg})
	}
	c.log.Info("node reinstall", "node", mac, "rollout", r.ID, "by", sess(ec).user)
	return ec.Redirect(http.StatusSeeOther, fmt.Sprintf("%s/rollouts/%d", Prefix, r.ID))
}

// specError maps a rollout creation error to the form field it concerns;
// field is empty for errors that are not the user's input.
func specError(err error) (field, msg string) {
	var fe *deploy.FieldError
	switch {
	case errors.As(err, &fe):
		switch fe.Field {
		case "selector", "selector.labels":
			if strings.Contains(fe.Msg, "label") {
				return "labels", fe.Msg
			}
			return "names", "Name nodes or labels to select."
		}
		return fe.Field, fe.Msg
	case errors.Is(err, rollout.ErrNoNodes):
		return "names", "The selection matches no node."
	case errors.Is(err, rollout.ErrConflict):
		return "names", err.Error()
	case isNotFound(err):
		if strings.HasPrefix(err.Error(), "image") {
			return "image", err.Error()
		}
		return "names", err.Error()
	}
	return "", ""
}

// imageRow is one image of the images page.
type imageRow struct {
	M     imaging.Manifest
	Swarm *imageSwarm
}

func (c *Console) swarmNow(ctx context.Context) (map[string]*imageSwarm, error) {
	var out map[string]*imageSwarm
	err := c.st.View(ctx, func(tx store.Tx) error {
		s, err := c.read(tx, c.now())
		if err != nil {
			return err
		}
		out = c.swarms(s)
		return nil
	})
	return out, err
}

func (c *Console) images(ec echo.Context) error {
	var rows []imageRow
	if c.opts.Images != nil {
		ms, err := c.opts.Images.List()
		if err != nil {
			return fmt.Errorf("image store: %w", err)
		}
		sw, err := c.swarmNow(ec.Request().Context())
		if err != nil {
			return err
		}
		for _, m := range ms {
			rows = append(rows, imageRow{M: m, Swarm: sw[m.Ref()]})
		}
	}
	return c.render(ec, http.StatusOK, "images", page{Title: "Images", Nav: "images", Data: rows})
}

type imagePage struct {
	M       imaging.Manifest
	Swarm   *imageSwarm
	Seeding bool
	Nodes   []nodeRow
}

func (c *Console) image(ec echo.Context) error {
	if c.opts.Images == nil {
		return echo.NewHTTPError(http.StatusNotFound, "This server has no image store.")
	}
	ref := ec.Param("ref")
	img, err := c.opts.Images.Get(ref)
	if err != nil {
		if errors.Is(err, imaging.ErrNotFound) {
			return echo.NewHTTPError(http.StatusNotFound, "Image "+ref+" does not exist (any more).")
		}
		return echo.NewHTTPError(http.StatusBadRequest, "image: "+err.Error())
	}
	p := imagePage{M: img.Manifest, Seeding: c.opts.Seeder != nil}
	err = c.st.View(ec.Request().Context(), func(tx store.Tx) error {
		s, err := c.read(tx, c.now())
		if err != nil {
			return err
		}
		p.Swarm = c.swarms(s)[img.Manifest.Ref()]
		for _, n := range s.nodes {
			if n.Image == img.Manifest.Ref() {
				p.Nodes = append(p.Nodes, rowOf(n, s.live))
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return c.render(ec, http.StatusOK, "image", page{Title: p.M.Ref(), Nav: "images", Data: p})
}

func (c *Console) rollouts(ec echo.Context) error {
	var views []rolloutSummary
	err := c.st.View(ec.Request().Context(), func(tx store.Tx) error {
		rs, err := tx.Rollouts()
		if err != nil {
			return err
		}
		s, err := c.read(tx, c.now())
		if err != nil {
			return err
		}
		for _, r := range rs {
			full, err := tx.Rollout(r.ID)
			if err != nil {
				return err
			}
			v, err := viewRollout(tx, full, s.byMAC, s.live, s.now)
			if err != nil {
				return err
			}
			views = append(views, v.Sum)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return c.render(ec, http.StatusOK, "rollouts", page{Title: "Rollouts", Nav: "rollouts", Data: views})
}

// rolloutForm is the create form's values and errors.
type rolloutForm struct {
	Image, Names, Labels                         string
	BatchSize, Canary, FailureThreshold, Retries string
	Images                                       []string
	Errors                                       map[string]string
}

func (c *Console) newRollout(ec echo.Context) error {
	f := rolloutForm{Image: ec.QueryParam("image"), Names: ec.QueryParam("names"), Labels: ec.QueryParam("labels"),
		BatchSize: "10", Canary: "1", FailureThreshold: "1", Retries: "2", Images: c.imageRefs()}
	return c.render(ec, http.StatusOK, "rollout_new", page{Title: "New rollout", Nav: "rollouts", Data: f})
}

// splitNames splits a list of hostnames or MACs on commas and white space.
func splitNames(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\r' || r == '\t' })
}

// selector parses the form's selection fields.
func selector(names, labels string) (deploy.Selector, map[string]string) {
	errs := map[string]string{}
	var sel deploy.Selector
	for _, n := range splitNames(names) {
		if m, err := deploy.NormalizeMAC(n); err == nil {
			n = m
		}
		sel.Names = append(sel.Names, n)
	}
	if strings.TrimSpace(labels) != "" {
		m, err := deploy.ParseLabels(labels)
		if err != nil {
			errs["labels"] = err.Error()
		}
		sel.Labels = m
	}
	return sel, errs
}

func (c *Console) createRollout(ec echo.Context) error {
	f := rolloutForm{Image: ec.FormValue("image"), Names: ec.FormValue("names"), Labels: ec.FormValue("labels"),
		BatchSize: ec.FormValue("batch_size"), Canary: ec.FormValue("canary"), FailureThreshold: ec.FormValue("failure_threshold"),
		Retries: ec.FormValue("max_retries"), Images: c.imageRefs()}
	sel, errs := selector(f.Names, f.Labels)
	f.Errors = errs
	num := func(field, v string, lo, hi int) int {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n < lo || n > hi {
			f.Errors[field] = fmt.Sprintf("Want a whole number from %d to %d.", lo, hi)
		}
		return n
	}
	spec := deploy.Spec{Image: strings.TrimSpace(f.Image), Selector: sel,
		BatchSize: num("batch_size", f.BatchSize, 1, 100000), Canary: num("canary", f.Canary, 0, 100000),
		FailureThreshold: num("failure_threshold", f.FailureThreshold, 1, 100000), MaxRetries: num("max_retries", f.Retries, 0, 100)}
	if spec.Image == "" {
		f.Errors["image"] = "Choose an image."
	}
	if sel.Empty() && f.Errors["labels"] == "" {
		f.Errors["names"] = "Name nodes or give labels to select them."
	}
	if len(f.Errors) == 0 {
		r, err := c.api.Scheduler().Create(ec.Request().Context(), spec)
		if err == nil {
			c.log.Info("rollout created from the console", "rollout", r.ID, "by", sess(ec).user)
			return ec.Redirect(http.StatusSeeOther, fmt.Sprintf("%s/rollouts/%d", Prefix, r.ID))
		}
		field, msg := specError(err)
		if field == "" {
			return err
		}
		f.Errors[field] = msg
	}
	return c.render(ec, http.StatusBadRequest, "rollout_new", page{Title: "New rollout", Nav: "rollouts", Data: f})
}

// preview answers the create form's live preview: which nodes the
// selection matches.
func (c *Console) preview(ec echo.Context) error {
	sel, errs := selector(ec.QueryParam("names"), ec.QueryParam("labels"))
	type match struct {
		Hostname string `json:"hostname"`
		MAC      string `json:"mac"`
		State    string `json:"state"`
		Busy     bool   `json:"busy"`
	}
	out := struct {
		Count   int               `json:"count"`
		Nodes   []match           `json:"nodes"`
		Unknown []string          `json:"unknown"`
		Errors  map[string]string `json:"errors"`
	}{Nodes: []match{}, Unknown: []string{}, Errors: errs}
	if sel.Empty() {
		return ec.JSON(http.StatusOK, out)
	}
	var nodes []*deploy.Node
	if err := c.st.View(ec.Request().Context(), func(tx store.Tx) error {
		var err error
		nodes, err = tx.Nodes(store.NodeFilter{Brief: true})
		return err
	}); err != nil {
		return err
	}
	for _, name := range sel.Names {
		found := false
		for _, n := range nodes {
			if (deploy.Selector{Names: []string{name}}).Match(n) {
				found = true
				break
			}
		}
		if !found {
			out.Unknown = append(out.Unknown, name)
		}
	}
	for _, n := range nodes {
		if sel.Match(n) {
			out.Count++
			if len(out.Nodes) < 50 {
				out.Nodes = append(out.Nodes, match{n.Hostname, n.MAC, string(n.State), n.State.Active()})
			}
		}
	}
	return ec.JSON(http.StatusOK, out)
}

type rolloutPage struct {
	rolloutView
	Notice string
	Error  string
}

func rolloutID(ec echo.Context) (int64, error) {
	id, err := strconv.ParseInt(ec.Param("id"), 10, 64)
	if err != nil || id < 1 {
		return 0, echo.NewHTTPError(http.StatusBadRequest, fmt.Sprintf("rollout: want a rollout number, got %q", ec.Param("id")))
	}
	return id, nil
}

func (c *Console) rollout(ec echo.Context) error {
	return c.showRollout(ec, http.StatusOK, ec.QueryParam("notice"), "")
}

func (c *Console) showRollout(ec echo.Context, status int, notice, errMsg string) error {
	id, err := rolloutID(ec)
	if err != nil {
		return err
	}
	p := rolloutPage{Notice: notice, Error: errMsg}
	err = c.st.View(ec.Request().Context(), func(tx store.Tx) error {
		r, err := tx.Rollout(id)
		if err != nil {
			return err
		}
		s, err := c.read(tx, c.now())
		if err != nil {
			return err
		}
		p.rolloutView, err = viewRollout(tx, r, s.byMAC, s.live, s.now)
		return err
	})
	if isNotFound(err) {
		return echo.NewHTTPError(http.StatusNotFound, fmt.Sprintf("Rollout %d does not exist (any more).", id))
	}
	if err != nil {
		return err
	}
	return c.render(ec, status, "rollout", page{Title: fmt.Sprintf("Rollout %d", id), Nav: "rollouts", Topic: fmt.Sprintf("rollout/%d", id), Data: p})
}

func (c *Console) rolloutAction(ec echo.Context) error {
	id, err := rolloutID(ec)
	if err != nil {
		return err
	}
	ctx := ec.Request().Context()
	action := ec.Param("action")
	sched := c.api.Scheduler()
	switch action {
	case "pause":
		_, err = sched.Pause(ctx, id, "paused by "+sess(ec).user+" from the console")
	case "resume":
		_, err = sched.Resume(ctx, id)
	case "cancel":
		_, err = sched.Cancel(ctx, id)
	default:
		return echo.NewHTTPError(http.StatusNotFound, "rollout action: want pause, resume or cancel, got "+action)
	}
	if errors.Is(err, rollout.ErrConflict) {
		return c.showRollout(ec, http.StatusConflict, "", err.Error())
	}
	if err != nil {
		return err
	}
	sched.Wake()
	c.log.Info("rollout "+action, "rollout", id, "by", sess(ec).user)
	past := map[string]string{"pause": "Paused.", "resume": "Resumed.", "cancel": "Cancelled."}[action]
	return ec.Redirect(http.StatusSeeOther, fmt.Sprintf("%s/rollouts/%d?notice=%s", Prefix, id, url.QueryEscape(past)))
}

type swarmPage struct {
	Images []*imageSwarm
	Seeder *imageSwarm
}

func (c *Console) swarm(ec echo.Context) error {
	sw, err := c.swarmNow(ec.Request().Context())
	if err != nil {
		return err
	}
	p := swarmPage{Seeder: c.seeder()}
	for _, is := range sw {
		p.Images = append(p.Images, is)
	}
	sort.Slice(p.Images, func(i, j int) bool { return p.Images[i].Ref < p.Images[j].Ref })
	return c.render(ec, http.StatusOK, "swarm", page{Title: "Swarm", Nav: "swarm", Topic: "swarm", Data: p})
}
