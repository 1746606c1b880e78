package enroll

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/esir-project/esir/ssi"
)

// authorizedKeys is root's authorized_keys file on the node.
const authorizedKeys = "/root/.ssh/authorized_keys"

// sshDir makes root's .ssh directory (0700) when b's files or key need
// it; called before the files are written.
func (n *Node) sshDir(b *ssi.Bundle) error {
	need := b.SSHAuthorizedKey != "" || slices.ContainsFunc(b.Files, func(f ssi.File) bool { return strings.HasPrefix(f.Path, "/root/.ssh/") })
	if !need {
		return nil
	}
	if err := os.MkdirAll(filepath.Join(n.Root, "root/.ssh"), 0o700); err != nil {
		return fmt.Errorf("root's .ssh: %w", err)
	}
	return nil
}

// installSSH keeps the cluster's SSH key in root's authorized_keys: the line
// ending with ssi.SSHKeyMark is replaced with b's (added when missing,
// removed when b has none); the administrator's lines stay as they are. A
// core node that b no longer gives the private key and ssh configuration
// (made remote, clustershell switched off) loses them.
func (n *Node) installSSH(b *ssi.Bundle) error {
	for _, p := range []string{ssi.SSHKeyPath, ssi.SSHConfigPath} {
		if slices.ContainsFunc(b.Files, func(f ssi.File) bool { return f.Path == p }) {
			continue
		}
		if err := os.Remove(filepath.Join(n.Root, p)); err == nil {
			n.logger().Info("removed the cluster's SSH key file: the node's bundle no longer has it", "node", b.Member.Name, "file", p)
		} else if !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s, no longer in the bundle: %w", p, err)
		}
	}
	path := filepath.Join(n.Root, authorizedKeys)
	old, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist) && b.SSHAuthorizedKey == "":
		return nil
	case err != nil && !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("%s: %w", authorizedKeys, err)
	}
	var w bytes.Buffer
	for l := range strings.Lines(string(old)) {
		if f := strings.Fields(l); len(f) > 0 && f[len(f)-1] == ssi.SSHKeyMark {
			continue
		}
		w.WriteString(strings.TrimSuffix(l, "\n") + "\n")
	}
	if b.SSHAuthorizedKey != "" {
		w.WriteString(b.SSHAuthorizedKey + "\n")
	}
	if bytes.Equal(w.Bytes(), old) {
		return nil
	}
	if err := n.writeFile(ssi.File{Path: authorizedKeys, Mode: 0o600, Data: w.Bytes()}); err != nil {
		return fmt.Errorf("root's authorized_keys: %w", err)
	}
	return nil
}
