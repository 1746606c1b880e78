package disk

import (
	"strings"
	"testing"
)

func TestChoose(t *testing.T) {
	const gib = int64(1) << 30
	for _, c := range []struct {
		name      string
		mountinfo string
		rule      Rule
		need      int64
		want      string // disk name, or "" for an error
		errHas    string
	}{
		{"smallest fitting fixed disk", "mountinfo", Rule{}, 10 * gib, "vda", ""},
		{"size rule", "mountinfo", Rule{MinSize: 50 * gib}, 10 * gib, "nvme0n1", ""},
		{"model glob", "mountinfo", Rule{Model: "INTEL*"}, 10 * gib, "sdb", ""},
		{"serial glob", "mountinfo", Rule{Serial: "ZC1*"}, 10 * gib, "sda", ""},
		{"path", "mountinfo", Rule{Path: "/dev/sda"}, 10 * gib, "sda", ""},
		{"loop only by name", "mountinfo", Rule{Path: "/dev/loop0"}, 100 << 20, "loop0", ""},
		{"loop not chosen unnamed", "mountinfo", Rule{MaxSize: gib}, 100 << 20, "", "loop0: virtual device"},
		{"boot medium refused even by name", "mountinfo", Rule{Path: "/dev/sdc"}, gib, "", "sdc: boot medium or in use (mounted at /run/medium)"},
		{"too small", "mountinfo", Rule{Path: "/dev/vda"}, 30 * gib, "", "vda: too small: 20.0 GiB, the image and layout need 30.0 GiB"},
		{"mounted partition makes disk busy", "mountinfo-nvme-used", Rule{MinSize: 50 * gib, MaxSize: 150 * gib}, gib, "", "nvme0n1: boot medium or in use (mounted at /data)"},
		{"nothing fits", "mountinfo", Rule{}, 8 * 1024 * gib, "", "sda: too small"},
	} {
		t.Run(c.name, func(t *testing.T) {
			disks, err := Scan("testdata/sys", "testdata/"+c.mountinfo)
			if err != nil {
				t.Fatal(err)
			}
			d, err := Choose(disks, c.rule, c.need)
			if c.want == "" {
				if err == nil {
					t.Fatalf("chose %s, want an error", d.Name)
				}
				if !strings.Contains(err.Error(), c.errHas) {
					t.Fatalf("error %q lacks %q", err, c.errHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if d.Name != c.want {
				t.Fatalf("chose %s, want %s", d.Name, c.want)
			}
		})
	}
}

func TestScan(t *testing.T) {
	disks, err := Scan("testdata/sys", "testdata/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]Disk{}
	for _, d := range disks {
		byName[d.Name] = d
	}
	for _, c := range []struct {
		name, model, serial string
		size                int64
		removable           bool
	}{
		{"sdb", "INTEL SSDSC2KB24", "BTYF111", 468862128 * 512, false},
		{"sdc", "Cruzer Blade", "4C53000", 30031872 * 512, true},
		{"vda", "", "VIRT123", 20 << 30, false},
	} {
		d := byName[c.name]
		if d.Model != c.model || d.Serial != c.serial || d.Size != c.size || d.Removable != c.removable {
			t.Errorf("%s: got %+v", c.name, d)
		}
	}
}

func TestPartitionPath(t *testing.T) {
	for in, want := range map[string]string{"/dev/sda": "/dev/sda2", "/dev/nvme0n1": "/dev/nvme0n1p2", "/dev/loop7": "/dev/loop7p2", "/dev/vdb": "/dev/vdb2"} {
		if got := PartitionPath(in, 2); got != want {
			t.Errorf("PartitionPath(%s) = %s, want %s", in, got, want)
		}
	}
}
