// Package api is the deployment server's HTTP surface on echo: the
// administrator's REST API under /api/v1 (nodes, images, rollouts, tokens),
// the agent protocol under /agent/v1 (see package agentapi), /healthz and
// Prometheus /metrics.
//
// Every input is validated (400 naming the field); unknown nodes, images and
// rollouts are 404; conflicts (a node in an active rollout, an illegal state
// change) are 409; a storage error is a 500 that says what failed.
package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/auth"
	"github.com/esir-project/esir/server/cluster"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/rollout"
	"github.com/esir-project/esir/server/store"
	"github.com/labstack/echo/v4"
	"github.com/labstack/echo/v4/middleware"
)

// Prefix is the path of the administrator API.
const Prefix = "/api/v1"

// ImageInfo summarises a published image.
type ImageInfo struct {
	Ref              string    `json:"ref"`
	Name             string    `json:"name"`
	Version          string    `json:"version"`
	Arch             string    `json:"arch,omitempty"`
	Mode             string    `json:"mode,omitempty"`
	SHA256           string    `json:"sha256,omitempty"`
	CompressedSize   int64     `json:"compressed_size"`
	UncompressedSize int64     `json:"uncompressed_size"`
	FileCount        int64     `json:"file_count"`
	InfoHash         string    `json:"info_hash,omitempty"`
	Kernels          []string  `json:"kernels,omitempty"`
	Created          time.Time `json:"created,omitzero"`
}

// Images is the server's view of the image store.
type Images interface {
	rollout.Images
	// List returns every published image.
	List(ctx context.Context) ([]ImageInfo, error)
	// Info describes one image (errors wrap store.ErrNotFound when unknown).
	Info(ctx context.Context, ref string) (ImageInfo, error)
	// Assign describes an image for an agent's assignment, with the URLs
	// (metainfo, web seed, tracker) under base, the server's public URL.
	Assign(ctx context.Context, ref, base string) (agentapi.Image, error)
	// Push imports an image export stream (imaging's Export format) and
	// publishes it; an existing NAME:VERSION is a conflict.
	Push(ctx context.Context, r io.Reader) (ImageInfo, error)
}

// ErrImageExists is returned (wrapped) by Images.Push for an image the
// store already holds.
var ErrImageExists = errors.New("image already exists")

// Config is the policy the API applies.
type Config struct {
	// PublicURL is the base URL agents reach this server at.
	PublicURL string
	// BootTokenTTL bounds boot tokens; EnrollTokenTTL enroll tokens.
	BootTokenTTL   time.Duration
	EnrollTokenTTL time.Duration
	// HostnamePattern names new nodes from their number (fmt, one %d).
	HostnamePattern string
	// Discovery registers unknown MACs in inventory mode; when false an
	// unknown MAC is refused.
	Discovery      bool
	Network        agentapi.Network
	Disk           agentapi.DiskLayout
	AuthorizedKeys []string
	// PollSeconds is how often an agent in inventory mode asks again.
	PollSeconds int
}

// API serves the administrator and agent HTTP interfaces.
type API struct {
	st      store.Store
	sched   *rollout.Scheduler
	signer  *auth.Signer
	images  Images
	cfg     Config
	log     *slog.Logger
	now     func() time.Time
	live    *Live
	metrics *Metrics
	cluster *cluster.Service
	// stopping ends long polls when the server shuts down.
	stopping context.Context
	stop     context.CancelFunc
}

// New returns the API. now is the clock (time.Now when nil).
func New(st store.Store, sched *rollout.Scheduler, signer *auth.Signer, images Images, cfg Config, log *slog.Logger, now func() time.Time) (*API, error) {
	if now == nil {
		now = time.Now
	}
	if cfg.HostnamePattern == "" {
		cfg.HostnamePattern = "node%03d"
	}
	if err := deploy.ValidHostname(fmt.Sprintf(cfg.HostnamePattern, 1)); err != nil {
		return nil, fmt.Errorf("hostname pattern %q: %w", cfg.HostnamePattern, err)
	}
	if cfg.BootTokenTTL <= 0 {
		cfg.BootTokenTTL = 2 * time.Hour
	}
	if cfg.EnrollTokenTTL <= 0 {
		cfg.EnrollTokenTTL = 7 * 24 * time.Hour
	}
	if cfg.PollSeconds <= 0 {
		cfg.PollSeconds = 10
	}
	if cfg.Network.Mode == "" {
		cfg.Network.Mode = "dhcp"
	}
	if cfg.Disk.ESPMiB == 0 {
		cfg.Disk.ESPMiB = 256
	}
	stopping, stop := context.WithCancel(context.Background())
	return &API{st: st, sched: sched, signer: signer, images: images, cfg: cfg, log: log, now: now, live: NewLive(), metrics: NewMetrics(),
		stopping: stopping, stop: stop}, nil
}

// Stop ends the API's long polls (node services' SSI waits): call it before
// the HTTP server's Shutdown, which waits for requests in flight.
func (a *API) Stop() { a.stop() }

// Live returns the live progress of agents (for the web console).
func (a *API) Live() *Live { return a.live }

// Store returns the store the API reads and writes.
func (a *API) Store() store.Store { return a.st }

// Scheduler returns the rollout scheduler.
func (a *API) Scheduler() *rollout.Scheduler { return a.sched }

// IssueBootToken returns a boot token for mac valid for the configured TTL.
func (a *API) IssueBootToken(mac string) (string, time.Time) {
	exp := a.now().Add(a.cfg.BootTokenTTL)
	return a.signer.Issue(auth.Boot, mac, exp), exp
}

// Echo returns a configured echo instance with the API mounted: error
// handler, body limit, metrics, /healthz and /metrics. Other parts (the web
// console, swarm and boot handlers) mount their routes on it afterwards.
func (a *API) Echo(health func(ctx context.Context) error) *echo.Echo {
	e := echo.New()
	e.HideBanner, e.HidePort = true, true
	e.HTTPErrorHandler = a.errorHandler
	e.Use(middleware.BodyLimitWithConfig(middleware.BodyLimitConfig{Limit: "8M", Skipper: func(c echo.Context) bool {
		return c.Request().Method == http.MethodPost && c.Path() == Prefix+"/images" // image uploads stream
	}}))
	e.Use(a.metrics.Middleware)
	e.GET("/healthz", func(c echo.Context) error {
		if health != nil {
			if err := health(c.Request().Context()); err != nil {
				return c.JSON(http.StatusServiceUnavailable, map[string]string{"status": "unhealthy", "error": err.Error()})
			}
		}
		return c.JSON(http.StatusOK, map[string]string{"status": "ok"})
	})
	e.GET("/metrics", a.handleMetrics)
	a.Mount(e)
	return e
}

// Mount adds the administrator API and the agent protocol routes to e.
func (a *API) Mount(e *echo.Echo) {
	g := e.Group(Prefix, a.requireAdmin)
	g.GET("/nodes", a.listNodes)
	g.POST("/nodes", a.addNode)
	g.GET("/nodes/:mac", a.getNode)
	g.DELETE("/nodes/:mac", a.deleteNode)
	g.PUT("/nodes/:mac/labels", a.labelNode)
	g.GET("/nodes/:mac/events", a.nodeEvents)
	g.POST("/nodes/:mac/boot-token", a.bootToken)
	g.GET("/images", a.listImages)
	g.GET("/images/:ref", a.getImage)
	g.POST("/images", a.pushImage)
	g.GET("/rollouts", a.listRollouts)
	g.POST("/rollouts", a.createRollout)
	g.GET("/rollouts/:id", a.getRollout)
	g.POST("/rollouts/:id/pause", a.pauseRollout)
	g.POST("/rollouts/:id/resume", a.resumeRollout)
	g.POST("/rollouts/:id/cancel", a.cancelRollout)
	g.GET("/tokens", a.listTokens)
	g.POST("/tokens", a.createToken)
	g.DELETE("/tokens/:id", a.deleteToken)

	ag := e.Group(strings.TrimSuffix(agentapi.Prefix, "/"), a.requireNode)
	ag.POST("/register", a.register)
	ag.GET("/assignment", a.assignment)
	ag.POST("/events", a.events)
	ag.POST("/report", a.report)
	ag.POST("/enroll", a.enroll)
	ag.GET("/ssi", a.ssiAssignment)
	ag.POST("/ssi/status", a.ssiStatus)
	g.GET("/cluster", a.getCluster)
	g.POST("/cluster/members/:name/leave", a.leaveCluster)
	g.POST("/cluster/reload", a.reloadCluster)
}

// badRequest is a 400 naming the field.
func badRequest(field, format string, args ...any) error {
	return echo.NewHTTPError(http.StatusBadRequest, field+": "+fmt.Sprintf(format, args...))
}

// bind decodes a JSON body strictly: unknown fields and trailing data are errors.
func bind(c echo.Context, v any) error {
	dec := json.NewDecoder(c.Request().Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		if errors.Is(err, io.EOF) {
			return echo.NewHTTPError(http.StatusBadRequest, "body: a JSON object is required")
		}
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return badRequest(te.Field, "want %s, got JSON %s", te.Type, te.Value)
		}
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return echo.NewHTTPError(http.StatusRequestEntityTooLarge, "body: too large")
		}
		msg := err.Error()
		if f, ok := strings.CutPrefix(msg, "json: unknown field "); ok {
			return badRequest(strings.Trim(f, `"`), "unknown field")
		}
		return echo.NewHTTPError(http.StatusBadRequest, "body: invalid JSON: "+msg)
	}
	if dec.More() {
		return echo.NewHTTPError(http.StatusBadRequest, "body: trailing data after the JSON object")
	}
	return nil
}

// errorHandler maps errors to statuses and writes {"message": ...}.
func (a *API) errorHandler(err error, c echo.Context) {
	if c.Response().Committed {
		return
	}
	status, msg := http.StatusInternalServerError, err.Error()
	var he *echo.HTTPError
	var fe *deploy.FieldError
	var te *deploy.TransitionError
	switch {
	case errors.As(err, &he):
		status = he.Code
		msg = fmt.Sprint(he.Message)
		if he.Internal != nil {
			msg += ": " + he.Internal.Error()
		}
	case errors.As(err, &fe):
		status = http.StatusBadRequest
	case errors.Is(err, rollout.ErrNoNodes):
		status, msg = http.StatusBadRequest, "selector: "+err.Error()
	case errors.Is(err, store.ErrNotFound):
		status = http.StatusNotFound
	case errors.Is(err, rollout.ErrConflict), errors.Is(err, ErrImageExists), errors.As(err, &te):
		status = http.StatusConflict
	case errors.Is(err, context.Canceled):
		status = 499
	}
	if status >= 500 {
		a.log.Error("request failed", "method", c.Request().Method, "path", c.Path(), "err", err)
	}
	if c.Request().Method == http.MethodHead {
		c.NoContent(status)
		return
	}
	c.JSON(status, agentapi.Error{Message: msg})
}
