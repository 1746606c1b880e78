package auth

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestNodeTokens(t *testing.T) {
	key, err := NewKey()
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewSigner(key)
	if err != nil {
		t.Fatal(err)
	}
	other, _ := NewSigner([]byte("another key of 32 bytes........."))
	now := time.Unix(1_800_000_000, 0)
	tok := s.Issue(Boot, "02:00:00:00:00:01", now.Add(time.Hour))
	if strings.ContainsAny(tok, " \t\"'") {
		t.Fatalf("token %q is not command-line safe", tok)
	}
	tampered := []byte(tok)
	tampered[len(nodePrefix)+3] ^= 1
	tests := []struct {
		name  string
		tok   string
		s     *Signer
		at    time.Time
		want  error
		claim Claims
	}{
		{"valid", tok, s, now, nil, Claims{Boot, "02:00:00:00:00:01", now.Add(time.Hour)}},
		{"enroll", s.Issue(Enroll, "02:00:00:00:00:02", now.Add(time.Minute)), s, now, nil, Claims{Enroll, "02:00:00:00:00:02", now.Add(time.Minute)}},
		{"expired", tok, s, now.Add(time.Hour), ErrExpired, Claims{}},
		{"other key", tok, other, now, ErrInvalid, Claims{}},
		{"tampered", string(tampered), s, now, ErrInvalid, Claims{}},
		{"admin token", "esir_abc", s, now, ErrInvalid, Claims{}},
		{"garbage", nodePrefix + "x.y", s, now, ErrInvalid, Claims{}},
		{"empty", "", s, now, ErrInvalid, Claims{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := tt.s.Verify(tt.tok, tt.at)
			if tt.want != nil {
				if !errors.Is(err, tt.want) {
					t.Fatalf("err = %v, want %v", err, tt.want)
				}
				return
			}
			if err != nil || c.Kind != tt.claim.Kind || c.MAC != tt.claim.MAC || !c.Expires.Equal(tt.claim.Expires) {
				t.Fatalf("claims %+v, %v; want %+v", c, err, tt.claim)
			}
		})
	}
	if _, err := NewSigner([]byte("short")); err == nil {
		t.Fatal("short key accepted")
	}
}

func TestAdminTokens(t *testing.T) {
	a, id, hash, err := NewAdminToken()
	if err != nil {
		t.Fatal(err)
	}
	b, _, _, _ := NewAdminToken()
	if a == b || !strings.HasPrefix(a, AdminPrefix) || len(a) < 40 {
		t.Fatalf("tokens %q %q", a, b)
	}
	if HashToken(a) != hash || strings.Contains(hash, a) || len(id) != 12 || !strings.HasPrefix(hash, id) {
		t.Fatalf("hash %q id %q", hash, id)
	}
}
