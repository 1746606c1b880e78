package enroll

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// The checks a CheckError names.
const (
	CheckInstall    = "install"    // the bundle's files and fstab lines
	CheckStart      = "start"      // starting an engine
	CheckStop       = "stop"       // stopping an engine the node's bundle no longer lists
	CheckMembership = "membership" // corosync lists the node, and every core member, as joined
	CheckQuorum     = "quorum"     // corosync says the partition is quorate
	CheckNodeID     = "node-id"    // corosync runs under the node's allocated id
	CheckPacemaker  = "pacemaker"  // crm_mon shows the node online
	CheckTime       = "time"       // chrony is synchronised (to a core member, on other nodes)
	CheckHome       = "home"       // the NFS home is mounted (on its server: served and exported)
	CheckVIP        = "vip"        // the real-server VIPs are on lo
	CheckReload     = "reload"     // a running engine reloaded its changed configuration (corosync nodelist, keepalived, chrony, NFS exports)
)

// CheckError is a failed enrollment check: which node, which check (one of
// the Check constants) and why. Enroll, WaitMember, WaitOnline, TimeSynced
// and View return it, possibly wrapped or joined: find it with errors.As.
type CheckError struct {
	Node  string // node name; "node ID" from WaitMember, "" when the node is not known
	Check string
	Err   error
}

// Error reads like "n3 not enrolled: check quorum: partition is not quorate
// (1 of 3 votes)".
func (e *CheckError) Error() string {
	if e.Node == "" {
		return fmt.Sprintf("check %s: %v", e.Check, e.Err)
	}
	return fmt.Sprintf("%s not enrolled: check %s: %v", e.Node, e.Check, e.Err)
}

// Unwrap returns the underlying error.
func (e *CheckError) Unwrap() error { return e.Err }

// failed returns a CheckError for check, its node still unnamed.
func failed(check string, format string, a ...any) *CheckError {
	return &CheckError{Check: check, Err: fmt.Errorf(format, a...)}
}

// named gives err's CheckError the node's name when it has none yet and
// returns err.
func named(err error, node string) error {
	var ce *CheckError
	if errors.As(err, &ce) && ce.Node == "" {
		ce.Node = node
	}
	return err
}

// timeout is the bound of one wait; 0 in Node.Timeout means one minute.
func (n *Node) timeout() time.Duration {
	if n.Timeout == 0 {
		return time.Minute
	}
	return n.Timeout
}

// wait runs check every interval until it returns nil, the node's timeout
// passes or ctx ends, and returns the last verdict, noting how long it kept
// failing. The deadline is checked between polls, so that a check in flight
// is not cut short and the last verdict is a real one.
func (n *Node) wait(ctx context.Context, interval time.Duration, check func() error) error {
	timeout := n.timeout()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			var ce *CheckError
			if errors.As(err, &ce) {
				ce.Err = fmt.Errorf("%w (still failing after %v)", ce.Err, timeout)
				return err
			}
			return fmt.Errorf("%w (still failing after %v)", err, timeout)
		}
		select {
		case <-ctx.Done():
		case <-time.After(interval):
		}
	}
}
