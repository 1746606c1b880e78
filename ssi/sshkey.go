package ssi

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"golang.org/x/crypto/ssh"
)

// The cluster's SSH key, for clustershell: the private key is root's on the
// core nodes (the ones an administrator runs clush from), the public key is
// in root's authorized_keys on every member. Remote nodes do not get the
// private key: one of them broken into must not open every other node.
const (
	// SSHKeyPath is where a core node keeps the cluster's private key.
	SSHKeyPath = "/root/.ssh/id_ed25519_esir"
	// SSHConfigPath is the ssh client configuration that makes root use
	// the key towards the cluster's members.
	SSHConfigPath = "/etc/ssh/ssh_config.d/esir-cluster.conf"
	// SSHKeyMark is the comment that ends ESIR's line in a member's
	// /root/.ssh/authorized_keys: the node replaces or removes that line
	// alone and keeps the administrator's.
	SSHKeyMark = "esir-ssi-cluster-key"
)

// loadSSHKey reads the cluster's SSH private key (OpenSSH format) from
// path, generating an ed25519 key once when it is missing, and returns it
// with its public key as an authorized_keys line (ending with SSHKeyMark).
// Like the other secrets it is 0600, and refused with its file named when
// group or others may read it.
func loadSSHKey(path string) (priv []byte, public string, err error) {
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, "", fmt.Errorf("cluster SSH key %s: %w", path, err)
		}
		block, err := ssh.MarshalPrivateKey(key, SSHKeyMark)
		if err != nil {
			return nil, "", fmt.Errorf("cluster SSH key %s: %w", path, err)
		}
		priv = pem.EncodeToMemory(block)
		if err := writeAtomic(path, priv, 0o600); err != nil {
			return nil, "", fmt.Errorf("cluster SSH key: %w", err)
		}
	case err != nil:
		return nil, "", fmt.Errorf("cluster SSH key: %w", err)
	case st.Mode().Perm()&0o077 != 0:
		return nil, "", fmt.Errorf("cluster SSH key %s: mode %v lets others read it; want 0600", path, st.Mode().Perm())
	default:
		if priv, err = os.ReadFile(path); err != nil {
			return nil, "", fmt.Errorf("cluster SSH key: %w", err)
		}
	}
	signer, err := ssh.ParsePrivateKey(priv)
	if err != nil {
		return nil, "", fmt.Errorf("cluster SSH key %s: %w", path, err)
	}
	if t := signer.PublicKey().Type(); t != ssh.KeyAlgoED25519 {
		return nil, "", fmt.Errorf("cluster SSH key %s: a %s key, want %s", path, t, ssh.KeyAlgoED25519)
	}
	line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(signer.PublicKey())))
	return priv, line + " " + SSHKeyMark, nil
}

// addSSH gives member m the cluster's SSH public key for root's
// authorized_keys and, on a core node, the private key and the ssh client
// configuration clush uses: root logs in to the members, by name or
// address, with the key. Member names are mapped to their addresses (Host
// NAME, HostName ADDR): a cluster need not have DNS for them (the lab has
// none, and the installer's /etc/hosts names only the node itself). Their
// host keys are made at each member's first boot (the installer removes
// the image's), so ESIR has none to hand out:
// towards the members alone, ssh accepts the first host key a member shows
// and keeps it in root's known_hosts (StrictHostKeyChecking accept-new); a
// key that changes later (a reinstalled member) is refused as usual, until
// the administrator removes the old one (ssh-keygen -R ADDRESS: with the
// names mapped, known_hosts keeps each member's key under its address,
// whether clush named it or gave its address). Towards the
// members, ssh offers root's agent's keys and the cluster key, not root's
// default key files (naming one IdentityFile drops those, and naming them
// too would make ssh warn on every clush line where they do not exist).
func (b *Bundle) addSSH(c *Cluster, s *State, m Member, keys *Keys) error {
	if len(keys.SSH) == 0 || keys.SSHPublic == "" {
		return fmt.Errorf("render %s: profile.clustershell needs the cluster's SSH key (LoadKeys makes it)", m.Name)
	}
	b.SSHAuthorizedKey = keys.SSHPublic
	if m.Role != Core {
		return nil
	}
	b.add(SSHKeyPath, 0o600, keys.SSH)
	var hosts []string
	var names strings.Builder
	for _, o := range slices.SortedFunc(slices.Values(s.Members), func(a, b Member) int { return a.ID - b.ID }) {
		hosts = append(hosts, o.Name, o.Addr.String())
		fmt.Fprintf(&names, "Host %s\n\tHostName %s\n", o.Name, o.Addr)
	}
	b.add(SSHConfigPath, 0o644, fmt.Appendf(nil, "# Written by ESIR for cluster %s, nodelist version %d. Do not edit.\n"+
		"# Member names need no DNS: each is its address.\n%s"+
		"# root logs in to the cluster's members (clush) with the cluster key. Member host\n"+
		"# keys are made at their first boot: the first one each shows is accepted and\n"+
		"# kept in known_hosts; a changed one is refused (ssh-keygen -R ADDRESS after a reinstall).\n"+
		"Match localuser root originalhost %s\n"+
		"\tIdentityFile %s\n\tStrictHostKeyChecking accept-new\n",
		c.Name, s.Version, names.String(), strings.Join(hosts, ","), SSHKeyPath))
	return nil
}
