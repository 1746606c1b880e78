// Package apitest runs the deployment server's API in-process on loopback,
// with an SSI cluster and nodes already installed, for tests and benchmarks
// of node services: they talk to it over HTTP as on a real network, while
// the nodes' engines run in namespaces.
package apitest

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"time"

	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/api"
	"github.com/esir-project/esir/server/auth"
	"github.com/esir-project/esir/server/cluster"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/rollout"
	"github.com/esir-project/esir/server/store"
)

// noImages is the image side of an API that deploys nothing: its nodes are
// installed already.
type noImages struct{}

func (noImages) Canonical(context.Context, string) (string, error) { return "", store.ErrNotFound }
func (noImages) List(context.Context) ([]api.ImageInfo, error)     { return nil, nil }
func (noImages) Info(context.Context, string) (api.ImageInfo, error) {
	return api.ImageInfo{}, store.ErrNotFound
}
func (noImages) Assign(context.Context, string, string) (agentapi.Image, error) {
	return agentapi.Image{}, store.ErrNotFound
}
func (noImages) Push(context.Context, io.Reader) (api.ImageInfo, error) {
	return api.ImageInfo{}, store.ErrNotFound
}

// Server is the API with a cluster.
type Server struct {
	URL    string // base URL
	Admin  string // admin token
	st     store.Store
	signer *auth.Signer
	http   *httptest.Server
	api    *api.API
}

// New starts the API on loopback with the cluster definition def (YAML),
// keeping its state under dir. Close stops it.
func New(dir, def string, log *slog.Logger) (*Server, error) {
	ctx := context.Background()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	st, err := store.OpenSQLite(ctx, filepath.Join(dir, "esir.db"))
	if err != nil {
		return nil, err
	}
	s := &Server{st: st}
	s.signer, _ = auth.NewSigner([]byte("0123456789abcdef0123456789abcdef"))
	if s.api, err = api.New(st, rollout.New(st, noImages{}, log, nil), s.signer, noImages{}, api.Config{PublicURL: "http://127.0.0.1"}, log, nil); err != nil {
		st.Close()
		return nil, err
	}
	defPath := filepath.Join(dir, "cluster.yaml")
	if err := os.WriteFile(defPath, []byte(def), 0o644); err != nil {
		st.Close()
		return nil, err
	}
	cl, err := cluster.Open(defPath, filepath.Join(dir, "ssi"), cluster.Options{LeaveTimeout: time.Minute, Log: log})
	if err != nil {
		st.Close()
		return nil, err
	}
	s.api.SetCluster(cl)
	s.http = httptest.NewServer(s.api.Echo(nil))
	s.URL = s.http.URL
	tok, err := api.CreateAdminToken(ctx, st, "apitest", time.Now())
	if err != nil {
		s.Close()
		return nil, err
	}
	s.Admin = tok.Token
	return s, nil
}

// Close stops the server.
func (s *Server) Close() {
	s.api.Stop()
	s.http.Close()
	s.st.Close()
}

// Installed adds node number i, called name, as installed and returns its
// MAC and an enroll token for its node service.
func (s *Server) Installed(i int, name string) (mac, token string, err error) {
	mac = fmt.Sprintf("52:54:00:5e:%02x:%02x", i>>8, i&0xff)
	now := time.Now().UTC()
	err = s.st.Update(context.Background(), func(tx store.Tx) error {
		return tx.PutNode(&deploy.Node{MAC: mac, Hostname: name, Number: i, State: deploy.Installed, Labels: map[string]string{},
			Created: now, Updated: now, Changed: now})
	})
	return mac, s.signer.Issue(auth.Enroll, mac, now.Add(24*time.Hour)), err
}

// Cluster returns the server's cluster snapshot, as GET /api/v1/cluster.
func (s *Server) Cluster(ctx context.Context) (cluster.Snapshot, error) {
	var snap cluster.Snapshot
	return snap, s.Do(ctx, http.MethodGet, "/api/v1/cluster", http.StatusOK, &snap)
}

// Do sends an admin request and decodes the answer into out (when not nil).
func (s *Server) Do(ctx context.Context, method, path string, want int, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, s.URL+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+s.Admin)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		return fmt.Errorf("%s %s: %d, want %d: %s", method, path, resp.StatusCode, want, data)
	}
	if out != nil {
		return json.Unmarshal(data, out)
	}
	return nil
}
