package enroll

import (
	"encoding/xml"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/esir-project/esir/ssi"
)

// fenceMark starts the description of every fencing device ESIR manages:
// Reconcile changes and deletes only those, never an administrator's.
const fenceMark = "ESIR: "

// fenceMonitor is how often pacemaker checks that a fencing device answers
// (fence_ipmilan asks the BMC for the power status).
const fenceMonitor = "60s"

// cibFence is the fencing part of the CIB.
type cibFence struct {
	devices     map[string]cibDevice   // ESIR's stonith primitives by id
	constraints map[string]cibLocation // rsc_location constraints by id
	watchdog    string                 // stonith-watchdog-timeout as set, "" when unset
}

type cibDevice struct {
	agent  string
	params map[string]string
}

type cibLocation struct {
	rsc, node, score string
}

// parseCIBFence reads ESIR's fencing devices, the location constraints
// and stonith-watchdog-timeout from `cibadmin --query`.
func parseCIBFence(out []byte) (cibFence, error) {
	type nvpair struct {
		Name  string `xml:"name,attr"`
		Value string `xml:"value,attr"`
	}
	var doc struct {
		Options    []nvpair `xml:"configuration>crm_config>cluster_property_set>nvpair"`
		Primitives []struct {
			ID          string   `xml:"id,attr"`
			Class       string   `xml:"class,attr"`
			Type        string   `xml:"type,attr"`
			Description string   `xml:"description,attr"`
			Attrs       []nvpair `xml:"instance_attributes>nvpair"`
		} `xml:"configuration>resources>primitive"`
		Locations []struct {
			ID    string `xml:"id,attr"`
			Rsc   string `xml:"rsc,attr"`
			Node  string `xml:"node,attr"`
			Score string `xml:"score,attr"`
		} `xml:"configuration>constraints>rsc_location"`
	}
	if err := xml.Unmarshal(out, &doc); err != nil {
		return cibFence{}, fmt.Errorf("CIB XML: %w", err)
	}
	f := cibFence{devices: map[string]cibDevice{}, constraints: map[string]cibLocation{}}
	for _, o := range doc.Options {
		if o.Name == "stonith-watchdog-timeout" {
			f.watchdog = o.Value
		}
	}
	for _, p := range doc.Primitives {
		if p.Class != "stonith" || !strings.HasPrefix(p.Description, fenceMark) {
			continue
		}
		d := cibDevice{agent: p.Type, params: map[string]string{}}
		for _, a := range p.Attrs {
			d.params[a.Name] = a.Value
		}
		f.devices[p.ID] = d
	}
	for _, l := range doc.Locations {
		f.constraints[l.ID] = cibLocation{rsc: l.Rsc, node: l.Node, score: l.Score}
	}
	return f, nil
}

// avoidID is the id of the location constraint that keeps device d off
// the node it fences.
func avoidID(d ssi.FenceDevice) string { return d.ID + "-avoids-" + d.Node }

// planFencing lists the changes that bring the CIB's fencing devices in
// line with b: with fencing on, one stonith primitive per device of
// b.FenceDevices (created, or deleted and created again when its agent or
// parameters differ), a location constraint keeping each BMC device off the
// node it fences, and stonith-watchdog-timeout for watchdog-only sbd; the
// devices ESIR made for nodes that left (or all of them, with fencing off)
// are deleted with their constraints. Passwords are not in the CIB: the
// devices read them from files (ssi.FenceDevice's password_script).
func planFencing(b *ssi.Bundle, f cibFence) []action {
	var acts []action
	want := map[string]bool{}
	var devices []ssi.FenceDevice
	if b.Fencing {
		devices = b.FenceDevices
	}
	for _, d := range devices {
		want[d.ID] = true
		if !validID(d.ID) {
			acts = append(acts, action{what: "skip fencing device " + d.ID,
				warn: fmt.Sprintf("cluster %s: fencing device %s cannot be a pacemaker resource id", b.Cluster, d.ID)})
			continue
		}
		have, ok := f.devices[d.ID]
		switch {
		case !ok:
			acts = append(acts, action{what: fmt.Sprintf("add fencing device %s (%s) for %s", d.ID, d.Agent, fencedName(d)),
				args: []string{"cibadmin", "--create", "--scope", "resources", "--xml-text", deviceXML(d)}})
		case have.agent != d.Agent || !maps.Equal(have.params, d.Params):
			// The CIB's schema refuses a constraint naming a resource
			// that does not exist: the device's constraints go first and
			// come back after it.
			acts = append(acts, deleteDevice(d.ID, f, "replace fencing device "+d.ID+" (its agent or parameters changed)")...)
			acts = append(acts, action{what: fmt.Sprintf("replace fencing device %s: create", d.ID),
				args: []string{"cibadmin", "--create", "--scope", "resources", "--xml-text", deviceXML(d)}})
			if d.Node != "" {
				want[avoidID(d)] = true
				acts = append(acts, action{what: fmt.Sprintf("keep fencing device %s off %s", d.ID, d.Node),
					args: []string{"cibadmin", "--create", "--scope", "constraints", "--xml-text", avoidXML(d)}})
			}
			continue
		}
		if d.Node == "" {
			continue
		}
		want[avoidID(d)] = true
		l, ok := f.constraints[avoidID(d)]
		switch {
		case !ok:
			acts = append(acts, action{what: fmt.Sprintf("keep fencing device %s off %s", d.ID, d.Node),
				args: []string{"cibadmin", "--create", "--scope", "constraints", "--xml-text", avoidXML(d)}})
		case l != (cibLocation{rsc: d.ID, node: d.Node, score: "-INFINITY"}):
			acts = append(acts,
				action{what: fmt.Sprintf("constraint %s changed: delete", avoidID(d)),
					args: []string{"cibadmin", "--delete", "--scope", "constraints", "--xml-text", fmt.Sprintf(`<rsc_location id="%s"/>`, avoidID(d))}},
				action{what: fmt.Sprintf("keep fencing device %s off %s", d.ID, d.Node),
					args: []string{"cibadmin", "--create", "--scope", "constraints", "--xml-text", avoidXML(d)}})
		}
	}
	for _, id := range slices.Sorted(maps.Keys(f.devices)) {
		if !want[id] {
			acts = append(acts, deleteDevice(id, f, "remove fencing device "+id+" (its node left, or fencing is off)")...)
		}
	}
	wd := ""
	if b.Fencing {
		wd = b.StonithWatchdogTimeout
	}
	switch {
	case wd != "" && f.watchdog != wd:
		acts = append(acts, action{what: "watchdog-only sbd: stonith-watchdog-timeout " + wd,
			args: []string{"crm_attribute", "--type", "crm_config", "--name", "stonith-watchdog-timeout", "--update", wd}})
	case wd == "" && f.watchdog != "" && f.watchdog != "0":
		acts = append(acts, action{what: "no watchdog-only sbd: remove stonith-watchdog-timeout",
			args: []string{"crm_attribute", "--type", "crm_config", "--name", "stonith-watchdog-timeout", "--delete"}})
	}
	return acts
}

// deleteDevice deletes device id from the CIB: the location constraints
// naming it first (the CIB's schema refuses a constraint naming a resource
// that does not exist), then its primitive.
func deleteDevice(id string, f cibFence, what string) []action {
	var acts []action
	for _, cid := range slices.Sorted(maps.Keys(f.constraints)) {
		if f.constraints[cid].rsc == id {
			acts = append(acts, action{what: fmt.Sprintf("%s: delete constraint %s", what, cid),
				args: []string{"cibadmin", "--delete", "--scope", "constraints", "--xml-text", fmt.Sprintf(`<rsc_location id="%s"/>`, cid)}})
		}
	}
	return append(acts, action{what: what + ": delete",
		args: []string{"cibadmin", "--delete", "--scope", "resources", "--xml-text", fmt.Sprintf(`<primitive id="%s"/>`, id)}})
}

// fencedName says which nodes a device fences.
func fencedName(d ssi.FenceDevice) string {
	if d.Node == "" {
		return "every node on its disk"
	}
	return d.Node
}

// deviceXML is fencing device d as a stonith primitive.
func deviceXML(d ssi.FenceDevice) string {
	p := cibPrimitive{ID: d.ID, Class: "stonith", Type: d.Agent, Description: fenceMark + "fences " + fencedName(d)}
	p.Attrs.ID = d.ID + "-instance_attributes"
	for _, k := range slices.Sorted(maps.Keys(d.Params)) {
		p.set(k, d.Params[k])
	}
	p.monitor(fenceMonitor, "")
	return p.xml()
}

// avoidXML is the location constraint that keeps device d off the node it
// fences: a node never fences itself.
func avoidXML(d ssi.FenceDevice) string {
	type location struct {
		XMLName xml.Name `xml:"rsc_location"`
		ID      string   `xml:"id,attr"`
		Rsc     string   `xml:"rsc,attr"`
		Node    string   `xml:"node,attr"`
		Score   string   `xml:"score,attr"`
	}
	data, err := xml.Marshal(location{ID: avoidID(d), Rsc: d.ID, Node: d.Node, Score: "-INFINITY"})
	if err != nil {
		panic(err)
	}
	return string(data)
}

// removeStaleFencePasswords removes the BMC password files (under the
// node's root) that b no longer gives the node: those of nodes that left,
// or all of them once fencing is off or the node is no longer core.
func (n *Node) removeStaleFencePasswords(b *ssi.Bundle) error {
	files, err := filepath.Glob(filepath.Join(n.Root, ssi.FencePasswordPattern))
	if err != nil {
		return fmt.Errorf("BMC password files: %w", err)
	}
	var errs []error
	for _, f := range files {
		rel := "/" + strings.TrimPrefix(strings.TrimPrefix(f, n.Root), "/")
		if slices.ContainsFunc(b.Files, func(bf ssi.File) bool { return bf.Path == rel }) {
			continue
		}
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove stale BMC password %s: %w", rel, err))
		}
	}
	return errors.Join(errs...)
}
