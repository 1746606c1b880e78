// Package auth makes and checks the server's credentials: administrator API
// tokens (random, stored only as a SHA-256 hash) and node tokens (boot and
// enroll), which are bound to one MAC address, expire, and are signed with
// the server's key so checking one needs no database.
package auth

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// AdminPrefix starts every administrator token, so they are recognisable in
// configuration files and logs.
const AdminPrefix = "esir_"

// nodePrefix starts every node token.
const nodePrefix = "esirn_"

// Errors returned by Verify (wrapped).
var (
	ErrInvalid = errors.New("invalid token")
	ErrExpired = errors.New("token expired")
)

// NewAdminToken returns a fresh administrator token, its ID (a short public
// name for listing and removal) and the hash to store.
func NewAdminToken() (token, id, hash string, err error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", "", "", fmt.Errorf("admin token: %w", err)
	}
	token = AdminPrefix + base64.RawURLEncoding.EncodeToString(b)
	return token, HashToken(token)[:12], HashToken(token), nil
}

// HashToken returns the hex SHA-256 of a token, the form stored.
func HashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// Kind says what a node token may do.
type Kind string

// Node token kinds.
const (
	// Boot tokens go on the netboot kernel command line; the agent uses one
	// for the whole install.
	Boot Kind = "boot"
	// Enroll tokens are written into the installed system for its first boot.
	Enroll Kind = "enroll"
)

// Claims is what a valid node token says.
type Claims struct {
	Kind    Kind
	MAC     string
	Expires time.Time
}

// Signer issues and verifies node tokens with one key.
type Signer struct {
	key []byte
}

// NewKey returns a fresh random signing key.
func NewKey() ([]byte, error) {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return nil, fmt.Errorf("signing key: %w", err)
	}
	return k, nil
}

// NewSigner returns a Signer using key (at least 16 bytes).
func NewSigner(key []byte) (*Signer, error) {
	if len(key) < 16 {
		return nil, fmt.Errorf("signing key: %d bytes, want at least 16", len(key))
	}
	return &Signer{key: append([]byte(nil), key...)}, nil
}

// Issue returns a token of that kind for mac (lower-case, colon form)
// valid until expires. The token contains only characters safe on a kernel
// command line.
func (s *Signer) Issue(kind Kind, mac string, expires time.Time) string {
	payload := string(kind) + "|" + strings.ToLower(mac) + "|" + strconv.FormatInt(expires.Unix(), 10)
	p := base64.RawURLEncoding.EncodeToString([]byte(payload))
	return nodePrefix + p + "." + base64.RawURLEncoding.EncodeToString(s.mac(p))
}

func (s *Signer) mac(p string) []byte {
	h := hmac.New(sha256.New, s.key)
	h.Write([]byte(p))
	return h.Sum(nil)
}

// Verify checks a node token's signature and expiry at now.
func (s *Signer) Verify(token string, now time.Time) (Claims, error) {
	rest, ok := strings.CutPrefix(token, nodePrefix)
	if !ok {
		return Claims{}, fmt.Errorf("%w: not a node token", ErrInvalid)
	}
	p, sig, ok := strings.Cut(rest, ".")
	if !ok {
		return Claims{}, fmt.Errorf("%w: malformed", ErrInvalid)
	}
	got, err := base64.RawURLEncoding.DecodeString(sig)
	if err != nil || subtle.ConstantTimeCompare(got, s.mac(p)) != 1 {
		return Claims{}, fmt.Errorf("%w: bad signature", ErrInvalid)
	}
	raw, err := base64.RawURLEncoding.DecodeString(p)
	if err != nil {
		return Claims{}, fmt.Errorf("%w: malformed", ErrInvalid)
	}
	parts := strings.Split(string(raw), "|")
	if len(parts) != 3 {
		return Claims{}, fmt.Errorf("%w: malformed", ErrInvalid)
	}
	exp, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil {
		return Claims{}, fmt.Errorf("%w: malformed expiry", ErrInvalid)
	}
	c := Claims{Kind: Kind(parts[0]), MAC: parts[1], Expires: time.Unix(exp, 0)}
	if c.Kind != Boot && c.Kind != Enroll {
		return Claims{}, fmt.Errorf("%w: unknown kind %q", ErrInvalid, c.Kind)
	}
	if !now.Before(c.Expires) {
		return Claims{}, fmt.Errorf("%w at %s", ErrExpired, c.Expires.UTC().Format(time.RFC3339))
	}
	return c, nil
}
