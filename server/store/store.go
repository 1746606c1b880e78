// Package store persists the deployment server's state: nodes and their event
// log, rollouts and their targets, admin tokens and server metadata.
//
// Store is an interface so that a PostgreSQL backend can follow for
// multi-server deployments; the backend here is an embedded SQLite database
// (modernc.org/sqlite, pure Go) in WAL mode with schema migrations. Every
// state change runs in a transaction through Update.
package store

import (
	"context"
	"errors"
	"time"

	"github.com/esir-project/esir/server/deploy"
)

// ErrNotFound is returned (wrapped) when a node, rollout or token is unknown.
var ErrNotFound = errors.New("not found")

// Store is the server's persistent state.
type Store interface {
	// Update runs fn in a read-write transaction, committed when fn returns
	// nil and rolled back otherwise.
	Update(ctx context.Context, fn func(Tx) error) error
	// View runs fn in a read-only transaction.
	View(ctx context.Context, fn func(Tx) error) error
	// NodeStatus reads one node's committed status outside a transaction:
	// the hot path of agent progress reports.
	NodeStatus(ctx context.Context, mac string) (*NodeStatus, error)
	// Close releases the database.
	Close() error
}

// NodeFilter narrows, orders and pages a node listing. Zero fields do not
// filter; the zero order is by node number.
type NodeFilter struct {
	State  deploy.State
	Labels map[string]string
	// Rollout lists the nodes currently assigned by that rollout.
	Rollout int64
	// Query keeps the nodes whose hostname, MAC, image or one of whose
	// labels written KEY=VALUE contains it, ignoring ASCII case.
	Query string
	// Brief leaves out the inventory and log tail (Hardware still
	// summarises the inventory): for listings. Never write back a node read
	// this way.
	Brief bool
	// Sort is the column to order by, one of SortKeys ("" is "number");
	// ties go by number. Desc reverses the order.
	Sort string
	Desc bool
	// Limit bounds the number of nodes returned (0: all); Offset skips the
	// first Offset nodes of the order.
	Limit, Offset int
}

// SortKeys returns the columns a node listing can be ordered by.
func SortKeys() []string {
	return []string{"number", "hostname", "mac", "state", "image", "hardware", "updated", "changed"}
}

// Token is an administrator API token; only its hash is stored.
type Token struct {
	ID       string    `json:"id"`
	Name     string    `json:"name"`
	Hash     string    `json:"-"`
	Created  time.Time `json:"created"`
	LastUsed time.Time `json:"last_used,omitzero"`
}

// NodeStatus is the part of a node that changes during a deployment, cheap
// to read on hot paths (agent reports, scheduler steps).
type NodeStatus struct {
	MAC        string
	State      deploy.State
	Reason     string
	Rollout    int64
	Assignment string
	Changed    time.Time
}

// Tx is one transaction's view of the store.
type Tx interface {
	// Node returns the node with that MAC or an ErrNotFound.
	Node(mac string) (*deploy.Node, error)
	// NodeStatus returns a node's status or an ErrNotFound.
	NodeStatus(mac string) (*NodeStatus, error)
	// NodeStatuses returns the status of the nodes a rollout holds.
	NodeStatuses(rollout int64) ([]NodeStatus, error)
	// Nodes lists nodes ordered by number.
	Nodes(f NodeFilter) ([]*deploy.Node, error)
	// CountNodes counts nodes by state.
	CountNodes() (map[deploy.State]int, error)
	// CountMatching counts the nodes a filter selects, ignoring its order
	// and paging: the total of a paged listing.
	CountMatching(f NodeFilter) (int, error)
	// PutNode inserts or replaces a node.
	PutNode(n *deploy.Node) error
	// DeleteNode removes a node and its events.
	DeleteNode(mac string) error
	// NextNodeNumber returns the next unused node number (1, 2, ...).
	NextNodeNumber() (int, error)
	// AddEvent appends to a node's event log.
	AddEvent(ev deploy.Event) error
	// Events returns a node's newest events, oldest first.
	Events(mac string, limit int) ([]deploy.Event, error)

	// CreateRollout stores a new rollout with its targets and sets its ID.
	CreateRollout(r *deploy.Rollout) error
	// Rollout returns a rollout with its targets.
	Rollout(id int64) (*deploy.Rollout, error)
	// RolloutInfo returns a rollout without its targets.
	RolloutInfo(id int64) (*deploy.Rollout, error)
	// Rollouts lists rollouts, newest first, without targets; states filter
	// when given.
	Rollouts(states ...deploy.RolloutState) ([]*deploy.Rollout, error)
	// PutRollout updates a rollout's own fields (not its targets).
	PutRollout(r *deploy.Rollout) error
	// PutTarget updates one target of a rollout.
	PutTarget(rollout int64, t deploy.Target) error
	// ActiveRollout returns the rollout (not final) in which the node has an
	// unfinished target, or 0.
	ActiveRollout(mac string) (int64, error)

	// PutToken stores an admin token.
	PutToken(t Token) error
	// Tokens lists admin tokens.
	Tokens() ([]Token, error)
	// TokenByHash finds an admin token by its hash.
	TokenByHash(hash string) (*Token, error)
	// TouchToken records a token's use.
	TouchToken(id string, at time.Time) error
	// DeleteToken removes an admin token.
	DeleteToken(id string) error

	// Meta reads a server setting ("" when unset).
	Meta(key string) (string, error)
	// SetMeta writes a server setting.
	SetMeta(key, value string) error
}
