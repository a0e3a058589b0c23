package mcp

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"
)

// Plan tokens let an agent mutate only what it was shown. A plan tool
// computes what would change from the servers' state and returns it with a
// token: the tool kind, the plan's parameters and its full content, an
// expiry and a nonce, signed with HMAC-SHA256 under a key made at start-up
// and never stored. The apply tool verifies the signature and expiry, spends
// the nonce, recomputes the plan from the same parameters against the
// current state, and refuses when the result differs from the signed
// content (the world changed since the plan).

// tokenBody is what a plan token carries (and signs).
type tokenBody struct {
	Kind    string          `json:"k"`
	Params  json.RawMessage `json:"p"`
	Content json.RawMessage `json:"c"`
	Expires int64           `json:"e"` // unix milliseconds
	Nonce   string          `json:"n"`
}

// planner issues and checks plan tokens.
type planner struct {
	key []byte
	ttl time.Duration
	now func() time.Time

	mu   sync.Mutex
	used map[string]time.Time // spent nonces until their token expires
}

func newPlanner(ttl time.Duration, now func() time.Time) (*planner, error) {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("plan token key: %w", err)
	}
	return &planner{key: key, ttl: ttl, now: now, used: map[string]time.Time{}}, nil
}

func (p *planner) mac(b []byte) []byte {
	h := hmac.New(sha256.New, p.key)
	h.Write(b)
	return h.Sum(nil)
}

// issue signs a plan of kind made from params with the given content.
func (p *planner) issue(kind string, params, content any) (string, time.Time, error) {
	pb, err := json.Marshal(params)
	if err != nil {
		return "", time.Time{}, fmt.Errorf("encode plan parameters: %w", err)
	}
	cb, err := json.Marshal(content)
	if err != nil {
		return "", time.Time{}, fmt.Errorf("encode plan: %w", err)
	}
	nonce := make([]byte, 12)
	if _, err := rand.Read(nonce); err != nil {
		return "", time.Time{}, err
	}
	exp := p.now().Add(p.ttl).Truncate(time.Millisecond)
	body, err := json.Marshal(tokenBody{Kind: kind, Params: pb, Content: cb, Expires: exp.UnixMilli(), Nonce: hex.EncodeToString(nonce)})
	if err != nil {
		return "", time.Time{}, err
	}
	enc := base64.RawURLEncoding
	return enc.EncodeToString(body) + "." + enc.EncodeToString(p.mac(body)), exp, nil
}

// errPlan prefixes every refusal of a plan token, so an agent can tell them
// from the servers' refusals.
var errPlan = errors.New("plan refused")

// open verifies a token for kind; it does not spend it.
func (p *planner) open(kind, token string) (*tokenBody, error) {
	enc := base64.RawURLEncoding
	b64, sig64, ok := strings.Cut(strings.TrimSpace(token), ".")
	body, err1 := enc.DecodeString(b64)
	sig, err2 := enc.DecodeString(sig64)
	if !ok || err1 != nil || err2 != nil || !hmac.Equal(sig, p.mac(body)) {
		return nil, fmt.Errorf("%w: the plan token does not verify (altered, truncated, or issued by another ferry mcp process, whose key died with it): call the plan tool again", errPlan)
	}
	var t tokenBody
	if err := json.Unmarshal(body, &t); err != nil {
		return nil, fmt.Errorf("%w: the plan token's body is unreadable: %v", errPlan, err)
	}
	if t.Kind != kind {
		return nil, fmt.Errorf("%w: the token is a %s plan, not a %s plan: pass it to its own apply tool", errPlan, t.Kind, kind)
	}
	if exp := time.UnixMilli(t.Expires); !p.now().Before(exp) {
		return nil, fmt.Errorf("%w: the plan expired at %s (plans live %s): call the plan tool again and review it", errPlan, exp.UTC().Format(time.RFC3339), p.ttl)
	}
	p.mu.Lock()
	_, spent := p.used[t.Nonce]
	p.mu.Unlock()
	if spent {
		return nil, fmt.Errorf("%w: this plan was already applied once: call the plan tool again", errPlan)
	}
	return &t, nil
}

// spend marks a token's nonce used; false if another apply got there first.
func (p *planner) spend(t *tokenBody) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	for n, exp := range p.used {
		if !now.Before(exp) {
			delete(p.used, n) // expired tokens are refused by open anyway
		}
	}
	if _, ok := p.used[t.Nonce]; ok {
		return false
	}
	p.used[t.Nonce] = time.UnixMilli(t.Expires)
	return true
}

// staleness compares the signed content with a fresh plan and names the
// top-level fields that differ ("" when they are equal).
func staleness(signed json.RawMessage, fresh any) (string, error) {
	fb, err := json.Marshal(fresh)
	if err != nil {
		return "", err
	}
	if bytes.Equal(signed, fb) {
		return "", nil
	}
	var a, b map[string]json.RawMessage
	if json.Unmarshal(signed, &a) != nil || json.Unmarshal(fb, &b) != nil {
		return "the plan's content", nil
	}
	var diffs []string
	for k, av := range a {
		if bv, ok := b[k]; !ok || !bytes.Equal(av, bv) {
			diffs = append(diffs, fmt.Sprintf("%s was %s, now %s", k, clip(av), clip(b[k])))
		}
	}
	for k, bv := range b {
		if _, ok := a[k]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s was absent, now %s", k, clip(bv)))
		}
	}
	sort.Strings(diffs)
	return strings.Join(diffs, "; "), nil
}

func clip(b json.RawMessage) string {
	if len(b) == 0 {
		return "absent"
	}
	if len(b) > 1000 {
		return string(b[:1000]) + "…"
	}
	return string(b)
}
