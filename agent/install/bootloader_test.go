package install

import "testing"

func TestExtlinuxOwns(t *testing.T) {
	for _, tt := range []struct {
		rel  string
		want bool
	}{
		{"boot/extlinux/ldlinux.sys", true},
		{"boot/extlinux/ldlinux.c32", true},
		{"boot/extlinux/extlinux.conf", false}, // rewritten by the bootloader step
		{"boot/extlinux", false},
		{"boot/ldlinux.sys", false},
		{"usr/lib/syslinux/ldlinux.c32", false},
	} {
		if got := extlinuxOwns(tt.rel); got != tt.want {
			t.Errorf("extlinuxOwns(%q) = %v, want %v", tt.rel, got, tt.want)
		}
	}
}
