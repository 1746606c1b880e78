package vmtest

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// nfsConf is the NFS server guest's /etc/nfs.conf: the server's grace period
// (90 s by default, in which no client may open a file: clients reclaim
// their state after a server's reboot) cut to the kernel's minimum, so that
// the clients' writes do not wait for it.
const nfsConf = "[nfsd]\ngrace-time=10\nlease-time=10\n"

// The home's user, as in the guests' /etc/passwd, its uid:gid, and the
// uid:gid the export's root_squash maps root to.
const (
	homeUser   = "user"
	homeOwner  = "1000:1000"
	squashedID = "65534:65534"
)

// startHome makes srv the NFS home's server as ssi/enroll does without
// systemd: /home on a file system of its own (a tmpfs standing for the
// node's /home partition) holding a user's home and a world-writable
// directory, then enroll.Node.Start with its bundle, whose only service is
// the NFS server exporting /home with the rendered exports file. The file is
// as ssi.Render gave it, and the kernel serves NFSv4 only.
func startHome(ctx context.Context, t *testing.T, srv *node, export string) {
	t.Helper()
	if !slices.Contains(srv.bundle.Services, "nfs-server") {
		t.Fatalf("%s: no nfs-server in its bundle (services %v)", srv.name, srv.bundle.Services)
	}
	want := ""
	for _, f := range srv.bundle.Files {
		if f.Path == "/etc/exports.d/esir-home.exports" {
			want = string(f.Data)
		}
	}
	if got, err := srv.enr.Run.Run(ctx, "cat", "/etc/exports.d/esir-home.exports"); err != nil {
		t.Fatal(err)
	} else if want == "" || string(got) != want {
		t.Fatalf("%s: exports file in the guest %q, rendered %q", srv.name, got, want)
	}
	home := fmt.Sprintf("mount -t tmpfs -o mode=0755 tmpfs %[1]s && mkdir -m 0755 %[1]s/%[2]s && chown %[3]s %[1]s/%[2]s &&"+
		" mkdir -m 1777 %[1]s/shared && echo from-%[4]s > %[1]s/%[2]s/from-%[4]s && chown %[3]s %[1]s/%[2]s/from-%[4]s",
		export, homeUser, homeOwner, srv.name)
	if _, err := srv.enr.Run.Run(ctx, "sh", "-c", home); err != nil {
		t.Fatal(err)
	}
	if err := srv.enr.Start(ctx, srv.bundle); err != nil {
		t.Fatal(err)
	}
	out, err := srv.enr.Run.Run(ctx, "cat", "/proc/fs/nfsd/versions", "/proc/fs/nfsd/threads")
	if err != nil {
		t.Fatal(err)
	}
	if f := strings.Fields(string(out)); !slices.Contains(f, "-3") || !slices.Contains(f, "+4.2") {
		t.Errorf("%s: nfsd versions and threads %q, want NFSv4 only", srv.name, out)
	}
	if out, err = srv.enr.Run.Run(ctx, "exportfs", "-v"); err != nil {
		t.Fatal(err)
	} else if !strings.Contains(string(out), export) || !strings.Contains(string(out), "root_squash") {
		t.Fatalf("%s: exportfs -v lists %q, want %s with root_squash", srv.name, out, export)
	}
	if err := srv.enr.HomeExported(ctx, export); err != nil {
		t.Fatalf("%s: the home server's check after Start: %v", srv.name, err)
	}
}

// checkHome enrolls the clients (enroll.Node.Enroll: their fstab line is the
// rendered one, mounted by util-linux's mount and mount.nfs4) and checks the
// home is one file system: every client's membership says the home is
// mounted; a file the server wrote is read on every client; a file the user
// wrote on the first client is the user's on the server and is read on the
// others; root on a client is squashed (its file in the shared directory
// belongs to nobody, and it cannot write into the user's home). Last, srv's
// NFS server stops with enroll.Node.Leave and starts again with Start.
func checkHome(ctx context.Context, t *testing.T, logf func(string, ...any), srv *node, export string, clients ...*node) {
	t.Helper()
	run := func(n *node, name string, args ...string) string {
		t.Helper()
		out, err := n.enr.Run.Run(ctx, name, args...)
		if err != nil {
			t.Fatalf("%s: %v", n.name, err)
		}
		return strings.TrimSpace(string(out))
	}
	source := srv.addr.String() + ":" + export
	for _, c := range clients {
		if c.bundle.HomeMount != export || !slices.ContainsFunc(c.bundle.FstabLines, func(l string) bool { return strings.HasPrefix(l, source+" ") }) {
			t.Fatalf("%s: rendered home mount %q, fstab lines %q; want %s from %s", c.name, c.bundle.HomeMount, c.bundle.FstabLines, export, source)
		}
		m, err := c.enr.Enroll(ctx, c.bundle)
		if err != nil {
			t.Fatal(err)
		}
		if !m.HomeMounted {
			t.Fatalf("%s: enrolled with the home not mounted: %+v", c.name, m)
		}
		line := ""
		for l := range strings.Lines(run(c, "cat", "/proc/self/mountinfo")) {
			if f := strings.Fields(l); len(f) > 4 && f[4] == export {
				line = strings.TrimSpace(l)
			}
		}
		if !strings.Contains(line, " - nfs4 "+source+" ") {
			t.Fatalf("%s: %s is mounted as %q, want nfs4 from %s", c.name, export, line, source)
		}
		vers := ""
		for o := range strings.SplitSeq(line[strings.LastIndex(line, " ")+1:], ",") {
			if strings.HasPrefix(o, "vers=") {
				vers = o
			}
		}
		logf("nfs: %s enrolled, %s mounted from %s (%s)", c.name, export, source, vers)
	}
	userHome := export + "/" + homeUser
	for _, c := range clients {
		if got := run(c, "cat", userHome+"/from-"+srv.name); got != "from-"+srv.name {
			t.Errorf("%s reads %q from the server's file, want %q", c.name, got, "from-"+srv.name)
		}
	}
	w := clients[0]
	file := userHome + "/from-" + w.name
	run(w, "su", "-s", "/bin/sh", "-c", "echo from-"+w.name+" > "+file, homeUser)
	if got := run(srv, "stat", "-c", "%u:%g", file); got != homeOwner {
		t.Errorf("%s: %s written by %s on %s is %s's, want %s", srv.name, file, homeUser, w.name, got, homeOwner)
	}
	for _, n := range append([]*node{srv}, clients[1:]...) {
		if got := run(n, "cat", file); got != "from-"+w.name {
			t.Errorf("%s reads %q from %s, want %q", n.name, got, file, "from-"+w.name)
		}
	}
	logf("nfs: a file %s wrote on %s is read on %s and the others; the server's file on every client", homeUser, w.name, srv.name)
	// root_squash.
	rootFile := export + "/shared/from-root-" + w.name
	run(w, "sh", "-c", "echo root > "+rootFile)
	if got := run(srv, "stat", "-c", "%u:%g", rootFile); got != squashedID {
		t.Errorf("%s: %s written by root on %s belongs to %s, want %s (root_squash)", srv.name, rootFile, w.name, got, squashedID)
	}
	if _, err := w.enr.Run.Run(ctx, "touch", userHome+"/from-root"); err == nil || !strings.Contains(err.Error(), "Permission denied") {
		t.Errorf("%s: root writing into %s's home (root_squash): %v, want permission denied", w.name, homeUser, err)
	}
	logf("nfs: root on %s is squashed to %s", w.name, squashedID)

	// The server stops (as a leaving node's would) and starts again.
	if err := srv.enr.Leave(ctx, srv.bundle); err != nil {
		t.Fatal(err)
	}
	if got := run(srv, "cat", "/proc/fs/nfsd/threads"); got != "0" {
		t.Errorf("%s: %s nfsd threads after Leave, want 0", srv.name, got)
	}
	if out, err := srv.enr.Run.Run(ctx, "pidof", "rpc.mountd"); err == nil {
		t.Errorf("%s: rpc.mountd still runs after Leave (pid %s)", srv.name, out)
	}
	if err := srv.enr.HomeExported(ctx, export); err == nil || !strings.Contains(err.Error(), "check home") {
		t.Errorf("%s: the home server's check after Leave: %v, want check home failed", srv.name, err)
	}
	if err := srv.enr.Start(ctx, srv.bundle); err != nil {
		t.Fatal(err)
	}
	threads, _ := strconv.Atoi(run(srv, "cat", "/proc/fs/nfsd/threads"))
	if threads == 0 {
		t.Errorf("%s: no nfsd threads after Start again", srv.name)
	}
	if _, err := srv.enr.Run.Run(ctx, "pidof", "rpc.mountd"); err != nil {
		t.Errorf("%s: no rpc.mountd after Start again: %v", srv.name, err)
	}
	// Leave withdrew the exports from the kernel (exportfs -au): Start
	// puts them back.
	if out := run(srv, "exportfs", "-v"); !strings.Contains(out, export) {
		t.Errorf("%s: exportfs -v lists %q after Start again, want %s", srv.name, out, export)
	}
	if err := srv.enr.HomeExported(ctx, export); err != nil {
		t.Errorf("%s: the home server's check after Start again: %v", srv.name, err)
	}
	logf("nfs: %s's NFS server stopped (Leave) and started again (Start): %d threads", srv.name, threads)
}
