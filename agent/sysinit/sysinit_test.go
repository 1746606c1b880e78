package sysinit

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseCmdline(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    Cmdline
		wantErr bool
	}{
		{
			name: "install",
			in:   "initrd=initrd esir.server=http://198.18.0.1:8080 esir.token=abc esir.mac=52:54:00:12:34:56 esir.mode=install console=ttyS0,115200 quiet\n",
			want: Cmdline{Server: "http://198.18.0.1:8080", Token: "abc", MAC: []byte{0x52, 0x54, 0, 0x12, 0x34, 0x56}, Mode: "install"},
		},
		{name: "inventory with debug", in: "esir.mode=inventory esir.debug", want: Cmdline{Mode: "inventory", Debug: true}},
		{name: "quoted", in: `esir.server="http://a b" esir.debug=0`, want: Cmdline{Server: "http://a b"}},
		{name: "nothing", in: "console=tty0", want: Cmdline{}},
		{name: "last wins", in: "esir.mode=inventory esir.mode=install", want: Cmdline{Mode: "install"}},
		{name: "bad mac", in: "esir.mac=zz", wantErr: true},
		{name: "bad mode", in: "esir.mode=wipe", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseCmdline(tt.in)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("no error for %q", tt.in)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Server != tt.want.Server || got.Token != tt.want.Token || got.MAC.String() != tt.want.MAC.String() ||
				got.Mode != tt.want.Mode || got.Debug != tt.want.Debug {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
	c, _ := ParseCmdline("console=ttyS0,115200 ro")
	if c.Params["console"] != "ttyS0,115200" || c.Params["ro"] != "" {
		t.Errorf("params %v", c.Params)
	}
}

// TestMountAllInPrivateNamespace mounts the netboot set under a temporary
// root in a mount namespace of its own thread, so the host sees nothing.
func TestMountAllInPrivateNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount (CI runs as root)")
	}
	root := t.TempDir()
	errc := make(chan error, 1)
	skip := make(chan error, 1)
	types := map[string]int64{}
	go func() {
		// The thread is never unlocked: it ends with the goroutine, taking
		// its mount namespace along.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNS | unix.CLONE_FS); err != nil {
			skip <- err
			return
		}
		if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
			skip <- err
			return
		}
		if err := MountAll(root, Mounts()); err != nil {
			errc <- err
			return
		}
		// Twice is fine: already mounted filesystems are skipped or EBUSY.
		if err := MountAll(root, Mounts()[:3]); err != nil {
			errc <- err
			return
		}
		for _, m := range Mounts() {
			var st unix.Statfs_t
			if err := unix.Statfs(filepath.Join(root, m.Target), &st); err != nil {
				errc <- err
				return
			}
			types[m.Target] = int64(st.Type)
		}
		if _, err := os.Stat(filepath.Join(root, "proc/self/status")); err != nil {
			errc <- err
			return
		}
		if _, err := os.Stat(filepath.Join(root, "dev/null")); err != nil {
			errc <- err
			return
		}
		errc <- nil
	}()
	select {
	case err := <-skip:
		t.Skipf("no private mount namespace here: %v", err)
	case err := <-errc:
		if err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]int64{"/proc": unix.PROC_SUPER_MAGIC, "/sys": unix.SYSFS_MAGIC, "/dev": unix.TMPFS_MAGIC,
		"/dev/pts": unix.DEVPTS_SUPER_MAGIC, "/run": unix.TMPFS_MAGIC, "/tmp": unix.TMPFS_MAGIC}
	for k, v := range want {
		if types[k] != v {
			t.Errorf("%s: filesystem magic %#x, want %#x", k, types[k], v)
		}
	}
	// The host's view of root stays empty.
	if _, err := os.Stat(filepath.Join(root, "proc/self")); err == nil {
		t.Error("mount leaked out of the private namespace")
	}
}

func TestPowerSignals(t *testing.T) {
	s := Signals()
	if s[unix.SIGUSR2] != PowerOff || s[unix.SIGTERM] != Reboot || s[unix.SIGPWR] != PowerOff {
		t.Fatalf("signal map %v", s)
	}
}
