// Package cluster is the deployment server's side of ESIR's SSI node stack.
// It keeps the cluster definition, allocates each enrolling node a stable id
// and a role (ssi.State), keeps the cluster's secrets, hands each member its
// bundle (ssi.Render) and records what each member's node service reports:
// enrolled, with the engines' membership view, or exactly which check failed.
//
// Leaving follows the order the engines need: the node is told to stop its
// stack and confirms; only then (or once LeaveTimeout has passed without a
// word from it) is it removed from the allocation, which bumps the nodelist
// version: the remaining members reload the nodelist and a core member purges
// the node from pacemaker.
//
// The allocation, the secrets and the members' last reports live under one
// directory, written atomically, so they survive a restart.
package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/esir-project/esir/ssi"
)

// State is a member's standing as the server sees it.
type State string

// Member states.
const (
	// Joining: allocated; its node service has not confirmed the bundle.
	Joining State = "joining"
	// Enrolled: the node's engines passed every check at its last report.
	Enrolled State = "enrolled"
	// Failed: the node's last report named a failed check.
	Failed State = "failed"
	// Leaving: told to stop its stack; removed once it confirms.
	Leaving State = "leaving"
	// Unreachable: no report for StaleAfter (computed, never stored).
	Unreachable State = "unreachable"
)

// ErrNotMember is returned (wrapped) for a node the cluster does not hold.
var ErrNotMember = errors.New("not a cluster member")

// ErrNotReady is returned (wrapped) for a bundle that cannot be rendered
// yet: the definition names a node (director, real server, NFS server) that
// has not joined. The node asks again shortly.
var ErrNotReady = errors.New("cluster not ready")

// ErrConflict is returned (wrapped) for a join the allocation refuses.
var ErrConflict = errors.New("cluster conflict")

// Member is one member's allocation and last report.
type Member struct {
	Name string     `json:"name"`
	MAC  string     `json:"mac"`
	ID   int        `json:"id"`
	Role ssi.Role   `json:"role"`
	Addr netip.Addr `json:"addr"`
	// State is the stored state; Snapshot shows Unreachable for a member
	// silent for StaleAfter.
	State State `json:"state"`
	// Check and Error say what failed (State Failed) or why it left.
	Check string `json:"check,omitempty"`
	Error string `json:"error,omitempty"`
	// Version is the nodelist version the node last applied.
	Version int `json:"version"`
	// View is the node's last membership view (ssi/enroll.Membership JSON).
	View     json.RawMessage `json:"view,omitempty"`
	Reported time.Time       `json:"reported,omitzero"`
	Joined   time.Time       `json:"joined,omitzero"`
	// Enrolled is when the node first reported enrolled at its version.
	Enrolled time.Time `json:"enrolled,omitzero"`
	LeaveBy  time.Time `json:"leave_by,omitzero"`
}

// View is the part of a node's membership view (ssi/enroll's Membership, as
// the node sent it) the server reads and shows; the rest is kept as the node
// sent it.
type View struct {
	NodeID       int         `json:"node_id"`
	Joined       []int       `json:"joined"`
	Nodelist     []int       `json:"nodelist"`
	Quorate      bool        `json:"quorate"`
	Expected     int         `json:"expected"`
	Total        int         `json:"total"`
	Online       []string    `json:"online"`
	VIPs         []string    `json:"vips"`
	TimeSource   string      `json:"time_source"`
	TimeOffsetMS float64     `json:"time_offset_ms"`
	TimeSynced   bool        `json:"time_synced"`
	HomeMounted  bool        `json:"home_mounted"`
	HomeExported bool        `json:"home_exported"`
	IPVS         []IPVSEntry `json:"ipvs"`
}

// IPVSEntry is one real server of a director's IPVS table, as the director
// reports it.
type IPVSEntry struct {
	Service  string `json:"service"` // "TCP 198.18.0.100:80 wlc"
	Real     string `json:"real"`    // "198.18.0.3:80"
	Weight   int    `json:"weight"`
	Active   int    `json:"active"`   // active connections
	Inactive int    `json:"inactive"` // inactive connections
}

// MemberView returns m's last view; ok is false when m sent none (or one
// that does not parse).
func MemberView(m Member) (v View, ok bool) {
	if len(m.View) == 0 || json.Unmarshal(m.View, &v) != nil {
		return View{}, false
	}
	return v, true
}

// TimeText is the view's time synchronisation in a few words: "SOURCE
// +0.250 ms" when synchronised, "NOT synced (SOURCE)", or "—" when the
// node runs no time service.
func (v View) TimeText() string {
	switch {
	case v.TimeSource == "" && !v.TimeSynced:
		return "—"
	case v.TimeSynced:
		return strings.TrimSpace(fmt.Sprintf("%s %+.3f ms", v.TimeSource, v.TimeOffsetMS))
	}
	return "NOT synced (" + v.TimeSource + ")"
}

// HomeText is the NFS home as the view reports it: on the home's server
// (server) "exported" or "NOT exported", elsewhere "mounted" or "NOT
// mounted"; "—" without an NFS home (nfsHome false).
func (v View) HomeText(nfsHome, server bool) string {
	switch {
	case !nfsHome:
		return "—"
	case server && v.HomeExported:
		return "exported"
	case server:
		return "NOT exported"
	case v.HomeMounted:
		return "mounted"
	}
	return "NOT mounted"
}

// Snapshot is the cluster as the server sees it now.
type Snapshot struct {
	Name     string      `json:"name"`
	Profile  ssi.Profile `json:"profile"`
	CoreSize int         `json:"core_size"`
	// NFSServer is the member that exports the NFS home ("" without one).
	NFSServer string `json:"nfs_server,omitempty"`
	Version   int    `json:"version"`
	// Warnings are the definition's (ssi.Cluster.Validate) and those the
	// allocation adds (ssi.Cluster.AllocationWarnings).
	Warnings []string `json:"warnings,omitempty"`
	Members  []Member `json:"members"`
	// Quorate, Joined and Online come from the freshest report of a core
	// member that is enrolled or failed (not unreachable).
	Quorate bool     `json:"quorate"`
	Joined  []int    `json:"joined"`
	Online  []string `json:"online"`
	// ViewFrom names the member whose view Quorate, Joined and Online are.
	ViewFrom string `json:"view_from,omitempty"`
	// VIPHolders maps each VIP to the members that report holding it (more
	// than one is a split brain).
	VIPHolders map[string][]string `json:"vip_holders,omitempty"`
	Retired    []int               `json:"retired,omitempty"`
}

// Holders returns the names of the members that hold a VIP (VIPHolders):
// their views' IPVS tables are the live ones.
func (s *Snapshot) Holders() map[string]bool {
	hs := map[string]bool{}
	for _, names := range s.VIPHolders {
		for _, n := range names {
			hs[n] = true
		}
	}
	return hs
}

// Options tune a Service.
type Options struct {
	// LeaveTimeout is how long a leave waits for the node to confirm that
	// its stack stopped before removing it anyway (default 30 s).
	LeaveTimeout time.Duration
	// StaleAfter is how long a member may stay silent before it shows as
	// unreachable (default 30 s; node services report at least every 10 s).
	StaleAfter time.Duration
	Now        func() time.Time
	Log        *slog.Logger
}

// Service is one SSI cluster kept by the server.
type Service struct {
	def      *ssi.Cluster
	defPath  string
	warnings []string // the definition's own (ssi.Validate)
	dir      string
	opts     Options

	mu      sync.Mutex
	alloc   *ssi.State
	keys    *ssi.Keys
	members map[string]*Member // by name
	macs    map[string]string  // member name by MAC
	// warned holds the warnings logged already (the definition's, and
	// those the allocation adds as nodes join).
	warned map[string]bool
	// changed is closed and replaced when the allocation or an action
	// changes (node services wait on it).
	changed chan struct{}
}

// Files under the service's directory.
const (
	allocFile   = "alloc.json"
	membersFile = "members.json"
	secretsDir  = "secrets"
)

// Open loads the cluster definition at defPath and the state kept in dir
// (created 0700 when missing): the allocation, the secrets (generated once)
// and the members' last reports.
func Open(defPath, dir string, opts Options) (*Service, error) {
	def, warn, err := ssi.Load(defPath)
	if err != nil {
		return nil, err
	}
	if opts.LeaveTimeout <= 0 {
		opts.LeaveTimeout = 30 * time.Second
	}
	if opts.StaleAfter <= 0 {
		opts.StaleAfter = 30 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("cluster %s: state directory: %w", def.Name, err)
	}
	s := &Service{def: def, defPath: defPath, warnings: warn, dir: dir, opts: opts, members: map[string]*Member{}, macs: map[string]string{},
		warned: map[string]bool{}, changed: make(chan struct{})}
	if s.alloc, err = ssi.LoadState(filepath.Join(dir, allocFile)); err != nil {
		return nil, fmt.Errorf("cluster %s: %w", def.Name, err)
	}
	if s.alloc.Cluster != "" && s.alloc.Cluster != def.Name {
		return nil, fmt.Errorf("cluster %s: %s holds cluster %s's members and secrets: a cluster keeps its name (rename it back, or give the new cluster a state directory of its own)",
			def.Name, dir, s.alloc.Cluster)
	}
	if s.keys, err = ssi.LoadKeys(filepath.Join(dir, secretsDir)); err != nil {
		return nil, fmt.Errorf("cluster %s: %w", def.Name, err)
	}
	var ms []*Member
	switch data, err := os.ReadFile(filepath.Join(dir, membersFile)); {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("cluster %s: %w", def.Name, err)
	default:
		if err := json.Unmarshal(data, &ms); err != nil {
			return nil, fmt.Errorf("cluster %s: %s: %w", def.Name, filepath.Join(dir, membersFile), err)
		}
	}
	for _, m := range ms {
		s.members[m.Name] = m
	}
	// The allocation is the truth about who is a member: a report without
	// an allocation is dropped, an allocation without a report joins again.
	for name := range s.members {
		if _, ok := s.alloc.Member(name); !ok {
			delete(s.members, name)
		}
	}
	for _, a := range s.alloc.Members {
		m, ok := s.members[a.Name]
		if !ok {
			m = &Member{Name: a.Name, State: Joining}
			s.members[a.Name] = m
		}
		m.ID, m.Role, m.Addr = a.ID, a.Role, a.Addr
		if m.MAC != "" {
			s.macs[m.MAC] = m.Name
		}
	}
	// A definition changed while the server was down reaches the members
	// as a new nodelist version: each applies it (touching only the
	// engines whose files change). Members allocated under a definition
	// of unknown digest (state from before digests) apply it again too.
	if d := def.Digest(); s.alloc.Definition != d || s.alloc.Cluster != def.Name {
		if s.alloc.Definition != d && (s.alloc.Definition != "" || len(s.alloc.Members) > 0) {
			s.alloc.Version++
			opts.Log.Info("cluster: the definition changed: members apply it as a new nodelist version", "cluster", def.Name,
				"file", defPath, "version", s.alloc.Version)
		}
		s.alloc.Cluster, s.alloc.Definition = def.Name, d
		if err := s.save(); err != nil {
			return nil, err
		}
	}
	s.logWarnings()
	return s, nil
}

// definitionWarnings returns the definition's warnings: its own and those
// the current allocation adds (ssi.Cluster.AllocationWarnings); callers
// hold mu, or own s alone.
func (s *Service) definitionWarnings() []string {
	warn := slices.Clone(s.warnings)
	for _, w := range s.def.AllocationWarnings(s.alloc) {
		if !slices.Contains(warn, w) {
			warn = append(warn, w)
		}
	}
	return warn
}

// logWarnings logs each definition warning once, when it first holds;
// callers hold mu, or own s alone.
func (s *Service) logWarnings() {
	for _, w := range s.definitionWarnings() {
		if !s.warned[w] {
			s.warned[w] = true
			s.opts.Log.Warn("cluster definition", "cluster", s.def.Name, "file", s.defPath, "warning", w)
		}
	}
}

// Name returns the cluster's name.
func (s *Service) Name() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.def.Name
}

// Reload reads the definition file (and its password files) again, as at
// Open: a changed definition replaces the running one and bumps the
// nodelist version, so every member applies it. A definition that does not
// load or renames the cluster (corosync cannot rename a running cluster)
// is refused with the running one kept. It returns the nodelist version
// and whether the definition changed.
func (s *Service) Reload() (version int, changed bool, err error) {
	def, warn, err := ssi.Load(s.defPath)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		return s.alloc.Version, false, fmt.Errorf("cluster %s: reload: %w (the running definition stays)", s.def.Name, err)
	}
	if def.Name != s.def.Name {
		return s.alloc.Version, false, fmt.Errorf("cluster %s: reload: %s names the cluster %s: a running cluster keeps its name (the running definition stays)",
			s.def.Name, s.defPath, def.Name)
	}
	d := def.Digest()
	if d == s.alloc.Definition {
		return s.alloc.Version, false, nil
	}
	oldDef, oldWarn, oldDigest := s.def, s.warnings, s.alloc.Definition
	s.def, s.warnings, s.alloc.Definition = def, warn, d
	s.alloc.Version++
	if err := s.save(); err != nil {
		s.def, s.warnings, s.alloc.Definition = oldDef, oldWarn, oldDigest
		s.alloc.Version--
		return s.alloc.Version, false, fmt.Errorf("cluster %s: reload: %w (the running definition stays)", s.def.Name, err)
	}
	s.opts.Log.Info("cluster: definition reloaded: members apply it as a new nodelist version", "cluster", s.def.Name,
		"file", s.defPath, "version", s.alloc.Version)
	s.logWarnings()
	s.broadcast()
	return s.alloc.Version, true, nil
}

// save writes the allocation and the members atomically; callers hold mu.
func (s *Service) save() error {
	if err := ssi.SaveState(filepath.Join(s.dir, allocFile), s.alloc); err != nil {
		return fmt.Errorf("cluster %s: %w", s.def.Name, err)
	}
	ms := make([]*Member, 0, len(s.members))
	for _, m := range s.members {
		ms = append(ms, m)
	}
	slices.SortFunc(ms, func(a, b *Member) int { return a.ID - b.ID })
	data, err := json.MarshalIndent(ms, "", "  ")
	if err != nil {
		return err
	}
	if err := writeAtomic(filepath.Join(s.dir, membersFile), data); err != nil {
		return fmt.Errorf("cluster %s: %w", s.def.Name, err)
	}
	return nil
}

// broadcast wakes every Wait; callers hold mu.
func (s *Service) broadcast() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *Service) byMAC(mac string) *Member {
	if name, ok := s.macs[mac]; ok {
		return s.members[name]
	}
	return nil
}

// Join allocates node name (booting from mac, at addr) an id and a role, or
// returns its allocation when it is already a member (a reboot: the node
// enrolls again at every boot). A name held by another MAC, an address held
// by another member and a node that is leaving are refused.
func (s *Service) Join(name, mac string, addr netip.Addr) (Member, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m, ok := s.members[name]; ok {
		if m.MAC != "" && m.MAC != mac {
			return Member{}, fmt.Errorf("cluster %s: node name %s is member id %d booting from %s, not %s: %w", s.def.Name, name, m.ID, m.MAC, mac, ErrConflict)
		}
		if m.State == Leaving {
			return Member{}, fmt.Errorf("cluster %s: node %s is leaving (until it confirms or %s): %w", s.def.Name, name, m.LeaveBy.Format(time.RFC3339), ErrConflict)
		}
	}
	if o := s.byMAC(mac); o != nil && o.Name != name {
		return Member{}, fmt.Errorf("cluster %s: %s is already member %s (id %d): %w", s.def.Name, mac, o.Name, o.ID, ErrConflict)
	}
	a, changed, err := s.alloc.Join(name, addr, s.def.CoreSize)
	if err != nil {
		return Member{}, fmt.Errorf("cluster %s: %w: %w", s.def.Name, err, ErrConflict)
	}
	m, ok := s.members[name]
	if !ok {
		m = &Member{Name: name, State: Joining, Joined: s.opts.Now().UTC()}
		s.members[name] = m
		changed = true
	}
	if m.MAC != mac {
		delete(s.macs, m.MAC)
		m.MAC, changed = mac, true
		s.macs[mac] = name
	}
	m.ID, m.Role, m.Addr = a.ID, a.Role, a.Addr
	if changed {
		if err := s.save(); err != nil {
			return Member{}, err
		}
		s.opts.Log.Info("cluster: member allocated", "cluster", s.def.Name, "node", name, "id", a.ID, "role", a.Role, "addr", addr, "version", s.alloc.Version)
		s.logWarnings()
		s.broadcast()
	}
	return *m, nil
}

// Assignment returns what the node booting from mac must do: its bundle at
// the current nodelist version, and whether to join or leave.
func (s *Service) Assignment(mac string) (*ssi.Bundle, string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.assignment(mac)
}

func (s *Service) assignment(mac string) (*ssi.Bundle, string, error) {
	m := s.byMAC(mac)
	if m == nil {
		return nil, "", fmt.Errorf("cluster %s: node %s: %w", s.def.Name, mac, ErrNotMember)
	}
	b, err := ssi.Render(s.def, s.alloc, s.keys, m.Name)
	if err != nil {
		return nil, "", fmt.Errorf("cluster %s: %w: %w", s.def.Name, err, ErrNotReady)
	}
	action := "join"
	if m.State == Leaving {
		action = "leave"
	}
	return b, action, nil
}

// Wait returns when the nodelist version differs from version or the
// member's action is leave, when ctx ends, or after wait.
func (s *Service) Wait(ctx context.Context, mac string, version int, wait time.Duration) {
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		s.mu.Lock()
		m := s.byMAC(mac)
		done := m == nil || m.State == Leaving || s.alloc.Version != version
		ch := s.changed
		s.mu.Unlock()
		if done {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			return
		case <-ch:
		}
	}
}

// Report is a node service's verdict.
type Report struct {
	Version int
	State   string // "enrolled", "failed" or "left"
	Check   string
	Error   string
	View    json.RawMessage
}

// Report records mac's verdict. first is true when the node is enrolled for
// the first time at the current nodelist version since it joined (the
// server then marks the node enrolled).
func (s *Service) Report(mac string, r Report) (m Member, first bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.byMAC(mac)
	if p == nil {
		return Member{}, false, fmt.Errorf("cluster %s: node %s: %w", s.def.Name, mac, ErrNotMember)
	}
	now := s.opts.Now().UTC()
	p.Reported = now
	if len(r.View) > 0 {
		p.View = r.View
	}
	p.Version = r.Version
	prev := p.State
	save := false
	switch r.State {
	case "left":
		if p.State != Leaving {
			return *p, false, fmt.Errorf("cluster %s: node %s reports it left, but it was not asked to: %w", s.def.Name, p.Name, ErrConflict)
		}
		return *p, false, s.remove(p, "left: its stack is stopped")
	case "enrolled":
		if p.State == Leaving {
			break
		}
		p.State, p.Check, p.Error = Enrolled, "", ""
		if p.Enrolled.IsZero() {
			p.Enrolled, first, save = now, true, true
		}
	case "failed":
		if p.State == Leaving {
			break
		}
		save = p.State != Failed || p.Check != r.Check
		p.State, p.Check, p.Error = Failed, r.Check, r.Error
	default:
		return *p, false, fmt.Errorf("state: %q is not enrolled, failed or left", r.State)
	}
	if prev != p.State {
		save = true
		s.opts.Log.Info("cluster: member state", "cluster", s.def.Name, "node", p.Name, "from", prev, "to", p.State, "check", p.Check, "error", p.Error)
	}
	if save {
		if err := s.save(); err != nil {
			return *p, false, err
		}
	}
	return *p, first, nil
}

// Leave starts name's leave: its node service is told to stop its stack and
// the node is removed once it confirms, or after LeaveTimeout. A member that
// cannot answer (unreachable, or never enrolled) is removed at once.
func (s *Service) Leave(name, why string) (Member, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.members[name]
	if !ok {
		return Member{}, fmt.Errorf("cluster %s: node %s: %w", s.def.Name, name, ErrNotMember)
	}
	if m.State == Leaving {
		return *m, nil
	}
	if s.state(m) == Unreachable || m.Reported.IsZero() {
		out := *m
		return out, s.remove(m, why+" (node silent: removed without its confirmation)")
	}
	m.State, m.LeaveBy, m.Error = Leaving, s.opts.Now().UTC().Add(s.opts.LeaveTimeout), why
	if err := s.save(); err != nil {
		return *m, err
	}
	s.opts.Log.Info("cluster: member leaving", "cluster", s.def.Name, "node", name, "why", why, "by", m.LeaveBy)
	s.broadcast()
	return *m, nil
}

// Remove takes name out of the allocation now, without asking its node
// service: for a node that is being reinstalled (its stack is not running).
func (s *Service) Remove(name, why string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.members[name]
	if !ok {
		return fmt.Errorf("cluster %s: node %s: %w", s.def.Name, name, ErrNotMember)
	}
	return s.remove(m, why)
}

// remove retires m's id and bumps the nodelist version; callers hold mu.
func (s *Service) remove(m *Member, why string) error {
	if _, err := s.alloc.Leave(m.Name); err != nil {
		return fmt.Errorf("cluster %s: %w", s.def.Name, err)
	}
	delete(s.members, m.Name)
	delete(s.macs, m.MAC)
	if err := s.save(); err != nil {
		return err
	}
	s.opts.Log.Info("cluster: member removed", "cluster", s.def.Name, "node", m.Name, "id", m.ID, "why", why, "version", s.alloc.Version)
	s.broadcast()
	return nil
}

// MemberOf returns the member booting from mac.
func (s *Service) MemberOf(mac string) (Member, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m := s.byMAC(mac); m != nil {
		return *m, true
	}
	return Member{}, false
}

// Tick removes the leaving members whose LeaveTimeout has passed. The
// server calls it every few seconds.
func (s *Service) Tick() {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.opts.Now()
	for _, m := range s.members {
		if m.State == Leaving && now.After(m.LeaveBy) {
			s.opts.Log.Warn("cluster: member did not confirm its leave in time: removed anyway; power it off if its engines still run",
				"cluster", s.def.Name, "node", m.Name, "timeout", s.opts.LeaveTimeout)
			if err := s.remove(m, "leave not confirmed within "+s.opts.LeaveTimeout.String()); err != nil {
				s.opts.Log.Error("cluster: remove", "node", m.Name, "err", err)
			}
		}
	}
}

// state is m's state with staleness applied; callers hold mu.
func (s *Service) state(m *Member) State {
	if m.State != Leaving && !m.Reported.IsZero() && s.opts.Now().Sub(m.Reported) > s.opts.StaleAfter {
		return Unreachable
	}
	return m.State
}

// Snapshot returns the cluster now.
func (s *Service) Snapshot() Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	snap := Snapshot{Name: s.def.Name, Profile: s.def.Profile, CoreSize: s.def.CoreSize, Version: s.alloc.Version,
		Warnings: s.definitionWarnings(), Retired: slices.Clone(s.alloc.Retired), Members: []Member{}, VIPHolders: map[string][]string{}}
	if s.def.Profile.NFSHome {
		snap.NFSServer = s.def.NFS.Server
	}
	var best *Member
	for _, m := range s.members {
		c := *m
		c.State = s.state(m)
		snap.Members = append(snap.Members, c)
		v, ok := MemberView(c)
		if !ok || c.State == Unreachable || c.State == Leaving {
			continue
		}
		for _, vip := range v.VIPs {
			snap.VIPHolders[vip] = append(snap.VIPHolders[vip], m.Name)
		}
		if m.Role == ssi.Core && (best == nil || m.Reported.After(best.Reported)) {
			best = m
		}
	}
	slices.SortFunc(snap.Members, func(a, b Member) int { return a.ID - b.ID })
	for _, h := range snap.VIPHolders {
		slices.Sort(h)
	}
	if best != nil {
		v, _ := MemberView(*best)
		snap.Quorate, snap.Joined, snap.Online, snap.ViewFrom = v.Quorate, v.Joined, v.Online, best.Name
	}
	return snap
}

func writeAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
