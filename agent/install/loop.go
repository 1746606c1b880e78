package install

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// AttachFile attaches a disk image file to a loop device (with partition
// scanning enabled, so partitions can be added) and returns the device and a
// function that detaches it. Loop devices an interrupted run left on the same
// file are cleaned up first: their partitions' mounts are unmounted and the
// devices detached, so a rerun starts from the file alone.
func AttachFile(ctx context.Context, file string) (string, func() error, error) {
	abs, err := filepath.Abs(file)
	if err != nil {
		return "", nil, err
	}
	if _, err := os.Stat(abs); err != nil {
		return "", nil, fmt.Errorf("disk image: %w", err)
	}
	out, err := runCmd(ctx, "losetup", "-j", abs)
	if err != nil {
		return "", nil, err
	}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		dev, _, ok := strings.Cut(l, ":")
		if !ok {
			continue
		}
		if err := detach(ctx, dev); err != nil {
			return "", nil, fmt.Errorf("disk image %s: stale %s: %w", abs, dev, err)
		}
	}
	out, err = runCmd(ctx, "losetup", "--find", "--show", "--partscan", abs)
	if err != nil {
		return "", nil, err
	}
	dev := strings.TrimSpace(out)
	return dev, func() error { return detach(context.Background(), dev) }, nil
}

// detach unmounts whatever is mounted from dev's partitions, removes the
// partitions and detaches dev.
func detach(ctx context.Context, dev string) error {
	name := filepath.Base(dev)
	devs := map[string]bool{}
	subs, _ := os.ReadDir(filepath.Join("/sys/block", name))
	for _, s := range subs {
		if b, err := os.ReadFile(filepath.Join("/sys/block", name, s.Name(), "dev")); err == nil {
			devs[strings.TrimSpace(string(b))] = true
		}
	}
	if b, err := os.ReadFile(filepath.Join("/sys/block", name, "dev")); err == nil {
		devs[strings.TrimSpace(string(b))] = true
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	var mounts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fl := strings.Fields(sc.Text())
		if len(fl) > 4 && devs[fl[2]] {
			mounts = append(mounts, fl[4])
		}
	}
	f.Close()
	for i := len(mounts) - 1; i >= 0; i-- {
		if err := unix.Unmount(mounts[i], 0); err != nil {
			return fmt.Errorf("unmount %s: %w", mounts[i], err)
		}
		_ = os.Remove(mounts[i])
	}
	if err := forgetPartitions(dev); err != nil {
		return err
	}
	_, err = runCmd(ctx, "losetup", "-d", dev)
	return err
}
