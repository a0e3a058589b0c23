package fsm

import (
	"fmt"
	"math/big"
	"sort"
	"strings"
	"time"
)

// RevokedCert is one entry of the certificate deny list.
type RevokedCert struct {
	Serial  string    `json:"serial"`
	Reason  string    `json:"reason,omitempty"`
	By      Identity  `json:"by"`
	Revoked time.Time `json:"revoked"`
}

// maxRevokeReason bounds the free-text reason kept in the log.
const maxRevokeReason = 256

// NormalizeSerial turns a certificate serial as people write it (hex with
// or without colons or a 0x prefix, any case) into the deny list's key:
// lowercase hex without leading zeros. X.509 serials are at most 20 bytes.
func NormalizeSerial(s string) (string, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	t = strings.TrimPrefix(t, "0x")
	t = strings.ReplaceAll(t, ":", "")
	n, ok := new(big.Int).SetString(t, 16)
	if !ok || t == "" || n.Sign() <= 0 || n.BitLen() > 160 {
		return "", fmt.Errorf("certificate serial %q is not a positive hex number of at most 20 bytes (as `ferry tls sign` prints it)", s)
	}
	return n.Text(16), nil
}

// SerialKey is the deny list's key for a certificate's serial number.
func SerialKey(n *big.Int) string {
	if n == nil {
		return ""
	}
	return n.Text(16)
}

func (s *Store) applyRevokeCert(c *RevokeCertCmd) *Result {
	if c.Actor.Kind != KindOperator {
		return forbidden(c.Actor, "revoke a certificate (operators only)")
	}
	serial, err := NormalizeSerial(c.Serial)
	if err != nil || serial != c.Serial {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "serial %q is not a normalized certificate serial", c.Serial)}
	}
	if len(c.Reason) > maxRevokeReason {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "revocation reason is %d bytes, at most %d", len(c.Reason), maxRevokeReason)}
	}
	if s.d.Revoked == nil {
		s.d.Revoked = map[string]*RevokedCert{}
	}
	if _, ok := s.d.Revoked[serial]; ok {
		return &Result{Duplicate: true} // revoking twice keeps the first record
	}
	s.d.Revoked[serial] = &RevokedCert{Serial: serial, Reason: c.Reason, By: c.Actor, Revoked: c.Now}
	return &Result{}
}

// Revoked reports whether a certificate serial (SerialKey form) is on the
// deny list.
func (s *Store) Revoked(serial string) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	_, ok := s.d.Revoked[serial]
	return ok
}

// RevokedCerts lists the deny list, by serial.
func (s *Store) RevokedCerts() []RevokedCert {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]RevokedCert, 0, len(s.d.Revoked))
	for _, r := range s.d.Revoked {
		out = append(out, *r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Serial < out[j].Serial })
	return out
}
