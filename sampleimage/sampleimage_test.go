package sampleimage_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/esir-project/esir/sampleimage"
	"github.com/esir-project/esir/vm"
)

// digest lists every entry of a tree with its type, mode, time, link target
// and content hash.
func digest(t *testing.T, root string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		fmt.Fprintf(&b, "%s %v %d", rel, fi.Mode(), fi.ModTime().UnixNano())
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			fmt.Fprintf(&b, " -> %s", l)
		case fi.Mode().IsRegular():
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " %x", sha256.Sum256(data))
		}
		b.WriteByte('\n')
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestBuild(t *testing.T) {
	k, err := vm.HostDebianKernel()
	if err != nil {
		t.Skipf("no Debian kernel on this machine: %v", err)
	}
	if _, err := os.Stat(sampleimage.Busybox); err != nil {
		t.Skipf("busybox-static not installed: %v", err)
	}
	ctx := context.Background()
	a, b := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	opts := sampleimage.Options{Kernel: k, Hostname: "node7", Modules: sampleimage.StorageNetFS}
	if err := sampleimage.Build(ctx, a, opts); err != nil {
		t.Fatal(err)
	}
	if err := sampleimage.Build(ctx, b, opts); err != nil {
		t.Fatal(err)
	}
	if da, db := digest(t, a), digest(t, b); da != db {
		t.Fatal("two builds of the same sample image differ")
	}
	mods := "lib/modules/" + k.Version + "/"
	for _, c := range []struct {
		name, want string // want: a substring of the content, or of the link target
	}{
		{"sbin/init", "/bin/busybox"},
		{"bin/sh", "/bin/busybox"},
		{"etc/inittab", "::sysinit:/etc/init.d/rcS"},
		{"etc/init.d/rcS", sampleimage.UpMarker},
		{"etc/hostname", "node7\n"},
		{"etc/passwd", "root:x:0:0:"},
		{"etc/os-release", "ID=esir-sample"},
		{"etc/machine-id", ""},
		{"boot/vmlinuz-" + k.Version, ""},
		{mods + "modules.dep", "kernel/drivers/block/virtio_blk.ko"},
		{mods + "modules.alias", "virtio_net"},
	} {
		p := filepath.Join(a, c.name)
		fi, err := os.Lstat(p)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		var got string
		if fi.Mode()&fs.ModeSymlink != 0 {
			got, _ = os.Readlink(p)
		} else {
			data, _ := os.ReadFile(p)
			got = string(data)
		}
		if !strings.Contains(got, c.want) {
			t.Errorf("%s: want %q in it", c.name, c.want)
		}
	}
	if fi, err := os.Stat(filepath.Join(a, "etc/machine-id")); err != nil || fi.Size() != 0 {
		t.Errorf("etc/machine-id must exist and be empty: %v", err)
	}
	if _, err := os.Stat(filepath.Join(a, mods, "kernel/sound")); err == nil {
		t.Errorf("module selection copied kernel/sound")
	}
	// Every module modules.dep names is in the tree (the selection is
	// closed over dependencies).
	dep, _ := os.ReadFile(filepath.Join(a, mods, "modules.dep"))
	for _, line := range strings.Split(strings.TrimSpace(string(dep)), "\n") {
		for _, f := range strings.Fields(strings.Replace(line, ":", " ", 1)) {
			if _, err := os.Stat(filepath.Join(a, mods, f)); err != nil {
				t.Errorf("modules.dep names %s, missing: %v", f, err)
			}
		}
	}
	if err := sampleimage.Build(ctx, a, opts); err == nil {
		t.Error("building into a non-empty directory succeeded")
	}
}
