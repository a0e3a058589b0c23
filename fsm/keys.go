package fsm

import (
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"sort"
)

// Sealed volume keys. The store never holds a plaintext volume key: only
// HPKE envelopes sealed on a worker (or on an operator's machine) to a
// recipient's public key. The store checks who may put which envelope and
// that it names the recipient's registered key; it cannot open any of them.

// The one HPKE suite this build seals with (RFC 9180 IDs): ML-KEM-768 +
// X25519 hybrid KEM, HKDF-SHA256, AES-256-GCM. Every key and envelope
// carries its three IDs so a later suite can be added beside it.
const (
	SuiteKEM  uint16 = 0x647a
	SuiteKDF  uint16 = 0x0001
	SuiteAEAD uint16 = 0x0002
)

// Size caps on sealed material: an X-Wing public key is 1216 bytes and an
// envelope of a 64-byte passphrase about 1200.
const (
	maxPublicKeyBytes = 2048
	maxEnvelopeBytes  = 4096
	// RecoveryRecipient is the recipient name of recovery envelopes.
	RecoveryRecipient = "recovery"
	// CodeNoRecoveryKey refuses sealing before `ferry keys recovery-init`.
	CodeNoRecoveryKey = "no_recovery_key"
)

// Purpose says why an envelope exists; it is bound into the envelope.
type Purpose string

const (
	PurposeOwner     Purpose = "owner"     // to the worker holding the volume
	PurposeRecovery  Purpose = "recovery"  // to the offline recovery key
	PurposeMigration Purpose = "migration" // to a migration's target, while it runs
)

// PublicKey is an HPKE public key and its suite.
type PublicKey struct {
	KEM         uint16 `json:"kem"`
	KDF         uint16 `json:"kdf"`
	AEAD        uint16 `json:"aead"`
	Key         []byte `json:"key"`
	Fingerprint string `json:"fingerprint"` // KeyFingerprint(Key)
}

// KeyFingerprint names a public key: hex SHA-256 of its bytes.
func KeyFingerprint(pub []byte) string {
	h := sha256.Sum256(pub)
	return hex.EncodeToString(h[:])
}

func (k *PublicKey) validate() string {
	switch {
	case k == nil:
		return "no public key"
	case k.KEM != SuiteKEM || k.KDF != SuiteKDF || k.AEAD != SuiteAEAD:
		return "unsupported HPKE suite (this build seals with MLKEM768X25519, HKDF-SHA256, AES-256-GCM)"
	case len(k.Key) == 0 || len(k.Key) > maxPublicKeyBytes:
		return "public key must be 1..2048 bytes"
	case k.Fingerprint != KeyFingerprint(k.Key):
		return "public key fingerprint does not match its bytes"
	}
	return ""
}

func (k *PublicKey) clone() *PublicKey {
	if k == nil {
		return nil
	}
	c := *k
	c.Key = slices.Clone(k.Key)
	return &c
}

// Envelope is a volume key sealed to one recipient. Everything but
// Ciphertext, SealedBy and SealedAt is bound into the HPKE info, so a
// changed field fails to open.
type Envelope struct {
	Volume      string  `json:"volume"`
	Epoch       uint64  `json:"epoch"` // the key's generation; 1 for a volume's first key
	Purpose     Purpose `json:"purpose"`
	Recipient   string  `json:"recipient"`   // worker name, or RecoveryRecipient
	Fingerprint string  `json:"fingerprint"` // of the recipient's public key
	Migration   string  `json:"migration,omitempty"`
	KEM         uint16  `json:"kem"`
	KDF         uint16  `json:"kdf"`
	AEAD        uint16  `json:"aead"`
	Ciphertext  []byte  `json:"ciphertext"` // HPKE enc || ct
	SealedBy    string  `json:"sealed_by,omitempty"`
	SealedAt    string  `json:"sealed_at,omitempty"`
}

func (e *Envelope) clone() Envelope {
	c := *e
	c.Ciphertext = slices.Clone(e.Ciphertext)
	return c
}

// envelopeKey is where an envelope lives in the store.
func envelopeKey(volume string, p Purpose, migration string) string {
	if p == PurposeMigration {
		return volume + "/" + string(p) + "/" + migration
	}
	return volume + "/" + string(p)
}

// SetWorkerKeyCmd registers a worker's key-encryption public key. Only the
// worker itself may: the actor comes from its certificate.
type SetWorkerKeyCmd struct {
	Header
	Name string    `json:"name"`
	Key  PublicKey `json:"key"`
}

// SetRecoveryKeyCmd stores the cluster's offline recovery public key.
type SetRecoveryKeyCmd struct {
	Header
	Key PublicKey `json:"key"`
}

// PutEnvelopesCmd stores envelopes of one volume's key.
type PutEnvelopesCmd struct {
	Header
	Volume    string     `json:"volume"`
	Envelopes []Envelope `json:"envelopes"`
}

func (s *Store) applySetWorkerKey(c *SetWorkerKeyCmd) *Result {
	if c.Actor.Kind != KindWorker || c.Actor.Name != c.Name {
		return forbidden(c.Actor, "register the key of worker "+c.Name+" (only that worker may)")
	}
	w, ok := s.d.Workers[c.Name]
	if !ok {
		return &Result{Refusal: notFound("worker", c.Name)}
	}
	if msg := c.Key.validate(); msg != "" {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "worker %s key: %s", c.Name, msg)}
	}
	if w.KEK != nil && w.KEK.Fingerprint != c.Key.Fingerprint {
		s.log.Warn().Str("worker", c.Name).Str("old", w.KEK.Fingerprint).Str("new", c.Key.Fingerprint).
			Msg("worker replaced its key-encryption key; its volumes need `ferry volume recover`")
	}
	w.KEK = c.Key.clone()
	cp := *w
	return &Result{Worker: &cp}
}

func (s *Store) applySetRecoveryKey(c *SetRecoveryKeyCmd) *Result {
	if c.Actor.Kind != KindOperator {
		return forbidden(c.Actor, "set the recovery key (only operators may)")
	}
	if msg := c.Key.validate(); msg != "" {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "recovery key: %s", msg)}
	}
	if old := s.d.RecoveryKey; old != nil && old.Fingerprint != c.Key.Fingerprint {
		return &Result{Refusal: refuse(RefuseConflict, CodeConflict,
			"a recovery key (%s) is already set; every recovery envelope is sealed to it, so it is never replaced", old.Fingerprint)}
	}
	s.d.RecoveryKey = c.Key.clone()
	return &Result{}
}

// applyPutEnvelopes checks every envelope before storing any. Owner and
// recovery envelopes come from the volume's worker (or an operator
// recovering it); an owner envelope needs a recovery envelope beside it or
// already stored. A migration envelope comes from the migration's source,
// names its target's key, and only while the source exports.
func (s *Store) applyPutEnvelopes(c *PutEnvelopesCmd) *Result {
	v, ok := s.d.Volumes[c.Volume]
	if !ok {
		return &Result{Refusal: notFound("volume", c.Volume)}
	}
	if v.State == VolDestroyed || v.State == VolPendingDelete {
		return &Result{Refusal: refuse(RefuseConflict, CodeWrongState, "volume %s is %s: it takes no envelopes", v.ID, v.State)}
	}
	if len(c.Envelopes) == 0 || len(c.Envelopes) > 3 {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "put 1..3 envelopes at a time")}
	}
	isOwner := c.Actor.Kind == KindWorker && c.Actor.Name == v.Worker
	// The worker making a remote fork's copy formats it under a key it
	// makes, so it seals that key to the fork's worker (and the recovery
	// key) until the copy is published; never after.
	if v.makingForkKey() && c.Actor.Kind == KindWorker && c.Actor.Name == v.ForkFrom {
		isOwner = true
	}
	seen := map[string]bool{}
	hasRecovery := false
	for i := range c.Envelopes {
		e := &c.Envelopes[i]
		if e.Volume != v.ID {
			return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "envelope %d is for volume %q, not %s", i, e.Volume, v.ID)}
		}
		if e.Epoch == 0 || e.KEM != SuiteKEM || e.KDF != SuiteKDF || e.AEAD != SuiteAEAD ||
			len(e.Ciphertext) == 0 || len(e.Ciphertext) > maxEnvelopeBytes {
			return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "envelope %d: needs an epoch >= 1, this build's HPKE suite and 1..4096 bytes of ciphertext", i)}
		}
		k := envelopeKey(v.ID, e.Purpose, e.Migration)
		if seen[k] {
			return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "two %s envelopes for volume %s", e.Purpose, v.ID)}
		}
		seen[k] = true
		var want *PublicKey
		switch e.Purpose {
		case PurposeOwner:
			if !isOwner && c.Actor.Kind != KindOperator {
				return forbidden(c.Actor, "seal the owner key of volume "+v.ID)
			}
			if e.Recipient != v.Worker || e.Migration != "" {
				return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "the owner envelope of volume %s must be sealed to its worker %s", v.ID, v.Worker)}
			}
			if w, ok := s.d.Workers[v.Worker]; ok {
				want = w.KEK
			}
		case PurposeRecovery:
			if !isOwner && c.Actor.Kind != KindOperator {
				return forbidden(c.Actor, "seal the recovery key of volume "+v.ID)
			}
			if e.Recipient != RecoveryRecipient || e.Migration != "" {
				return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "a recovery envelope names recipient %q", RecoveryRecipient)}
			}
			if s.d.RecoveryKey == nil {
				return &Result{Refusal: refuse(RefuseConflict, CodeNoRecoveryKey, "the cluster has no recovery key: run `ferry keys recovery-init --out FILE` first")}
			}
			want = s.d.RecoveryKey
			hasRecovery = true
		case PurposeMigration:
			id, locked := s.d.Locks["volume/"+v.ID]
			m := s.d.Migrations[id]
			if !locked || m == nil || m.ID != e.Migration {
				return &Result{Refusal: refuse(RefuseConflict, CodeWrongState, "volume %s has no active migration %q", v.ID, e.Migration)}
			}
			if c.Actor.Kind != KindWorker || c.Actor.Name != m.Source || m.Source != v.Worker {
				return forbidden(c.Actor, "seal the key of volume "+v.ID+" for migration "+m.ID+" (only its source may)")
			}
			if m.State != SourceStopped && m.State != Exported {
				return &Result{Refusal: refuse(RefuseConflict, CodeWrongState, "migration %s is %s: its target's envelope is accepted only while the source exports", m.ID, m.State)}
			}
			if e.Recipient != m.Target {
				return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "migration %s moves volume %s to %s, not %s", m.ID, v.ID, m.Target, e.Recipient)}
			}
			if w, ok := s.d.Workers[m.Target]; ok {
				want = w.KEK
			}
		default:
			return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "envelope purpose %q: use owner, recovery or migration", e.Purpose)}
		}
		if want == nil {
			return &Result{Refusal: refuse(RefuseConflict, CodeConflict, "recipient %s has registered no key-encryption key", e.Recipient)}
		}
		if e.Fingerprint != want.Fingerprint {
			return &Result{Refusal: refuse(RefuseConflict, CodeConflict, "envelope %d is sealed to key %s, but %s's registered key is %s", i, e.Fingerprint, e.Recipient, want.Fingerprint)}
		}
	}
	if seen[envelopeKey(v.ID, PurposeOwner, "")] && !hasRecovery {
		if _, ok := s.d.Envelopes[envelopeKey(v.ID, PurposeRecovery, "")]; !ok {
			return &Result{Refusal: refuse(RefuseConflict, CodeNoRecoveryKey,
				"volume %s: an owner envelope needs a recovery envelope beside it (run `ferry keys recovery-init` if the cluster has no recovery key)", v.ID)}
		}
	}
	for i := range c.Envelopes {
		e := c.Envelopes[i].clone()
		e.SealedBy = c.Actor.String()
		e.SealedAt = c.Now.UTC().Format("2006-01-02T15:04:05Z07:00")
		s.d.Envelopes[envelopeKey(v.ID, e.Purpose, e.Migration)] = &e
	}
	v.HasKey = s.d.Envelopes[envelopeKey(v.ID, PurposeOwner, "")] != nil
	cp := copyVolume(v)
	return &Result{Volume: &cp}
}

// makingForkKey reports whether v is a remote fork whose copy (and key) its
// ForkFrom worker is still making.
func (v *Volume) makingForkKey() bool { return v.RemoteFork() && v.Forking() && v.Layout == nil }

// dropEnvelopes forgets every envelope of a volume (it is destroyed).
func (s *Store) dropEnvelopes(volume string) {
	for k, e := range s.d.Envelopes {
		if e.Volume == volume {
			delete(s.d.Envelopes, k)
		}
	}
}

// dropMigrationEnvelopes forgets a migration's envelopes once it ended.
func (s *Store) dropMigrationEnvelopes(m *Migration) {
	for k, e := range s.d.Envelopes {
		if e.Purpose == PurposeMigration && e.Migration == m.ID {
			delete(s.d.Envelopes, k)
		}
	}
}

// RecoveryKey returns the cluster's recovery public key, if set.
func (s *Store) RecoveryKey() (PublicKey, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.d.RecoveryKey == nil {
		return PublicKey{}, false
	}
	return *s.d.RecoveryKey.clone(), true
}

// EnvelopeAccess says whether reader may read the envelope of volume for
// purpose, and returns it. Owner envelopes go to the volume's worker only
// (not to operators); a migration envelope to the target of the active
// migration that names it; recovery envelopes to operators (they open
// only with the offline key). The read is not a command: the server logs
// it instead of writing to the log.
func (s *Store) EnvelopeAccess(reader Identity, volume string, p Purpose) (Envelope, *Refusal) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	v, ok := s.d.Volumes[volume]
	if !ok {
		return Envelope{}, notFound("volume", volume)
	}
	if v.State == VolDestroyed {
		return Envelope{}, refuse(RefuseGone, CodeWrongState, "volume %s is destroyed", v.ID)
	}
	key := envelopeKey(v.ID, p, "")
	switch p {
	case PurposeOwner:
		if reader.Kind != KindWorker || reader.Name != v.Worker {
			return Envelope{}, refuse(RefuseForbidden, CodeForbidden, "%s may not read the owner envelope of volume %s (only worker %s may)", reader, v.ID, v.Worker)
		}
	case PurposeRecovery:
		if reader.Kind != KindOperator {
			return Envelope{}, refuse(RefuseForbidden, CodeForbidden, "%s may not read recovery envelopes (only operators may)", reader)
		}
	case PurposeMigration:
		id, locked := s.d.Locks["volume/"+v.ID]
		m := s.d.Migrations[id]
		if !locked || m == nil || reader.Kind != KindWorker || reader.Name != m.Target || m.State == RollingBack || m.State.Terminal() {
			return Envelope{}, refuse(RefuseForbidden, CodeForbidden, "%s may not read a migration envelope of volume %s: it targets no active migration of it", reader, v.ID)
		}
		key = envelopeKey(v.ID, p, m.ID)
	default:
		return Envelope{}, refuse(RefuseInvalid, CodeInvalid, "envelope purpose %q: use owner, recovery or migration", p)
	}
	e, ok := s.d.Envelopes[key]
	if !ok {
		return Envelope{}, refuse(RefuseNotFound, CodeNotFound, "volume %s has no %s envelope", v.ID, p)
	}
	return e.clone(), nil
}

// EnvelopeSummaries lists which envelopes exist (no ciphertext), by key.
func (s *Store) EnvelopeSummaries(volume string) []Envelope {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []Envelope
	for _, e := range s.d.Envelopes {
		if volume == "" || e.Volume == volume {
			c := *e
			c.Ciphertext = nil
			out = append(out, c)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		return envelopeKey(out[i].Volume, out[i].Purpose, out[i].Migration) < envelopeKey(out[j].Volume, out[j].Purpose, out[j].Migration)
	})
	return out
}
