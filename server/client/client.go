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
	"strings"

	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/api"
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
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("%s %s: encode: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	if c.Server == "" {
		return fmt.Errorf("no server: give --server, ESIR_SERVER or server: in the config file")
	}
	u := strings.TrimRight(c.Server, "/") + api.Prefix + path
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, u, err)
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
		return fmt.Errorf("%s %s: %w", method, u, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s %s: read answer: %w", method, u, err)
	}
	if resp.StatusCode/100 != 2 {
		var e agentapi.Error
		if json.Unmarshal(data, &e) != nil || e.Message == "" {
			e.Message = strings.TrimSpace(string(data))
		}
		return &agentapi.StatusError{Status: resp.StatusCode, Message: e.Message}
	}
	if out != nil && len(data) > 0 {
		if err := json.Unmarshal(data, out); err != nil {
			return fmt.Errorf("%s %s: decode answer: %w", method, u, err)
		}
	}
	return nil
}

// Nodes lists nodes, optionally by state and labels ("k=v").
func (c *Client) Nodes(ctx context.Context, state string, labels ...string) ([]api.NodeView, error) {
	q := url.Values{}
	if state != "" {
		q.Set("state", state)
	}
	for _, l := range labels {
		q.Add("label", l)
	}
	path := "/nodes"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	var out []api.NodeView
	return out, c.Do(ctx, http.MethodGet, path, nil, &out)
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
