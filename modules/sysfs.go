package modules

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// Device is one device that asks for a driver: its sysfs path and modalias.
type Device struct {
	Path     string `json:"path"`     // relative to the sysfs root, e.g. bus/pci/devices/0000:00:03.0
	Bus      string `json:"bus"`      // pci, usb, virtio, cpu, dmi, ...
	Modalias string `json:"modalias"` // as the kernel prints it
}

// ReadDevices returns every device under the sysfs root that has a modalias:
// bus/*/devices/*/modalias, the CPU (devices/system/cpu/modalias) and the
// DMI identity (devices/virtual/dmi/id/modalias), sorted by path. The root
// is a parameter so recorded trees work as well as /sys.
func ReadDevices(sysfs string) ([]Device, error) {
	files, err := filepath.Glob(filepath.Join(sysfs, "bus", "*", "devices", "*", "modalias"))
	if err != nil {
		return nil, fmt.Errorf("sysfs %s: %w", sysfs, err)
	}
	for _, extra := range []string{"devices/system/cpu/modalias", "devices/virtual/dmi/id/modalias"} {
		if _, err := os.Stat(filepath.Join(sysfs, extra)); err == nil {
			files = append(files, filepath.Join(sysfs, extra))
		}
	}
	devs := make([]Device, 0, len(files))
	for _, f := range files {
		data, err := os.ReadFile(f)
		if os.IsNotExist(err) || (err != nil && os.IsPermission(err)) {
			continue // the device went away while we looked, or hides its alias
		}
		if err != nil {
			return nil, fmt.Errorf("sysfs: read %s: %w", f, err)
		}
		ma := strings.TrimRight(string(data), "\n\x00")
		if ma == "" {
			continue
		}
		rel, _ := filepath.Rel(sysfs, filepath.Dir(f))
		devs = append(devs, Device{Path: filepath.ToSlash(rel), Bus: busOf(rel, ma), Modalias: ma})
	}
	sort.Slice(devs, func(i, j int) bool { return devs[i].Path < devs[j].Path })
	return devs, nil
}

func busOf(rel, modalias string) string {
	parts := strings.Split(filepath.ToSlash(rel), "/")
	if len(parts) >= 2 && parts[0] == "bus" {
		return parts[1]
	}
	b, _, _ := strings.Cut(modalias, ":")
	return b
}

// ReadDeviceList reads devices from a recorded list: one modalias per line
// ('#' comments allowed), or "PATH MODALIAS" when a line has a path too.
// Devices get the path "recorded/N" when the list has none.
func ReadDeviceList(file string) ([]Device, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("device list: %w", err)
	}
	defer f.Close()
	var devs []Device
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		d := Device{Path: fmt.Sprintf("recorded/%d", n), Modalias: line}
		if p, ma, ok := strings.Cut(line, " "); ok && !strings.Contains(p, ":") {
			d.Path, d.Modalias = p, strings.TrimSpace(ma)
		}
		if !strings.Contains(d.Modalias, ":") {
			return nil, fmt.Errorf("%s:%d: %q is not a modalias (want BUS:...)", file, n, line)
		}
		d.Bus, _, _ = strings.Cut(d.Modalias, ":")
		devs = append(devs, d)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("device list %s: %w", file, err)
	}
	return devs, nil
}
