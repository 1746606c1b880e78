package ssi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
)

// Role is a member's part in the cluster.
type Role string

// Roles.
const (
	Core   Role = "core"   // corosync voter running pacemaker
	Remote Role = "remote" // pacemaker-remote member, not in corosync's nodelist
)

// Member is one node's allocation: its id is stable and never given to
// another node, even after it leaves.
type Member struct {
	ID   int        `json:"id"`
	Name string     `json:"name"`
	Addr netip.Addr `json:"addr"` // corosync ring0 / cluster network address
	Role Role       `json:"role"`
}

// State is the persisted allocation: members, the ids retired by leaving
// nodes, the next id to hand out and the nodelist version, which grows with
// every change and becomes corosync's config_version. Its methods are not safe
// for concurrent use: the server serialises changes.
type State struct {
	Version int      `json:"version"`
	NextID  int      `json:"next_id"`
	Members []Member `json:"members"`
	Retired []int    `json:"retired,omitempty"`
	// Cluster and Definition are the name and the digest (Cluster.Digest)
	// of the definition the current version was handed out with.
	Cluster    string `json:"cluster,omitempty"`
	Definition string `json:"definition,omitempty"`
}

// NewState returns an empty allocation.
func NewState() *State { return &State{NextID: 1} }

// Member returns the member called name.
func (s *State) Member(name string) (Member, bool) {
	for _, m := range s.Members {
		if m.Name == name {
			return m, true
		}
	}
	return Member{}, false
}

// Core returns the core members in id order.
func (s *State) Core() []Member {
	var out []Member
	for _, m := range s.Members {
		if m.Role == Core {
			out = append(out, m)
		}
	}
	return out
}

// Join allocates name an id and a role, or returns its existing allocation
// (joining again is idempotent; a new address is recorded). A node becomes a
// core voter while fewer than coreSize core members exist, a remote member
// otherwise. changed reports whether the state changed (and must be saved).
func (s *State) Join(name string, addr netip.Addr, coreSize int) (m Member, changed bool, err error) {
	if !nameRE.MatchString(name) {
		return Member{}, false, fmt.Errorf("join: node name %q is not valid (lower-case letters, digits and '-')", name)
	}
	if !addr.IsValid() {
		return Member{}, false, fmt.Errorf("join %s: no cluster address", name)
	}
	for i, o := range s.Members {
		if o.Name != name && o.Addr == addr {
			return Member{}, false, fmt.Errorf("join %s: address %s already belongs to node %s (id %d)", name, addr, o.Name, o.ID)
		}
		if o.Name == name {
			if o.Addr == addr {
				return o, false, nil
			}
			s.Members[i].Addr = addr
			s.Version++
			return s.Members[i], true, nil
		}
	}
	if s.NextID < 1 {
		s.NextID = 1
	}
	role := Remote
	if len(s.Core()) < coreSize {
		role = Core
	}
	m = Member{ID: s.NextID, Name: name, Addr: addr, Role: role}
	s.NextID++
	s.Members = append(s.Members, m)
	s.Version++
	return m, true, nil
}

// Leave removes name and retires its id for good.
func (s *State) Leave(name string) (Member, error) {
	for i, m := range s.Members {
		if m.Name == name {
			s.Members = slices.Delete(s.Members, i, i+1)
			s.Retired = append(s.Retired, m.ID)
			slices.Sort(s.Retired)
			s.Version++
			return m, nil
		}
	}
	return Member{}, fmt.Errorf("leave: node %s is not a member", name)
}

// Check refuses a state that breaks the allocation's rules: duplicate ids,
// names or addresses, an id reused after it was retired, an id at or above
// NextID, an unknown role.
func (s *State) Check() error {
	var errs []error
	ids := map[int]string{}
	names := map[string]bool{}
	addrs := map[netip.Addr]string{}
	for _, m := range s.Members {
		switch {
		case m.ID < 1:
			errs = append(errs, fmt.Errorf("node %s: id %d is not positive", m.Name, m.ID))
		case ids[m.ID] != "":
			errs = append(errs, fmt.Errorf("node %s: id %d is a duplicate of node %s", m.Name, m.ID, ids[m.ID]))
		case slices.Contains(s.Retired, m.ID):
			errs = append(errs, fmt.Errorf("node %s: id %d was retired and is never reused", m.Name, m.ID))
		case m.ID >= s.NextID:
			errs = append(errs, fmt.Errorf("node %s: id %d was never allocated (next id %d)", m.Name, m.ID, s.NextID))
		}
		ids[m.ID] = m.Name
		if names[m.Name] {
			errs = append(errs, fmt.Errorf("node %s: name appears twice", m.Name))
		}
		names[m.Name] = true
		if o, dup := addrs[m.Addr]; dup {
			errs = append(errs, fmt.Errorf("node %s: address %s already belongs to node %s", m.Name, m.Addr, o))
		}
		addrs[m.Addr] = m.Name
		if m.Role != Core && m.Role != Remote {
			errs = append(errs, fmt.Errorf("node %s: unknown role %q", m.Name, m.Role))
		}
	}
	return errors.Join(errs...)
}

// LoadState reads an allocation file; a missing file is an empty allocation.
func LoadState(path string) (*State, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return NewState(), nil
	}
	if err != nil {
		return nil, fmt.Errorf("allocation state: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var s State
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("allocation state %s: %w", path, err)
	}
	if err := s.Check(); err != nil {
		return nil, fmt.Errorf("allocation state %s: %w", path, err)
	}
	return &s, nil
}

// SaveState writes the allocation atomically (temporary file, fsync, rename).
func SaveState(path string, s *State) error {
	if err := s.Check(); err != nil {
		return fmt.Errorf("allocation state %s: refusing to save: %w", path, err)
	}
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("allocation state %s: %w", path, err)
	}
	return writeAtomic(path, append(data, '\n'), 0o600)
}

// writeAtomic writes data to path through a temporary file in the same
// directory, fsynced and renamed over path.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := f.Chmod(mode); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
