package server

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/client"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/fleet"
)

// buildImage makes a tiny file-mode image base:1.0 in a new store.
func buildImage(t *testing.T) string { return buildImageNamed(t, "base", "1.0") }

// buildImageNamed makes a tiny file-mode image in a new store.
func buildImageNamed(t *testing.T, name, version string) string {
	t.Helper()
	root := t.TempDir()
	for name, data := range map[string]string{"etc/hostname": "template\n", "usr/bin/hello": "#!/bin/sh\necho hi\n", "boot/vmlinuz-6.1.0-test": "kernel"} {
		p := filepath.Join(root, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	dir := filepath.Join(t.TempDir(), "store")
	st, err := imaging.OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Build(context.Background(), root, imaging.BuildOptions{Name: name, Version: version, Arch: "x86_64"}); err != nil {
		t.Fatal(err)
	}
	return dir
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func TestConfig(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "c.yaml")
	os.WriteFile(file, []byte("listen: 127.0.0.1:9000\nboot_token_ttl: 30m\ndiscovery: false\n"), 0o644)
	c := DefaultConfig()
	if err := c.LoadFile(file); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"ESIR_LISTEN": "127.0.0.1:9001", "ESIR_DATA_DIR": dir}
	if err := c.ApplyEnv(func(k string) (string, bool) { v, ok := env[k]; return v, ok }); err != nil {
		t.Fatal(err)
	}
	if err := c.Finish(); err != nil {
		t.Fatal(err)
	}
	if c.Listen != "127.0.0.1:9001" || c.BootTokenTTL != 30*time.Minute || c.Discovery || c.PublicURL != "http://127.0.0.1:9001" || c.Database != filepath.Join(dir, "esir.db") {
		t.Fatalf("config %+v", c)
	}
	bad := []struct{ yaml, want string }{
		{"listn: :80\n", "listn"},
		{"boot_token_ttl: soon\n", "line 1"},
	}
	for _, b := range bad {
		os.WriteFile(file, []byte(b.yaml), 0o644)
		c := DefaultConfig()
		if err := c.LoadFile(file); err == nil || !strings.Contains(err.Error(), b.want) {
			t.Errorf("%q: %v", b.yaml, err)
		}
	}
	for _, mut := range []func(*Config){
		func(c *Config) { c.Listen = "nonsense" },
		func(c *Config) { c.TLSCert = "x" },
		func(c *Config) { c.PublicURL = "ftp://x" },
		func(c *Config) { c.DHCPInterface = "eth9" },
		func(c *Config) { c.DHCPInterface, c.DHCPServerIP, c.DHCPMode = "eth9", "198.18.0.1", "full" },
	} {
		c := DefaultConfig()
		mut(&c)
		if err := c.Finish(); err == nil {
			t.Errorf("accepted %+v", c)
		}
	}
	if err := (&Config{}).ApplyEnv(func(k string) (string, bool) { return "maybe", k == "ESIR_DISCOVERY" }); err == nil || !strings.Contains(err.Error(), "ESIR_DISCOVERY") {
		t.Fatalf("bad env: %v", err)
	}
}

// TestServerInProcess runs the whole server on loopback: first admin token,
// image publishing and seeding, the agent protocol with real image URLs,
// iPXE scripts from node state, graceful shutdown, and a busy port.
func TestServerInProcess(t *testing.T) {
	dir := t.TempDir()
	bootDir := filepath.Join(dir, "boot")
	os.MkdirAll(bootDir, 0o755)
	os.WriteFile(filepath.Join(bootDir, "vmlinuz"), []byte("kernel"), 0o644)
	os.WriteFile(filepath.Join(bootDir, "initrd"), []byte("initrd"), 0o644)
	cfg := DefaultConfig()
	cfg.Listen, cfg.DataDir, cfg.ImageStore = freePort(t), filepath.Join(dir, "data"), buildImage(t)
	cfg.SwarmListen, cfg.AdminTokenFile, cfg.BootDir = "127.0.0.1:0", filepath.Join(dir, "admin.token"), bootDir
	cfg.SchedulerTick = 50 * time.Millisecond
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv, err := New(ctx, cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	base := "http://" + srv.Addr().String()
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()

	fi, err := os.Stat(cfg.AdminTokenFile)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin token file: %v %v", fi, err)
	}
	tok, _ := os.ReadFile(cfg.AdminTokenFile)
	c := &client.Client{Server: base, Token: strings.TrimSpace(string(tok))}
	imgs, err := c.Images(ctx)
	if err != nil || len(imgs) != 1 || imgs[0].Ref != "base:1.0" || imgs[0].Kernels[0] != "6.1.0-test" {
		t.Fatalf("images %+v %v", imgs, err)
	}
	// Push a second image (an export from another store) over the API.
	other, err := imaging.OpenStore(buildImage(t))
	if err != nil {
		t.Fatal(err)
	}
	var exp bytes.Buffer
	if err := other.Export(ctx, "base:1.0", &exp); err != nil {
		t.Fatal(err)
	}
	if _, err := c.PushImage(ctx, bytes.NewReader(exp.Bytes())); !agentapi.IsStatus(err, 409) {
		t.Fatalf("pushing an image the store holds: %v", err)
	}
	if _, err := c.PushImage(ctx, strings.NewReader("not a tar")); err == nil {
		t.Fatal("garbage push accepted")
	}
	extra, err := imaging.OpenStore(buildImageNamed(t, "extra", "2"))
	if err != nil {
		t.Fatal(err)
	}
	exp.Reset()
	if err := extra.Export(ctx, "extra:2", &exp); err != nil {
		t.Fatal(err)
	}
	if in, err := c.PushImage(ctx, &exp); err != nil || in.Ref != "extra:2" {
		t.Fatalf("push: %+v %v", in, err)
	}
	if imgs, err := c.Images(ctx); err != nil || len(imgs) != 2 {
		t.Fatalf("images after push: %+v %v", imgs, err)
	}
	// The seeder published the image.
	resp, err := http.Get(base + "/swarm/images")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), "base") || !strings.Contains(string(body), "extra") {
		t.Fatalf("swarm images %d %s", resp.StatusCode, body)
	}
	// An unknown machine's iPXE script boots the agent in inventory mode
	// with a boot token on the command line.
	mac := fleet.MAC(1)
	script := get(t, base+"/pxe/boot.ipxe?mac="+mac, 200)
	if !strings.Contains(script, "esir.mode=inventory") || !strings.Contains(script, "esir.token=esirn_") || !strings.Contains(script, base+"/pxe/files/vmlinuz") {
		t.Fatalf("script:\n%s", script)
	}
	get(t, base+"/pxe/files/initrd", 200)
	btok, err := c.BootToken(ctx, mac)
	if err != nil {
		t.Fatal(err)
	}
	ag := fleet.New(base, btok, mac, nil)
	if _, err := ag.Register(ctx); err != nil {
		t.Fatal(err)
	}
	v, err := c.CreateRollout(ctx, deploy.Spec{Image: "base", Selector: deploy.Selector{Names: []string{"node001"}}})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { n, err := c.Node(ctx, mac); return err == nil && n.State == deploy.Assigned })
	if s := get(t, base+"/pxe/boot.ipxe?mac="+mac, 200); !strings.Contains(s, "esir.mode=install") {
		t.Fatalf("assigned node's script:\n%s", s)
	}
	r, err := ag.Register(ctx)
	if err != nil || r.Assignment == nil {
		t.Fatalf("register: %+v %v", r, err)
	}
	// The assignment's metainfo URL serves the torrent with our tracker.
	mi := get(t, r.Assignment.Image.TorrentURL, 200)
	if !strings.Contains(mi, "/swarm/announce") || r.Assignment.Image.InfoHash == "" {
		t.Fatalf("metainfo from %s lacks the announce URL", r.Assignment.Image.TorrentURL)
	}
	get(t, r.Assignment.Image.WebSeedURL, 200)
	if err := ag.Install(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { v, err := c.Rollout(ctx, v.ID); return err == nil && v.State == deploy.RolloutCompleted })
	if s := get(t, base+"/pxe/boot.ipxe?mac="+mac, 200); !strings.Contains(s, "exit") {
		t.Fatalf("installed node's script:\n%s", s)
	}
	// A second server on the same port fails at start.
	cfg2 := cfg
	cfg2.Listen, cfg2.DataDir, cfg2.SwarmListen = srv.Addr().String(), filepath.Join(dir, "data2"), ""
	if _, err := New(ctx, cfg2, log); err == nil || !strings.Contains(err.Error(), "listen") {
		t.Fatalf("busy port: %v", err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("shutdown: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("server did not shut down")
	}
}

func get(t *testing.T, url string, want int) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		t.Fatalf("GET %s: %d, want %d: %s", url, resp.StatusCode, want, b)
	}
	return string(b)
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 20 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// proc is a real `esir server` process.
type proc struct {
	cmd *exec.Cmd
	out *bytes.Buffer
}

func startServer(t *testing.T, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(bin, append([]string{"server"}, args...)...), out: &bytes.Buffer{}}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			p.cmd.Process.Kill()
			p.cmd.Wait()
		}
		if t.Failed() {
			t.Logf("server output:\n%s", p.out)
			if a := os.Getenv("ESIR_ARTIFACTS"); a != "" {
				os.WriteFile(filepath.Join(a, fmt.Sprintf("%s-server-%d.log", t.Name(), p.cmd.Process.Pid)), p.out.Bytes(), 0o644)
			}
		}
	})
	return p
}

// TestKill9Resume kills a real server process with SIGKILL in the middle of
// a rollout and checks that the restarted server lost nothing and carries
// the rollout on to completion.
func TestKill9Resume(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the esir binary")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "esir")
	build := exec.Command("go", "build", "-o", bin, "github.com/esir-project/esir/cmd/esir")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	addr := freePort(t)
	conf := filepath.Join(dir, "server.yaml")
	os.WriteFile(conf, []byte(fmt.Sprintf("listen: %s\ndata_dir: %s\nimage_store: %s\nswarm_listen: \"\"\nscheduler_tick: 100ms\nadmin_token_file: %s\n",
		addr, filepath.Join(dir, "data"), buildImage(t), filepath.Join(dir, "token"))), 0o644)

	// --print-config: flags beat the environment, which beats the file.
	pc := exec.Command(bin, "server", "-c", conf, "--print-config", "--hostname-pattern", "web%02d")
	pc.Env = append(os.Environ(), "ESIR_HOSTNAME_PATTERN=env%d", "ESIR_BOOT_TOKEN_TTL=45m")
	out, err := pc.Output()
	if err != nil || !strings.Contains(string(out), "hostname_pattern: web%02d") || !strings.Contains(string(out), "boot_token_ttl: 45m0s") ||
		!strings.Contains(string(out), "listen: "+addr) {
		t.Fatalf("print-config: %v\n%s", err, out)
	}

	p := startServer(t, bin, "-c", conf)
	base := "http://" + addr
	ctx := context.Background()
	waitFor(t, func() bool {
		r, err := http.Get(base + "/healthz")
		return err == nil && r.Body.Close() == nil && r.StatusCode == 200
	})
	tok, _ := os.ReadFile(filepath.Join(dir, "token"))
	c := &client.Client{Server: base, Token: strings.TrimSpace(string(tok))}
	var agents []*fleet.Agent
	for i := 1; i <= 4; i++ {
		bt, err := c.BootToken(ctx, fleet.MAC(i))
		if err != nil {
			t.Fatal(err)
		}
		a := fleet.New(base, bt, fleet.MAC(i), nil)
		if _, err := a.Register(ctx); err != nil {
			t.Fatal(err)
		}
		agents = append(agents, a)
	}
	v, err := c.CreateRollout(ctx, deploy.Spec{Image: "base:1.0", Selector: deploy.Selector{Names: []string{"node001", "node002", "node003", "node004"}}, BatchSize: 2})
	if err != nil {
		t.Fatal(err)
	}
	state := func(i int) deploy.State {
		n, err := c.Node(ctx, agents[i].MAC)
		if err != nil {
			return ""
		}
		return n.State
	}
	waitFor(t, func() bool { return state(0) == deploy.Assigned && state(1) == deploy.Assigned })
	for _, a := range agents[:2] {
		if r, err := a.Register(ctx); err != nil || r.Assignment == nil {
			t.Fatalf("register: %+v %v", r, err)
		}
	}
	if err := agents[0].Install(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := agents[1].Progress(ctx, agentapi.PhaseFetching, 1<<20, 64<<20); err != nil {
		t.Fatal(err)
	}
	// kill -9 in the middle of the rollout.
	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	p.cmd.Wait()

	p2 := startServer(t, bin, "-c", conf)
	waitFor(t, func() bool {
		r, err := http.Get(base + "/healthz")
		return err == nil && r.Body.Close() == nil && r.StatusCode == 200
	})
	// Same admin token (not recreated), same node token key, same state.
	got, err := c.Rollout(ctx, v.ID)
	if err != nil {
		t.Fatalf("admin token after restart: %v", err)
	}
	if got.State != deploy.RolloutRunning || got.Batch != 0 {
		t.Fatalf("rollout after restart: %s batch %d", got.State, got.Batch)
	}
	if s := []deploy.State{state(0), state(1), state(2), state(3)}; s[0] != deploy.Installed || s[1] != deploy.Fetching || s[2] != deploy.Discovered || s[3] != deploy.Discovered {
		t.Fatalf("states after restart: %v", s)
	}
	// The agent carries on with the same assignment and token.
	if _, err := agents[1].Progress(ctx, agentapi.PhaseInstalling, 1<<20, 64<<20); err != nil {
		t.Fatalf("agent after restart: %v", err)
	}
	if _, err := agents[1].Finish(ctx, true, "", ""); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return state(2) == deploy.Assigned && state(3) == deploy.Assigned })
	for _, a := range agents[2:] {
		if _, err := a.Register(ctx); err != nil {
			t.Fatal(err)
		}
		if err := a.Install(ctx); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, func() bool { v, err := c.Rollout(ctx, v.ID); return err == nil && v.State == deploy.RolloutCompleted })
	if !strings.Contains(p.out.String(), "shown only now") || strings.Contains(p2.out.String(), "admin token") {
		t.Fatal("the admin token must be announced on the first start only")
	}
	var nodes []json.RawMessage
	if err := c.Do(ctx, "GET", "/nodes?state=installed", nil, &nodes); err != nil || len(nodes) != 4 {
		t.Fatalf("installed nodes: %d %v", len(nodes), err)
	}
}

// TestTLS serves the API over HTTPS when a certificate is configured.
func TestTLS(t *testing.T) {
	dir := t.TempDir()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "esir.test"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	cfg := DefaultConfig()
	cfg.Listen, cfg.DataDir, cfg.ImageStore, cfg.SwarmListen = freePort(t), filepath.Join(dir, "data"), filepath.Join(dir, "store"), ""
	cfg.TLSCert, cfg.TLSKey = certFile, keyFile
	ctx, cancel := context.WithCancel(context.Background())
	srv, err := New(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(srv.Config().PublicURL, "https://") {
		t.Fatalf("public URL %s", srv.Config().PublicURL)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	defer func() { cancel(); <-done }()
	pool := x509.NewCertPool()
	pool.AddCert(must(x509.ParseCertificate(der)))
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	waitFor(t, func() bool {
		r, err := hc.Get("https://" + cfg.Listen + "/healthz")
		return err == nil && r.Body.Close() == nil && r.StatusCode == 200
	})
	if r, err := http.Get("http://" + cfg.Listen + "/healthz"); err == nil && r.StatusCode == 200 {
		t.Fatal("plain HTTP served with TLS configured")
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// TestConfigAuthorizedKeys reads authorized_keys_file: keys kept, blank
// lines and comments skipped, a bad line refused with its number.
func TestConfigAuthorizedKeys(t *testing.T) {
	if keys, err := (&Config{}).AuthorizedKeys(); err != nil || keys != nil {
		t.Fatalf("no file: %v, %v", keys, err)
	}
	file := filepath.Join(t.TempDir(), "authorized_keys")
	key := "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl admin@lab"
	os.WriteFile(file, []byte("# the lab's administrator\n\n"+key+"\n"), 0o600)
	c := &Config{AuthorizedKeysFile: file}
	keys, err := c.AuthorizedKeys()
	if err != nil || len(keys) != 1 || keys[0] != key {
		t.Fatalf("AuthorizedKeys = %q, %v", keys, err)
	}
	os.WriteFile(file, []byte(key+"\nnot a key\n"), 0o600)
	if _, err := c.AuthorizedKeys(); err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Fatalf("bad line: %v", err)
	}
}
