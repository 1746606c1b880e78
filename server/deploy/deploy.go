// Package deploy holds ESIR's deployment domain: nodes with their hardware
// inventory and labels, the per-node deployment state machine with its event
// log, and rollouts of an image onto a selection of nodes.
//
// It knows nothing of storage or HTTP; the store persists these types and the
// rollout scheduler moves them.
package deploy

import (
	"fmt"
	"net"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/esir-project/esir/server/agentapi"
)

// State is where a node stands in its deployment.
type State string

// The node states. A node is discovered when its agent first registers, or
// when an administrator adds it. A rollout assigns it an image; the agent then
// boots, fetches, installs and, at first boot of the installed system, enrolls.
const (
	Discovered State = "discovered"
	Assigned   State = "assigned"
	Booting    State = "booting"
	Fetching   State = "fetching"
	Installing State = "installing"
	Installed  State = "installed"
	Enrolled   State = "enrolled"
	Failed     State = "failed"
)

// States lists every state in lifecycle order.
var States = []State{Discovered, Assigned, Booting, Fetching, Installing, Installed, Enrolled, Failed}

// transitions lists, for each state, the states it may move to.
//
// A reboot during an install (register again from booting, fetching or
// installing) goes back to booting with a fresh assignment. Installed and
// enrolled nodes may be assigned again (reinstall); a failed node may be
// retried (assigned) or released (discovered).
func transitions(from State) []State {
	switch from {
	case Discovered:
		return []State{Assigned}
	case Assigned:
		return []State{Booting, Failed, Discovered}
	case Booting:
		return []State{Booting, Fetching, Failed}
	case Fetching:
		return []State{Booting, Installing, Failed}
	case Installing:
		return []State{Booting, Installed, Failed}
	case Installed:
		return []State{Enrolled, Assigned, Failed}
	case Enrolled:
		return []State{Assigned}
	case Failed:
		return []State{Assigned, Discovered}
	}
	return nil
}

// Valid reports whether s is one of the known states.
func (s State) Valid() bool {
	for _, v := range States {
		if v == s {
			return true
		}
	}
	return false
}

// Active reports whether a node in state s is in the middle of a deployment.
func (s State) Active() bool {
	switch s {
	case Assigned, Booting, Fetching, Installing:
		return true
	}
	return false
}

// CanTransition reports whether a node may move from one state to another.
func CanTransition(from, to State) bool {
	for _, t := range transitions(from) {
		if t == to {
			return true
		}
	}
	return false
}

// TransitionError is returned for a transition the state machine refuses.
type TransitionError struct {
	Node     string
	From, To State
}

func (e *TransitionError) Error() string {
	return fmt.Sprintf("node %s: illegal transition %s -> %s", e.Node, e.From, e.To)
}

// Event is one entry of a node's event log: a state transition or a note.
type Event struct {
	ID     int64     `json:"id"`
	MAC    string    `json:"mac"`
	Time   time.Time `json:"time"`
	From   State     `json:"from,omitempty"`
	To     State     `json:"to,omitempty"`
	Reason string    `json:"reason,omitempty"`
}

// Node is a machine ESIR knows, identified by the MAC address it boots from.
type Node struct {
	MAC       string              `json:"mac"`
	Hostname  string              `json:"hostname"`
	Number    int                 `json:"number"`
	Labels    map[string]string   `json:"labels"`
	State     State               `json:"state"`
	Reason    string              `json:"reason,omitempty"`
	Inventory *agentapi.Inventory `json:"inventory,omitempty"`
	// Hardware summarises Inventory in one line (see HardwareSummary).
	Hardware   string    `json:"hardware,omitempty"`
	Image      string    `json:"image,omitempty"`
	Rollout    int64     `json:"rollout,omitempty"`
	Assignment string    `json:"assignment,omitempty"`
	Phase      string    `json:"phase,omitempty"`
	LogTail    []string  `json:"log_tail,omitempty"`
	Created    time.Time `json:"created"`
	Updated    time.Time `json:"updated"`
	Changed    time.Time `json:"changed"`
}

// Transition moves the node to state to, recording reason, and returns the
// event to log. Illegal transitions return a *TransitionError and leave the
// node unchanged.
func (n *Node) Transition(to State, reason string, now time.Time) (Event, error) {
	if !CanTransition(n.State, to) {
		return Event{}, &TransitionError{Node: n.MAC, From: n.State, To: to}
	}
	ev := Event{MAC: n.MAC, Time: now, From: n.State, To: to, Reason: reason}
	n.State = to
	n.Reason = ""
	if to == Failed {
		n.Reason = reason
	}
	n.Updated = now
	n.Changed = now
	return ev, nil
}

// HardwareSummary describes an inventory in one line, e.g.
// "4 CPUs, 16.0 GiB RAM, 2 disks 1.8 TiB".
func HardwareSummary(inv *agentapi.Inventory) string {
	if inv == nil {
		return ""
	}
	var disk int64
	for _, d := range inv.Disks {
		disk += d.SizeBytes
	}
	return fmt.Sprintf("%d CPUs, %s RAM, %d disks %s", max(inv.CPU.Threads, inv.CPU.Cores), size(inv.MemoryBytes), len(inv.Disks), size(disk))
}

func size(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	f, i := float64(n), 0
	for f >= 1024 && i < len(units)-1 {
		f /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	return fmt.Sprintf("%.1f %s", f, units[i])
}

// NormalizeMAC parses a MAC address (any form net.ParseMAC accepts, 6 bytes)
// and returns it lower-case with colons.
func NormalizeMAC(s string) (string, error) {
	hw, err := net.ParseMAC(strings.TrimSpace(s))
	if err != nil || len(hw) != 6 {
		return "", fmt.Errorf("invalid MAC address %q", s)
	}
	return hw.String(), nil
}

var labelKeyRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62}[A-Za-z0-9])?$`)
var labelValueRE = regexp.MustCompile(`^[A-Za-z0-9._/:-]{0,128}$`)
var hostnameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// ValidLabel checks a label key and value.
func ValidLabel(k, v string) error {
	if !labelKeyRE.MatchString(k) {
		return fmt.Errorf("label key %q: want 1-64 characters of letters, digits, '.', '_', '/', '-'", k)
	}
	if !labelValueRE.MatchString(v) {
		return fmt.Errorf("label %q value %q: want up to 128 characters of letters, digits, '.', '_', '/', ':', '-'", k, v)
	}
	return nil
}

// ValidHostname checks a host name (one DNS label, lower case).
func ValidHostname(h string) error {
	if !hostnameRE.MatchString(h) {
		return fmt.Errorf("hostname %q: want 1-63 lower-case letters, digits and '-'", h)
	}
	return nil
}

// Selector picks nodes for a rollout: by MAC or hostname, and by labels. A
// node matches when it is named (if Names is set) and carries every label in
// Labels (if set). An empty selector matches nothing.
type Selector struct {
	Names  []string          `json:"names,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
}

// Empty reports whether the selector names nothing.
func (s Selector) Empty() bool { return len(s.Names) == 0 && len(s.Labels) == 0 }

// Match reports whether n is selected.
func (s Selector) Match(n *Node) bool {
	if s.Empty() {
		return false
	}
	if len(s.Names) > 0 {
		found := false
		for _, name := range s.Names {
			if strings.EqualFold(name, n.MAC) || name == n.Hostname {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	for k, v := range s.Labels {
		if n.Labels[k] != v {
			return false
		}
	}
	return true
}

// ParseLabels parses "k=v,k2=v2" (or several such arguments) into a map.
func ParseLabels(args ...string) (map[string]string, error) {
	out := map[string]string{}
	for _, a := range args {
		for _, kv := range strings.Split(a, ",") {
			kv = strings.TrimSpace(kv)
			if kv == "" {
				continue
			}
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return nil, fmt.Errorf("label %q: want KEY=VALUE", kv)
			}
			if err := ValidLabel(k, v); err != nil {
				return nil, err
			}
			out[k] = v
		}
	}
	return out, nil
}

// RolloutState is the state of a rollout as a whole.
type RolloutState string

// Rollout states. A running rollout starts batches; a paused one starts no
// new node (nodes already installing finish); cancelled and completed are final.
const (
	RolloutRunning   RolloutState = "running"
	RolloutPaused    RolloutState = "paused"
	RolloutCancelled RolloutState = "cancelled"
	RolloutCompleted RolloutState = "completed"
)

// Final reports whether the rollout can no longer change.
func (s RolloutState) Final() bool { return s == RolloutCancelled || s == RolloutCompleted }

// Spec is what an administrator asks for when creating a rollout.
type Spec struct {
	Image            string               `json:"image"`
	Selector         Selector             `json:"selector"`
	BatchSize        int                  `json:"batch_size"`
	Canary           int                  `json:"canary"`
	FailureThreshold int                  `json:"failure_threshold"`
	MaxRetries       int                  `json:"max_retries"`
	RetryBackoff     Duration             `json:"retry_backoff"`
	NodeTimeout      Duration             `json:"node_timeout"`
	Disk             *agentapi.DiskLayout `json:"disk,omitempty"`
}

// FieldError names the input field that is wrong.
type FieldError struct {
	Field string
	Msg   string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Msg }

// Validate checks the spec and fills defaults (batch size 10, retry backoff
// 30 s, node timeout 1 h, failure threshold 1).
func (s *Spec) Validate() error {
	if strings.TrimSpace(s.Image) == "" {
		return &FieldError{"image", "required"}
	}
	if s.Selector.Empty() {
		return &FieldError{"selector", "name nodes or labels"}
	}
	for k, v := range s.Selector.Labels {
		if err := ValidLabel(k, v); err != nil {
			return &FieldError{"selector.labels", err.Error()}
		}
	}
	switch {
	case s.BatchSize < 0:
		return &FieldError{"batch_size", "must be >= 1"}
	case s.BatchSize == 0:
		s.BatchSize = 10
	}
	if s.Canary < 0 {
		return &FieldError{"canary", "must be >= 0"}
	}
	if s.FailureThreshold < 0 {
		return &FieldError{"failure_threshold", "must be >= 0 (0 means 1)"}
	}
	if s.FailureThreshold == 0 {
		s.FailureThreshold = 1
	}
	if s.MaxRetries < 0 || s.MaxRetries > 100 {
		return &FieldError{"max_retries", "must be between 0 and 100"}
	}
	if s.RetryBackoff < 0 {
		return &FieldError{"retry_backoff", "must not be negative"}
	}
	if s.RetryBackoff == 0 {
		s.RetryBackoff = Duration(30 * time.Second)
	}
	if s.NodeTimeout < 0 {
		return &FieldError{"node_timeout", "must not be negative"}
	}
	if s.NodeTimeout == 0 {
		s.NodeTimeout = Duration(time.Hour)
	}
	return nil
}

// Rollout is an image being deployed onto a set of nodes in batches.
type Rollout struct {
	ID      int64        `json:"id"`
	Spec    Spec         `json:"spec"`
	State   RolloutState `json:"state"`
	Reason  string       `json:"reason,omitempty"`
	Batch   int          `json:"batch"`
	Batches int          `json:"batches"`
	// FailuresAccepted is the number of failed targets an administrator
	// accepted by resuming after a threshold pause.
	FailuresAccepted int       `json:"failures_accepted"`
	Created          time.Time `json:"created"`
	Updated          time.Time `json:"updated"`
	Targets          []Target  `json:"targets,omitempty"`
}

// TargetStatus is where one node of a rollout stands.
type TargetStatus string

// Target statuses.
const (
	TargetPending   TargetStatus = "pending"
	TargetActive    TargetStatus = "active"
	TargetRetrying  TargetStatus = "retrying"
	TargetSucceeded TargetStatus = "succeeded"
	TargetFailed    TargetStatus = "failed"
	TargetCancelled TargetStatus = "cancelled"
)

// Done reports whether the target needs no more work.
func (s TargetStatus) Done() bool {
	return s == TargetSucceeded || s == TargetFailed || s == TargetCancelled
}

// Target is one node of a rollout.
type Target struct {
	MAC       string       `json:"mac"`
	Batch     int          `json:"batch"`
	Status    TargetStatus `json:"status"`
	Attempts  int          `json:"attempts"`
	NextTry   time.Time    `json:"next_try,omitzero"`
	Started   time.Time    `json:"started,omitzero"`
	Finished  time.Time    `json:"finished,omitzero"`
	LastError string       `json:"last_error,omitempty"`
}

// Plan orders the selected MACs (sorted) into batches: the first canary
// targets form batch 0 when canary > 0, the rest fill batches of batchSize.
// It returns the targets and the number of batches.
func Plan(macs []string, canary, batchSize int) ([]Target, int) {
	sorted := append([]string(nil), macs...)
	sort.Strings(sorted)
	ts := make([]Target, 0, len(sorted))
	batch, inBatch := 0, 0
	for _, m := range sorted {
		size := batchSize
		if canary > 0 && batch == 0 {
			size = canary
		}
		if inBatch == size {
			batch++
			inBatch = 0
		}
		ts = append(ts, Target{MAC: m, Batch: batch, Status: TargetPending})
		inBatch++
	}
	if len(ts) == 0 {
		return ts, 0
	}
	return ts, batch + 1
}

// Duration is a time.Duration that reads and writes JSON as a Go duration
// string ("30s") and also accepts a number of seconds.
type Duration time.Duration

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) {
	return []byte(`"` + time.Duration(d).String() + `"`), nil
}

// UnmarshalJSON reads "30s" or 30 (seconds).
func (d *Duration) UnmarshalJSON(b []byte) error {
	s := strings.TrimSpace(string(b))
	if s == "null" {
		return nil
	}
	if strings.HasPrefix(s, `"`) {
		v, err := time.ParseDuration(strings.Trim(s, `"`))
		if err != nil {
			return fmt.Errorf("duration %s: %w", s, err)
		}
		*d = Duration(v)
		return nil
	}
	var secs float64
	if _, err := fmt.Sscanf(s, "%g", &secs); err != nil {
		return fmt.Errorf("duration %s: want a string like \"30s\" or seconds", s)
	}
	*d = Duration(time.Duration(secs * float64(time.Second)))
	return nil
}
