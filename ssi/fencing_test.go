package ssi

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// fencingDef is a valid definition with fencing by BMC; tests edit it.
const fencingDef = `name: f
profile: {corosync: true, pacemaker: true, fencing: true}
core_size: 3
fencing:
  bmcs:
    - {node: n1, address: 198.18.1.1, username: admin, password: "pw-n1"}
    - {node: n2, address: bmc-n2.example.org, port: 6230, username: admin, password: "pw-n2", lanplus: false}
    - {node: r1, agent: fence_redfish, address: 198.18.1.4, username: root, password: "pw-r1", options: {ssl_insecure: "1"}}
`

func TestFencingValidate(t *testing.T) {
	tests := []struct {
		name    string
		edit    func(string) string
		wantErr string // "" for valid
		warn    string // a warning that must be present
	}{
		{name: "valid", edit: func(s string) string { return s }},
		{name: "address out of range", edit: func(s string) string { return strings.Replace(s, "198.18.1.1", "300.1.1.1", 1) },
			wantErr: "fencing.bmcs[0].address"},
		{name: "loopback address", edit: func(s string) string { return strings.Replace(s, "198.18.1.1", "127.0.0.1", 1) },
			wantErr: "fencing.bmcs[0].address: 127.0.0.1 cannot be a BMC's address"},
		{name: "address with a blank", edit: func(s string) string { return strings.Replace(s, "bmc-n2.example.org", `"bmc n2"`, 1) },
			wantErr: "fencing.bmcs[1].address"},
		{name: "no address", edit: func(s string) string { return strings.Replace(s, "address: 198.18.1.4, ", "", 1) },
			wantErr: "fencing.bmcs[2].address: missing"},
		{name: "same node twice", edit: func(s string) string { return strings.Replace(s, "node: n2", "node: n1", 1) },
			wantErr: "fencing.bmcs[1].node: n1 already has a BMC in fencing.bmcs[0]"},
		{name: "unknown agent", edit: func(s string) string { return strings.Replace(s, "fence_redfish", "fence_apc", 1) },
			wantErr: "fencing.bmcs[2].agent"},
		{name: "no password", edit: func(s string) string { return strings.Replace(s, `, password: "pw-n1"`, "", 1) },
			wantErr: "fencing.bmcs[0].password: missing"},
		{name: "password with a newline", edit: func(s string) string { return strings.Replace(s, `"pw-n1"`, `"pw\nx"`, 1) },
			wantErr: "fencing.bmcs[0].password: contains control characters"},
		{name: "reserved option", edit: func(s string) string { return strings.Replace(s, "ssl_insecure", "pcmk_host_list", 1) },
			wantErr: "fencing.bmcs[2].options.pcmk_host_list"},
		{name: "lanplus for redfish", edit: func(s string) string {
			return strings.Replace(s, "agent: fence_redfish,", "agent: fence_redfish, lanplus: true,", 1)
		},
			wantErr: "fencing.bmcs[2].lanplus"},
		{name: "bad action", edit: func(s string) string { return strings.Replace(s, "fencing:\n", "fencing:\n  action: cycle\n", 1) },
			wantErr: "fencing.action"},
		{name: "fencing on, nothing to fence with", edit: func(s string) string { return s[:strings.Index(s, "fencing:\n")] },
			wantErr: "fencing: profile.fencing is on but neither fencing.bmcs nor fencing.sbd"},
		{name: "sbd device outside /dev", edit: func(s string) string { return s + "  sbd: {device: /srv/disk}\n" },
			wantErr: "fencing.sbd.device"},
		{name: "sbd watchdog timeout", edit: func(s string) string { return s + "  sbd: {device: /dev/sdb, watchdog_timeout: 500}\n" },
			wantErr: "fencing.sbd.watchdog_timeout"},
		{name: "BMCs with fencing off", edit: func(s string) string { return strings.Replace(s, "fencing: true", "fencing: false", 1) },
			warn: "BMCs or sbd are given but profile.fencing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, warn, err := Parse([]byte(tt.edit(fencingDef)))
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
			}
			if tt.warn != "" && !slices.ContainsFunc(warn, func(w string) bool { return strings.Contains(w, tt.warn) }) {
				t.Errorf("warnings %q lack %q", warn, tt.warn)
			}
		})
	}
}

func TestFencingPasswordFile(t *testing.T) {
	dir := t.TempDir()
	def := strings.Replace(fencingDef, `password: "pw-n1"`, "password_file: n1.pw", 1)
	path := filepath.Join(dir, "cluster.yaml")
	if err := os.WriteFile(path, []byte(def), 0o600); err != nil {
		t.Fatal(err)
	}
	pw := filepath.Join(dir, "n1.pw")
	if err := os.WriteFile(pw, []byte("from-file\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Load(path); err == nil || !strings.Contains(err.Error(), "fencing.bmcs[0].password_file") || !strings.Contains(err.Error(), "want 0600") {
		t.Fatalf("a password file others may read: %v", err)
	}
	if err := os.Chmod(pw, 0o600); err != nil {
		t.Fatal(err)
	}
	c, warn, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(c.Fencing.BMCs[0].Password) != "from-file" {
		t.Errorf("password from file %q, want from-file (trailing newline dropped)", string(c.Fencing.BMCs[0].Password))
	}
	if slices.ContainsFunc(warn, func(w string) bool { return strings.Contains(w, "mode") }) {
		t.Errorf("a 0600 definition warned: %q", warn)
	}
	// Inline passwords in a definition others may read: a warning.
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, warn, err = Load(path); err != nil || !slices.ContainsFunc(warn, func(w string) bool { return strings.Contains(w, "others may read them") }) {
		t.Errorf("inline passwords in a 0644 definition: warnings %q, %v", warn, err)
	}
	both := strings.Replace(def, "password_file: n1.pw", `password: x, password_file: n1.pw`, 1)
	if err := os.WriteFile(path, []byte(both), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Load(path); err == nil || !strings.Contains(err.Error(), "not both") {
		t.Errorf("password and password_file: %v", err)
	}
}

// TestFencingSecretHidden checks that a BMC password prints as <secret>
// in every way the definition may reach a log or the API.
func TestFencingSecretHidden(t *testing.T) {
	c, _, err := Parse([]byte(fencingDef))
	if err != nil {
		t.Fatal(err)
	}
	data, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{fmt.Sprintf("%v", c), fmt.Sprintf("%+v", c.Fencing), fmt.Sprintf("%#v", c.Fencing.BMCs[0]), string(data)} {
		if strings.Contains(s, "pw-n1") {
			t.Errorf("password printed: %s", s)
		}
	}
}

func TestFencingRender(t *testing.T) {
	c, _, err := Parse([]byte(fencingDef))
	if err != nil {
		t.Fatal(err)
	}
	s := NewState()
	for i, n := range []string{"n1", "n2", "n3", "r1"} {
		if _, _, err := s.Join(n, netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)}), c.CoreSize); err != nil {
			t.Fatal(err)
		}
	}
	keys := &Keys{Corosync: make([]byte, corosyncKeyLen), Pacemaker: make([]byte, pacemakerKeyLen)}
	// n3 has no BMC and there is no sbd: the warning names it, and only it.
	warn := c.AllocationWarnings(s)
	if len(warn) != 1 || !strings.Contains(warn[0], "core member n3 has no BMC") {
		t.Errorf("allocation warnings %q, want one naming n3", warn)
	}
	b, err := Render(c, s, keys, "n2")
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, d := range b.FenceDevices {
		ids = append(ids, d.ID+"="+d.Agent+"@"+d.Node)
	}
	if want := []string{"fence-n1=fence_ipmilan@n1", "fence-n2=fence_ipmilan@n2", "fence-r1=fence_redfish@r1"}; !slices.Equal(ids, want) {
		t.Fatalf("devices %v, want %v", ids, want)
	}
	want := []map[string]string{
		{"ip": "198.18.1.1", "username": "admin", "lanplus": "1", "pcmk_host_list": "n1", "password_script": "cat /etc/pacemaker/esir-fence-n1.password"},
		{"ip": "bmc-n2.example.org", "ipport": "6230", "username": "admin", "pcmk_host_list": "n2", "password_script": "cat /etc/pacemaker/esir-fence-n2.password"},
		{"ip": "198.18.1.4", "username": "root", "ssl_insecure": "1", "pcmk_host_list": "r1", "password_script": "cat /etc/pacemaker/esir-fence-r1.password"},
	}
	for i, d := range b.FenceDevices {
		if !maps.Equal(d.Params, want[i]) {
			t.Errorf("%s: params %v, want %v", d.ID, d.Params, want[i])
		}
	}
	for _, n := range []string{"n1", "n2", "r1"} {
		i := slices.IndexFunc(b.Files, func(f File) bool { return f.Path == "/etc/pacemaker/esir-fence-"+n+".password" })
		if i < 0 || b.Files[i].Mode != 0o600 || b.Files[i].Owner != "" || string(b.Files[i].Data) != "pw-"+n {
			t.Errorf("%s's password file on n2: %+v", n, b.Files[max(i, 0)])
		}
	}
	// The remote member holds no CIB: no device, no password.
	r, err := Render(c, s, keys, "r1")
	if err != nil {
		t.Fatal(err)
	}
	data, _ := json.Marshal(r)
	if len(r.FenceDevices) != 0 || strings.Contains(string(data), "esir-fence") {
		t.Errorf("remote r1's bundle carries fencing: %s", data)
	}
	// fencing.action off: every device turns a reboot into an off.
	c.Fencing.Action = "off"
	b, _ = Render(c, s, keys, "n1")
	for _, d := range b.FenceDevices {
		if d.Params["pcmk_reboot_action"] != "off" {
			t.Errorf("%s with action off: %v", d.ID, d.Params)
		}
	}
	// Fencing off: nothing.
	c.Profile.Fencing = false
	if b, _ = Render(c, s, keys, "n1"); len(b.FenceDevices) != 0 || slices.ContainsFunc(b.Files, func(f File) bool { return strings.Contains(f.Path, "fence") }) {
		t.Errorf("fencing off renders devices %v", b.FenceDevices)
	}
}

func TestFencingSBD(t *testing.T) {
	def := "name: s\nprofile: {corosync: true, pacemaker: true, fencing: true}\ncore_size: 3\nfencing:\n  sbd: {device: /dev/disk/by-id/wwn-0x5000c500a1b2c3d4}\n"
	c, _, err := Parse([]byte(def))
	if err != nil {
		t.Fatal(err)
	}
	s := NewState()
	for i, n := range []string{"n1", "n2", "n3", "r1"} {
		if _, _, err := s.Join(n, netip.AddrFrom4([4]byte{198, 18, 0, byte(i + 1)}), c.CoreSize); err != nil {
			t.Fatal(err)
		}
	}
	if w := c.AllocationWarnings(s); len(w) != 0 {
		t.Errorf("sbd fences every member, yet: %q", w)
	}
	for _, n := range []string{"n1", "r1"} {
		b, err := Render(c, s, &Keys{}, n)
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(b.Files, func(f File) bool { return f.Path == "/etc/default/sbd" })
		if i < 0 {
			t.Fatalf("%s: no /etc/default/sbd", n)
		}
		got := string(b.Files[i].Data)
		for _, l := range []string{"SBD_DEVICE=/dev/disk/by-id/wwn-0x5000c500a1b2c3d4\n", "SBD_PACEMAKER=yes\n", "SBD_WATCHDOG_DEV=/dev/watchdog\n", "SBD_WATCHDOG_TIMEOUT=5\n"} {
			if !strings.Contains(got, l) {
				t.Errorf("%s: /etc/default/sbd lacks %q:\n%s", n, l, got)
			}
		}
		if n == "n1" && (len(b.FenceDevices) != 1 || b.FenceDevices[0].Agent != "fence_sbd" || b.FenceDevices[0].Params["devices"] != "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4" || b.StonithWatchdogTimeout != "") {
			t.Errorf("n1: devices %+v, watchdog timeout %q; want one fence_sbd on the disk", b.FenceDevices, b.StonithWatchdogTimeout)
		}
	}
	// Watchdog only: no device; pacemaker waits twice the watchdog timeout.
	c.Fencing.SBD.Device = ""
	c.Fencing.SBD.WatchdogTimeout = 7
	b, _ := Render(c, s, &Keys{}, "n1")
	if len(b.FenceDevices) != 0 || b.StonithWatchdogTimeout != "14s" {
		t.Errorf("watchdog-only sbd: devices %+v, stonith-watchdog-timeout %q; want none and 14s", b.FenceDevices, b.StonithWatchdogTimeout)
	}
}
