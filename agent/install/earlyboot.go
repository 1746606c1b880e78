package install

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/esir-project/esir/agent/initrd"
	"github.com/esir-project/esir/initramfs"
	"github.com/esir-project/esir/modules"
)

// kernelFiles is the installed system's kernel.
type kernelFiles struct {
	version string
	vmlinuz string // path inside the root, /boot/vmlinuz-VERSION
	initrd  string // path inside the root of the early-boot initramfs
	modules string // path inside the root of the module tree
}

// findKernel returns the newest kernel under the mounted root that has a
// module tree.
func findKernel(root string) (kernelFiles, error) {
	ms, _ := filepath.Glob(filepath.Join(root, "boot", "vmlinuz-*"))
	var ks []kernelFiles
	for _, m := range ms {
		v := strings.TrimPrefix(filepath.Base(m), "vmlinuz-")
		for _, dir := range []string{"/lib/modules/", "/usr/lib/modules/"} {
			if _, err := os.Stat(filepath.Join(root, dir, v, "modules.dep")); err == nil {
				ks = append(ks, kernelFiles{version: v, vmlinuz: "/boot/vmlinuz-" + v, modules: dir + v,
					initrd: "/boot/esir-initrd.img-" + v})
				break
			}
		}
	}
	if len(ks) == 0 {
		return kernelFiles{}, fmt.Errorf("the image has no kernel with modules (/boot/vmlinuz-* and /lib/modules/VERSION/modules.dep)")
	}
	sort.Slice(ks, func(i, j int) bool { return versionLess(ks[i].version, ks[j].version) })
	return ks[len(ks)-1], nil
}

// versionLess orders kernel versions with digit runs compared as numbers.
func versionLess(a, b string) bool {
	for a != "" && b != "" {
		da, db := digits(a), digits(b)
		if da > 0 && db > 0 {
			if x, y := strings.TrimLeft(a[:da], "0"), strings.TrimLeft(b[:db], "0"); x != y {
				if len(x) != len(y) {
					return len(x) < len(y)
				}
				return x < y
			}
			a, b = a[da:], b[db:]
			continue
		}
		if a[0] != b[0] {
			return a[0] < b[0]
		}
		a, b = a[1:], b[1:]
	}
	return len(a) < len(b)
}

func digits(s string) int {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	return i
}

// earlyBase is the image-independent part of the early-boot initramfs,
// compressed in the background from the install's start.
type earlyBase struct {
	done chan struct{}
	b    []byte
	err  error
}

// startEarlyBase starts compressing the early boot's image-independent
// part: the agent binary is most of the initramfs's bytes, and it need not
// wait for the image.
func (r *run) startEarlyBase() {
	e := &earlyBase{done: make(chan struct{})}
	r.base = e
	go func() {
		defer close(e.done)
		if r.opts.Agent == "" {
			e.err = fmt.Errorf("no esir-agent binary given for the early boot's /init")
			return
		}
		a := initramfs.New()
		if e.err = initrd.AddBase(a, r.opts.Agent); e.err != nil {
			return
		}
		var buf bytes.Buffer
		if _, err := a.WriteTo(&buf); err != nil {
			e.err = fmt.Errorf("early-boot initramfs: %w", err)
			return
		}
		e.b = buf.Bytes()
	}()
}

// wait returns the compressed part.
func (e *earlyBase) wait() ([]byte, error) {
	<-e.done
	return e.b, e.err
}

// startInitrd starts building the node's early-boot initramfs from the
// unpacked kernel's modules (r.kernel) and writing it next to the kernel,
// with the list of its modules in /etc/esir/boot-modules; r.initrdData
// keeps it for the ESP.
func (r *run) startInitrd() {
	r.initrd = r.goJob(func() error {
		k := r.kernel
		tree, err := modules.Open(r.inRoot(k.modules), modules.Options{})
		if err != nil {
			return err
		}
		devs := r.opts.Devices
		if devs == nil {
			if devs, err = modules.ReadDevices(r.opts.SysRoot); err != nil {
				return err
			}
		}
		plan, err := tree.BootPlan(devs, modules.BootNeeds{Filesystems: []string{"ext4"}, Network: true})
		if err != nil {
			return err
		}
		r.bootPlan = plan
		a := initramfs.New()
		cfg := initrd.Config{Kernel: k.version, Root: r.res.RootPartUUID, RootFSType: "ext4", Init: "/sbin/init"}
		if err := initrd.AddConfig(a, cfg); err != nil {
			return err
		}
		if err := modules.AddToInitramfs(a, tree, plan); err != nil {
			return err
		}
		base, err := r.base.wait()
		if err != nil {
			return err
		}
		var mods bytes.Buffer
		if _, err := a.WriteTo(&mods); err != nil {
			return fmt.Errorf("early-boot initramfs: %w", err)
		}
		// The two compressed archives, one after the other, are the
		// initramfs (the kernel unpacks each in turn). One allocation
		// of the whole: growing the agent's part would copy it.
		r.initrdData = append(append(make([]byte, 0, len(base)+mods.Len()), base...), mods.Bytes()...)
		// The list also goes into the root, where the installed system
		// (and an administrator) can see which modules this node boots
		// with.
		if err := r.writeFile("/etc/esir/boot-modules", plan.ModuleList(true), 0o644); err != nil {
			return err
		}
		return r.writeFile(k.initrd, r.initrdData, 0o644)
	})
}

// earlyBoot waits for the node's early-boot initramfs, built and written
// next to the kernel by the job the unpack started.
func (r *run) earlyBoot() (string, error) {
	// Personalise was the last step to write into the root.
	r.startRelease()
	if r.kernelErr != nil {
		return "", r.kernelErr
	}
	if err := r.initrd.wait(); err != nil {
		return "", err
	}
	r.res.BootModules = r.bootPlan.Names()
	return fmt.Sprintf("kernel %s, %d modules: %s", r.kernel.version, len(r.bootPlan.Steps), strings.Join(r.res.BootModules, ",")), nil
}
