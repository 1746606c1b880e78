package enroll

import (
	"context"
	"slices"
	"testing"
)

// TestDirectNFSServer covers the kernel NFS server without systemd beyond a
// first start (TestStartReloadsChangedEngines): Leave stops it as Debian's
// unit does and stops rpc.mountd; a server whose rpc.mountd died does not
// count as running, and Start brings back rpc.mountd without mounting the
// nfsd filesystem again; a second Leave finds nothing to stop.
func TestDirectNFSServer(t *testing.T) {
	ctx := context.Background()
	e := &engines{running: map[string]bool{}, coming: map[string]int{}}
	n := &Node{Root: t.TempDir(), Run: e, Init: Direct}
	b := reloadBundle("nfs-server")
	if err := n.Start(ctx, b); err != nil {
		t.Fatal(err)
	}
	e.take()
	if !n.isRunning(ctx, "nfs-server") {
		t.Fatal("the NFS server does not count as running after Start")
	}

	if err := n.Leave(ctx, b); err != nil {
		t.Fatal(err)
	}
	want := []string{"rpc.nfsd 0", "exportfs -au", "exportfs -f", "kill -TERM 44"}
	if got := e.take(); !slices.Equal(got, want) {
		t.Fatalf("Leave ran %q, want %q", got, want)
	}
	if e.running["nfs-server"] || e.running["rpc.mountd"] {
		t.Fatalf("after Leave: nfsd threads %v, rpc.mountd %v", e.running["nfs-server"], e.running["rpc.mountd"])
	}
	if err := n.Start(ctx, b); err != nil {
		t.Fatal(err)
	}
	// The nfsd filesystem stays mounted; the exports are withdrawn and must
	// be put back. The files did not change: nothing reloads.
	want = []string{"exportfs -ra", "rpc.mountd -N 2 -N 3 --no-udp", "rpc.nfsd -N 3 -V 4 --no-udp"}
	if got := e.take(); !slices.Equal(got, want) {
		t.Fatalf("Start after Leave ran %q, want %q", got, want)
	}

	// rpc.mountd died: the server is down (no client passes the export
	// check) and Start starts rpc.mountd again; rpc.nfsd only sets the
	// thread count of the running kernel server.
	e.running["rpc.mountd"] = false
	if n.isRunning(ctx, "nfs-server") {
		t.Fatal("the NFS server counts as running without rpc.mountd")
	}
	if err := n.Start(ctx, b); err != nil {
		t.Fatal(err)
	}
	if got := e.take(); !slices.Equal(got, want) {
		t.Fatalf("Start without rpc.mountd ran %q, want %q", got, want)
	}

	if err := n.Leave(ctx, b); err != nil {
		t.Fatal(err)
	}
	e.take()
	e.running["nfsd"] = false // the nfsd filesystem unmounted, as after a reboot
	if err := n.Leave(ctx, b); err != nil {
		t.Fatal(err)
	}
	if got := e.take(); len(got) != 0 {
		t.Fatalf("Leave of a stopped server ran %q, want nothing", got)
	}
}
