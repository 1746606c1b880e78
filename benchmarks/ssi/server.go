package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"time"

	agentenroll "github.com/esir-project/esir/agent/enroll"
	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/server/apitest"
	srvcluster "github.com/esir-project/esir/server/cluster"
	"github.com/esir-project/esir/ssi"
	"github.com/esir-project/esir/ssi/enroll"
)

// serverRun is the whole path: three core nodes (corosync) whose node
// services enroll through the server's API; it times installed -> enrolled
// at the server, then kills one node and times until the server's
// membership view (the survivors' reports) drops it, beside corosync's
// token + consensus bound.
func serverRun(ctx context.Context, def, dir string) (enrolled, detect, bound time.Duration, err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, 0, 0, err
	}
	srv, err := apitest.New(dir, def, nil)
	if err != nil {
		return 0, 0, 0, err
	}
	defer srv.Close()
	c, _, err := ssi.Parse([]byte(def))
	if err != nil {
		return 0, 0, 0, err
	}
	lab, nodes, _, err := cluster(ctx, c, dir, 0)
	if err != nil {
		return 0, 0, 0, err
	}
	defer closeAll(lab, nodes)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	log := slog.New(slog.DiscardHandler)
	if os.Getenv("ESIR_BENCH_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	cfgs := make([]agentenroll.Config, len(nodes))
	for i, n := range nodes {
		mac, tok, err := srv.Installed(i+1, n.Host.Name)
		if err != nil {
			return 0, 0, 0, err
		}
		cfgs[i] = agentenroll.Config{Server: srv.URL, Token: tok, MAC: mac, Hostname: n.Host.Name, Addr: n.Host.IP().String()}
	}
	var stops []context.CancelFunc
	defer func() {
		for _, stop := range stops {
			stop()
		}
	}()
	start := time.Now()
	for i, n := range nodes {
		if _, err := agentenroll.Run(ctx, cfgs[i], log); err != nil {
			return 0, 0, 0, err
		}
		f := &agentenroll.Follower{
			Client: &agentapi.Client{Server: srv.URL, Token: cfgs[i].Token},
			MAC:    cfgs[i].MAC,
			Node:   &enroll.Node{Root: n.Root, Run: n, Init: enroll.Direct, Timeout: time.Minute},
			Log:    log,
		}
		nctx, stop := context.WithCancel(ctx)
		stops = append(stops, stop)
		go f.Follow(nctx)
	}
	snap, err := waitSnapshot(ctx, srv, time.Minute, func(s srvcluster.Snapshot) bool {
		enr := 0
		for _, m := range s.Members {
			if m.State == srvcluster.Enrolled {
				enr++
			}
		}
		return enr == 3
	})
	if err != nil {
		return 0, 0, 0, fmt.Errorf("enroll through the server: %w (members %+v)", err, snap.Members)
	}
	enrolled = time.Since(start)
	if bound, err = corosyncBound(ctx, nodes[0]); err != nil {
		return 0, 0, 0, err
	}
	stops[2]() // the node's service dies with it
	nodes[2].Kill()
	start = time.Now()
	snap, err = waitSnapshot(ctx, srv, time.Minute, func(s srvcluster.Snapshot) bool {
		return s.Quorate && slices.Equal(s.Joined, []int{1, 2})
	})
	if err != nil {
		return 0, 0, 0, fmt.Errorf("killed node at the server: %w (view of %s: joined %v)", err, snap.ViewFrom, snap.Joined)
	}
	return enrolled, time.Since(start), bound, nil
}

// waitSnapshot polls the server's cluster view every 20 ms until ok.
func waitSnapshot(ctx context.Context, srv *apitest.Server, d time.Duration, ok func(srvcluster.Snapshot) bool) (srvcluster.Snapshot, error) {
	deadline := time.Now().Add(d)
	for {
		s, err := srv.Cluster(ctx)
		if err == nil && ok(s) {
			return s, nil
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("not after %v", d)
			}
			return s, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}
