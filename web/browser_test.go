package web_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"html"
	"io"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/server/agentapi"
)

const chromium = "/usr/bin/chromium"

// artifacts returns $ESIR_ARTIFACTS/web (created), or "" when unset.
func artifacts(t *testing.T) string {
	d := os.Getenv("ESIR_ARTIFACTS")
	if d == "" {
		return ""
	}
	d = filepath.Join(d, "web")
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	return d
}

// buildImage makes a tiny file-mode image store.
func buildImage(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	for name, data := range map[string]string{"etc/hostname": "template\n", "usr/bin/hello": "#!/bin/sh\necho hi\n", "boot/vmlinuz-6.1.0-test": "kernel"} {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	dir := filepath.Join(t.TempDir(), "store")
	st, err := imaging.OpenStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Build(context.Background(), root, imaging.BuildOptions{Name: "base", Version: "1.0", Arch: "x86_64"}); err != nil {
		t.Fatal(err)
	}
	return dir
}

// server is a real `esir server` process.
type server struct {
	url, dataDir, token, password string
}

// startServer starts `esir server` on loopback; args are extra flags.
func startServer(t *testing.T, ctx context.Context, args ...string) *server {
	t.Helper()
	// ESIR_BIN names a prebuilt esir binary; otherwise the test builds one.
	bin := os.Getenv("ESIR_BIN")
	if bin == "" {
		if _, err := exec.LookPath("go"); err != nil {
			t.Skip("no go toolchain to build esir")
		}
		bin = filepath.Join(t.TempDir(), "esir")
		build := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/esir-project/esir/cmd/esir")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("build esir: %v\n%s", err, out)
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	s := &server{url: "http://" + addr, dataDir: t.TempDir()}
	tokFile := filepath.Join(s.dataDir, "admin-token")
	logFile := filepath.Join(t.TempDir(), "server.log")
	lf, err := os.Create(logFile)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, append([]string{"server", "--listen", addr, "--data-dir", s.dataDir, "--image-store", buildImage(t),
		"--swarm-listen", "", "--admin-token-file", tokFile, "--scheduler-tick", "200ms", "--public-url", s.url}, args...)...)
	cmd.Stdout, cmd.Stderr = lf, lf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		lf.Close()
		if d := artifacts(t); d != "" && t.Failed() {
			b, _ := os.ReadFile(logFile)
			os.WriteFile(filepath.Join(d, "server.log"), b, 0o644)
		}
		if t.Failed() {
			b, _ := os.ReadFile(logFile)
			t.Logf("server log:\n%s", b)
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(s.url + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("server did not come up: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	tok, err := os.ReadFile(tokFile)
	if err != nil {
		t.Fatal(err)
	}
	pw, err := os.ReadFile(filepath.Join(s.dataDir, "admin-password"))
	if err != nil {
		t.Fatalf("admin password file: %v", err)
	}
	if fi, _ := os.Stat(filepath.Join(s.dataDir, "admin-password")); fi.Mode().Perm() != 0o600 {
		t.Fatalf("admin password file mode %v, want 0600", fi.Mode().Perm())
	}
	s.token, s.password = strings.TrimSpace(string(tok)), strings.TrimSpace(string(pw))
	return s
}

// bootToken asks the admin API for a node's boot token.
func (s *server) bootToken(t *testing.T, mac string) string {
	t.Helper()
	var out struct{ Token string }
	if err := json.Unmarshal(s.admin(t, http.MethodPost, "/api/v1/nodes/"+mac+"/boot-token", nil, http.StatusOK), &out); err != nil || out.Token == "" {
		t.Fatalf("boot token for %s: %v", mac, err)
	}
	return out.Token
}

// admin sends an admin API request with a JSON body (nil: none) and
// returns the answer's body, failing unless the status is want.
func (s *server) admin(t *testing.T, method, path string, body any, want int) []byte {
	t.Helper()
	var in io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		in = bytes.NewReader(b)
	}
	req, _ := http.NewRequest(method, s.url+path, in)
	req.Header.Set("Authorization", "Bearer "+s.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		t.Fatalf("%s %s: status %d, want %d: %s", method, path, resp.StatusCode, want, out)
	}
	return out
}

// agent simulates one node's agent through the real protocol: it registers,
// polls for an assignment, then reports booting, fetching (bytes rising) and
// installing, and a final report; failStep makes it fail there.
type agent struct {
	mac, failStep string
	c             *agentapi.Client
}

func (a *agent) run(ctx context.Context) error {
	inv := agentapi.Inventory{Arch: "x86_64", Firmware: "uefi", Vendor: "QEMU", Product: "Standard PC (Q35)",
		CPU: agentapi.CPU{Model: "QEMU Virtual CPU", Cores: 4, Threads: 8}, MemoryBytes: 8 << 30,
		Disks:   []agentapi.Disk{{Name: "sda", Path: "/dev/sda", Model: "QEMU HARDDISK", Serial: "QM0001", SizeBytes: 64 << 30}},
		NICs:    []agentapi.NIC{{Name: "eth0", MAC: a.mac, Driver: "virtio_net", Speed: 1000, Link: true}},
		Modules: []string{"virtio_pci", "virtio_net", "virtio_blk"}, Kernel: "6.1.0-test"}
	resp, err := a.c.Register(ctx, agentapi.RegisterRequest{MAC: a.mac, Inventory: inv})
	if err != nil {
		return err
	}
	for resp.Mode != agentapi.ModeInstall {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(150 * time.Millisecond):
		}
		if resp, err = a.c.Assignment(ctx); err != nil {
			return err
		}
	}
	asg := resp.Assignment
	seq := int64(0)
	send := func(ev agentapi.Event) error {
		seq++
		ev.Seq = seq
		_, err := a.c.Events(ctx, agentapi.EventBatch{MAC: a.mac, Assignment: asg.ID, Events: []agentapi.Event{ev}})
		return err
	}
	if err := send(agentapi.Event{Phase: agentapi.PhaseBooting, Log: []string{"agent: booted, modules loaded"}}); err != nil {
		return err
	}
	const total = 200 << 20
	have := &agentapi.Have{}
	for b := int64(0); b <= total; b += 8 << 20 {
		have.Emitted += 40
		have.Sent += 6
		have.Suppressed += 22
		have.Coalesced += 12
		h := *have
		ev := agentapi.Event{Phase: agentapi.PhaseFetching, Bytes: b, Total: total, Rate: 40 << 20, Peers: 4, Have: &h}
		if b == 0 {
			ev.Log = []string{"fetch: " + asg.Image.Ref + " from the swarm"}
		}
		if err := send(ev); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(200 * time.Millisecond):
		}
	}
	if a.failStep != "" {
		_, err := a.c.Report(ctx, agentapi.Report{MAC: a.mac, Assignment: asg.ID, Step: a.failStep, Reason: "/dev/sda: device or resource busy",
			LogTail: []string{"mkfs.ext4: /dev/sda2 is apparently in use by the system"}})
		return err
	}
	for _, step := range []string{"partition", "mkfs", "unpack", "bootloader"} {
		if err := send(agentapi.Event{Phase: agentapi.PhaseInstalling, Step: step, Bytes: 50 << 20, Total: 100 << 20, Log: []string{"install: " + step}}); err != nil {
			return err
		}
		time.Sleep(250 * time.Millisecond)
	}
	_, err = a.c.Report(ctx, agentapi.Report{MAC: a.mac, Assignment: asg.ID, Success: true})
	return err
}

func newBrowser(t *testing.T, ctx context.Context) context.Context {
	t.Helper()
	if _, err := os.Stat(chromium); err != nil {
		t.Skipf("no %s: install Debian's chromium (scripts/setup.sh)", chromium)
	}
	// Chromium's helper processes may still write its profile for a moment
	// after the browser exits: t.TempDir's removal would fail the test, so
	// remove it here, retrying, after the browser stops (cleanups run last
	// in, first out).
	profile, err := os.MkdirTemp("", "esir-chromium-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for i := 0; ; i++ {
			err := os.RemoveAll(profile)
			if err == nil {
				return
			}
			if i == 20 {
				t.Logf("chromium's profile stays behind: %v", err)
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromium), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun,
		chromedp.Flag("disable-quic", true), chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true), chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(profile), chromedp.WindowSize(1440, 1000),
	}
	actx, cancel := chromedp.NewExecAllocator(ctx, opts...)
	t.Cleanup(cancel)
	bctx, bcancel := chromedp.NewContext(actx)
	t.Cleanup(bcancel)
	return bctx
}

// shot saves a full-page screenshot into the artifacts directory.
func shot(t *testing.T, ctx context.Context, name string) {
	d := artifacts(t)
	if d == "" {
		return
	}
	var png []byte
	if err := chromedp.Run(ctx, chromedp.FullScreenshot(&png, 100)); err != nil {
		t.Logf("screenshot %s: %v", name, err)
		return
	}
	if err := os.WriteFile(filepath.Join(d, name+".png"), png, 0o644); err != nil {
		t.Log(err)
	}
}

// waitJS polls a JavaScript expression until it is true.
// waitJS polls expr every 100 ms until it is true, for at most d. A poll
// that lost its JavaScript context (the page was still switching documents
// after a navigation: "Cannot find context with specified id", "Execution
// context was destroyed") starts again in the new one.
func waitJS(expr string, d time.Duration) chromedp.Action {
	return chromedp.ActionFunc(func(ctx context.Context) error {
		deadline := time.Now().Add(d)
		for {
			left := time.Until(deadline)
			if left <= 0 {
				return fmt.Errorf("%s: not true within %v", expr, d)
			}
			err := chromedp.Poll(expr, nil, chromedp.WithPollingInterval(100*time.Millisecond), chromedp.WithPollingTimeout(left)).Do(ctx)
			if err == nil || !(strings.Contains(err.Error(), "Cannot find context with specified id") ||
				strings.Contains(err.Error(), "Execution context was destroyed")) {
				return err
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(100 * time.Millisecond):
			}
		}
	})
}

func TestBrowserRollout(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	srv := startServer(t, ctx)

	// A fleet of six simulated agents: they register (inventory) and wait.
	// The node with MAC ...:03 fails at mkfs.
	actx, stopAgents := context.WithCancel(ctx)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	defer func() { stopAgents(); wg.Wait() }()
	for i := 1; i <= 6; i++ {
		mac := fmt.Sprintf("52:54:00:00:00:%02x", i)
		a := &agent{mac: mac, c: &agentapi.Client{Server: srv.url, Token: srv.bootToken(t, mac)}}
		if i == 3 {
			a.failStep = "mkfs"
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := a.run(actx); err != nil && actx.Err() == nil {
				errs <- fmt.Errorf("agent %s: %w", a.mac, err)
			}
		}()
		time.Sleep(50 * time.Millisecond) // register in order: node001 is ...:01
	}

	b := newBrowser(t, ctx)
	var loc, text string
	// Signing in: the console sends us to the login page first.
	err := chromedp.Run(b,
		chromedp.Navigate(srv.url+"/ui/rollouts"),
		chromedp.WaitVisible("#login-form"),
		chromedp.Location(&loc),
	)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(loc, "/ui/login") {
		t.Fatalf("unauthenticated page went to %s, want the login page", loc)
	}
	shot(t, b, "01-login")
	err = chromedp.Run(b,
		chromedp.SendKeys("#user", "admin"), chromedp.SendKeys("#password", "wrong password"),
		chromedp.Click("#signin"), chromedp.WaitVisible("#login-error"), chromedp.Text("#login-error", &text),
	)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text, "wrong password") {
		t.Fatalf("bad login says %q", text)
	}
	err = chromedp.Run(b,
		chromedp.SetValue("#user", "admin"), chromedp.SetValue("#password", srv.password),
		chromedp.Click("#signin"), chromedp.WaitVisible("#new-rollout"), chromedp.Location(&loc),
	)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasSuffix(loc, "/ui/rollouts") {
		t.Fatalf("after login at %s, want back at /ui/rollouts", loc)
	}
	// The dashboard counts the six discovered nodes, live.
	err = chromedp.Run(b, chromedp.Navigate(srv.url+"/ui/"),
		waitJS(`document.querySelector('[data-count="discovered"]').textContent.trim() === "6"`, 20*time.Second))
	if err != nil {
		t.Fatalf("dashboard never showed 6 discovered nodes: %v", err)
	}
	shot(t, b, "02-dashboard-before")

	// Invalid form input is shown next to the field.
	err = chromedp.Run(b, chromedp.Navigate(srv.url+"/ui/rollouts/new"), chromedp.WaitVisible("#rollout-form"),
		chromedp.SetValue("#batch_size", "zero"), chromedp.Click("#create"), chromedp.WaitVisible("#err-batch_size"),
		chromedp.Text("#err-batch_size", &text))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text, "whole number") {
		t.Fatalf("batch size error %q", text)
	}
	var errImage, errNames bool
	chromedp.Run(b, chromedp.Evaluate(`!!document.querySelector('#err-image')`, &errImage), chromedp.Evaluate(`!!document.querySelector('#err-names')`, &errNames))
	if !errImage || !errNames {
		t.Fatalf("missing image/names errors: image %v names %v", errImage, errNames)
	}
	shot(t, b, "03-form-errors")

	// Create a rollout from the form; the preview shows the matched nodes.
	err = chromedp.Run(b,
		chromedp.SetValue("#image", "base:1.0"), chromedp.SetValue("#batch_size", "3"), chromedp.SetValue("#canary", "0"),
		chromedp.SetValue("#failure_threshold", "2"), chromedp.SetValue("#max_retries", "0"),
		chromedp.SendKeys("#names", "node001 node002 node003 node004 node005 node006"),
		waitJS(`document.querySelector('#preview-count').textContent === "6"`, 10*time.Second),
	)
	if err != nil {
		t.Fatalf("preview: %v", err)
	}
	shot(t, b, "04-form-preview")
	err = chromedp.Run(b, chromedp.Click("#create"), chromedp.WaitVisible("#targets"), chromedp.Location(&loc))
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`/ui/rollouts/\d+$`).MatchString(loc) {
		t.Fatalf("after create at %s", loc)
	}
	rolloutURL := loc

	// Progress bars advance without reloading: mark the page, read a bar
	// twice, check the mark survived.
	barOf := `(mac) => parseFloat(document.querySelector('tr[data-k="'+mac+'"] .fill').style.width)`
	var p1, p2 float64
	var mark bool
	err = chromedp.Run(b,
		chromedp.Evaluate(`window.__esirMark = true`, nil),
		waitJS(`(`+barOf+`)("52:54:00:00:00:01") > 6`, 20*time.Second),
		chromedp.Evaluate(`(`+barOf+`)("52:54:00:00:00:01")`, &p1),
	)
	if err != nil {
		t.Fatalf("node bar never moved: %v", err)
	}
	shot(t, b, "05-rollout-progress")
	err = chromedp.Run(b,
		waitJS(fmt.Sprintf(`(`+barOf+`)("52:54:00:00:00:01") > %g`, p1+5), 20*time.Second),
		chromedp.Evaluate(`(`+barOf+`)("52:54:00:00:00:01")`, &p2),
		chromedp.Evaluate(`window.__esirMark === true`, &mark),
	)
	if err != nil {
		t.Fatalf("node bar stuck at %g: %v", p1, err)
	}
	if !mark {
		t.Fatal("the page was reloaded; progress must arrive live")
	}
	t.Logf("node001 progress %g%% -> %g%% live", p1, p2)

	// Pause while the first batch installs, then resume.
	err = chromedp.Run(b, chromedp.Click("#pause"), chromedp.WaitVisible("#notice"),
		waitJS(`document.querySelector('#r-state').textContent === "paused"`, 10*time.Second))
	if err != nil {
		t.Fatalf("pause: %v", err)
	}
	shot(t, b, "06-paused")
	err = chromedp.Run(b, chromedp.Evaluate(`document.querySelector("#notice").remove()`, nil), chromedp.Click("#resume"), chromedp.WaitVisible("#notice"),
		waitJS(`document.querySelector('#r-state').textContent === "running"`, 10*time.Second))
	if err != nil {
		t.Fatalf("resume: %v", err)
	}

	// The failed node's reason appears, and the rollout completes.
	err = chromedp.Run(b,
		waitJS(`document.querySelector('tr[data-k="52:54:00:00:00:03"] [data-f="why"]').textContent.includes("device or resource busy")`, 30*time.Second),
		waitJS(`document.querySelector('#r-state').textContent === "completed"`, 60*time.Second),
		chromedp.Text(`tr[data-k="52:54:00:00:00:03"] [data-f="why"]`, &text),
	)
	if err != nil {
		t.Fatalf("failure reason or completion not shown: %v", err)
	}
	if !strings.Contains(text, "mkfs") {
		t.Fatalf("failed node reason %q, want the step", text)
	}
	shot(t, b, "07-rollout-done")

	// Other pages render with the data.
	for _, pg := range []struct{ path, sel, want, name string }{
		{"/ui/", "#dash-failures", "device or resource busy", "08-dashboard"},
		{"/ui/nodes?sort=state", "#nodes", "node006", "09-nodes"},
		{"/ui/nodes/52:54:00:00:00:03", "#node-reason", "device or resource busy", "10-node-failed"},
		{"/ui/images", "main", "base:1.0", "11-images"},
		{"/ui/swarm", "#have-chart", "", "12-swarm"},
		{"/ui/nodes/52:54:00:00:00:99", "#error-message", "does not exist", "13-node-missing"},
	} {
		if err := chromedp.Run(b, chromedp.Navigate(srv.url+pg.path), chromedp.WaitVisible(pg.sel), chromedp.Text(pg.sel, &text)); err != nil {
			t.Fatalf("%s: %v", pg.path, err)
		}
		time.Sleep(400 * time.Millisecond) // let the first live update land
		if !strings.Contains(text, pg.want) {
			t.Errorf("%s: %s shows %q, want %q", pg.path, pg.sel, text, pg.want)
		}
		shot(t, b, pg.name)
	}

	// Log out: the console is closed again.
	err = chromedp.Run(b, chromedp.Navigate(rolloutURL), chromedp.WaitVisible("#logout"), chromedp.Click("#logout"),
		chromedp.WaitVisible("#login-form"), chromedp.Navigate(srv.url+"/ui/nodes"), chromedp.WaitVisible("#login-form"), chromedp.Location(&loc))
	if err != nil {
		t.Fatalf("logout: %v", err)
	}
	if !strings.Contains(loc, "/ui/login") {
		t.Fatalf("after logout /ui/nodes went to %s", loc)
	}
	shot(t, b, "14-logged-out")
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
}

// session signs in through the login form with a Go HTTP client.
func session(t *testing.T, s *server, form url.Values) (*http.Client, string) {
	t.Helper()
	jar, _ := cookiejar.New(nil)
	c := &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := c.Get(s.url + "/ui/login")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	m := regexp.MustCompile(`name="csrf" value="([^"]+)"`).FindSubmatch(body)
	if m == nil {
		t.Fatal("login page has no csrf field")
	}
	form.Set("csrf", string(m[1]))
	resp, err = c.PostForm(s.url+"/ui/login", form)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusSeeOther {
		return nil, ""
	}
	resp, err = c.Get(s.url + "/ui/users")
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	m = regexp.MustCompile(`data-csrf="([^"]+)"`).FindSubmatch(body)
	if m == nil {
		t.Fatalf("no session csrf token on the users page (status %d)", resp.StatusCode)
	}
	return c, string(m[1])
}

func TestAuthAndCSRF(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	srv := startServer(t, ctx)
	type login struct {
		name string
		form url.Values
		ok   bool
	}
	for _, tc := range []login{
		{"password", url.Values{"user": {"admin"}, "password": {srv.password}}, true},
		{"api token", url.Values{"method": {"token"}, "token": {srv.token}}, true},
		{"wrong password", url.Values{"user": {"admin"}, "password": {"nope-nope-nope"}}, false},
		{"unknown user", url.Values{"user": {"root"}, "password": {srv.password}}, false},
		{"wrong token", url.Values{"method": {"token"}, "token": {"esir_bogus"}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, _ := session(t, srv, tc.form)
			if (c != nil) != tc.ok {
				t.Fatalf("login succeeded %v, want %v", c != nil, tc.ok)
			}
		})
	}
	c, csrf := session(t, srv, url.Values{"user": {"admin"}, "password": {srv.password}})
	post := func(path string, form url.Values, header string) int {
		req, _ := http.NewRequest(http.MethodPost, srv.url+path, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		if header != "" {
			req.Header.Set("X-CSRF-Token", header)
		}
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, tc := range []struct {
		name, path string
		form       url.Values
		header     string
		want       int
	}{
		{"no csrf", "/ui/users", url.Values{"name": {"eve"}, "password": {"0123456789ab"}, "confirm": {"0123456789ab"}}, "", http.StatusForbidden},
		{"wrong csrf", "/ui/users", url.Values{"csrf": {"x" + csrf}, "name": {"eve"}, "password": {"0123456789ab"}, "confirm": {"0123456789ab"}}, "", http.StatusForbidden},
		{"no csrf on rollout pause", "/ui/rollouts/1/pause", url.Values{}, "", http.StatusForbidden},
		{"no csrf on logout", "/ui/logout", url.Values{}, "", http.StatusForbidden},
		{"csrf header", "/ui/users", url.Values{"name": {"bob"}, "password": {"0123456789ab"}, "confirm": {"0123456789ab"}}, csrf, http.StatusSeeOther},
		{"csrf field, short password", "/ui/users", url.Values{"csrf": {csrf}, "name": {"carol"}, "password": {"short"}, "confirm": {"short"}}, "", http.StatusBadRequest},
		{"csrf field, unknown rollout", "/ui/rollouts/77/pause", url.Values{"csrf": {csrf}}, "", http.StatusNotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := post(tc.path, tc.form, tc.header); got != tc.want {
				t.Fatalf("POST %s: status %d, want %d", tc.path, got, tc.want)
			}
		})
	}
	// The new user signs in; the refused user does not exist.
	if c2, _ := session(t, srv, url.Values{"user": {"bob"}, "password": {"0123456789ab"}}); c2 == nil {
		t.Fatal("user bob created through the console cannot sign in")
	}
	if c2, _ := session(t, srv, url.Values{"user": {"eve"}, "password": {"0123456789ab"}}); c2 != nil {
		t.Fatal("user eve was created without a CSRF token")
	}
	// Cookie flags.
	jar, _ := cookiejar.New(nil)
	hc := &http.Client{Jar: jar, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	r0, _ := hc.Get(srv.url + "/ui/login")
	body, _ := io.ReadAll(r0.Body)
	r0.Body.Close()
	m := regexp.MustCompile(`name="csrf" value="([^"]+)"`).FindSubmatch(body)
	r1, err := hc.PostForm(srv.url+"/ui/login", url.Values{"csrf": {string(m[1])}, "user": {"admin"}, "password": {srv.password}})
	if err != nil {
		t.Fatal(err)
	}
	r1.Body.Close()
	var sc string
	for _, h := range r1.Header.Values("Set-Cookie") {
		if strings.HasPrefix(h, "esir_session=") {
			sc = h
		}
	}
	for _, want := range []string{"HttpOnly", "SameSite=Strict", "Expires=", "Path=/ui"} {
		if !strings.Contains(sc, want) {
			t.Errorf("session cookie %q lacks %s", sc, want)
		}
	}
	// Logout ends the session on the server too.
	if got := post("/ui/logout", url.Values{"csrf": {csrf}}, ""); got != http.StatusSeeOther {
		t.Fatalf("logout status %d", got)
	}
	req, _ := http.NewRequest(http.MethodGet, srv.url+"/ui/nodes", nil)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if loc := resp.Header.Get("Location"); resp.StatusCode != http.StatusSeeOther || !strings.Contains(loc, "/ui/login") {
		t.Fatalf("after logout: %d %s", resp.StatusCode, loc)
	}
	// Scripts (live updates) get 401, not a redirect.
	req, _ = http.NewRequest(http.MethodGet, srv.url+"/ui/events?topic=dash", nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err = c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("events without a session: %d, want 401", resp.StatusCode)
	}
}

// The node list reads one page from the store: filtered, sorted, with the
// matching count and page links.
func TestNodeListPages(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	srv := startServer(t, ctx)
	for i := 1; i <= 7; i++ {
		body := fmt.Sprintf(`{"mac":"52:54:00:00:01:%02x","hostname":"n%d","labels":{"rack":"r%d"}}`, i, 8-i, i%2)
		srv.admin(t, http.MethodPost, "/api/v1/nodes", json.RawMessage(body), http.StatusCreated)
	}
	c, _ := session(t, srv, url.Values{"user": {"admin"}, "password": {srv.password}})
	rowRE := regexp.MustCompile(`data-k="52:54:00:00:01:0(\d)"`)
	for _, tc := range []struct {
		query, rows, pager, next, prev string
	}{
		{"", "1234567", "1–7 of 7 · page 1 of 1", "", ""},
		{"?per=3", "123", "1–3 of 7 · page 1 of 3", "page=2", ""},
		{"?per=3&page=2&sort=hostname", "432", "4–6 of 7 · page 2 of 3", "page=3", "page=1"},
		{"?per=3&page=9&sort=hostname&dir=desc", "7", "7–7 of 7 · page 3 of 3", "", "page=2"},
		{"?q=R1&per=2&page=2", "57", "3–4 of 4 · page 2 of 2", "", "page=1"},
		{"?q=n3", "5", "1–1 of 1 · page 1 of 1", "", ""},
		{"?state=failed", "", "", "", ""},
		{"?sort=progress&dir=desc&per=2", "76", "1–2 of 7 · page 1 of 4", "page=2", ""},
	} {
		t.Run(tc.query, func(t *testing.T) {
			resp, err := c.Get(srv.url + "/ui/nodes" + tc.query)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d", resp.StatusCode)
			}
			var rows string
			for _, m := range rowRE.FindAllStringSubmatch(string(b), -1) {
				rows += m[1]
			}
			body := html.UnescapeString(string(b))
			if rows != tc.rows {
				t.Errorf("rows %q, want %q", rows, tc.rows)
			}
			if tc.pager != "" && !strings.Contains(body, tc.pager) {
				t.Errorf("pager %q missing", tc.pager)
			}
			if tc.rows == "" && !strings.Contains(body, "No node matches.") {
				t.Error("no empty-table message")
			}
			for rel, want := range map[string]string{"next": tc.next, "prev": tc.prev} {
				m := regexp.MustCompile(`href="([^"]*)" rel="` + rel + `"`).FindStringSubmatch(body)
				switch {
				case want == "" && m != nil:
					t.Errorf("unexpected %s link %s", rel, m[1])
				case want != "" && (m == nil || !strings.Contains(m[1], want)):
					t.Errorf("%s link %v, want one with %s", rel, m, want)
				}
			}
			if !strings.Contains(body, "of 7</span>") {
				t.Errorf("heading lacks the fleet total")
			}
		})
	}
}
