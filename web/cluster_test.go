package web_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"html"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/deploy"
	"github.com/esir-project/esir/server/fleet"
	"github.com/esir-project/esir/ssi/enroll"
)

// webClusterDef has two corosync voters (an even core size: warned), pacemaker
// without STONITH (warned), one VIP directed by the core members, chrony and
// an NFS home served by node003.
const webClusterDef = `name: lab
profile: {corosync: true, pacemaker: true, fencing: false, keepalived: true, chrony: true, nfs_home: true}
core_size: 2
vips:
  - name: www
    address: 198.18.0.100/24
    vrid: 51
    services:
      - port: 80
nfs:
  server: node003
  clients: 198.18.0.0/24
time:
  sources: [198.18.1.1]
  allow: 198.18.0.0/24
`

const vip = "198.18.0.100"

// startClusterServer starts a server that keeps the cluster webClusterDef.
func startClusterServer(t *testing.T, ctx context.Context) *server {
	t.Helper()
	def := filepath.Join(t.TempDir(), "cluster.yaml")
	if err := os.WriteFile(def, []byte(webClusterDef), 0o644); err != nil {
		t.Fatal(err)
	}
	return startServer(t, ctx, "--cluster-definition", def)
}

// member is a simulated cluster member: its node service's client, holding
// the node's enroll token.
type member struct {
	name, mac string
	svc       *agentapi.Client
}

// joinMembers takes n simulated nodes through a rollout to installed and
// enrolls node i at 198.18.0.i, as its first boot does: the first two
// become the core members. It returns the members and the cluster's
// nodelist version, as node services learn it from their assignment.
func joinMembers(t *testing.T, ctx context.Context, srv *server, n int) ([]*member, int) {
	t.Helper()
	var agents []*fleet.Agent
	var names []string
	for i := 1; i <= n; i++ {
		mac := fleet.MAC(i)
		a := fleet.New(srv.url, srv.bootToken(t, mac), mac, nil)
		if _, err := a.Register(ctx); err != nil {
			t.Fatal(err)
		}
		agents, names = append(agents, a), append(names, mac)
	}
	srv.admin(t, http.MethodPost, "/api/v1/rollouts", deploy.Spec{Image: "base:1.0", Selector: deploy.Selector{Names: names}, BatchSize: n}, http.StatusCreated)
	var ms []*member
	deadline := time.Now().Add(15 * time.Second)
	for _, a := range agents {
		for a.Mode != agentapi.ModeInstall {
			if time.Now().After(deadline) {
				t.Fatalf("%s got no install assignment in 15 s (mode %q)", a.MAC, a.Mode)
			}
			time.Sleep(100 * time.Millisecond)
			if _, err := a.Register(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if err := a.Install(ctx); err != nil {
			t.Fatal(err)
		}
		m := &member{name: a.Assignment.Hostname, mac: a.MAC, svc: &agentapi.Client{Server: srv.url, Token: a.Assignment.EnrollToken}}
		addr := fmt.Sprintf("198.18.0.%d", len(ms)+1)
		if _, err := m.svc.Enroll(ctx, agentapi.EnrollRequest{MAC: m.mac, Hostname: m.name, Inventory: fleet.Inventory(m.mac), Addr: addr}); err != nil {
			t.Fatalf("enroll %s at %s: %v", m.name, addr, err)
		}
		ms = append(ms, m)
	}
	asg, err := ms[0].svc.SSI(ctx, -1, 0)
	if err != nil {
		t.Fatalf("%s's SSI assignment: %v", ms[0].name, err)
	}
	return ms, asg.Version
}

// report sends the member's verdict at version as its node service does:
// enrolled with view, or failed at check with why.
func (m *member) report(t *testing.T, ctx context.Context, version int, view enroll.Membership, check, why string) {
	t.Helper()
	data, err := json.Marshal(view)
	if err != nil {
		t.Fatal(err)
	}
	st := agentapi.SSIStatus{MAC: m.mac, Version: version, State: agentapi.SSIEnrolled, View: data}
	if check != "" {
		st.State, st.Check, st.Error = agentapi.SSIFailed, check, why
	}
	if _, err := m.svc.SSIStatus(ctx, st); err != nil {
		t.Fatalf("%s reports %s: %v", m.name, st.State, err)
	}
}

// ipvsTable is a director's IPVS table with both remote members as real
// servers.
func ipvsTable() []enroll.IPVSEntry {
	return []enroll.IPVSEntry{
		{Service: "TCP 198.18.0.100:80 wlc", Real: "198.18.0.3:80", Forward: "Route", Weight: 1, Active: 5, Inactive: 2},
		{Service: "TCP 198.18.0.100:80 wlc", Real: "198.18.0.4:80", Forward: "Route", Weight: 1, Active: 3},
	}
}

// coreView is a healthy core member's view: both voters joined, every
// member online, time from upstream, the home mounted.
func coreView(id int) enroll.Membership {
	return enroll.Membership{NodeID: id, Joined: []int{1, 2}, Nodelist: []int{1, 2}, Quorate: true, Expected: 2, Total: 2,
		Online: []string{"node001", "node002", "node003", "node004"}, Role: "core", TimeSource: "198.18.1.1", TimeOffsetMS: 0.25, TimeSynced: true, HomeMounted: true}
}

// remoteView is a remote member's view: time from node001, home not
// mounted.
func remoteView() enroll.Membership {
	return enroll.Membership{Online: []string{"node001", "node002", "node003", "node004"}, Role: "remote", TimeSource: "198.18.0.1", TimeOffsetMS: -0.04, TimeSynced: true}
}

// getPage GETs a console page with a signed-in client.
func getPage(t *testing.T, c *http.Client, u string) string {
	t.Helper()
	resp, err := c.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: status %d: %s", u, resp.StatusCode, b)
	}
	return string(b)
}

// rows returns the text of each cell of each row of the table with id in
// page, by the row's data-k (its index without one).
func rows(t *testing.T, page, id string) map[string][]string {
	t.Helper()
	m := regexp.MustCompile(`(?s)<table[^>]*id="` + id + `".*?<tbody>(.*?)</tbody>`).FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no table #%s on the page", id)
	}
	cellRE, tagRE, keyRE := regexp.MustCompile(`(?s)<td[^>]*>(.*?)</td>`), regexp.MustCompile(`<[^>]*>`), regexp.MustCompile(`data-k="([^"]+)"`)
	out := map[string][]string{}
	for i, tr := range regexp.MustCompile(`(?s)<tr([^>]*)>(.*?)</tr>`).FindAllStringSubmatch(m[1], -1) {
		key := fmt.Sprint(i)
		if k := keyRE.FindStringSubmatch(tr[1]); k != nil {
			key = k[1]
		}
		var cells []string
		for _, c := range cellRE.FindAllStringSubmatch(tr[2], -1) {
			cells = append(cells, strings.TrimSpace(html.UnescapeString(tagRE.ReplaceAllString(c[1], ""))))
		}
		out[key] = cells
	}
	return out
}

// summary returns the text of the summary's element with id.
func summary(t *testing.T, page, id string) string {
	t.Helper()
	m := regexp.MustCompile(`<[a-z]+ id="` + id + `"[^>]*>([^<]*)<`).FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no #%s in the cluster summary", id)
	}
	return html.UnescapeString(m[1])
}

// wantRow compares a member's row, cell by cell, with want; the "last
// report" cell (index 10) only has to be recent.
func wantRow(t *testing.T, got map[string][]string, name string, want []string) {
	t.Helper()
	r := got["m-"+name]
	if len(r) != len(want) {
		t.Errorf("%s's row %q, want %d cells %q", name, r, len(want), want)
		return
	}
	for i := range want {
		if i == 10 {
			if !regexp.MustCompile(`^\d+s ago$`).MatchString(r[i]) {
				t.Errorf("%s's last report %q, want seconds ago", name, r[i])
			}
			continue
		}
		if r[i] != want[i] {
			t.Errorf("%s's cell %d is %q, want %q (row %q)", name, i, r[i], want[i], r)
		}
	}
}

// TestClusterPage drives a four-member cluster through the agent API as
// node services would and checks what the console's Cluster page shows,
// first as the server renders it, then as its live updates change it.
func TestClusterPage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	srv := startClusterServer(t, ctx)
	ms, ver := joinMembers(t, ctx, srv, 4)
	for i, m := range ms {
		if want := fmt.Sprintf("node%03d", i+1); m.name != want {
			t.Fatalf("member %d is %s, want %s", i, m.name, want)
		}
	}
	n1, n2, n3, n4 := ms[0], ms[1], ms[2], ms[3]
	// node002's clock is off; node004 lost its home; node003 serves the
	// home; node001 holds the VIP and reports last: the quorum is its view.
	v2 := coreView(2)
	v2.TimeSynced, v2.TimeOffsetMS = false, 120
	n2.report(t, ctx, ver, v2, "time", "chrony is not synchronised (offset 120 ms)")
	v3 := remoteView()
	v3.HomeExported = true
	n3.report(t, ctx, ver, v3, "", "")
	n4.report(t, ctx, ver, remoteView(), "home", "/home is not mounted")
	v1 := coreView(1)
	v1.VIPs, v1.IPVS = []string{vip}, ipvsTable()
	n1.report(t, ctx, ver, v1, "", "")

	c, _ := session(t, srv, url.Values{"user": {"admin"}, "password": {srv.password}})
	page := getPage(t, c, srv.url+"/ui/cluster")
	vs := fmt.Sprintf("%d / %d", ver, ver)
	got := rows(t, page, "members")
	if len(got) != 4 {
		t.Errorf("%d member rows, want 4: %q", len(got), got)
	}
	wantRow(t, got, "node001", []string{"1", "node001", "198.18.0.1", "core", "enrolled", vs, "198.18.1.1 +0.250 ms", vip, "4", "mounted", "", ""})
	wantRow(t, got, "node002", []string{"2", "node002", "198.18.0.2", "core", "failed", vs, "NOT synced (198.18.1.1)", "", "4", "mounted", "",
		"time: chrony is not synchronised (offset 120 ms)"})
	wantRow(t, got, "node003", []string{"3", "node003", "198.18.0.3", "remote", "enrolled", vs, "198.18.0.1 -0.040 ms", "", "4", "exported", "", ""})
	wantRow(t, got, "node004", []string{"4", "node004", "198.18.0.4", "remote", "failed", vs, "198.18.0.1 -0.040 ms", "", "4", "NOT mounted", "",
		"home: /home is not mounted"})
	for id, want := range map[string]string{"c-q": "quorate (2 joined, view of node001)", "c-m": "4", "c-c": "2 enrolled, 2 failed",
		"c-v": fmt.Sprint(ver), "c-h": vip + " on node001"} {
		if s := summary(t, page, id); s != want {
			t.Errorf("summary #%s shows %q, want %q", id, s, want)
		}
	}
	if !strings.Contains(page, `id="c-q" class="ok"`) {
		t.Error("a quorate cluster's quorum is not marked ok")
	}
	if m := regexp.MustCompile(`<dt>Stack</dt><dd>([^<]*)<`).FindStringSubmatch(page); m == nil || html.UnescapeString(m[1]) != "corosync, pacemaker, keepalived+IPVS, chrony, NFS home" {
		t.Errorf("the stack does not list the definition's profile: %q", m)
	}
	for _, w := range []string{"warning: core_size: 2 is even", "warning: profile.fencing: STONITH is DISABLED"} {
		if !strings.Contains(page, w) {
			t.Errorf("no %q on the page", w)
		}
	}
	wantIPVS := map[string][]string{
		"0": {"TCP 198.18.0.100:80 wlc", "198.18.0.3:80", "1", "5", "2"},
		"1": {"TCP 198.18.0.100:80 wlc", "198.18.0.4:80", "1", "3", "0"},
	}
	if got := rows(t, page, "ipvs"); !maps.EqualFunc(got, wantIPVS, slices.Equal) {
		t.Errorf("IPVS rows %q, want %q", got, wantIPVS)
	}

	t.Run("live", func(t *testing.T) {
		live := openLive(t, ctx, c, srv, "cluster")
		first := live.next(t)
		for _, m := range ms {
			if r, ok := first.members["m-"+m.name]; !ok || r.Name != m.name {
				t.Errorf("the first message lacks %s: %+v", m.name, first.members)
			}
		}
		if first.sum.Holders != vip+" on node001" || !first.sum.QOK || len(first.sum.IPVS) != 2 {
			t.Errorf("first summary %+v", first.sum)
		}
		if w := first.sum.Warnings; len(w) != 2 || !slices.ContainsFunc(w, func(x string) bool { return strings.HasPrefix(x, "core_size: 2 is even") }) {
			t.Errorf("live warnings %q, want the even core size and STONITH disabled", w)
		}

		// node003 stops serving the home.
		n3.report(t, ctx, ver, remoteView(), "home", "the NFS server is not running")
		live.until(t, "node003 failed, NOT exported", func(s liveState) bool {
			r := s.members["m-node003"]
			return r.State == "failed" && r.Check == "home: the NFS server is not running" && r.Home == "NOT exported" &&
				s.sum.Counts == "1 enrolled, 3 failed"
		})

		// node002's clock recovers and it takes the VIP while node001
		// still holds it: a split brain.
		v2 := coreView(2)
		v2.VIPs, v2.IPVS = []string{vip}, ipvsTable()[1:]
		n2.report(t, ctx, ver, v2, "", "")
		live.until(t, "the VIP on both directors", func(s liveState) bool {
			r := s.members["m-node002"]
			return s.sum.Split && s.sum.Holders == vip+" on node001, node002" && r.State == "enrolled" && r.Check == "" && r.VIPs == vip &&
				r.Time == "198.18.1.1 +0.250 ms"
		})

		// node001 leaves: its last view still holds the VIP, but a
		// leaving member no longer counts.
		srv.admin(t, http.MethodPost, "/api/v1/cluster/members/node001/leave", nil, http.StatusAccepted)
		s := live.until(t, "the VIP on node002 alone", func(s liveState) bool {
			return s.sum.Holders == vip+" on node002" && !s.sum.Split && s.members["m-node001"].State == "leaving"
		})
		if r := s.members["m-node001"]; r.Check != "esir cluster leave" || r.VIPs != "" {
			t.Errorf("leaving node001's row says %q and VIPs held %q, want why it leaves and no VIP", r.Check, r.VIPs)
		}
		if q := s.sum.Quorum; q != "quorate (2 joined, view of node002)" {
			t.Errorf("quorum %q after node001 left, want node002's view", q)
		}
		if len(s.sum.IPVS) != 1 || s.sum.IPVS[0].Real != "198.18.0.4:80" || s.sum.IPVS[0].Active != 3 {
			t.Errorf("IPVS rows after the VIP moved %+v, want node002's one real server", s.sum.IPVS)
		}
		// The server renders the same.
		page := getPage(t, c, srv.url+"/ui/cluster")
		if got := rows(t, page, "ipvs"); !maps.EqualFunc(got, map[string][]string{"0": wantIPVS["1"]}, slices.Equal) {
			t.Errorf("rendered IPVS rows after the VIP moved %q", got)
		}
	})

	t.Run("browser", func(t *testing.T) {
		b := newBrowser(t, ctx)
		bctx, cancel := context.WithTimeout(b, 25*time.Second)
		defer cancel()
		err := chromedp.Run(bctx,
			chromedp.Navigate(srv.url+"/ui/cluster"), chromedp.WaitVisible("#login-form"),
			chromedp.SetValue("#user", "admin"), chromedp.SetValue("#password", srv.password),
			chromedp.Click("#signin"), chromedp.WaitVisible("#members"),
			waitJS(`document.querySelector("#live").textContent === "live"`, 5*time.Second),
		)
		if err != nil {
			t.Fatalf("open the cluster page: %v", err)
		}
		n4.report(t, ctx, ver, remoteView(), "pacemaker", "node004 is not online")
		err = chromedp.Run(bctx,
			waitJS(`document.querySelector('tr[data-k="m-node004"] [data-f="chk"]').textContent === "pacemaker: node004 is not online"`, 5*time.Second))
		if err != nil {
			t.Fatalf("node004's failed check never updated in the page: %v", err)
		}
	})
}

// TestClusterPageWithoutCluster: a server without a cluster definition
// says how to give it one.
func TestClusterPageWithoutCluster(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srv := startServer(t, ctx)
	c, _ := session(t, srv, url.Values{"user": {"admin"}, "password": {srv.password}})
	page := getPage(t, c, srv.url+"/ui/cluster")
	if !strings.Contains(page, "This server keeps no SSI cluster") || strings.Contains(page, `id="members"`) {
		t.Errorf("the cluster page without a cluster:\n%s", page)
	}
}

// liveRow is the part of a member's live entry (web's memberRow) the tests
// read.
type liveRow struct {
	Name  string `json:"n"`
	State string `json:"s"`
	Check string `json:"chk"`
	Time  string `json:"time"`
	VIPs  string `json:"vip"`
	Home  string `json:"home"`
}

// liveSum is the cluster summary's live entry.
type liveSum struct {
	Quorum  string `json:"q"`
	QOK     bool   `json:"qok"`
	Counts  string `json:"c"`
	Holders string `json:"h"`
	Split   bool   `json:"split"`
	IPVS    []struct {
		Real   string `json:"real"`
		Active int    `json:"active"`
	} `json:"ipvs"`
	Warnings []string `json:"w"`
}

// liveState is the cluster topic as the messages so far set it.
type liveState struct {
	members map[string]liveRow
	sum     liveSum
}

// liveStream reads a console topic's Server-Sent Events.
type liveStream struct {
	msgs  chan []byte
	state liveState
}

// openLive subscribes to topic with the signed-in client c; the stream
// closes at the end of the test.
func openLive(t *testing.T, ctx context.Context, c *http.Client, srv *server, topic string) *liveStream {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.url+"/ui/events?topic="+topic, nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := c.Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		cancel()
		resp.Body.Close()
		t.Fatalf("events: status %d, %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	l := &liveStream{msgs: make(chan []byte, 64), state: liveState{members: map[string]liveRow{}}}
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); resp.Body.Close(); <-done })
	go func() {
		defer close(done)
		defer close(l.msgs)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			if data, ok := bytes.CutPrefix(sc.Bytes(), []byte("data: ")); ok {
				l.msgs <- bytes.Clone(data)
			}
		}
	}()
	return l
}

// next applies the next message and returns the state.
func (l *liveStream) next(t *testing.T) liveState {
	t.Helper()
	select {
	case data, ok := <-l.msgs:
		if !ok {
			t.Fatal("the event stream ended")
		}
		var msg struct {
			Set map[string]json.RawMessage `json:"set"`
			Del []string                   `json:"del"`
		}
		if err := json.Unmarshal(data, &msg); err != nil {
			t.Fatalf("event %s: %v", data, err)
		}
		for k, v := range msg.Set {
			var err error
			if k == "csum" {
				l.state.sum = liveSum{}
				err = json.Unmarshal(v, &l.state.sum)
			} else {
				var r liveRow
				err = json.Unmarshal(v, &r)
				l.state.members[k] = r
			}
			if err != nil {
				t.Fatalf("event entry %s: %s: %v", k, v, err)
			}
		}
		for _, k := range msg.Del {
			delete(l.state.members, k)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no live update for 10 s")
	}
	return l.state
}

// until applies messages until ok holds, for at most 10 s.
func (l *liveStream) until(t *testing.T, what string, ok func(liveState) bool) liveState {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok(l.state) {
		if time.Now().After(deadline) {
			t.Fatalf("live updates never showed %s: %+v", what, l.state)
		}
		l.next(t)
	}
	return l.state
}
