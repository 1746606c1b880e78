package install_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/diskfs/go-diskfs"
	"github.com/esir-project/esir/agent/initrd"
	"github.com/esir-project/esir/agent/install"
	"github.com/esir-project/esir/imaging"
	"github.com/esir-project/esir/modules"
	"github.com/esir-project/esir/pxe/netboot"
	"github.com/esir-project/esir/sampleimage"
	"github.com/esir-project/esir/server/agentapi"
	"github.com/esir-project/esir/vm"
	"golang.org/x/sys/unix"
)

const mac = "52:54:00:e5:1a:01"

// fixture is what every subtest shares: built once per test binary.
type fixture struct {
	dir    string
	agent  string // static esir-agent
	image  *imaging.Image
	virtio []modules.Device // hardware of the UEFI machine
	ahci   []modules.Device // hardware of the BIOS machine
}

func requireTools(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (loop devices, mount, mkfs)")
	}
	for _, p := range append(install.HostTools(), "/usr/sbin/losetup", sampleimage.Busybox, "/usr/sbin/depmod") {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("needs %s (scripts/setup.sh installs it): %v", p, err)
		}
	}
	if _, err := vm.HostDebianKernel(); err != nil {
		t.Skipf("needs Debian's kernel: %v", err)
	}
}

func setup(t *testing.T) *fixture {
	ctx := context.Background()
	fx := &fixture{dir: t.TempDir()}
	fx.agent = filepath.Join(fx.dir, "esir-agent")
	build := exec.Command("go", "build", "-o", fx.agent, "github.com/esir-project/esir/cmd/esir-agent")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build esir-agent: %v\n%s", err, out)
	}
	k, _ := vm.HostDebianKernel()
	tree := filepath.Join(fx.dir, "tree")
	if err := sampleimage.Build(ctx, tree, sampleimage.Options{Kernel: k, Modules: sampleimage.StorageNetFS}); err != nil {
		t.Fatal(err)
	}
	st, err := imaging.OpenStore(filepath.Join(fx.dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	if fx.image, err = st.Build(ctx, tree, imaging.BuildOptions{Name: "sample", Version: "1"}); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(tree)
	if fx.virtio, err = modules.ReadDeviceList("testdata/q35-virtio-blk.txt"); err != nil {
		t.Fatal(err)
	}
	if fx.ahci, err = modules.ReadDeviceList("testdata/q35-ahci-e1000.txt"); err != nil {
		t.Fatal(err)
	}
	return fx
}

func assignment(host string) *agentapi.Assignment {
	return &agentapi.Assignment{
		ID: "a1", Hostname: host, Server: "http://198.18.0.1:8080", EnrollToken: "tok-" + host,
		Disk:           agentapi.DiskLayout{ESPMiB: 64, SwapMiB: 16},
		Network:        agentapi.Network{Mode: "dhcp", DNS: []string{"198.18.0.1"}, Domain: "lab.example"},
		AuthorizedKeys: []string{"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEsir test@esir"},
	}
}

func newDisk(t *testing.T, dir, name string, size int64) string {
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

// installFile installs the image onto a disk image file in-process.
func installFile(t *testing.T, fx *fixture, file, host string, hw []modules.Device) (*install.Result, []install.Event, error) {
	return installFileWith(t, fx, file, host, hw, fx.agent)
}

// installFileWith is installFile with the agent binary given.
func installFileWith(t *testing.T, fx *fixture, file, host string, hw []modules.Device, agent string) (*install.Result, []install.Event, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dev, detach, err := install.AttachFile(ctx, file)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := detach(); err != nil {
			t.Errorf("detach %s: %v", dev, err)
		}
	}()
	asg := assignment(host)
	asg.Disk.Rule.Path = dev
	var events []install.Event
	res, err := install.Run(ctx, install.ImageFromStore(&fx.image.Manifest, fx.image.ArchivePath()), asg, install.Options{
		MAC: mac, Cmdline: "console=ttyS0,115200", Agent: agent, Devices: hw,
		Report: func(e install.Event) { events = append(events, e) },
	})
	return res, events, err
}

func TestInstall(t *testing.T) {
	requireTools(t)
	fx := setup(t)
	const mib = 1 << 20

	t.Run("too-small-refused-before-writing", func(t *testing.T) {
		file := newDisk(t, fx.dir, "small.img", 96*mib)
		_, events, err := installFile(t, fx, file, "small", fx.virtio)
		var se *install.StepError
		if !errors.As(err, &se) || se.Step != install.StepDisk || !strings.Contains(se.Error(), "too small") {
			t.Fatalf("want a disk step error saying too small, got %v", err)
		}
		for _, e := range events {
			if e.Step != install.StepDisk {
				t.Errorf("step %s ran after the disk was refused", e.Step)
			}
		}
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if i := bytes.IndexFunc(data, func(r rune) bool { return r != 0 }); i >= 0 {
			t.Fatalf("the refused disk was written at byte %d", i)
		}
	})

	// Work done in the background (here the early-boot initramfs and the
	// node service, both lacking the agent binary) fails at its own step,
	// nothing after it runs, the disk gets no boot code, and the install
	// leaves nothing mounted (installFile detaches the disk).
	t.Run("background-failure-reported-at-its-step", func(t *testing.T) {
		file := newDisk(t, fx.dir, "noagent.img", 512*mib)
		missing := filepath.Join(fx.dir, "no-such-agent")
		_, events, err := installFileWith(t, fx, file, "noagent", fx.virtio, missing)
		var se *install.StepError
		if !errors.As(err, &se) || se.Step != install.StepEarlyBoot || !strings.Contains(se.Error(), missing) {
			t.Fatalf("want an earlyboot step error naming %s, got %v", missing, err)
		}
		for _, e := range events {
			if e.Step == install.StepBootloader || e.Step == install.StepService || e.Step == install.StepSync {
				t.Errorf("step %s ran after earlyboot failed", e.Step)
			}
		}
		raw := make([]byte, 440)
		f, err := os.Open(file)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.ReadAt(raw, 0); err != nil {
			t.Fatal(err)
		}
		mbr, _ := os.ReadFile(install.DefaultTools().GPTMBR)
		if bytes.HasPrefix(raw, mbr) {
			t.Error("the failed install wrote the boot code")
		}
	})

	clean := newDisk(t, fx.dir, "clean.img", 512*mib)
	var res *install.Result
	t.Run("clean", func(t *testing.T) {
		var events []install.Event
		var err error
		res, events, err = installFile(t, fx, clean, "node1", fx.virtio)
		if err != nil {
			t.Fatal(err)
		}
		var done []string
		for _, e := range events {
			if e.Status == install.Done {
				done = append(done, e.Step)
			}
		}
		if strings.Join(done, ",") != strings.Join(install.Steps(), ",") {
			t.Fatalf("steps done %v, want %v", done, install.Steps())
		}
		checkInstalled(t, fx, clean, res, "node1")
	})
	if res == nil {
		t.FailNow()
	}

	t.Run("killed-during-unpack-then-rerun", func(t *testing.T) {
		file := newDisk(t, fx.dir, "killed.img", 512*mib)
		args := []string{"install", "--log-level", "debug", "--disk", file, "--image", fx.image.Dir,
			"--agent", fx.agent, "--mac", mac, "--hostname", "node1", "--server", "http://198.18.0.1:8080",
			"--enroll-token", "tok-node1", "--hardware", "testdata/q35-virtio-blk.txt", "--esp-mib", "64",
			"--swap-mib", "16", "--cmdline", "console=ttyS0,115200"}
		// Same network and keys as assignment(): through an assignment file.
		asgFile := filepath.Join(fx.dir, "asg.json")
		writeAssignment(t, asgFile, assignment("node1"))
		args = append(args, "--assignment", asgFile)

		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, fx.agent, args...)
		stderr, _ := cmd.StderrPipe()
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		killed := false
		var log strings.Builder
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			line := sc.Text()
			log.WriteString(line + "\n")
			if !killed && strings.Contains(line, "install progress") && strings.Contains(line, "step=unpack") {
				_ = cmd.Process.Kill()
				killed = true
			}
		}
		_ = cmd.Wait()
		if !killed {
			t.Fatalf("the agent never reported unpack progress:\n%s", log.String())
		}
		if strings.Contains(log.String(), "step=unpack detail") {
			t.Fatalf("unpack finished before the kill:\n%s", log.String())
		}
		// The killed run left its loop device and mount behind; the rerun
		// through the CLI cleans them up and installs.
		out, err := exec.CommandContext(ctx, fx.agent, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("rerun: %v\n%s", err, out)
		}
		if got, want := diskDigest(t, file), diskDigest(t, clean); got != want {
			t.Fatalf("rerun after a kill differs from a clean install:\n%s", diffLines(want, got))
		}
	})

	t.Run("boot-uefi-virtio", func(t *testing.T) {
		bootAndCheck(t, vm.Config{Name: "uefi", Firmware: vm.UEFI, Disks: []vm.Disk{{Path: clean, Model: "virtio-blk"}}},
			res, "node1", []string{"virtio_blk", "virtio_pci"}, []string{"e1000", "sd_mod"})
	})

	t.Run("boot-bios-ahci", func(t *testing.T) {
		file := newDisk(t, fx.dir, "bios.img", 512*mib)
		r, _, err := installFile(t, fx, file, "node2", fx.ahci)
		if err != nil {
			t.Fatal(err)
		}
		bootAndCheck(t, vm.Config{Name: "bios", Firmware: vm.BIOS, Disks: []vm.Disk{{Path: file, Model: "ahci"}}},
			r, "node2", []string{"ahci", "sd_mod", "e1000"}, []string{"virtio_blk", "virtio_net"})
	})
}

func writeAssignment(t *testing.T, path string, a *agentapi.Assignment) {
	t.Helper()
	b := fmt.Sprintf(`{"hostname":%q,"server":%q,"enroll_token":%q,"disk":{"rule":{},"esp_mib":%d,"swap_mib":%d},
"network":{"mode":%q,"dns":[%q],"domain":%q},"authorized_keys":[%q]}`,
		a.Hostname, a.Server, a.EnrollToken, a.Disk.ESPMiB, a.Disk.SwapMiB, a.Network.Mode, a.Network.DNS[0], a.Network.Domain, a.AuthorizedKeys[0])
	if err := os.WriteFile(path, []byte(b), 0o644); err != nil {
		t.Fatal(err)
	}
}

// mountRoot attaches the disk file and mounts its root partition read-only.
func mountRoot(t *testing.T, file string) string {
	t.Helper()
	ctx := context.Background()
	dev, detach, err := install.AttachFile(ctx, file)
	if err != nil {
		t.Fatal(err)
	}
	parts, err := initrd.ReadGPT(file)
	if err != nil {
		detach()
		t.Fatal(err)
	}
	f, err := os.Open(dev)
	if err != nil {
		detach()
		t.Fatal(err)
	}
	for _, p := range parts {
		bp := unix.BlkpgPartition{Start: int64(p.Start) * 512, Length: int64(p.End-p.Start+1) * 512, Pno: int32(p.Number)}
		if err := addPartition(f, bp); err != nil {
			f.Close()
			detach()
			t.Fatal(err)
		}
	}
	f.Close()
	part := dev + "p2"
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(part); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	mnt := t.TempDir()
	if err := unix.Mount(part, mnt, "ext4", unix.MS_RDONLY, ""); err != nil {
		detach()
		t.Fatalf("mount %s: %v", part, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
		if err := detach(); err != nil {
			t.Errorf("detach: %v", err)
		}
	})
	return mnt
}

func checkInstalled(t *testing.T, fx *fixture, file string, res *install.Result, host string) {
	t.Helper()
	parts, err := initrd.ReadGPT(file)
	if err != nil {
		t.Fatal(err)
	}
	if len(parts) != 3 {
		t.Fatalf("GPT has %d partitions, want ESP, root, swap", len(parts))
	}
	for i, want := range []struct{ typ, guid string }{
		{"c12a7328-f81f-11d2-ba4b-00a0c93ec93b", res.ESPPartUUID},
		{"0fc63daf-8483-4772-8e79-3d69d8477de4", res.RootPartUUID},
		{"0657fd6d-a4ab-43c4-84e5-0933c84b4f4f", ""},
	} {
		if parts[i].Type != want.typ || (want.guid != "" && parts[i].GUID != want.guid) {
			t.Errorf("partition %d: type %s guid %s, want %s %s", i+1, parts[i].Type, parts[i].GUID, want.typ, want.guid)
		}
	}
	if parts[1].Attributes&(1<<2) == 0 {
		t.Error("root partition lacks the LegacyBIOSBootable attribute")
	}
	raw, _ := os.ReadFile(file)
	mbr, _ := os.ReadFile(install.DefaultTools().GPTMBR)
	if !bytes.Equal(raw[:len(mbr)], mbr) {
		t.Error("the disk's boot code is not gptmbr.bin")
	}
	if !bytes.Equal(raw[parts[2].Start*512+4086:parts[2].Start*512+4096], []byte("SWAPSPACE2")) {
		t.Error("swap partition has no swap signature")
	}
	mnt := mountRoot(t, file)
	read := func(name string) string {
		b, err := os.ReadFile(filepath.Join(mnt, name))
		if err != nil {
			t.Errorf("%s: %v", name, err)
		}
		return string(b)
	}
	for _, c := range []struct{ file, want string }{
		{"etc/hostname", host + "\n"},
		{"etc/hosts", "127.0.1.1\t" + host + ".lab.example " + host},
		{"etc/fstab", "PARTUUID=" + res.RootPartUUID + "\t/\text4"},
		{"etc/network/interfaces", "iface eth0 inet dhcp"},
		{"etc/systemd/network/10-esir.network", "MACAddress=" + mac},
		{"etc/resolv.conf", "nameserver 198.18.0.1"},
		{"root/.ssh/authorized_keys", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEsir test@esir\n"},
		{"etc/esir/node.json", `"enroll_token": "tok-` + host + `"`},
		{"etc/init.d/S90esir-node", "esir-agent enroll"},
		{"etc/systemd/system/esir-node.service", "ExecStart=/usr/sbin/esir-agent enroll"},
		{"boot/extlinux/extlinux.conf", "APPEND root=PARTUUID=" + res.RootPartUUID},
		{"etc/esir/boot-modules", "virtio_blk"},
	} {
		if got := read(c.file); !strings.Contains(got, c.want) {
			t.Errorf("%s: want %q in:\n%s", c.file, c.want, got)
		}
	}
	if fi, err := os.Stat(filepath.Join(mnt, "etc/machine-id")); err != nil || fi.Size() != 0 {
		t.Errorf("etc/machine-id must be empty: %v", err)
	}
	for _, f := range []string{"boot/extlinux/ldlinux.sys", "boot/esir-initrd.img-" + res.Kernel, "usr/sbin/esir-agent", "sbin/init"} {
		if _, err := os.Lstat(filepath.Join(mnt, f)); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
	// The agent binary, copied in while the image unpacked and named
	// once it was in place.
	if got, err := os.ReadFile(filepath.Join(mnt, "usr/sbin/esir-agent")); err != nil {
		t.Error(err)
	} else if want, _ := os.ReadFile(fx.agent); !bytes.Equal(got, want) {
		t.Errorf("usr/sbin/esir-agent: %d bytes differ from the agent's %d", len(got), len(want))
	}
	if fi, err := os.Stat(filepath.Join(mnt, "usr/sbin/esir-agent")); err == nil && fi.Mode().Perm() != 0o755 {
		t.Errorf("usr/sbin/esir-agent has mode %v, want 0755", fi.Mode().Perm())
	}
	if keys, _ := filepath.Glob(filepath.Join(mnt, "etc/ssh/ssh_host_*")); len(keys) > 0 {
		t.Errorf("SSH host keys left: %v", keys)
	}
	esp := espFiles(t, file)
	for _, f := range []string{"/EFI/BOOT/BOOTX64.EFI", "/loader/loader.conf", "/loader/entries/esir.conf",
		"/esir/vmlinuz-" + res.Kernel, "/esir/initrd.img-" + res.Kernel} {
		if _, ok := esp[f]; !ok {
			t.Errorf("ESP lacks %s (has %v)", f, keys(esp))
		}
	}
	if e := esp["/loader/entries/esir.conf"]; !strings.Contains(e, "options root=PARTUUID="+res.RootPartUUID) || !strings.Contains(e, "-- initrd") {
		t.Errorf("loader entry: %s", e)
	}
	k, _ := os.ReadFile(filepath.Join(mnt, "boot/vmlinuz-"+res.Kernel))
	if esp["/esir/vmlinuz-"+res.Kernel] != string(k) {
		t.Error("the ESP's kernel differs from the root's")
	}
}

func keys(m map[string]string) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// espFiles reads every file of the ESP with go-diskfs.
func espFiles(t *testing.T, file string) map[string]string {
	t.Helper()
	d, err := diskfs.Open(file, diskfs.WithOpenMode(diskfs.ReadOnly))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	fsys, err := d.GetFilesystem(1)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	var walk func(dir string)
	walk = func(dir string) {
		ents, err := fsys.ReadDir(dir)
		if err != nil {
			t.Fatalf("ESP %s: %v", dir, err)
		}
		for _, e := range ents {
			p := path.Join(dir, e.Name())
			if e.Name() == "." || e.Name() == ".." {
				continue
			}
			if e.IsDir() {
				walk(p)
				continue
			}
			f, err := fsys.OpenFile("/"+p, os.O_RDONLY)
			if err != nil {
				t.Fatalf("ESP %s: %v", p, err)
			}
			b, err := io.ReadAll(f)
			if err != nil {
				t.Fatalf("ESP %s: %v", p, err)
			}
			out["/"+p] = string(b)
		}
	}
	walk(".")
	return out
}

// diskDigest describes an installed disk: its GPT, its ESP's files, and
// every entry of its root filesystem (type, mode, owner, size, content,
// link target; modification times of the image's files).
func diskDigest(t *testing.T, file string) string {
	t.Helper()
	var b strings.Builder
	parts, err := initrd.ReadGPT(file)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range parts {
		fmt.Fprintf(&b, "gpt %+v\n", p)
	}
	esp := espFiles(t, file)
	for _, k := range keys(esp) {
		fmt.Fprintf(&b, "esp %s %x\n", k, sha256.Sum256([]byte(esp[k])))
	}
	mnt := mountRoot(t, file)
	epoch := sampleimage.Epoch()
	err = filepath.WalkDir(mnt, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(mnt, p)
		st := fi.Sys().(*syscall.Stat_t)
		fmt.Fprintf(&b, "%s %v %d:%d", rel, fi.Mode(), st.Uid, st.Gid)
		if fi.ModTime().Equal(epoch) {
			b.WriteString(" epoch")
		}
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			fmt.Fprintf(&b, " -> %s", l)
		case fi.Mode().IsRegular():
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			if rel == "boot/extlinux/ldlinux.sys" {
				// extlinux writes the file's own sector list into it, and
				// where ext4 places a file depends on when the kernel wrote
				// the files before it back (delayed allocation under the
				// install's periodic flushes): two good installs differ
				// there under load. Its size is compared; the boot tests
				// show it works.
				fmt.Fprintf(&b, " %d (sector list patched by extlinux)", len(data))
				break
			}
			fmt.Fprintf(&b, " %d %x", len(data), sha256.Sum256(data))
		}
		b.WriteByte('\n')
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func diffLines(a, b string) string {
	as, bs := strings.Split(a, "\n"), strings.Split(b, "\n")
	in := func(s []string) map[string]bool {
		m := map[string]bool{}
		for _, x := range s {
			m[x] = true
		}
		return m
	}
	ma, mb := in(as), in(bs)
	var out []string
	for _, x := range as {
		if !mb[x] {
			out = append(out, "- "+x)
		}
	}
	for _, x := range bs {
		if !ma[x] {
			out = append(out, "+ "+x)
		}
	}
	if len(out) > 40 {
		out = append(out[:40], "...")
	}
	return strings.Join(out, "\n")
}

// bootAndCheck boots the installed disk and reads the early boot's and the
// installed system's console lines.
func bootAndCheck(t *testing.T, cfg vm.Config, res *install.Result, host string, must, mustNot []string) {
	if err := vm.Available(cfg.Firmware); err != nil {
		t.Skip(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cfg.WorkDir = t.TempDir()
	cfg.MemoryMiB = 768
	cfg.NoReboot = true
	v, err := vm.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Kill()
	t.Cleanup(func() {
		if t.Failed() {
			_ = v.KeepLog(os.Getenv("ESIR_ARTIFACTS"), "agent-install")
		}
	})
	line, off, err := v.WaitFor(ctx, regexp.MustCompile(regexp.QuoteMeta(initrd.Marker)+" root PARTUUID="), 0)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(line, "PARTUUID="+res.RootPartUUID) {
		t.Errorf("early boot found another root: %s", line)
	}
	_, early, _ := strings.Cut(line, "modules=")
	up, _, err := v.WaitFor(ctx, regexp.MustCompile(regexp.QuoteMeta(sampleimage.UpMarker)), off)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(up, "hostname="+host+" ") {
		t.Errorf("installed system: %s, want hostname %s", up, host)
	}
	_, loaded, _ := strings.Cut(up, "modules=")
	got := strings.Split(strings.TrimSpace(loaded), ",")
	sort.Strings(got)
	want := append([]string(nil), res.BootModules...)
	sort.Strings(want)
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("installed system runs modules %v, want exactly the matched boot set %v (early boot said %s)", got, want, early)
	}
	has := map[string]bool{}
	for _, m := range got {
		has[m] = true
	}
	for _, m := range must {
		if !has[m] {
			t.Errorf("module %s not loaded on this hardware (loaded %v)", m, got)
		}
	}
	for _, m := range mustNot {
		if has[m] {
			t.Errorf("module %s loaded although this hardware does not need it", m)
		}
	}
}

// addPartition tells the kernel about one partition (BLKPG), as partx -a
// does; a kernel that found it by itself answers EBUSY.
func addPartition(f *os.File, bp unix.BlkpgPartition) error {
	a := unix.BlkpgIoctlArg{Op: unix.BLKPG_ADD_PARTITION, Datalen: int32(unsafe.Sizeof(bp)), Data: (*byte)(unsafe.Pointer(&bp))}
	_, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKPG, uintptr(unsafe.Pointer(&a)))
	if e != 0 && e != unix.EBUSY {
		return fmt.Errorf("add partition %d: %w", bp.Pno, e)
	}
	return nil
}

// TestNetbootCarriesHostTools: everything the install runs or reads from the
// netboot environment is what pxe/netboot packs by default.
func TestNetbootCarriesHostTools(t *testing.T) {
	packed := map[string]bool{"/etc/mke2fs.conf": true, "/sbin/mkfs.ext4": true} // netboot adds both with mke2fs
	for _, f := range append(netboot.DefaultHelpers(), netboot.DefaultFiles()...) {
		packed[f] = true
	}
	for _, f := range install.HostTools() {
		if !packed[f] {
			t.Errorf("the install needs %s but the netboot environment does not carry it", f)
		}
	}
}
