package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/deploy"
	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver
)

// migrations are applied in order; each runs once, in its own transaction.
// Never edit one that has shipped: append a new one.
func migrations() []string {
	return []string{
		`CREATE TABLE nodes (
		mac TEXT PRIMARY KEY,
		hostname TEXT NOT NULL,
		number INTEGER NOT NULL UNIQUE,
		labels TEXT NOT NULL DEFAULT '{}',
		state TEXT NOT NULL,
		reason TEXT NOT NULL DEFAULT '',
		inventory TEXT NOT NULL DEFAULT '',
		image TEXT NOT NULL DEFAULT '',
		rollout INTEGER NOT NULL DEFAULT 0,
		assignment TEXT NOT NULL DEFAULT '',
		phase TEXT NOT NULL DEFAULT '',
		log_tail TEXT NOT NULL DEFAULT '[]',
		created INTEGER NOT NULL,
		updated INTEGER NOT NULL,
		changed INTEGER NOT NULL
	);
	CREATE INDEX nodes_state ON nodes(state);
	CREATE TABLE events (
		id INTEGER PRIMARY KEY AUTOINCREMENT,
		mac TEXT NOT NULL,
		time INTEGER NOT NULL,
		from_state TEXT NOT NULL,
		to_state TEXT NOT NULL,
		reason TEXT NOT NULL
	);
	CREATE INDEX events_mac ON events(mac, id);
	CREATE TABLE rollouts (
		id INTEGER PRIMARY KEY AUTOINCREMENT,
		spec TEXT NOT NULL,
		state TEXT NOT NULL,
		reason TEXT NOT NULL DEFAULT '',
		batch INTEGER NOT NULL,
		batches INTEGER NOT NULL,
		failures_accepted INTEGER NOT NULL DEFAULT 0,
		created INTEGER NOT NULL,
		updated INTEGER NOT NULL
	);
	CREATE TABLE targets (
		rollout INTEGER NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
		mac TEXT NOT NULL,
		batch INTEGER NOT NULL,
		status TEXT NOT NULL,
		attempts INTEGER NOT NULL DEFAULT 0,
		next_try INTEGER NOT NULL DEFAULT 0,
		started INTEGER NOT NULL DEFAULT 0,
		finished INTEGER NOT NULL DEFAULT 0,
		last_error TEXT NOT NULL DEFAULT '',
		PRIMARY KEY (rollout, mac)
	);
	CREATE INDEX targets_mac ON targets(mac, status);
	CREATE TABLE tokens (
		id TEXT PRIMARY KEY,
		name TEXT NOT NULL,
		hash TEXT NOT NULL UNIQUE,
		created INTEGER NOT NULL,
		last_used INTEGER NOT NULL DEFAULT 0
	);
	CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);`,
		`ALTER TABLE nodes ADD COLUMN hardware TEXT NOT NULL DEFAULT '';`,
		`CREATE INDEX nodes_rollout ON nodes(rollout);
	CREATE INDEX nodes_hostname ON nodes(hostname);`,
	}
}

// SQLite is the embedded SQLite backend. Writes go through one connection
// (SQLite has one writer); reads use a pool and see committed data (WAL).
//
// The committed status of every node (NodeStatus) is also kept in memory,
// written through when an Update commits, so the hot path of agent reports
// never waits for a database connection. SQLite is a single-process
// database, so this process sees every write.
type SQLite struct {
	path string
	w    *sql.DB
	r    *sql.DB
	// wmu serialises Update, so status changes reach the cache in commit
	// order (SQLite has one writer anyway).
	wmu sync.Mutex
	// smu guards statuses, the committed status of every node by MAC.
	smu      sync.RWMutex
	statuses map[string]NodeStatus
}

// OpenSQLite opens (creating it 0600 when missing) the database file at path,
// switches it to WAL mode and applies pending migrations.
func OpenSQLite(ctx context.Context, path string) (*SQLite, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("database %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("database %s: %w", path, err)
	}
	f.Close()
	q := url.Values{}
	for _, p := range []string{"journal_mode(WAL)", "busy_timeout(10000)", "synchronous(NORMAL)", "foreign_keys(ON)"} {
		q.Add("_pragma", p)
	}
	dsn := "file:" + path + "?" + q.Encode()
	w, err := sql.Open("sqlite", dsn+"&_txlock=immediate")
	if err != nil {
		return nil, fmt.Errorf("database %s: %w", path, err)
	}
	w.SetMaxOpenConns(1)
	w.SetConnMaxIdleTime(0)
	r, err := sql.Open("sqlite", dsn+"&_pragma=query_only(1)")
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("database %s: %w", path, err)
	}
	r.SetMaxOpenConns(8)
	s := &SQLite{path: path, w: w, r: r}
	if err := s.migrate(ctx); err != nil {
		s.Close()
		return nil, err
	}
	if err := s.loadStatuses(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// loadStatuses fills the status cache from the database.
func (s *SQLite) loadStatuses(ctx context.Context) error {
	rows, err := s.w.QueryContext(ctx, `SELECT `+statusCols+` FROM nodes`)
	if err != nil {
		return fmt.Errorf("database %s: read node states: %w", s.path, err)
	}
	defer rows.Close()
	m := map[string]NodeStatus{}
	for rows.Next() {
		st, err := scanStatus(rows)
		if err != nil {
			return fmt.Errorf("database %s: read node states: %w", s.path, err)
		}
		m[st.MAC] = *st
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("database %s: read node states: %w", s.path, err)
	}
	s.statuses = m
	return nil
}

func (s *SQLite) migrate(ctx context.Context) error {
	if _, err := s.w.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("database %s: create migrations table: %w", s.path, err)
	}
	var have int
	if err := s.w.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&have); err != nil {
		return fmt.Errorf("database %s: read schema version: %w", s.path, err)
	}
	all := migrations()
	if have > len(all) {
		return fmt.Errorf("database %s: schema version %d is newer than this server (%d)", s.path, have, len(all))
	}
	for v := have + 1; v <= len(all); v++ {
		tx, err := s.w.BeginTx(ctx, nil)
		if err != nil {
			return fmt.Errorf("database %s: migration %d: %w", s.path, v, err)
		}
		if _, err := tx.ExecContext(ctx, all[v-1]); err != nil {
			tx.Rollback()
			return fmt.Errorf("database %s: migration %d: %w", s.path, v, err)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations(version, applied) VALUES (?, ?)`, v, time.Now().Unix()); err != nil {
			tx.Rollback()
			return fmt.Errorf("database %s: migration %d: %w", s.path, v, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("database %s: migration %d: commit: %w", s.path, v, err)
		}
	}
	return nil
}

// SchemaVersion returns the applied schema version.
func (s *SQLite) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.r.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&v)
	return v, err
}

// Close closes the database.
func (s *SQLite) Close() error {
	return errors.Join(s.r.Close(), s.w.Close())
}

// NodeStatus implements Store from the in-memory copy of the committed
// statuses.
func (s *SQLite) NodeStatus(ctx context.Context, mac string) (*NodeStatus, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("node %s: %w", mac, err)
	}
	s.smu.RLock()
	st, ok := s.statuses[mac]
	s.smu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("node %s: %w", mac, ErrNotFound)
	}
	return &st, nil
}

// Update implements Store.
func (s *SQLite) Update(ctx context.Context, fn func(Tx) error) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	t := &sqlTx{written: map[string]*NodeStatus{}}
	if err := s.run(ctx, s.w, false, t, fn); err != nil {
		return err
	}
	if len(t.written) > 0 {
		s.smu.Lock()
		for mac, st := range t.written {
			if st == nil {
				delete(s.statuses, mac)
			} else {
				s.statuses[mac] = *st
			}
		}
		s.smu.Unlock()
	}
	return nil
}

// View implements Store.
func (s *SQLite) View(ctx context.Context, fn func(Tx) error) error {
	return s.run(ctx, s.r, true, &sqlTx{}, fn)
}

func (s *SQLite) run(ctx context.Context, db *sql.DB, ro bool, t *sqlTx, fn func(Tx) error) error {
	tx, err := db.BeginTx(ctx, &sql.TxOptions{ReadOnly: ro})
	if err != nil {
		return fmt.Errorf("database %s: begin: %w", s.path, err)
	}
	t.tx = tx
	if err := fn(t); err != nil {
		tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("database %s: commit: %w", s.path, err)
	}
	return nil
}

type sqlTx struct {
	tx *sql.Tx
	// written holds the status of each node this (read-write) transaction
	// wrote, nil for a deleted node: applied to the cache on commit.
	written map[string]*NodeStatus
}

func ns(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromNS(v int64) time.Time {
	if v == 0 {
		return time.Time{}
	}
	return time.Unix(0, v).UTC()
}

const nodeCols = `mac, hostname, number, labels, state, reason, inventory, image, rollout, assignment, phase, log_tail, created, updated, changed, hardware`

// briefCols is nodeCols without the inventory and log tail.
const briefCols = `mac, hostname, number, labels, state, reason, image, rollout, assignment, phase, created, updated, changed, hardware`

type scanner interface{ Scan(...any) error }

func scanNode(row scanner) (*deploy.Node, error) {
	var n deploy.Node
	var labels, inv, logTail []byte
	var created, updated, changed int64
	var state string
	if err := row.Scan(&n.MAC, &n.Hostname, &n.Number, &labels, &state, &n.Reason, &inv, &n.Image, &n.Rollout, &n.Assignment, &n.Phase, &logTail, &created, &updated, &changed, &n.Hardware); err != nil {
		return nil, err
	}
	n.State = deploy.State(state)
	n.Created, n.Updated, n.Changed = fromNS(created), fromNS(updated), fromNS(changed)
	if err := scanLabels(&n, labels); err != nil {
		return nil, err
	}
	if len(inv) > 0 {
		n.Inventory = &agentapi.Inventory{}
		if err := json.Unmarshal(inv, n.Inventory); err != nil {
			return nil, fmt.Errorf("node %s: inventory: %w", n.MAC, err)
		}
	}
	if string(logTail) != "[]" {
		if err := json.Unmarshal(logTail, &n.LogTail); err != nil {
			return nil, fmt.Errorf("node %s: log tail: %w", n.MAC, err)
		}
	}
	return &n, nil
}

// scanBrief reads a row of briefCols.
func scanBrief(row scanner) (*deploy.Node, error) {
	var n deploy.Node
	var labels []byte
	var created, updated, changed int64
	var state string
	if err := row.Scan(&n.MAC, &n.Hostname, &n.Number, &labels, &state, &n.Reason, &n.Image, &n.Rollout, &n.Assignment, &n.Phase, &created, &updated, &changed, &n.Hardware); err != nil {
		return nil, err
	}
	n.State = deploy.State(state)
	n.Created, n.Updated, n.Changed = fromNS(created), fromNS(updated), fromNS(changed)
	if err := scanLabels(&n, labels); err != nil {
		return nil, err
	}
	return &n, nil
}

// scanLabels decodes the labels column ("{}" for most nodes, no decoding).
func scanLabels(n *deploy.Node, labels []byte) error {
	if string(labels) == "{}" {
		n.Labels = map[string]string{}
		return nil
	}
	if err := json.Unmarshal(labels, &n.Labels); err != nil {
		return fmt.Errorf("node %s: labels: %w", n.MAC, err)
	}
	if n.Labels == nil {
		n.Labels = map[string]string{}
	}
	return nil
}

func (t *sqlTx) Node(mac string) (*deploy.Node, error) {
	n, err := scanNode(t.tx.QueryRow(`SELECT `+nodeCols+` FROM nodes WHERE mac = ?`, mac))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("node %s: %w", mac, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("node %s: read: %w", mac, err)
	}
	return n, nil
}

const statusCols = `mac, state, reason, rollout, assignment, changed`

func scanStatus(row scanner) (*NodeStatus, error) {
	var st NodeStatus
	var state string
	var changed int64
	if err := row.Scan(&st.MAC, &state, &st.Reason, &st.Rollout, &st.Assignment, &changed); err != nil {
		return nil, err
	}
	st.State, st.Changed = deploy.State(state), fromNS(changed)
	return &st, nil
}

func (t *sqlTx) NodeStatus(mac string) (*NodeStatus, error) {
	st, err := scanStatus(t.tx.QueryRow(`SELECT `+statusCols+` FROM nodes WHERE mac = ?`, mac))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("node %s: %w", mac, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("node %s: read: %w", mac, err)
	}
	return st, nil
}

func (t *sqlTx) NodeStatuses(rollout int64) ([]NodeStatus, error) {
	rows, err := t.tx.Query(`SELECT `+statusCols+` FROM nodes WHERE rollout = ?`, rollout)
	if err != nil {
		return nil, fmt.Errorf("rollout %d: node states: %w", rollout, err)
	}
	defer rows.Close()
	var out []NodeStatus
	for rows.Next() {
		st, err := scanStatus(rows)
		if err != nil {
			return nil, fmt.Errorf("rollout %d: node states: %w", rollout, err)
		}
		out = append(out, *st)
	}
	return out, rows.Err()
}

// where renders a filter's conditions (after WHERE) and their arguments.
func (f NodeFilter) where() (string, []any) {
	var b strings.Builder
	b.WriteString("1=1")
	var args []any
	if f.State != "" {
		b.WriteString(` AND state = ?`)
		args = append(args, string(f.State))
	}
	if f.Rollout != 0 {
		b.WriteString(` AND rollout = ?`)
		args = append(args, f.Rollout)
	}
	for k, v := range f.Labels {
		b.WriteString(` AND json_extract(labels, ?) = ?`)
		args = append(args, `$."`+strings.ReplaceAll(k, `"`, ``)+`"`, v)
	}
	if f.Query != "" {
		// instr on lower(): a plain substring, no LIKE wildcards to escape.
		b.WriteString(` AND (instr(lower(hostname), ?) OR instr(mac, ?) OR instr(lower(image), ?)
			OR EXISTS (SELECT 1 FROM json_each(nodes.labels) WHERE instr(lower(json_each.key || '=' || json_each.value), ?)))`)
		q := strings.ToLower(f.Query)
		args = append(args, q, q, q, q)
	}
	w := b.String()
	return w, args
}

// orderBy renders a filter's ORDER BY clause.
func (f NodeFilter) orderBy() (string, error) {
	dir := ""
	if f.Desc {
		dir = " DESC"
	}
	var col string
	switch f.Sort {
	case "", "number":
		return " ORDER BY number" + dir, nil
	case "hostname", "mac", "image", "hardware", "updated", "changed":
		col = f.Sort
	case "state":
		var b strings.Builder
		b.WriteString("CASE state")
		for i, st := range deploy.States {
			fmt.Fprintf(&b, " WHEN '%s' THEN %d", st, i)
		}
		fmt.Fprintf(&b, " ELSE %d END", len(deploy.States))
		col = b.String()
	default:
		return "", fmt.Errorf("list nodes: sort: unknown column %q (want one of %s)", f.Sort, strings.Join(SortKeys(), ", "))
	}
	return " ORDER BY " + col + dir + ", number" + dir, nil
}

func (t *sqlTx) Nodes(f NodeFilter) ([]*deploy.Node, error) {
	cols, scan := nodeCols, scanNode
	if f.Brief {
		cols, scan = briefCols, scanBrief
	}
	w, args := f.where()
	order, err := f.orderBy()
	if err != nil {
		return nil, err
	}
	q := `SELECT ` + cols + ` FROM nodes WHERE ` + w + order
	if f.Limit > 0 || f.Offset > 0 {
		limit := f.Limit
		if limit <= 0 {
			limit = -1
		}
		q += fmt.Sprintf(` LIMIT %d OFFSET %d`, limit, max(f.Offset, 0))
	}
	rows, err := t.tx.Query(q, args...)
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	defer rows.Close()
	var out []*deploy.Node
	if f.Limit > 0 {
		out = make([]*deploy.Node, 0, f.Limit)
	}
	for rows.Next() {
		n, err := scan(rows)
		if err != nil {
			return nil, fmt.Errorf("list nodes: %w", err)
		}
		out = append(out, n)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	return out, nil
}

func (t *sqlTx) CountMatching(f NodeFilter) (int, error) {
	w, args := f.where()
	var n int
	if err := t.tx.QueryRow(`SELECT COUNT(*) FROM nodes WHERE `+w, args...).Scan(&n); err != nil {
		return 0, fmt.Errorf("count nodes: %w", err)
	}
	return n, nil
}

func (t *sqlTx) CountNodes() (map[deploy.State]int, error) {
	rows, err := t.tx.Query(`SELECT state, COUNT(*) FROM nodes GROUP BY state`)
	if err != nil {
		return nil, fmt.Errorf("count nodes: %w", err)
	}
	defer rows.Close()
	out := map[deploy.State]int{}
	for rows.Next() {
		var s string
		var c int
		if err := rows.Scan(&s, &c); err != nil {
			return nil, fmt.Errorf("count nodes: %w", err)
		}
		out[deploy.State(s)] = c
	}
	return out, rows.Err()
}

func (t *sqlTx) PutNode(n *deploy.Node) error {
	labels, err := json.Marshal(n.Labels)
	if err != nil {
		return fmt.Errorf("node %s: labels: %w", n.MAC, err)
	}
	if n.Labels == nil {
		labels = []byte("{}")
	}
	inv := ""
	n.Hardware = deploy.HardwareSummary(n.Inventory)
	if n.Inventory != nil {
		b, err := json.Marshal(n.Inventory)
		if err != nil {
			return fmt.Errorf("node %s: inventory: %w", n.MAC, err)
		}
		inv = string(b)
	}
	logTail, err := json.Marshal(n.LogTail)
	if err != nil {
		return fmt.Errorf("node %s: log tail: %w", n.MAC, err)
	}
	if n.LogTail == nil {
		logTail = []byte("[]")
	}
	_, err = t.tx.Exec(`INSERT INTO nodes (`+nodeCols+`) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)
		ON CONFLICT(mac) DO UPDATE SET hostname=excluded.hostname, number=excluded.number, labels=excluded.labels,
		state=excluded.state, reason=excluded.reason, inventory=excluded.inventory, image=excluded.image,
		rollout=excluded.rollout, assignment=excluded.assignment, phase=excluded.phase, log_tail=excluded.log_tail,
		updated=excluded.updated, changed=excluded.changed, hardware=excluded.hardware`,
		n.MAC, n.Hostname, n.Number, string(labels), string(n.State), n.Reason, inv, n.Image, n.Rollout, n.Assignment,
		n.Phase, string(logTail), ns(n.Created), ns(n.Updated), ns(n.Changed), n.Hardware)
	if err != nil {
		return fmt.Errorf("node %s: write: %w", n.MAC, err)
	}
	if t.written != nil {
		// As read back: Changed at the column's precision, in UTC.
		t.written[n.MAC] = &NodeStatus{MAC: n.MAC, State: n.State, Reason: n.Reason, Rollout: n.Rollout, Assignment: n.Assignment, Changed: fromNS(ns(n.Changed))}
	}
	return nil
}

func (t *sqlTx) DeleteNode(mac string) error {
	res, err := t.tx.Exec(`DELETE FROM nodes WHERE mac = ?`, mac)
	if err != nil {
		return fmt.Errorf("node %s: delete: %w", mac, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("node %s: %w", mac, ErrNotFound)
	}
	if _, err := t.tx.Exec(`DELETE FROM events WHERE mac = ?`, mac); err != nil {
		return fmt.Errorf("node %s: delete events: %w", mac, err)
	}
	if t.written != nil {
		t.written[mac] = nil
	}
	return nil
}

func (t *sqlTx) NextNodeNumber() (int, error) {
	var n int
	if err := t.tx.QueryRow(`SELECT COALESCE(MAX(number), 0) + 1 FROM nodes`).Scan(&n); err != nil {
		return 0, fmt.Errorf("next node number: %w", err)
	}
	return n, nil
}

func (t *sqlTx) AddEvent(ev deploy.Event) error {
	_, err := t.tx.Exec(`INSERT INTO events (mac, time, from_state, to_state, reason) VALUES (?,?,?,?,?)`,
		ev.MAC, ns(ev.Time), string(ev.From), string(ev.To), ev.Reason)
	if err != nil {
		return fmt.Errorf("node %s: log event: %w", ev.MAC, err)
	}
	return nil
}

func (t *sqlTx) Events(mac string, limit int) ([]deploy.Event, error) {
	if limit <= 0 {
		limit = 100
	}
	rows, err := t.tx.Query(`SELECT id, mac, time, from_state, to_state, reason FROM events WHERE mac = ? ORDER BY id DESC LIMIT ?`, mac, limit)
	if err != nil {
		return nil, fmt.Errorf("node %s: events: %w", mac, err)
	}
	defer rows.Close()
	var out []deploy.Event
	for rows.Next() {
		var ev deploy.Event
		var tm int64
		var from, to string
		if err := rows.Scan(&ev.ID, &ev.MAC, &tm, &from, &to, &ev.Reason); err != nil {
			return nil, fmt.Errorf("node %s: events: %w", mac, err)
		}
		ev.Time, ev.From, ev.To = fromNS(tm), deploy.State(from), deploy.State(to)
		out = append(out, ev)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("node %s: events: %w", mac, err)
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out, nil
}

func (t *sqlTx) CreateRollout(r *deploy.Rollout) error {
	spec, err := json.Marshal(r.Spec)
	if err != nil {
		return fmt.Errorf("rollout: spec: %w", err)
	}
	res, err := t.tx.Exec(`INSERT INTO rollouts (spec, state, reason, batch, batches, failures_accepted, created, updated) VALUES (?,?,?,?,?,?,?,?)`,
		string(spec), string(r.State), r.Reason, r.Batch, r.Batches, r.FailuresAccepted, ns(r.Created), ns(r.Updated))
	if err != nil {
		return fmt.Errorf("rollout: create: %w", err)
	}
	if r.ID, err = res.LastInsertId(); err != nil {
		return fmt.Errorf("rollout: create: %w", err)
	}
	for _, tg := range r.Targets {
		if _, err := t.tx.Exec(`INSERT INTO targets (rollout, mac, batch, status, attempts, next_try, started, finished, last_error) VALUES (?,?,?,?,?,?,?,?,?)`,
			r.ID, tg.MAC, tg.Batch, string(tg.Status), tg.Attempts, ns(tg.NextTry), ns(tg.Started), ns(tg.Finished), tg.LastError); err != nil {
			return fmt.Errorf("rollout %d: target %s: %w", r.ID, tg.MAC, err)
		}
	}
	return nil
}

const rolloutCols = `id, spec, state, reason, batch, batches, failures_accepted, created, updated`

func scanRollout(row scanner) (*deploy.Rollout, error) {
	var r deploy.Rollout
	var spec, state string
	var created, updated int64
	if err := row.Scan(&r.ID, &spec, &state, &r.Reason, &r.Batch, &r.Batches, &r.FailuresAccepted, &created, &updated); err != nil {
		return nil, err
	}
	if err := json.Unmarshal([]byte(spec), &r.Spec); err != nil {
		return nil, fmt.Errorf("rollout %d: spec: %w", r.ID, err)
	}
	r.State = deploy.RolloutState(state)
	r.Created, r.Updated = fromNS(created), fromNS(updated)
	return &r, nil
}

func (t *sqlTx) RolloutInfo(id int64) (*deploy.Rollout, error) {
	r, err := scanRollout(t.tx.QueryRow(`SELECT `+rolloutCols+` FROM rollouts WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("rollout %d: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("rollout %d: read: %w", id, err)
	}
	return r, nil
}

func (t *sqlTx) Rollout(id int64) (*deploy.Rollout, error) {
	r, err := t.RolloutInfo(id)
	if err != nil {
		return nil, err
	}
	rows, err := t.tx.Query(`SELECT mac, batch, status, attempts, next_try, started, finished, last_error FROM targets WHERE rollout = ? ORDER BY batch, mac`, id)
	if err != nil {
		return nil, fmt.Errorf("rollout %d: targets: %w", id, err)
	}
	defer rows.Close()
	for rows.Next() {
		var tg deploy.Target
		var status string
		var next, started, finished int64
		if err := rows.Scan(&tg.MAC, &tg.Batch, &status, &tg.Attempts, &next, &started, &finished, &tg.LastError); err != nil {
			return nil, fmt.Errorf("rollout %d: targets: %w", id, err)
		}
		tg.Status = deploy.TargetStatus(status)
		tg.NextTry, tg.Started, tg.Finished = fromNS(next), fromNS(started), fromNS(finished)
		r.Targets = append(r.Targets, tg)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("rollout %d: targets: %w", id, err)
	}
	return r, nil
}

func (t *sqlTx) Rollouts(states ...deploy.RolloutState) ([]*deploy.Rollout, error) {
	q := `SELECT ` + rolloutCols + ` FROM rollouts`
	var args []any
	if len(states) > 0 {
		q += ` WHERE state IN (` + strings.TrimSuffix(strings.Repeat("?,", len(states)), ",") + `)`
		for _, s := range states {
			args = append(args, string(s))
		}
	}
	q += ` ORDER BY id DESC`
	rows, err := t.tx.Query(q, args...)
	if err != nil {
		return nil, fmt.Errorf("list rollouts: %w", err)
	}
	defer rows.Close()
	var out []*deploy.Rollout
	for rows.Next() {
		r, err := scanRollout(rows)
		if err != nil {
			return nil, fmt.Errorf("list rollouts: %w", err)
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

func (t *sqlTx) PutRollout(r *deploy.Rollout) error {
	spec, err := json.Marshal(r.Spec)
	if err != nil {
		return fmt.Errorf("rollout %d: spec: %w", r.ID, err)
	}
	res, err := t.tx.Exec(`UPDATE rollouts SET spec=?, state=?, reason=?, batch=?, batches=?, failures_accepted=?, updated=? WHERE id=?`,
		string(spec), string(r.State), r.Reason, r.Batch, r.Batches, r.FailuresAccepted, ns(r.Updated), r.ID)
	if err != nil {
		return fmt.Errorf("rollout %d: write: %w", r.ID, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("rollout %d: %w", r.ID, ErrNotFound)
	}
	return nil
}

func (t *sqlTx) PutTarget(rollout int64, tg deploy.Target) error {
	res, err := t.tx.Exec(`UPDATE targets SET batch=?, status=?, attempts=?, next_try=?, started=?, finished=?, last_error=? WHERE rollout=? AND mac=?`,
		tg.Batch, string(tg.Status), tg.Attempts, ns(tg.NextTry), ns(tg.Started), ns(tg.Finished), tg.LastError, rollout, tg.MAC)
	if err != nil {
		return fmt.Errorf("rollout %d: target %s: write: %w", rollout, tg.MAC, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("rollout %d: target %s: %w", rollout, tg.MAC, ErrNotFound)
	}
	return nil
}

func (t *sqlTx) ActiveRollout(mac string) (int64, error) {
	var id int64
	err := t.tx.QueryRow(`SELECT t.rollout FROM targets t JOIN rollouts r ON r.id = t.rollout
		WHERE t.mac = ? AND t.status NOT IN ('succeeded','failed','cancelled') AND r.state NOT IN ('completed','cancelled')
		LIMIT 1`, mac).Scan(&id)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("node %s: active rollout: %w", mac, err)
	}
	return id, nil
}

func (t *sqlTx) PutToken(tk Token) error {
	_, err := t.tx.Exec(`INSERT INTO tokens (id, name, hash, created, last_used) VALUES (?,?,?,?,?)`,
		tk.ID, tk.Name, tk.Hash, ns(tk.Created), ns(tk.LastUsed))
	if err != nil {
		return fmt.Errorf("token %s: write: %w", tk.ID, err)
	}
	return nil
}

func (t *sqlTx) Tokens() ([]Token, error) {
	rows, err := t.tx.Query(`SELECT id, name, hash, created, last_used FROM tokens ORDER BY created`)
	if err != nil {
		return nil, fmt.Errorf("list tokens: %w", err)
	}
	defer rows.Close()
	var out []Token
	for rows.Next() {
		var tk Token
		var c, l int64
		if err := rows.Scan(&tk.ID, &tk.Name, &tk.Hash, &c, &l); err != nil {
			return nil, fmt.Errorf("list tokens: %w", err)
		}
		tk.Created, tk.LastUsed = fromNS(c), fromNS(l)
		out = append(out, tk)
	}
	return out, rows.Err()
}

func (t *sqlTx) TokenByHash(hash string) (*Token, error) {
	var tk Token
	var c, l int64
	err := t.tx.QueryRow(`SELECT id, name, hash, created, last_used FROM tokens WHERE hash = ?`, hash).Scan(&tk.ID, &tk.Name, &tk.Hash, &c, &l)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("token: %w", ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("token: read: %w", err)
	}
	tk.Created, tk.LastUsed = fromNS(c), fromNS(l)
	return &tk, nil
}

func (t *sqlTx) TouchToken(id string, at time.Time) error {
	if _, err := t.tx.Exec(`UPDATE tokens SET last_used = ? WHERE id = ?`, ns(at), id); err != nil {
		return fmt.Errorf("token %s: write: %w", id, err)
	}
	return nil
}

func (t *sqlTx) DeleteToken(id string) error {
	res, err := t.tx.Exec(`DELETE FROM tokens WHERE id = ?`, id)
	if err != nil {
		return fmt.Errorf("token %s: delete: %w", id, err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return fmt.Errorf("token %s: %w", id, ErrNotFound)
	}
	return nil
}

func (t *sqlTx) Meta(key string) (string, error) {
	var v string
	err := t.tx.QueryRow(`SELECT value FROM meta WHERE key = ?`, key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("meta %s: %w", key, err)
	}
	return v, nil
}

func (t *sqlTx) SetMeta(key, value string) error {
	if _, err := t.tx.Exec(`INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value`, key, value); err != nil {
		return fmt.Errorf("meta %s: write: %w", key, err)
	}
	return nil
}
