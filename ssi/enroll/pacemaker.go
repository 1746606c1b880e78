package enroll

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/esir-project/esir/ssi"
)

// crmStatus is what ESIR reads from `crm_mon --output-as=xml`.
type crmStatus struct {
	Nodes          []crmNode
	StonithEnabled bool // cluster option stonith-enabled (pacemaker's default: true)
	StonithDevices int  // configured fencing resources (stonith:* agents)
	Failures       []crmFailure
}

type crmNode struct {
	Name   string `xml:"name,attr"`
	ID     string `xml:"id,attr"` // corosync node id for core members, the name for remote ones
	Online bool   `xml:"online,attr"`
	Type   string `xml:"type,attr"` // "member" or "remote"
}

type crmFailure struct {
	OpKey  string `xml:"op_key,attr"` // RESOURCE_OPERATION_INTERVAL
	Node   string `xml:"node,attr"`
	Reason string `xml:"exitreason,attr"`
	Change string `xml:"last-rc-change,attr"` // "2026-12-03 12:48:32Z"
}

// online returns the names of the online nodes, sorted.
func (s crmStatus) online() []string {
	var names []string
	for _, nd := range s.Nodes {
		if nd.Online {
			names = append(names, nd.Name)
		}
	}
	slices.Sort(names)
	return names
}

// Online returns the nodes pacemaker shows online (core and remote), from
// crm_mon's XML.
func (n *Node) Online(ctx context.Context) ([]string, error) {
	s, err := n.crmMon(ctx)
	if err != nil {
		return nil, err
	}
	return s.online(), nil
}

// crmMon runs crm_mon once. On a remote node it answers through
// pacemaker-remoted once a core node holds the remote's connection.
func (n *Node) crmMon(ctx context.Context) (crmStatus, error) {
	out, err := n.Run.Run(ctx, "crm_mon", "-1", "--inactive", "--output-as=xml")
	if err != nil {
		return crmStatus{}, failed(CheckPacemaker, "crm_mon: %w: %s", err, bytes.TrimSpace(out))
	}
	return parseCrmMon(out)
}

// parseCrmMon reads crm_mon's XML.
func parseCrmMon(out []byte) (crmStatus, error) {
	type resource struct {
		ID    string `xml:"id,attr"`
		Agent string `xml:"resource_agent,attr"`
	}
	var doc struct {
		Options struct {
			Stonith string `xml:"stonith-enabled,attr"`
		} `xml:"summary>cluster_options"`
		Nodes     []crmNode    `xml:"nodes>node"`
		Resources []resource   `xml:"resources>resource"`
		Grouped   []resource   `xml:"resources>group>resource"`
		Cloned    []resource   `xml:"resources>clone>resource"`
		Failures  []crmFailure `xml:"failures>failure"`
		Errors    []string     `xml:"status>errors>error"`
	}
	if err := xml.Unmarshal(out, &doc); err != nil {
		return crmStatus{}, failed(CheckPacemaker, "crm_mon XML: %w", err)
	}
	if len(doc.Nodes) == 0 && len(doc.Errors) > 0 {
		// A remote node whose connection no core node holds yet: "Could
		// not connect to the CIB: Transport endpoint is not connected".
		return crmStatus{}, failed(CheckPacemaker, "crm_mon: %s", strings.Join(doc.Errors, "; "))
	}
	s := crmStatus{Nodes: doc.Nodes, StonithEnabled: doc.Options.Stonith != "false", Failures: doc.Failures}
	devices := map[string]bool{} // a cloned device shows once per instance ("id:0", "id:1", ...)
	for _, r := range slices.Concat(doc.Resources, doc.Grouped, doc.Cloned) {
		if id, _, _ := strings.Cut(r.ID, ":"); strings.HasPrefix(r.Agent, "stonith:") && !devices[id] {
			devices[id] = true
			s.StonithDevices++
		}
	}
	return s, nil
}

// WaitOnline polls pacemaker (crm_mon) until it shows node name online, or
// the timeout; the error is a *CheckError (pacemaker).
func (n *Node) WaitOnline(ctx context.Context, name string) error {
	_, err := n.waitOnline(ctx, name)
	return err
}

func (n *Node) waitOnline(ctx context.Context, name string) (crmStatus, error) {
	var s crmStatus
	err := n.wait(ctx, 500*time.Millisecond, func() error {
		var err error
		if s, err = n.crmMon(ctx); err != nil {
			return err
		}
		if online := s.online(); !slices.Contains(online, name) {
			return failed(CheckPacemaker, "%s is not online (online: %v)", name, online)
		}
		return nil
	})
	return s, named(err, name)
}

// Remote connection resources: how often the connection is monitored and
// how long a core node waits before reconnecting to a remote node it lost.
const (
	remoteMonitor   = "10s"
	remoteReconnect = "15s"
	// remoteRetry is how old a failed connection to a current remote member
	// must be before Reconcile clears it and pacemaker connects again.
	remoteRetry = 10 * time.Second
)

// Reconcile makes pacemaker's configuration match b, on a core node of a
// cluster running pacemaker (elsewhere it does nothing):
//
//   - every remote member of b.Remotes gets an ocf:pacemaker:remote
//     connection resource named after it (server = its address,
//     reconnect_interval, a monitor operation); a changed address is updated;
//   - the connection resources of nodes that are no longer members are
//     deleted, and departed nodes (core or remote) are purged from
//     pacemaker's node list (crm_node -R NAME --force) once they are offline
//     and, for a core node, out of corosync's nodelist;
//   - a failed connection to a remote member that is not online is cleaned
//     up (crm_resource --cleanup) so pacemaker connects again;
//   - with b.Fencing off, stonith-enabled=false (logged as a warning naming
//     the cluster); with it on, an earlier false is removed (pacemaker's
//     default, true);
//   - with b.Fencing on, the fencing devices of b.FenceDevices are in the
//     CIB, each BMC device kept off the node it fences, and the devices ESIR
//     made for nodes that left are deleted (planFencing); devices an
//     administrator added are left alone.
//
// Only one core node acts at a time: the lowest-id core member that corosync
// lists as joined in a quorate partition and pacemaker shows online; on the
// others, and in a partition without quorum, Reconcile does nothing. It is
// idempotent and cheap when nothing changed (corosync-cmapctl,
// corosync-quorumtool, crm_mon, cibadmin --query): call it every few seconds
// with the node's current bundle. A bundle older than the server's state may
// undo a change for one round; the next bundle brings it back.
func (n *Node) Reconcile(ctx context.Context, b *ssi.Bundle) error {
	if b.Member.Role != ssi.Core || !slices.Contains(b.Services, "pacemaker") {
		return nil
	}
	name := b.Member.Name
	log := n.logger().With("node", name, "cluster", b.Cluster, "version", b.Version)
	cs, err := n.Status(ctx)
	if err != nil {
		return fmt.Errorf("reconcile pacemaker on %s: %w", name, err)
	}
	if !cs.Quorate {
		log.Debug("reconcile: partition not quorate, leaving pacemaker alone")
		return nil
	}
	ps, err := n.crmMon(ctx)
	if err != nil {
		return fmt.Errorf("reconcile pacemaker on %s: %w", name, err)
	}
	if leader := reconciler(cs, ps); leader != b.Member.ID {
		log.Debug("reconcile: another core member acts", "reconciler", leader)
		return nil
	}
	out, err := n.Run.Run(ctx, "cibadmin", "--query")
	if err != nil {
		return fmt.Errorf("reconcile pacemaker on %s: cibadmin --query: %w: %s", name, err, bytes.TrimSpace(out))
	}
	cib, err := parseCIB(out)
	if err != nil {
		return fmt.Errorf("reconcile pacemaker on %s: %w", name, err)
	}
	var errs []error
	act := func(what string, args ...string) {
		log.Info("reconcile: "+what, "command", args[0]+" "+strings.Join(args[1:], " "))
		if out, err := n.Run.Run(ctx, args[0], args[1:]...); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w: %s", what, err, bytes.TrimSpace(out)))
		}
	}
	for _, a := range plan(b, cs, ps, cib, time.Now()) {
		if a.warn != "" {
			log.Warn(a.warn)
		}
		if len(a.args) > 0 { // an action without a command only warns
			act(a.what, a.args...)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("reconcile pacemaker on %s: %w", name, errors.Join(errs...))
	}
	return nil
}

// reconciler returns the id of the core member that reconciles pacemaker:
// the lowest id corosync lists as joined whose node pacemaker shows online;
// 0 when there is none.
func reconciler(cs Membership, ps crmStatus) int {
	for _, id := range cs.Joined { // sorted
		for _, nd := range ps.Nodes {
			if nd.Type != "remote" && nd.ID == strconv.Itoa(id) && nd.Online {
				return id
			}
		}
	}
	return 0
}

// action is one change Reconcile makes.
type action struct {
	what string
	warn string // logged as a warning first, when set
	args []string
}

// plan lists the changes that bring pacemaker's configuration in line with
// b, given corosync's view cs, crm_mon's ps and the CIB.
func plan(b *ssi.Bundle, cs Membership, ps crmStatus, cib cibState, now time.Time) []action {
	var acts []action
	switch {
	case !b.Fencing && cib.stonith != "false":
		acts = append(acts, action{
			what: "disable STONITH",
			warn: fmt.Sprintf("cluster %s: fencing is off in the cluster definition: setting stonith-enabled=false; pacemaker cannot recover safely from a hung node; test clusters only", b.Cluster),
			args: []string{"crm_attribute", "--type", "crm_config", "--name", "stonith-enabled", "--update", "false"}})
	case b.Fencing && cib.stonith == "false":
		acts = append(acts, action{what: "enable STONITH (fencing is on in the cluster definition)",
			args: []string{"crm_attribute", "--type", "crm_config", "--name", "stonith-enabled", "--delete"}})
	}
	acts = append(acts, planFencing(b, cib.fence)...)
	members := map[string]bool{}
	for _, m := range b.Members {
		members[m.Name] = true
	}
	online := map[string]bool{}
	for _, nd := range ps.Nodes {
		online[nd.Name] = nd.Online
	}
	for _, r := range b.Remotes {
		res, ok := cib.remotes[r.Name]
		switch {
		case !validID(r.Name):
			acts = append(acts, action{what: "skip remote " + r.Name,
				warn: fmt.Sprintf("cluster %s: remote member %s cannot be a pacemaker resource id (it must start with a letter)", b.Cluster, r.Name)})
		case !ok:
			acts = append(acts, action{what: "add remote " + r.Name,
				args: []string{"cibadmin", "--create", "--scope", "resources", "--xml-text", remoteXML(r)}})
		case res.server != r.Addr.String():
			acts = append(acts, action{what: fmt.Sprintf("move remote %s from %s to %s", r.Name, res.server, r.Addr),
				args: []string{"crm_resource", "--resource", r.Name, "--set-parameter", "server", "--parameter-value", r.Addr.String()}})
		case !online[r.Name] && failedSince(ps, r.Name, now) > remoteRetry:
			acts = append(acts, action{what: "retry the connection to remote " + r.Name,
				args: []string{"crm_resource", "--cleanup", "--resource", r.Name}})
		}
	}
	for _, id := range slices.Sorted(maps.Keys(cib.remotes)) {
		if !members[id] {
			acts = append(acts, action{what: "remove the connection of departed remote " + id,
				args: []string{"cibadmin", "--delete", "--scope", "resources", "--xml-text", fmt.Sprintf(`<primitive id="%s"/>`, id)}})
		}
	}
	for _, nd := range cib.knownNodes(ps) {
		if members[nd.Name] || online[nd.Name] {
			continue
		}
		if _, ok := cib.remotes[nd.Name]; ok {
			continue // its connection goes first
		}
		if id, err := strconv.Atoi(nd.ID); err == nil && (slices.Contains(cs.Nodelist, id) || slices.Contains(cs.Joined, id)) {
			continue // corosync still lists it: the others reload first
		}
		acts = append(acts, action{what: "purge departed node " + nd.Name,
			args: []string{"crm_node", "--remove", nd.Name, "--force"}})
	}
	return acts
}

// failedSince returns how long ago the last failure of resource id's
// operations happened; 0 without failure.
func failedSince(ps crmStatus, id string, now time.Time) time.Duration {
	var last time.Duration
	for _, f := range ps.Failures {
		if !strings.HasPrefix(f.OpKey, id+"_") {
			continue
		}
		t, err := time.Parse("2006-01-02 15:04:05Z07:00", f.Change)
		if err != nil {
			return remoteRetry + 1 // unknown: retry
		}
		if d := now.Sub(t); last == 0 || d < last {
			last = max(d, 1)
		}
	}
	return last
}

// validID reports whether name can be an XML id (pacemaker resource ids
// are): ESIR's node names are lower-case letters, digits and '-', so it must
// start with a letter.
func validID(name string) bool {
	return name != "" && name[0] >= 'a' && name[0] <= 'z'
}

// cibPrimitive is a CIB primitive resource as ESIR writes it: instance
// attributes and a monitor operation.
type cibPrimitive struct {
	XMLName     xml.Name `xml:"primitive"`
	ID          string   `xml:"id,attr"`
	Class       string   `xml:"class,attr"`
	Provider    string   `xml:"provider,attr,omitempty"`
	Type        string   `xml:"type,attr"`
	Description string   `xml:"description,attr,omitempty"`
	Attrs       struct {
		ID     string      `xml:"id,attr"`
		Nvpair []cibNvpair `xml:"nvpair"`
	} `xml:"instance_attributes"`
	Ops []cibOp `xml:"operations>op"`
}

type cibNvpair struct {
	ID    string `xml:"id,attr"`
	Name  string `xml:"name,attr"`
	Value string `xml:"value,attr"`
}

type cibOp struct {
	ID       string `xml:"id,attr"`
	Name     string `xml:"name,attr"`
	Interval string `xml:"interval,attr"`
	Timeout  string `xml:"timeout,attr,omitempty"`
}

// set adds the instance attribute name=value, its id derived from the
// attributes' id.
func (p *cibPrimitive) set(name, value string) {
	p.Attrs.Nvpair = append(p.Attrs.Nvpair, cibNvpair{ID: p.Attrs.ID + "-" + name, Name: name, Value: value})
}

// monitor adds the monitor operation every interval (timeout: "" for
// pacemaker's default).
func (p *cibPrimitive) monitor(interval, timeout string) {
	p.Ops = append(p.Ops, cibOp{ID: p.ID + "-monitor-interval-" + interval, Name: "monitor", Interval: interval, Timeout: timeout})
}

func (p *cibPrimitive) xml() string {
	data, err := xml.Marshal(p)
	if err != nil {
		panic(err) // fixed types: cannot fail
	}
	return string(data)
}

// remoteXML is the connection resource of remote member m.
func remoteXML(m ssi.Member) string {
	p := cibPrimitive{ID: m.Name, Class: "ocf", Provider: "pacemaker", Type: "remote"}
	p.Attrs.ID = m.Name + "-instance_attributes"
	p.set("server", m.Addr.String())
	p.set("reconnect_interval", remoteReconnect)
	p.monitor(remoteMonitor, "15s")
	return p.xml()
}

// cibState is what Reconcile reads from the CIB.
type cibState struct {
	stonith string               // stonith-enabled as set, "" when unset
	remotes map[string]cibRemote // ocf:pacemaker:remote primitives by id
	nodes   []crmNode            // nodes section and node_state entries (Online unset)
	fence   cibFence             // ESIR's fencing devices and their constraints
}

type cibRemote struct{ server string }

// knownNodes returns every node pacemaker knows, from the CIB and crm_mon,
// once each.
func (c cibState) knownNodes(ps crmStatus) []crmNode {
	var out []crmNode
	seen := map[string]bool{}
	for _, nd := range slices.Concat(ps.Nodes, c.nodes) {
		if nd.Name == "" || seen[nd.Name] {
			continue
		}
		seen[nd.Name] = true
		out = append(out, nd)
	}
	return out
}

// parseCIB reads `cibadmin --query`.
func parseCIB(out []byte) (cibState, error) {
	type nvpair struct {
		Name  string `xml:"name,attr"`
		Value string `xml:"value,attr"`
	}
	var doc struct {
		Options    []nvpair `xml:"configuration>crm_config>cluster_property_set>nvpair"`
		Primitives []struct {
			ID       string   `xml:"id,attr"`
			Class    string   `xml:"class,attr"`
			Provider string   `xml:"provider,attr"`
			Type     string   `xml:"type,attr"`
			Attrs    []nvpair `xml:"instance_attributes>nvpair"`
		} `xml:"configuration>resources>primitive"`
		Nodes []struct {
			ID    string `xml:"id,attr"`
			Uname string `xml:"uname,attr"`
			Type  string `xml:"type,attr"`
		} `xml:"configuration>nodes>node"`
		States []struct {
			ID     string `xml:"id,attr"`
			Uname  string `xml:"uname,attr"`
			Remote string `xml:"remote_node,attr"`
		} `xml:"status>node_state"`
	}
	if err := xml.Unmarshal(out, &doc); err != nil {
		return cibState{}, fmt.Errorf("CIB XML: %w", err)
	}
	c := cibState{remotes: map[string]cibRemote{}}
	var err error
	if c.fence, err = parseCIBFence(out); err != nil {
		return cibState{}, err
	}
	for _, o := range doc.Options {
		if o.Name == "stonith-enabled" {
			c.stonith = o.Value
		}
	}
	for _, p := range doc.Primitives {
		if p.Class != "ocf" || p.Provider != "pacemaker" || p.Type != "remote" {
			continue
		}
		var r cibRemote
		for _, a := range p.Attrs {
			if a.Name == "server" {
				r.server = a.Value
			}
		}
		c.remotes[p.ID] = r
	}
	for _, nd := range doc.Nodes {
		c.nodes = append(c.nodes, crmNode{Name: nd.Uname, ID: nd.ID, Type: nd.Type})
	}
	for _, st := range doc.States {
		t := "member"
		if st.Remote == "true" {
			t = "remote"
		}
		c.nodes = append(c.nodes, crmNode{Name: st.Uname, ID: st.ID, Type: t})
	}
	return c, nil
}
