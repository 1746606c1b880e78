package lab

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/esir-project/esir/server/cluster"
	"github.com/esir-project/esir/ssi"
	"golang.org/x/crypto/ssh"
)

// The lab administrator's SSH key: the server's authorized_keys_file gives
// its public half to root on every node it installs, so the lab logs in to
// a node the way an administrator would. It is not the cluster's key (that
// one stays on the core nodes); Down removes it with the lab.
const (
	adminKeyFile    = "admin-ssh-key"
	adminPubKeyFile = "admin-ssh-key.pub"
	adminKeyComment = "esir-lab-admin"
)

// AdminKey is the path of the lab administrator's SSH private key.
func (st *State) AdminKey() string { return filepath.Join(st.Dir, adminKeyFile) }

// adminPubKey is the authorized_keys file the server hands out.
func (st *State) adminPubKey() string { return filepath.Join(st.Dir, adminPubKeyFile) }

// writeAdminKey makes the lab administrator's ed25519 key (private 0600,
// public as an authorized_keys line).
func (st *State) writeAdminKey() error {
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return fmt.Errorf("lab: administrator SSH key: %w", err)
	}
	block, err := ssh.MarshalPrivateKey(key, adminKeyComment)
	if err != nil {
		return fmt.Errorf("lab: administrator SSH key: %w", err)
	}
	if err := writeAtomic(st.AdminKey(), pem.EncodeToMemory(block), 0o600); err != nil {
		return fmt.Errorf("lab: administrator SSH key: %w", err)
	}
	signer, err := ssh.NewSignerFromKey(key)
	if err != nil {
		return fmt.Errorf("lab: administrator SSH key: %w", err)
	}
	line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(signer.PublicKey()))) + " " + adminKeyComment + "\n"
	if err := writeAtomic(st.adminPubKey(), []byte(line), 0o644); err != nil {
		return fmt.Errorf("lab: administrator SSH key: %w", err)
	}
	return nil
}

// ClushCheck is the outcome of Clush.
type ClushCheck struct {
	From    string `json:"from"`    // the core node clush ran on
	Command string `json:"command"` // what ran there
	// Answers is each node's answer (its host name), by the node clush
	// names in front of it.
	Answers map[string]string `json:"answers"`
	// HostKeys are the nodes' ed25519 host key fingerprints as the lab's
	// own SSH client saw them (different on every node: each made its own
	// at first boot).
	HostKeys map[string]string `json:"host_keys"`
	// Stderr is clush's error output (ssh's first-contact warnings among
	// it).
	Stderr string        `json:"stderr,omitempty"`
	Took   time.Duration `json:"took"`
}

// Clush checks clustershell the way an administrator uses it: the lab logs
// in to the first core node by name (not by member ID, which follows the
// order the nodes happened to enroll in) over SSH with the administrator's key (from
// the switch namespace) and runs clush on the cluster's group all there;
// clush reaches every member, itself included, over SSH with the cluster
// key ESIR installed on the core nodes. It fails, naming the nodes, unless
// every member answers with its own host name. It also records every
// member's host key and fails when two members share one (host keys must
// be made at each node's first boot, not copied from the image).
func (st *State) Clush(ctx context.Context, s *cluster.Snapshot, timeout time.Duration) (*ClushCheck, error) {
	if st.Cluster == "" || s == nil {
		return nil, errors.New("lab: this lab has no SSI cluster")
	}
	members := slices.SortedFunc(slices.Values(s.Members), func(a, b cluster.Member) int { return strings.Compare(a.Name, b.Name) })
	from := slices.IndexFunc(members, func(m cluster.Member) bool { return m.Role == ssi.Core })
	if from < 0 {
		return nil, fmt.Errorf("lab: cluster %s has no core member to run clush from", st.Cluster)
	}
	signer, err := st.adminSigner()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	chk := &ClushCheck{From: members[from].Name, Command: ClushCommand(st.Cluster), HostKeys: map[string]string{}}
	for _, m := range members {
		fp, err := st.hostKey(ctx, m, signer)
		if err != nil {
			return chk, err
		}
		chk.HostKeys[m.Name] = fp
	}
	seen := map[string]string{}
	for _, m := range members {
		if other, ok := seen[chk.HostKeys[m.Name]]; ok {
			return chk, fmt.Errorf("lab: %s and %s have the same SSH host key %s: host keys were not made at first boot", other, m.Name, chk.HostKeys[m.Name])
		}
		seen[chk.HostKeys[m.Name]] = m.Name
	}
	c, err := st.sshClient(ctx, members[from], signer, nil)
	if err != nil {
		return chk, err
	}
	defer c.Close()
	sess, err := c.NewSession()
	if err != nil {
		return chk, fmt.Errorf("lab: ssh session on %s: %w", chk.From, err)
	}
	defer sess.Close()
	var stdout, stderr bytes.Buffer
	sess.Stdout, sess.Stderr = &stdout, &stderr
	done := make(chan error, 1)
	go func() { done <- sess.Run(chk.Command) }()
	select {
	case err = <-done:
	case <-ctx.Done():
		c.Close()
		err = ctx.Err()
	}
	chk.Took = time.Since(start)
	chk.Stderr = clushStderr(stderr.String())
	chk.Answers = ParseClush(stdout.String())
	var names []string
	for _, m := range members {
		names = append(names, m.Name)
	}
	if missing := clushMissing(chk.Answers, names); len(missing) > 0 || err != nil {
		return chk, fmt.Errorf("lab: clush on %s (%s): no answer from %s: %v; clush's output:\n%s",
			chk.From, chk.Command, strings.Join(missing, ", "), err, strings.TrimSpace(stdout.String()+"\n"+chk.Stderr))
	}
	return chk, nil
}

// ClushCommand is what Clush runs on the core node: hostname on every
// member of group all of the cluster's group source (ESIR's
// /etc/clustershell/groups.d/esir.yaml names the source after the
// cluster; Debian's groups.conf makes "local" the default source), lines
// prefixed by node (-L), clush's exit code the largest of the nodes' (-S).
func ClushCommand(clusterName string) string {
	return "clush -L -S -t 30 -u 60 -s " + clusterName + " -g all hostname"
}

// ParseClush reads clush -L output ("NODE: LINE" a line) into each node's
// answer (its lines joined by newlines).
func ParseClush(out string) map[string]string {
	answers := map[string]string{}
	for l := range strings.Lines(out) {
		node, text, ok := strings.Cut(strings.TrimRight(l, "\r\n"), ": ")
		if !ok || node == "" || strings.ContainsAny(node, " \t") {
			continue
		}
		if a, ok := answers[node]; ok {
			answers[node] = a + "\n" + text
		} else {
			answers[node] = text
		}
	}
	return answers
}

// clushProgress is clush's progress indicator ("clush: 2/3", redrawn with
// carriage returns or spaces), which it writes to stderr among the nodes'
// messages.
var clushProgress = regexp.MustCompile(`clush: \d+/\d+\s*`)

// clushStderr is clush's error output without its progress indicator.
func clushStderr(s string) string {
	var lines []string
	for l := range strings.Lines(clushProgress.ReplaceAllString(s, "")) {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "\n")
}

// clushMissing lists the nodes (in order) without an answer that is their
// own host name.
func clushMissing(answers map[string]string, nodes []string) []string {
	var missing []string
	for _, n := range nodes {
		if strings.TrimSpace(answers[n]) != n {
			missing = append(missing, n)
		}
	}
	return missing
}

func (st *State) adminSigner() (ssh.Signer, error) {
	b, err := os.ReadFile(st.AdminKey())
	if err != nil {
		return nil, fmt.Errorf("lab: administrator SSH key (made by lab up): %w", err)
	}
	signer, err := ssh.ParsePrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("lab: administrator SSH key %s: %w", st.AdminKey(), err)
	}
	return signer, nil
}

// hostKey logs in to m and returns the SHA-256 fingerprint of its host key.
func (st *State) hostKey(ctx context.Context, m cluster.Member, signer ssh.Signer) (string, error) {
	var fp string
	c, err := st.sshClient(ctx, m, signer, func(key ssh.PublicKey) { fp = ssh.FingerprintSHA256(key) })
	if err != nil {
		return "", err
	}
	c.Close()
	return fp, nil
}

// sshClient logs in to member m as root with the administrator's key from
// the switch namespace, trying again until ctx ends while sshd is not up
// yet (the node makes its host keys at first boot, before sshd starts).
// Any host key is accepted (seen, when not nil, receives it): the lab
// cannot know a key the node made itself, and the network is the lab's.
func (st *State) sshClient(ctx context.Context, m cluster.Member, signer ssh.Signer, seen func(ssh.PublicKey)) (*ssh.Client, error) {
	addr := net.JoinHostPort(m.Addr.String(), "22")
	cfg := &ssh.ClientConfig{
		User: "root",
		Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: func(_ string, _ net.Addr, key ssh.PublicKey) error {
			if seen != nil {
				seen(key)
			}
			return nil
		},
		HostKeyAlgorithms: []string{ssh.KeyAlgoED25519},
		Timeout:           20 * time.Second,
	}
	for {
		c, err := st.dialSSH(ctx, addr, cfg)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("lab: ssh root@%s (%s) with the administrator's key: %w (last error: %v)", m.Name, addr, ctx.Err(), err)
		case <-time.After(3 * time.Second):
		}
	}
}

func (st *State) dialSSH(ctx context.Context, addr string, cfg *ssh.ClientConfig) (*ssh.Client, error) {
	dctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	conn, err := DialNS(dctx, st.Switch, addr)
	if err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(cfg.Timeout))
	cc, chans, reqs, err := ssh.NewClientConn(conn, addr, cfg)
	if err != nil {
		conn.Close()
		return nil, err
	}
	_ = conn.SetDeadline(time.Time{})
	return ssh.NewClient(cc, chans, reqs), nil
}
