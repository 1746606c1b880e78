package web

import (
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/esir-project/esir/server/cluster"
	"github.com/labstack/echo/v4"
)

// memberRow is one member on the cluster page (short keys: sent live).
type memberRow struct {
	Name   string `json:"n"`
	ID     int    `json:"id"`
	Role   string `json:"role"`
	Addr   string `json:"addr"`
	State  string `json:"s"`
	Ver    string `json:"ver"`
	Check  string `json:"chk"`
	Rep    string `json:"rep"`
	Time   string `json:"time"`
	VIPs   string `json:"vip"`
	Online string `json:"onl"`
	Home   string `json:"home"`
}

// clusterSum is the cluster page's summary line.
type clusterSum struct {
	Name    string              `json:"name"`
	Version int                 `json:"v"`
	Quorum  string              `json:"q"`
	QOK     bool                `json:"qok"`
	Members int                 `json:"m"`
	Counts  string              `json:"c"`
	Holders string              `json:"h"`
	Split   bool                `json:"split"`
	IPVS    []cluster.IPVSEntry `json:"ipvs"`
	// Warnings are the definition's and the allocation's (live: an even
	// core size shows as members join).
	Warnings []string `json:"w"`
}

type clusterPage struct {
	None    bool
	Sum     clusterSum
	Members []memberRow
	Profile string
}

func (c *Console) clusterNow() (clusterPage, bool) {
	cl := c.api.Cluster()
	if cl == nil {
		return clusterPage{None: true}, false
	}
	snap := cl.Snapshot()
	now := c.opts.Now()
	p := clusterPage{}
	var parts []string
	pr := snap.Profile
	for _, x := range []struct {
		on   bool
		name string
	}{{pr.Corosync, "corosync"}, {pr.Pacemaker, "pacemaker"}, {pr.Fencing, "fencing"}, {pr.Keepalived, "keepalived+IPVS"},
		{pr.Chrony, "chrony"}, {pr.NFSHome, "NFS home"}, {pr.ClusterShell, "clustershell"}} {
		if x.on {
			parts = append(parts, x.name)
		}
	}
	p.Profile = strings.Join(parts, ", ")
	s := clusterSum{Name: snap.Name, Version: snap.Version, Members: len(snap.Members), Warnings: snap.Warnings}
	switch {
	case snap.ViewFrom == "":
		s.Quorum = "unknown: no core member reports"
	case snap.Quorate:
		s.Quorum, s.QOK = fmt.Sprintf("quorate (%d joined, view of %s)", len(snap.Joined), snap.ViewFrom), true
	default:
		s.Quorum = fmt.Sprintf("NOT quorate (%d joined, view of %s)", len(snap.Joined), snap.ViewFrom)
	}
	// The IPVS tables shown are those of the members the snapshot counts
	// as holding a VIP: not a leaving or unreachable member's last view.
	holders := snap.Holders()
	counts := map[cluster.State]int{}
	for _, m := range snap.Members {
		counts[m.State]++
		r := memberRow{Name: m.Name, ID: m.ID, Role: string(m.Role), Addr: m.Addr.String(), State: string(m.State),
			Ver: fmt.Sprintf("%d / %d", m.Version, snap.Version), Rep: "never"}
		if m.Check != "" {
			r.Check = m.Check + ": " + m.Error
		} else if m.State == cluster.Leaving {
			r.Check = m.Error
		}
		if !m.Reported.IsZero() {
			r.Rep = ago(now, m.Reported)
		}
		if v, ok := cluster.MemberView(m); ok {
			r.Time = v.TimeText()
			r.Online = fmt.Sprint(len(v.Online))
			r.Home = v.HomeText(pr.NFSHome, m.Name == snap.NFSServer)
			// A leaving or unreachable member's last view may still
			// list a VIP: the VIPs and tables shown are the holders'.
			if holders[m.Name] {
				r.VIPs = strings.Join(v.VIPs, " ")
				s.IPVS = append(s.IPVS, v.IPVS...)
			}
		}
		p.Members = append(p.Members, r)
	}
	var cs []string
	for _, st := range []cluster.State{cluster.Enrolled, cluster.Joining, cluster.Failed, cluster.Leaving, cluster.Unreachable} {
		if counts[st] > 0 {
			cs = append(cs, fmt.Sprintf("%d %s", counts[st], st))
		}
	}
	s.Counts = strings.Join(cs, ", ")
	var hs []string
	for vip, h := range snap.VIPHolders {
		hs = append(hs, vip+" on "+strings.Join(h, ", "))
		s.Split = s.Split || len(h) > 1
	}
	slices.Sort(hs)
	s.Holders = strings.Join(hs, "; ")
	if s.Holders == "" {
		s.Holders = "no director reports holding a VIP"
	}
	p.Sum = s
	return p, true
}

// clusterEntries are the cluster topic's live entries: one per member and
// the summary.
func (c *Console) clusterEntries() map[string]any {
	p, ok := c.clusterNow()
	m := map[string]any{}
	if !ok {
		return m
	}
	for _, r := range p.Members {
		m["m-"+r.Name] = r
	}
	m["csum"] = p.Sum
	return m
}

func (c *Console) clusterPage(ec echo.Context) error {
	p, _ := c.clusterNow()
	return c.render(ec, http.StatusOK, "cluster", page{Title: "Cluster", Nav: "cluster", Topic: "cluster", Data: p})
}
