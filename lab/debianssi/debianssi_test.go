package debianssi

import (
	"slices"
	"strings"
	"testing"
)

func TestModulesToDrop(t *testing.T) {
	dep := []byte(`kernel/drivers/gpu/drm/drm.ko: kernel/drivers/video/fbdev/core/fb.ko
kernel/drivers/video/fbdev/core/fb.ko:
kernel/net/netfilter/ipvs/ip_vs.ko: kernel/net/netfilter/nf_conntrack.ko kernel/lib/libcrc32c.ko
kernel/net/netfilter/nf_conntrack.ko: kernel/lib/libcrc32c.ko
kernel/lib/libcrc32c.ko:
kernel/drivers/ata/ahci.ko: kernel/drivers/ata/libahci.ko kernel/drivers/usb/common/usb-common.ko
kernel/drivers/ata/libahci.ko:
kernel/drivers/usb/common/usb-common.ko:
kernel/drivers/usb/storage/usb-storage.ko: kernel/drivers/usb/common/usb-common.ko
kernel/sound/core/snd.ko:
kernel/net/wireless/cfg80211.ko:
kernel/drivers/net/ethernet/intel/e1000/e1000.ko:
kernel/drivers/net/ethernet/mellanox/mlx4/mlx4_core.ko:
kernel/drivers/scsi/sd_mod.ko:
kernel/drivers/scsi/lpfc/lpfc.ko:
kernel/fs/ext4/ext4.ko:
kernel/fs/btrfs/btrfs.ko:
`)
	got := modulesToDrop(dep, keepModule)
	want := []string{
		"kernel/drivers/gpu/drm/drm.ko",
		"kernel/drivers/net/ethernet/mellanox/mlx4/mlx4_core.ko",
		"kernel/drivers/scsi/lpfc/lpfc.ko",
		"kernel/drivers/usb/storage/usb-storage.ko",
		"kernel/drivers/video/fbdev/core/fb.ko",
		"kernel/fs/btrfs/btrfs.ko",
		"kernel/net/wireless/cfg80211.ko",
		"kernel/sound/core/snd.ko",
	}
	if !slices.Equal(got, want) {
		t.Errorf("dropped\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestRecipe(t *testing.T) {
	if s := stamp(); s != stamp() || !strings.HasPrefix(s, "debian-ssi recipe "+Generation+" sha256:"+digest()) {
		t.Errorf("stamp %q is not stable or not named", s)
	}
	script := chrootScript()
	for _, svc := range stackServices {
		if !strings.Contains(script, svc) {
			t.Errorf("the chroot script does not disable %s", svc)
		}
	}
	for _, want := range []string{"--no-install-recommends install " + strings.Join(Packages, " "), "INITRD=No", "policy-rc.d",
		"systemctl enable systemd-networkd.service esir-hello.service", "/etc/systemd/network/99-default.link"} {
		if !strings.Contains(script, want) {
			t.Errorf("the chroot script lacks %q", want)
		}
	}
	if f, ok := files()["etc/systemd/system/esir-hello.service"]; !ok || !strings.Contains(f.data, "httpd -f -p 80") {
		t.Errorf("hello service: %q", f.data)
	}
	if Ref() != "debian-ssi:"+Generation+"-"+digest()[:8] {
		t.Errorf("Ref() = %q", Ref())
	}
}
