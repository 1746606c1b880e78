// Package agentapi is the versioned HTTP+JSON protocol between ESIR's node
// agent and the deployment server: the messages and a small client. It
// imports only the standard library, so the agent can use it without pulling
// in the server.
//
// Every request carries "Authorization: Bearer TOKEN" where TOKEN is the boot
// token bound to the node's MAC (from esir.token= on the kernel command line)
// or, for Enroll, the enroll token from the assignment. The server refuses a
// request about any other MAC.
//
// Protocol v1 (paths under Prefix):
//
//	POST register    RegisterRequest  -> RegisterResponse
//	GET  assignment                   -> RegisterResponse
//	POST events      EventBatch       -> Ack
//	POST report      Report           -> Ack
//	POST enroll      EnrollRequest    -> Ack
//	GET  ssi?version=N                -> SSIAssignment (long poll)
//	POST ssi/status  SSIStatus        -> Ack
//
// The installed system's node service uses its enroll token for enroll and
// for the ssi calls. When the server keeps an SSI cluster, the enroll Ack
// names it and the node service then follows its SSI assignment: it applies
// each new bundle version, reports the verdict of the engines' own checks and
// its membership view, and leaves when told to.
//
// Events and reports are idempotent: a repeated event or report (same
// assignment and sequence number, or a phase the node already passed)
// changes nothing. Registering again during an install (the node rebooted)
// yields a fresh assignment.
package agentapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"
)

// Version is the protocol version this package speaks.
const Version = "v1"

// Prefix is the URL path under which the server serves this protocol.
const Prefix = "/agent/" + Version + "/"

// Modes the server gives a registering agent.
const (
	// ModeInstall: the assignment says what to install.
	ModeInstall = "install"
	// ModeInventory: report hardware, then wait (poll assignment).
	ModeInventory = "inventory"
	// ModeLocal: the node is installed; reboot to its disk.
	ModeLocal = "local"
)

// Phases an agent reports, in order. A final Report ends the install.
const (
	PhaseBooting    = "booting"
	PhaseFetching   = "fetching"
	PhaseInstalling = "installing"
)

// CPU describes the node's processors.
type CPU struct {
	Model   string `json:"model,omitempty"`
	Sockets int    `json:"sockets,omitempty"`
	Cores   int    `json:"cores,omitempty"`
	Threads int    `json:"threads,omitempty"`
}

// Disk is one block device of the node.
type Disk struct {
	Name       string `json:"name"`
	Path       string `json:"path,omitempty"`
	Model      string `json:"model,omitempty"`
	Serial     string `json:"serial,omitempty"`
	SizeBytes  int64  `json:"size_bytes"`
	Rotational bool   `json:"rotational,omitempty"`
	Removable  bool   `json:"removable,omitempty"`
}

// NIC is one network interface of the node.
type NIC struct {
	Name   string `json:"name"`
	MAC    string `json:"mac"`
	Driver string `json:"driver,omitempty"`
	Speed  int    `json:"speed_mbps,omitempty"`
	Link   bool   `json:"link,omitempty"`
}

// Inventory is the hardware an agent found.
type Inventory struct {
	Arch        string   `json:"arch,omitempty"`
	Firmware    string   `json:"firmware,omitempty"`
	Vendor      string   `json:"vendor,omitempty"`
	Product     string   `json:"product,omitempty"`
	Serial      string   `json:"serial,omitempty"`
	CPU         CPU      `json:"cpu"`
	MemoryBytes int64    `json:"memory_bytes"`
	Disks       []Disk   `json:"disks,omitempty"`
	NICs        []NIC    `json:"nics,omitempty"`
	Modules     []string `json:"modules,omitempty"`
	Kernel      string   `json:"kernel,omitempty"`
}

// RegisterRequest is sent by an agent when it starts.
type RegisterRequest struct {
	MAC       string    `json:"mac"`
	Inventory Inventory `json:"inventory"`
	// AgentVersion is the agent's build version, for the log.
	AgentVersion string `json:"agent_version,omitempty"`
}

// RegisterResponse tells the agent what to do.
type RegisterResponse struct {
	Mode       string      `json:"mode"`
	Hostname   string      `json:"hostname,omitempty"`
	Number     int         `json:"number,omitempty"`
	Assignment *Assignment `json:"assignment,omitempty"`
	// PollInterval is how long to wait before asking again in inventory mode.
	PollSeconds int `json:"poll_seconds,omitempty"`
}

// Image says which image to install and where to get it.
type Image struct {
	Ref      string `json:"ref"`
	Name     string `json:"name"`
	Version  string `json:"version"`
	Mode     string `json:"mode,omitempty"`
	SHA256   string `json:"sha256,omitempty"`
	InfoHash string `json:"info_hash,omitempty"`
	Size     int64  `json:"size,omitempty"`
	// TorrentURL serves the metainfo with announce and url-list filled in.
	TorrentURL string `json:"torrent_url,omitempty"`
	// WebSeedURL serves the archive over HTTP with Range (fallback).
	WebSeedURL string `json:"web_seed_url,omitempty"`
	Tracker    string `json:"tracker,omitempty"`
}

// DiskRule chooses the target disk: the first non-removable disk, not the
// boot medium, matching every field that is set.
type DiskRule struct {
	Path     string `json:"path,omitempty"`
	Model    string `json:"model,omitempty"`
	Serial   string `json:"serial,omitempty"`
	MinBytes int64  `json:"min_bytes,omitempty"`
	MaxBytes int64  `json:"max_bytes,omitempty"`
}

// DiskLayout is how to partition the target disk. Sizes in MiB; the root
// partition takes the rest.
type DiskLayout struct {
	Rule    DiskRule `json:"rule"`
	ESPMiB  int      `json:"esp_mib"`
	SwapMiB int      `json:"swap_mib,omitempty"`
	RootFS  string   `json:"root_fs,omitempty"`
}

// Network is the node's network configuration once installed.
type Network struct {
	// Mode is "dhcp" or "static".
	Mode      string   `json:"mode"`
	Interface string   `json:"interface,omitempty"`
	Address   string   `json:"address,omitempty"`
	Gateway   string   `json:"gateway,omitempty"`
	DNS       []string `json:"dns,omitempty"`
	Domain    string   `json:"domain,omitempty"`
}

// Assignment is one install attempt for one node.
type Assignment struct {
	// ID names this attempt; events and reports carry it. A new boot gets a
	// new ID.
	ID       string     `json:"id"`
	Rollout  int64      `json:"rollout"`
	Image    Image      `json:"image"`
	Disk     DiskLayout `json:"disk"`
	Hostname string     `json:"hostname"`
	Number   int        `json:"number"`
	Network  Network    `json:"network"`
	Peers    []string   `json:"peers,omitempty"`
	// Server is the server's base URL for the installed system's enrollment.
	Server string `json:"server"`
	// EnrollToken authenticates the installed system's first-boot enrollment.
	EnrollToken    string   `json:"enroll_token"`
	AuthorizedKeys []string `json:"authorized_keys,omitempty"`
	Kexec          bool     `json:"kexec,omitempty"`
	// SeedSeconds is how long to keep seeding after the install (0: until
	// the process ends).
	SeedSeconds int `json:"seed_seconds,omitempty"`
}

// Have counts HAVE messages on the wire (distribution's suppression).
type Have struct {
	Emitted    int64 `json:"emitted"`
	Sent       int64 `json:"sent"`
	Suppressed int64 `json:"suppressed"`
	Coalesced  int64 `json:"coalesced"`
}

// Event is one progress report.
type Event struct {
	// Seq increases with each event of an assignment; the server ignores an
	// event whose Seq it has already seen.
	Seq   int64     `json:"seq"`
	Time  time.Time `json:"time,omitzero"`
	Phase string    `json:"phase"`
	// Step is the install step within the phase (partition, mkfs, unpack...).
	Step  string   `json:"step,omitempty"`
	Bytes int64    `json:"bytes,omitempty"`
	Total int64    `json:"total,omitempty"`
	Rate  float64  `json:"rate,omitempty"`
	Peers int      `json:"peers,omitempty"`
	Have  *Have    `json:"have,omitempty"`
	Log   []string `json:"log,omitempty"`
}

// EventBatch carries one or more events of one assignment.
type EventBatch struct {
	MAC        string  `json:"mac"`
	Assignment string  `json:"assignment"`
	Events     []Event `json:"events"`
}

// Report is the final word on an assignment.
type Report struct {
	MAC        string `json:"mac"`
	Assignment string `json:"assignment"`
	Success    bool   `json:"success"`
	// Step and Reason say what failed (step, device, cause).
	Step    string   `json:"step,omitempty"`
	Reason  string   `json:"reason,omitempty"`
	LogTail []string `json:"log_tail,omitempty"`
}

// EnrollRequest is sent by the installed system at first boot.
type EnrollRequest struct {
	MAC       string    `json:"mac"`
	Hostname  string    `json:"hostname"`
	Image     string    `json:"image,omitempty"`
	Inventory Inventory `json:"inventory"`
	// Addr is the node's address on the network it reaches the server by:
	// its cluster interconnect address when the server keeps an SSI cluster.
	Addr string `json:"addr,omitempty"`
}

// SSI actions.
const (
	// SSIJoin: apply the bundle (install, start or reload, verify).
	SSIJoin = "join"
	// SSILeave: stop the node's stack and report SSILeft.
	SSILeave = "leave"
)

// SSI states a node service reports.
const (
	SSIEnrolled = "enrolled" // every check of the bundle's engines passed
	SSIFailed   = "failed"   // Check names the check that failed
	SSILeft     = "left"     // the stack is stopped after an SSILeave
)

// SSIAssignment is a node's part in the SSI cluster.
type SSIAssignment struct {
	Cluster string `json:"cluster"`
	Action  string `json:"action"`
	// Version is the cluster's nodelist version the bundle was rendered at.
	Version int `json:"version"`
	// Bundle is the node's ssi.Bundle (files with secrets, services, role)
	// as JSON.
	Bundle json.RawMessage `json:"bundle,omitempty"`
	// Token, when set, replaces the node service's token (renewal).
	Token string `json:"token,omitempty"`
}

// SSIStatus is a node service's verdict on its SSI bundle.
type SSIStatus struct {
	MAC     string `json:"mac"`
	Version int    `json:"version"`
	State   string `json:"state"`
	// Check names the failed check (membership, quorum, pacemaker, time...)
	// and Error says why, when State is SSIFailed.
	Check string `json:"check,omitempty"`
	Error string `json:"error,omitempty"`
	// View is the node's membership view (ssi/enroll.Membership as JSON).
	View json.RawMessage `json:"view,omitempty"`
}

// Ack answers events, reports and enrollment. Applied is false when the
// message changed nothing (a repeat, or stale).
type Ack struct {
	Applied bool   `json:"applied"`
	State   string `json:"state"`
	Note    string `json:"note,omitempty"`
	// Cluster, in an enroll Ack, names the SSI cluster the node joins.
	Cluster string `json:"cluster,omitempty"`
}

// Error is the body of every non-2xx answer.
type Error struct {
	Message string `json:"message"`
}

// StatusError is a non-2xx answer from the server.
type StatusError struct {
	Status  int
	Message string
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("server answered %d: %s", e.Status, e.Message)
}

// IsStatus reports whether err is a *StatusError with the given status.
func IsStatus(err error, status int) bool {
	var se *StatusError
	return errors.As(err, &se) && se.Status == status
}

// Client talks protocol v1 to a server.
type Client struct {
	// Server is the base URL, e.g. http://198.18.0.1:8080.
	Server string
	// Token is the boot (or enroll) token.
	Token string
	// HTTP is the client to use; http.DefaultClient when nil.
	HTTP *http.Client
}

// Register announces the node and returns what it should do.
func (c *Client) Register(ctx context.Context, req RegisterRequest) (*RegisterResponse, error) {
	var out RegisterResponse
	if err := c.do(ctx, http.MethodPost, "register", req, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Assignment asks again what the node should do (inventory mode polling).
func (c *Client) Assignment(ctx context.Context) (*RegisterResponse, error) {
	var out RegisterResponse
	if err := c.do(ctx, http.MethodGet, "assignment", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Events sends progress events.
func (c *Client) Events(ctx context.Context, b EventBatch) (*Ack, error) {
	var out Ack
	if err := c.do(ctx, http.MethodPost, "events", b, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Report sends the final report of an assignment.
func (c *Client) Report(ctx context.Context, r Report) (*Ack, error) {
	var out Ack
	if err := c.do(ctx, http.MethodPost, "report", r, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Enroll reports the installed system's first boot.
func (c *Client) Enroll(ctx context.Context, r EnrollRequest) (*Ack, error) {
	var out Ack
	if err := c.do(ctx, http.MethodPost, "enroll", r, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// SSI asks for the node's SSI assignment. With version >= 0 the server waits
// (up to wait) until the nodelist version differs from version or the action
// changes, so a node service learns of a change as it happens.
func (c *Client) SSI(ctx context.Context, version int, wait time.Duration) (*SSIAssignment, error) {
	var out SSIAssignment
	path := fmt.Sprintf("ssi?version=%d&wait=%d", version, int(wait/time.Millisecond))
	if err := c.do(ctx, http.MethodGet, path, nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// SSIStatus reports the node's SSI verdict and membership view.
func (c *Client) SSIStatus(ctx context.Context, s SSIStatus) (*Ack, error) {
	var out Ack
	if err := c.do(ctx, http.MethodPost, "ssi/status", s, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("agent %s: encode: %w", path, err)
		}
		body = bytes.NewReader(b)
	}
	url := strings.TrimRight(c.Server, "/") + Prefix + path
	req, err := http.NewRequestWithContext(ctx, method, url, body)
	if err != nil {
		return fmt.Errorf("agent %s: %w", path, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer "+c.Token)
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("agent %s %s: %w", method, url, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("agent %s %s: read answer: %w", method, url, err)
	}
	if resp.StatusCode/100 != 2 {
		var e Error
		if json.Unmarshal(data, &e) != nil || e.Message == "" {
			e.Message = strings.TrimSpace(string(data))
		}
		return &StatusError{Status: resp.StatusCode, Message: e.Message}
	}
	if out != nil {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("agent %s %s: decode answer: %w", method, url, err)
		}
	}
	return nil
}
