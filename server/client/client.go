// Package client is a Go client of the deployment server's administrator
// API, used by the esir CLI, tests and benchmarks.
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/cluster"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/store"
	"gopkg.in/yaml.v3"
)

// Client calls the administrator API of one server.
type Client struct {
	Server string
	Token  string
	HTTP   *http.Client
}

// Settings is the CLI's config file (~/.config/esir/config, YAML).
type Settings struct {
	Server string `yaml:"server"`
	Token  string `yaml:"token"`
}

// DefaultConfigPath returns ~/.config/esir/config (under $XDG_CONFIG_HOME
// when home is "").
func DefaultConfigPath(configHome string) string {
	return filepath.Join(configHome, "esir", "config")
}

// ReadSettings reads the CLI config file; a missing file gives empty
// settings.
func ReadSettings(path string) (Settings, error) {
	var s Settings
	data, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return s, nil
	}
	if err != nil {
		return s, fmt.Errorf("config %s: %w", path, err)
	}
	if err := yaml.Unmarshal(data, &s); err != nil {
		return s, fmt.Errorf("config %s: %w", path, err)
	}
	return s, nil
}

// Do sends a request to path (under /api/v1) and decodes the JSON answer
// into out (when not nil). Non-2xx answers are *agentapi.StatusError.
func (c *Client) Do(ctx context.Context, method, path string, in, out any) error {
	_, err := c.do(ctx, method, path, in, out)
	return err
}

// do is Do that also returns the answer's headers.
func (c *Client) do(ctx context.Context, method, path string, in, out any) (http.Header, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("%s %s: encode: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	if c.Server == "" {
		return nil, fmt.Errorf("no server: give --server, ESIR_SERVER or server: in the config file")
	}
	u := strings.TrimRight(c.Server, "/") + api.Prefix + path
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, u, err)
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.Token != "" {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, u, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: read answer: %w", method, u, err)
	}
	if resp.StatusCode/100 != 2 {
		var e agentapi.Error
		if json.Unmarshal(data, &e) != nil || e.Message == "" {
			e.Message = strings.TrimSpace(string(data))
		}
		return nil, &agentapi.StatusError{Status: resp.StatusCode, Message: e.Message}
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return nil, fmt.Errorf("%s %s: decode answer: %w", method, u, err)
		}
	}
	return resp.Header, nil
}

// NodeQuery selects nodes for a listing; zero fields do not filter.
type NodeQuery struct {
	State  string
	Labels []string // "k=v"
	// Query is a substring of the hostname, MAC, image or a "k=v" label.
	Query string
	// Sort is a column (number, hostname, mac, state, image, hardware,
	// updated, changed); Desc reverses it.
	Sort string
	Desc bool
	// Limit is the page size (0: the server's default); Offset the first
	// node of the page.
	Limit, Offset int
	// Inventory asks for full nodes (inventory and log tail).
	Inventory bool
}

func (q NodeQuery) values() url.Values {
	v := url.Values{}
	if q.State != "" {
		v.Set("state", q.State)
	}
	for _, l := range q.Labels {
		v.Add("label", l)
	}
	if q.Query != "" {
		v.Set("q", q.Query)
	}
	if q.Sort != "" {
		v.Set("sort", q.Sort)
	}
	if q.Desc {
		v.Set("order", "desc")
	}
	if q.Limit > 0 {
		v.Set("limit", strconv.Itoa(q.Limit))
	}
	if q.Offset > 0 {
		v.Set("offset", strconv.Itoa(q.Offset))
	}
	if q.Inventory {
		v.Set("inventory", "true")
	}
	return v
}

// NodePage is one page of a node listing.
type NodePage struct {
	Nodes []api.NodeView
	// Total is the number of nodes the query matches, over all pages.
	Total int
}

// NodesPage fetches one page of nodes.
func (c *Client) NodesPage(ctx context.Context, q NodeQuery) (NodePage, error) {
	path := "/nodes"
	if v := q.values(); len(v) > 0 {
		path += "?" + v.Encode()
	}
	var p NodePage
	h, err := c.do(ctx, http.MethodGet, path, nil, &p.Nodes)
	if err != nil {
		return p, err
	}
	p.Total = len(p.Nodes) + q.Offset
	if t := h.Get(api.TotalCountHeader); t != "" {
		if p.Total, err = strconv.Atoi(t); err != nil {
			return p, fmt.Errorf("GET %s: %s %q: %w", path, api.TotalCountHeader, t, err)
		}
	}
	return p, nil
}

// AllNodes pages through every node q matches from q.Offset on (q.Limit is
// the page size). Nodes added or removed meanwhile may shift the pages.
func (c *Client) AllNodes(ctx context.Context, q NodeQuery) ([]api.NodeView, error) {
	var out []api.NodeView
	for {
		p, err := c.NodesPage(ctx, q)
		if err != nil {
			return nil, err
		}
		if out == nil {
			out = make([]api.NodeView, 0, max(p.Total-q.Offset, len(p.Nodes)))
		}
		out = append(out, p.Nodes...)
		q.Offset += len(p.Nodes)
		if len(p.Nodes) == 0 || q.Offset >= p.Total {
			return out, nil
		}
	}
}

// Nodes lists every node, optionally by state and labels ("k=v"), paging
// through the server's listing.
func (c *Client) Nodes(ctx context.Context, state string, labels ...string) ([]api.NodeView, error) {
	return c.AllNodes(ctx, NodeQuery{State: state, Labels: labels})
}

// Node shows one node with its events.
func (c *Client) Node(ctx context.Context, mac string) (*api.NodeDetail, error) {
	var out api.NodeDetail
	return &out, c.Do(ctx, http.MethodGet, "/nodes/"+url.PathEscape(mac), nil, &out)
}

// AddNode pre-registers a node.
func (c *Client) AddNode(ctx context.Context, req api.AddNodeRequest) (*api.NodeView, error) {
	var out api.NodeView
	return &out, c.Do(ctx, http.MethodPost, "/nodes", req, &out)
}

// Label sets and removes a node's labels.
func (c *Client) Label(ctx context.Context, mac string, req api.LabelRequest) (*api.NodeView, error) {
	var out api.NodeView
	return &out, c.Do(ctx, http.MethodPut, "/nodes/"+url.PathEscape(mac)+"/labels", req, &out)
}

// RemoveNode deletes a node.
func (c *Client) RemoveNode(ctx context.Context, mac string) error {
	return c.Do(ctx, http.MethodDelete, "/nodes/"+url.PathEscape(mac), nil, nil)
}

// BootToken issues a boot token for mac.
func (c *Client) BootToken(ctx context.Context, mac string) (string, error) {
	var out api.TokenResponse
	err := c.Do(ctx, http.MethodPost, "/nodes/"+url.PathEscape(mac)+"/boot-token", nil, &out)
	return out.Token, err
}

// Images lists the server's images.
func (c *Client) Images(ctx context.Context) ([]api.ImageInfo, error) {
	var out []api.ImageInfo
	return out, c.Do(ctx, http.MethodGet, "/images", nil, &out)
}

// PushImage uploads an image export stream (imaging's Export format).
func (c *Client) PushImage(ctx context.Context, r io.Reader) (*api.ImageInfo, error) {
	u := strings.TrimRight(c.Server, "/") + api.Prefix + "/images"
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, r)
	if err != nil {
		return nil, fmt.Errorf("push image: %w", err)
	}
	req.Header.Set("Content-Type", "application/x-tar")
	req.Header.Set("Authorization", "Bearer "+c.Token)
	hc := c.HTTP
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("push image to %s: %w", u, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		var e agentapi.Error
		if json.Unmarshal(data, &e) != nil || e.Message == "" {
			e.Message = strings.TrimSpace(string(data))
		}
		return nil, &agentapi.StatusError{Status: resp.StatusCode, Message: e.Message}
	}
	var out api.ImageInfo
	if err := json.Unmarshal(data, &out); err != nil {
		return nil, fmt.Errorf("push image: decode answer: %w", err)
	}
	return &out, nil
}

// CreateRollout starts a rollout.
func (c *Client) CreateRollout(ctx context.Context, spec deploy.Spec) (*api.RolloutView, error) {
	var out api.RolloutView
	return &out, c.Do(ctx, http.MethodPost, "/rollouts", spec, &out)
}

// Rollouts lists rollouts.
func (c *Client) Rollouts(ctx context.Context) ([]api.RolloutView, error) {
	var out []api.RolloutView
	return out, c.Do(ctx, http.MethodGet, "/rollouts", nil, &out)
}

// Rollout shows one rollout with its nodes.
func (c *Client) Rollout(ctx context.Context, id int64) (*api.RolloutView, error) {
	var out api.RolloutView
	return &out, c.Do(ctx, http.MethodGet, fmt.Sprintf("/rollouts/%d", id), nil, &out)
}

// RolloutAction pauses, resumes or cancels a rollout.
func (c *Client) RolloutAction(ctx context.Context, id int64, action string) (*api.RolloutView, error) {
	var out api.RolloutView
	return &out, c.Do(ctx, http.MethodPost, fmt.Sprintf("/rollouts/%d/%s", id, action), nil, &out)
}

// Tokens lists admin tokens.
func (c *Client) Tokens(ctx context.Context) ([]store.Token, error) {
	var out []store.Token
	return out, c.Do(ctx, http.MethodGet, "/tokens", nil, &out)
}

// CreateToken makes an admin token.
func (c *Client) CreateToken(ctx context.Context, name string) (*api.TokenResponse, error) {
	var out api.TokenResponse
	return &out, c.Do(ctx, http.MethodPost, "/tokens", api.CreateTokenRequest{Name: name}, &out)
}

// RemoveToken deletes an admin token.
func (c *Client) RemoveToken(ctx context.Context, id string) error {
	return c.Do(ctx, http.MethodDelete, "/tokens/"+url.PathEscape(id), nil, nil)
}

// Cluster shows the SSI cluster: members with role, state and view, quorum,
// VIP holders.
func (c *Client) Cluster(ctx context.Context) (*cluster.Snapshot, error) {
	var out cluster.Snapshot
	return &out, c.Do(ctx, http.MethodGet, "/cluster", nil, &out)
}

// ReloadCluster makes the server read its cluster definition again.
func (c *Client) ReloadCluster(ctx context.Context) (*api.ReloadResult, error) {
	var out api.ReloadResult
	return &out, c.Do(ctx, http.MethodPost, "/cluster/reload", nil, &out)
}

// LeaveCluster starts a member's leave.
func (c *Client) LeaveCluster(ctx context.Context, name string) (*cluster.Member, error) {
	var out cluster.Member
	return &out, c.Do(ctx, http.MethodPost, "/cluster/members/"+url.PathEscape(name)+"/leave", nil, &out)
}
