package enroll

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/esir-project/esir/ssi"
)

// sysctlRecord lists, under the node's root, the kernel settings ESIR
// changed: one line per key, "file<TAB>key<TAB>value before ESIR set it".
// When a bundle no longer has the file (a real server that carries no VIP
// any more), restoreSysctls sets the key back and removes the file.
const sysctlRecord = "var/lib/esir/ssi/sysctl"

// sysctlSaved is one line of the record.
type sysctlSaved struct {
	File, Key, Value string
}

// applySysctls sets the kernel parameters of b's /etc/sysctl.d files
// ("key = value" lines) with sysctl -w, recording first the value each key
// had before ESIR set it.
func (n *Node) applySysctls(ctx context.Context, b *ssi.Bundle) error {
	saved, err := n.readSysctlRecord()
	if err != nil {
		return err
	}
	for _, f := range b.Files {
		kvs, err := sysctlLines(f)
		if err != nil {
			return err
		}
		for _, kv := range kvs {
			k, v := kv[0], kv[1]
			if !slices.ContainsFunc(saved, func(s sysctlSaved) bool { return s.Key == k }) {
				out, err := n.Run.Run(ctx, "sysctl", "-n", k)
				old := strings.Join(strings.Fields(string(out)), " ")
				if err != nil || old == "" {
					return fmt.Errorf("%s: read %s before setting it: %v: %s", f.Path, k, err, bytes.TrimSpace(out))
				}
				saved = append(saved, sysctlSaved{File: f.Path, Key: k, Value: old})
				if err := n.writeSysctlRecord(saved); err != nil {
					return err
				}
			}
			if out, err := n.Run.Run(ctx, "sysctl", "-w", k+"="+v); err != nil {
				return fmt.Errorf("%s: sysctl -w %s=%s: %w: %s", f.Path, k, v, err, bytes.TrimSpace(out))
			}
		}
	}
	return nil
}

// restoreSysctls sets back the keys ESIR changed for a sysctl.d file b no
// longer has (unless another of b's files sets the key), and removes that
// file, so that the next boot does not apply it either.
func (n *Node) restoreSysctls(ctx context.Context, b *ssi.Bundle) error {
	saved, err := n.readSysctlRecord()
	if err != nil || len(saved) == 0 {
		return err
	}
	setBy := map[string]string{} // key -> b's file that sets it
	for _, f := range b.Files {
		kvs, err := sysctlLines(f)
		if err != nil {
			return err
		}
		for _, kv := range kvs {
			setBy[kv[0]] = f.Path
		}
	}
	var keep, gone []sysctlSaved
	var stale []string // ESIR's files b no longer has
	for _, s := range saved {
		if !slices.ContainsFunc(b.Files, func(f ssi.File) bool { return f.Path == s.File }) && !slices.Contains(stale, s.File) {
			stale = append(stale, s.File)
		}
		if f, ok := setBy[s.Key]; ok {
			s.File = f // the value before ESIR stays on record
			keep = append(keep, s)
			continue
		}
		gone = append(gone, s)
	}
	for i, s := range gone {
		n.logger().Info("restoring a kernel setting the node's bundle no longer needs",
			"node", b.Member.Name, "key", s.Key, "value", s.Value, "file", s.File)
		if out, err := n.Run.Run(ctx, "sysctl", "-w", s.Key+"="+s.Value); err != nil {
			// What is restored already is off the record: a later round
			// must not set it again over an administrator's change.
			return errors.Join(fmt.Errorf("restore %s (set by %s): sysctl -w %s=%s: %w: %s", s.Key, s.File, s.Key, s.Value, err, bytes.TrimSpace(out)),
				n.writeSysctlRecord(append(keep, gone[i:]...)))
		}
	}
	for _, f := range stale {
		if err := os.Remove(filepath.Join(n.Root, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return errors.Join(fmt.Errorf("remove %s, no longer in the bundle: %w", f, err), n.writeSysctlRecord(keep))
		}
	}
	return n.writeSysctlRecord(keep)
}

// sysctlLines returns the key/value pairs of f when it is an
// /etc/sysctl.d file ("key = value" lines; # and ; start comments).
func sysctlLines(f ssi.File) ([][2]string, error) {
	if !strings.HasPrefix(f.Path, "/etc/sysctl.d/") {
		return nil, nil
	}
	var kvs [][2]string
	for l := range strings.Lines(string(f.Data)) {
		l = strings.TrimSpace(l)
		if l == "" || l[0] == '#' || l[0] == ';' {
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			return nil, fmt.Errorf("%s: not a key = value line: %q", f.Path, l)
		}
		kvs = append(kvs, [2]string{strings.TrimSpace(k), strings.TrimSpace(v)})
	}
	return kvs, nil
}

func (n *Node) readSysctlRecord() ([]sysctlSaved, error) {
	path := filepath.Join(n.Root, sysctlRecord)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("kernel settings ESIR changed: %w", err)
	}
	var saved []sysctlSaved
	for l := range strings.Lines(string(data)) {
		f := strings.SplitN(strings.TrimSuffix(l, "\n"), "\t", 3)
		if len(f) != 3 {
			return nil, fmt.Errorf("kernel settings ESIR changed: %s: bad line %q", path, l)
		}
		saved = append(saved, sysctlSaved{File: f[0], Key: f[1], Value: f[2]})
	}
	return saved, nil
}

func (n *Node) writeSysctlRecord(saved []sysctlSaved) error {
	path := filepath.Join(n.Root, sysctlRecord)
	if len(saved) == 0 {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("kernel settings ESIR changed: %w", err)
		}
		return nil
	}
	var w strings.Builder
	for _, s := range saved {
		fmt.Fprintf(&w, "%s\t%s\t%s\n", s.File, s.Key, s.Value)
	}
	if err := writeRecord(path, []byte(w.String())); err != nil {
		return fmt.Errorf("kernel settings ESIR changed: %w", err)
	}
	return nil
}

// writeRecord replaces one of ESIR's records under the node's root.
func writeRecord(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
