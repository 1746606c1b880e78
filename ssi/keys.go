package ssi

import (
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Key sizes: corosync-keygen's default (2048 bits) and the 4096 bytes
// pacemaker's documentation uses for its authkey.
const (
	corosyncKeyLen  = 256
	pacemakerKeyLen = 4096
)

// Keys are the cluster's shared secrets.
type Keys struct {
	Corosync  []byte // /etc/corosync/authkey, core nodes only
	Pacemaker []byte // /etc/pacemaker/authkey, every pacemaker or pacemaker-remote node
	SSH       []byte // root's cluster SSH private key (OpenSSH format), core nodes only (SSHKeyPath)
	SSHPublic string // its authorized_keys line, on every member
}

// LoadKeys reads the secrets kept in dir, generating each missing one once.
// Files are 0600 in a 0700 directory; a secret readable by group or others,
// or of the wrong size, is refused with its file named.
func LoadKeys(dir string) (*Keys, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("cluster secrets: %w", err)
	}
	var k Keys
	var err error
	if k.Corosync, err = loadKey(filepath.Join(dir, "corosync-authkey"), corosyncKeyLen); err != nil {
		return nil, err
	}
	if k.Pacemaker, err = loadKey(filepath.Join(dir, "pacemaker-authkey"), pacemakerKeyLen); err != nil {
		return nil, err
	}
	if k.SSH, k.SSHPublic, err = loadSSHKey(filepath.Join(dir, "ssh-ed25519")); err != nil {
		return nil, err
	}
	return &k, nil
}

func loadKey(path string, n int) ([]byte, error) {
	st, err := os.Stat(path)
	if errors.Is(err, os.ErrNotExist) {
		key := make([]byte, n)
		if _, err := rand.Read(key); err != nil {
			return nil, fmt.Errorf("cluster secret %s: %w", path, err)
		}
		if err := writeAtomic(path, key, 0o600); err != nil {
			return nil, fmt.Errorf("cluster secret: %w", err)
		}
		return key, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cluster secret: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("cluster secret %s: mode %v lets others read it; want 0600", path, st.Mode().Perm())
	}
	key, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cluster secret: %w", err)
	}
	if len(key) != n {
		return nil, fmt.Errorf("cluster secret %s: %d bytes, want %d", path, len(key), n)
	}
	return key, nil
}
