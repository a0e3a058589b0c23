package fsm

import (
	"bytes"
	"encoding/base64"
	"io"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

func restoreFromString(t *testing.T, snap string) *Store {
	t.Helper()
	s := NewStore(zerolog.Nop())
	if err := s.Restore(io.NopCloser(strings.NewReader(snap))); err != nil {
		t.Fatal(err)
	}
	return s
}

// testKey is a stand-in public key: the store checks sizes, suite and
// fingerprint, never the key's mathematics (it cannot open envelopes).
func testKey(b byte) PublicKey {
	k := bytes.Repeat([]byte{b}, 1216)
	return PublicKey{KEM: SuiteKEM, KDF: SuiteKDF, AEAD: SuiteAEAD, Key: k, Fingerprint: KeyFingerprint(k)}
}

func testEnvelope(vol string, p Purpose, to string, k PublicKey, mig string) Envelope {
	return Envelope{Volume: vol, Epoch: 1, Purpose: p, Recipient: to, Fingerprint: k.Fingerprint, Migration: mig,
		KEM: SuiteKEM, KDF: SuiteKDF, AEAD: SuiteAEAD, Ciphertext: bytes.Repeat([]byte{0xc7}, 1200)}
}

var recoveryIdent = Identity{Name: "ops", Kind: KindOperator}

// keyedHarness registers the workers' keys and the recovery key on top of setup.
func keyedHarness(t *testing.T) (*harness, map[string]PublicKey) {
	h := newHarness(t)
	h.setup(true)
	keys := map[string]PublicKey{srcW.Name: testKey(1), dstW.Name: testKey(2), otherW.Name: testKey(3), RecoveryRecipient: testKey(9)}
	for _, w := range []Identity{srcW, dstW, otherW} {
		h.must(h.apply(CmdSetWorkerKey, &SetWorkerKeyCmd{Header: h.hdr(w), Name: w.Name, Key: keys[w.Name]}))
	}
	h.must(h.apply(CmdSetRecoveryKey, &SetRecoveryKeyCmd{Header: h.hdr(operator), Key: keys[RecoveryRecipient]}))
	return h, keys
}

func TestWorkerKeyBoundToItsCertificate(t *testing.T) {
	h := newHarness(t)
	h.setup(true)
	for _, id := range []Identity{otherW, operator, server} {
		if r := h.apply(CmdSetWorkerKey, &SetWorkerKeyCmd{Header: h.hdr(id), Name: srcW.Name, Key: testKey(5)}); r.Refusal == nil || r.Refusal.Code != CodeForbidden {
			t.Errorf("%s registered worker %s's key: %+v", id, srcW.Name, r.Refusal)
		}
	}
	bad := testKey(5)
	bad.Fingerprint = KeyFingerprint([]byte("other"))
	if r := h.apply(CmdSetWorkerKey, &SetWorkerKeyCmd{Header: h.hdr(srcW), Name: srcW.Name, Key: bad}); r.Refusal == nil {
		t.Error("a key with a wrong fingerprint was accepted")
	}
	h.must(h.apply(CmdSetWorkerKey, &SetWorkerKeyCmd{Header: h.hdr(srcW), Name: srcW.Name, Key: testKey(5)}))
	if w, _ := h.s.Worker(srcW.Name); w.KEK == nil || w.KEK.Fingerprint != testKey(5).Fingerprint {
		t.Fatalf("worker record: %+v", w.KEK)
	}
	// The recovery key: operators only, never replaced by a different one.
	if r := h.apply(CmdSetRecoveryKey, &SetRecoveryKeyCmd{Header: h.hdr(srcW), Key: testKey(9)}); r.Refusal == nil {
		t.Error("a worker set the recovery key")
	}
	h.must(h.apply(CmdSetRecoveryKey, &SetRecoveryKeyCmd{Header: h.hdr(operator), Key: testKey(9)}))
	h.must(h.apply(CmdSetRecoveryKey, &SetRecoveryKeyCmd{Header: h.hdr(operator), Key: testKey(9)}))
	if r := h.apply(CmdSetRecoveryKey, &SetRecoveryKeyCmd{Header: h.hdr(operator), Key: testKey(8)}); r.Refusal == nil || r.Refusal.Code != CodeConflict {
		t.Errorf("recovery key replaced: %+v", r.Refusal)
	}
}

func TestOwnerEnvelopeNeedsRecovery(t *testing.T) {
	h := newHarness(t)
	h.setup(true)
	h.must(h.apply(CmdSetWorkerKey, &SetWorkerKeyCmd{Header: h.hdr(srcW), Name: srcW.Name, Key: testKey(1)}))
	owner := testEnvelope("vol1", PurposeOwner, srcW.Name, testKey(1), "")
	r := h.apply(CmdPutEnvelopes, &PutEnvelopesCmd{Header: h.hdr(srcW), Volume: "vol1", Envelopes: []Envelope{owner}})
	if r.Refusal == nil || r.Refusal.Code != CodeNoRecoveryKey || !bytes.Contains([]byte(r.Refusal.Reason), []byte("recovery-init")) {
		t.Fatalf("owner envelope without recovery: %+v", r.Refusal)
	}
	rec := testEnvelope("vol1", PurposeRecovery, RecoveryRecipient, testKey(9), "")
	if r := h.apply(CmdPutEnvelopes, &PutEnvelopesCmd{Header: h.hdr(srcW), Volume: "vol1", Envelopes: []Envelope{owner, rec}}); r.Refusal == nil || r.Refusal.Code != CodeNoRecoveryKey {
		t.Fatalf("recovery envelope with no recovery key in the cluster: %+v", r.Refusal)
	}
	h.must(h.apply(CmdSetRecoveryKey, &SetRecoveryKeyCmd{Header: h.hdr(operator), Key: testKey(9)}))
	h.must(h.apply(CmdPutEnvelopes, &PutEnvelopesCmd{Header: h.hdr(srcW), Volume: "vol1", Envelopes: []Envelope{owner, rec}}))
	if v, _ := h.s.Volume("vol1"); !v.HasKey {
		t.Fatal("volume does not record its owner envelope")
	}
}

func TestEnvelopeRules(t *testing.T) {
	h, keys := keyedHarness(t)
	owner := testEnvelope("vol1", PurposeOwner, srcW.Name, keys[srcW.Name], "")
	rec := testEnvelope("vol1", PurposeRecovery, RecoveryRecipient, keys[RecoveryRecipient], "")
	put := func(id Identity, es ...Envelope) *Result {
		return h.apply(CmdPutEnvelopes, &PutEnvelopesCmd{Header: h.hdr(id), Volume: "vol1", Envelopes: es})
	}
	wrongKey := owner
	wrongKey.Fingerprint = keys[dstW.Name].Fingerprint
	wrongTo := testEnvelope("vol1", PurposeOwner, dstW.Name, keys[dstW.Name], "")
	otherVol := testEnvelope("vol2", PurposeOwner, srcW.Name, keys[srcW.Name], "")
	for name, r := range map[string]*Result{
		"foreign worker":       put(otherW, owner, rec),
		"target worker":        put(dstW, owner, rec),
		"server":               put(server, owner, rec),
		"stale key":            put(srcW, wrongKey, rec),
		"owner to another":     put(srcW, wrongTo, rec),
		"other volume":         put(srcW, otherVol, rec),
		"migration too early":  put(srcW, testEnvelope("vol1", PurposeMigration, dstW.Name, keys[dstW.Name], "m1")),
		"duplicate":            put(srcW, owner, owner),
		"no envelopes":         put(srcW),
		"recovery to a worker": put(srcW, owner, testEnvelope("vol1", PurposeRecovery, srcW.Name, keys[srcW.Name], "")),
	} {
		if r.Refusal == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	h.must(put(srcW, owner, rec))

	// Reads: the owner reads its envelope; nobody else does, operators included.
	if e, ref := h.s.EnvelopeAccess(srcW, "vol1", PurposeOwner); ref != nil || !bytes.Equal(e.Ciphertext, owner.Ciphertext) {
		t.Fatalf("owner read: %v", ref)
	}
	for _, id := range []Identity{dstW, otherW, operator, server} {
		if _, ref := h.s.EnvelopeAccess(id, "vol1", PurposeOwner); ref == nil || ref.Kind != RefuseForbidden {
			t.Errorf("%s read the owner envelope: %+v", id, ref)
		}
	}
	if _, ref := h.s.EnvelopeAccess(recoveryIdent, "vol1", PurposeRecovery); ref != nil {
		t.Errorf("operator reads the recovery envelope: %v", ref)
	}
	if _, ref := h.s.EnvelopeAccess(srcW, "vol1", PurposeRecovery); ref == nil {
		t.Error("a worker read the recovery envelope")
	}

	// The migration envelope: only the source, only to m1's target, only while exporting.
	mig := testEnvelope("vol1", PurposeMigration, dstW.Name, keys[dstW.Name], "m1")
	h.must(h.propose(dstW, EvTargetPrepared, "tp", EventPayload{TargetVolume: "vol1-dst", Layout: testLayout()}))
	if r := put(srcW, mig); r.Refusal == nil || r.Refusal.Code != CodeWrongState {
		t.Fatalf("migration envelope before the source stopped: %+v", r.Refusal)
	}
	h.must(h.propose(srcW, EvSourceStopped, "ss", EventPayload{Layout: testLayout()}))
	toOther := testEnvelope("vol1", PurposeMigration, otherW.Name, keys[otherW.Name], "m1")
	otherMig := testEnvelope("vol1", PurposeMigration, dstW.Name, keys[dstW.Name], "m9")
	for name, r := range map[string]*Result{
		"by the target":         put(dstW, mig),
		"by an operator":        put(operator, mig),
		"to a non-target":       put(srcW, toOther),
		"for another migration": put(srcW, otherMig),
	} {
		if r.Refusal == nil {
			t.Errorf("migration envelope %s: accepted", name)
		}
	}
	h.must(put(srcW, mig))
	if e, ref := h.s.EnvelopeAccess(dstW, "vol1", PurposeMigration); ref != nil || e.Migration != "m1" {
		t.Fatalf("target read: %+v %v", e, ref)
	}
	for _, id := range []Identity{srcW, otherW, operator} {
		if _, ref := h.s.EnvelopeAccess(id, "vol1", PurposeMigration); ref == nil {
			t.Errorf("%s read the migration envelope", id)
		}
	}
	// After rollback the target loses it, and the store forgets it.
	h.must(h.propose(operator, EvAbort, "a", EventPayload{}))
	if _, ref := h.s.EnvelopeAccess(dstW, "vol1", PurposeMigration); ref == nil {
		t.Fatal("target reads the migration envelope while rolling back")
	}
	h.must(h.propose(dstW, EvTargetTornDown, "b", EventPayload{}))
	h.must(h.propose(srcW, EvSourceRestored, "c", EventPayload{}))
	for _, e := range h.s.EnvelopeSummaries("vol1") {
		if e.Purpose == PurposeMigration {
			t.Fatalf("migration envelope kept after the migration ended: %+v", e)
		}
	}
}

// TestRetiredPlaintextKeys: old log entries carrying a plaintext key still
// apply (so old logs replay) but store nothing, and key reads are no writes.
func TestRetiredPlaintextKeys(t *testing.T) {
	h := newHarness(t)
	h.setup(true)
	key := bytes.Repeat([]byte{0x42}, 64)
	r := h.must(h.apply(CmdSetVolumeKey, &SetVolumeKeyCmd{Header: h.hdr(srcW), ID: "vol1", Key: key}))
	if !r.Ignored {
		t.Fatal("retired set_volume_key was not ignored")
	}
	h.must(h.apply(CmdKeyAccess, &KeyAccessCmd{Header: h.hdr(dstW), ID: "vol1"}))
	snap := snapshotBytes(t, h.s)
	for _, form := range [][]byte{key, []byte("QkJCQkJC"), []byte("4242424242")} {
		if bytes.Contains(h.s.Dump(), form) || bytes.Contains(snap, form) {
			t.Fatalf("plaintext key in the state (%q)", form)
		}
	}
	if v, _ := h.s.Volume("vol1"); v.HasKey {
		t.Fatal("volume claims a key after a retired command")
	}
	if m, _ := h.s.Migration("m1"); len(m.KeyAccess) != 0 {
		t.Fatal("a key read was recorded in the log")
	}
}

// TestOldSnapshotKeysDropped: a snapshot from before sealing restores
// without its plaintext keys, and the next snapshot does not carry them.
func TestOldSnapshotKeysDropped(t *testing.T) {
	s := restoreFromString(t, `{"index":3,"migrations":{},"keys":{"vol1":"QkJCQkJCQkJC"}}`)
	if bytes.Contains(snapshotBytes(t, s), []byte("QkJCQkJC")) || bytes.Contains(s.Dump(), []byte("QkJCQkJC")) {
		t.Fatal("old plaintext keys survived a restore")
	}
}

func TestDestroyDropsEnvelopes(t *testing.T) {
	h, keys := keyedHarness(t)
	h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(srcW), Volume: Volume{ID: "vol9", Worker: srcW.Name, Size: 1 << 20, State: VolCreated}}))
	h.must(h.apply(CmdPutEnvelopes, &PutEnvelopesCmd{Header: h.hdr(srcW), Volume: "vol9", Envelopes: []Envelope{
		testEnvelope("vol9", PurposeOwner, srcW.Name, keys[srcW.Name], ""), testEnvelope("vol9", PurposeRecovery, RecoveryRecipient, keys[RecoveryRecipient], "")}}))
	h.must(h.apply(CmdDestroyVolume, &DestroyVolumeCmd{Header: h.hdr(operator), ID: "vol9", Retention: 1}))
	h.now = h.now.Add(2 * 1e9)
	h.must(h.apply(CmdDestroyVolume, &DestroyVolumeCmd{Header: h.hdr(operator), ID: "vol9"}))
	if n := len(h.s.EnvelopeSummaries("vol9")); n != 0 {
		t.Fatalf("%d envelopes kept after destroy", n)
	}
	if bytes.Contains(snapshotBytes(t, h.s), []byte(base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{0xc7}, 12)))) {
		t.Fatal("envelope bytes in the snapshot after destroy")
	}
}
