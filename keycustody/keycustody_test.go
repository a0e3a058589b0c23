package keycustody

import (
	"bytes"
	"context"
	"errors"
	"os"
	"sync"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/sealing"
)

// envCP keeps envelopes and worker keys in memory for these tests only;
// who may read what is the store's rule, tested in fsm and server.
type envCP struct {
	mu       sync.Mutex
	envs     map[string]fsm.Envelope
	workers  map[string]fsm.PublicKey
	recovery fsm.PublicKey
}

func envKey(vol string, p fsm.Purpose) string { return vol + "/" + string(p) }

func (f *envCP) Envelope(_ context.Context, vol string, p fsm.Purpose) (*fsm.Envelope, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	e, ok := f.envs[envKey(vol, p)]
	if !ok {
		return nil, &fsm.Refusal{Kind: fsm.RefuseNotFound, Code: fsm.CodeNotFound, Reason: "no envelope"}
	}
	return &e, nil
}
func (f *envCP) PutEnvelopes(_ context.Context, vol string, envs []fsm.Envelope) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, e := range envs {
		f.envs[envKey(vol, e.Purpose)] = e
	}
	return nil
}
func (f *envCP) SetWorkerKey(_ context.Context, w string, k fsm.PublicKey) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.workers[w] = k
	return nil
}
func (f *envCP) RecoveryKey(context.Context) (*fsm.PublicKey, error) { return &f.recovery, nil }
func (f *envCP) GetWorker(_ context.Context, name string) (*fsm.Worker, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	k := f.workers[name]
	return &fsm.Worker{Name: name, Address: "fd00::2", KEK: &k}, nil
}

// noStore answers nothing: a custodian that only loads its key.
type noStore struct{}

func (noStore) Envelope(context.Context, string, fsm.Purpose) (*fsm.Envelope, error) {
	return nil, errors.New("no envelope")
}
func (noStore) PutEnvelopes(context.Context, string, []fsm.Envelope) error { return nil }
func (noStore) RecoveryKey(context.Context) (*fsm.PublicKey, error)        { return nil, errors.New("none") }
func (noStore) GetWorker(context.Context, string) (*fsm.Worker, error) {
	return nil, errors.New("none")
}

func newTestCustodian(t *testing.T, store Store, worker string) *Custodian {
	c, err := Load(zerolog.Nop(), t.TempDir(), worker, store)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestWorkerKeyMadeOnceAndPrivate(t *testing.T) {
	dir := t.TempDir()
	a, err := Load(zerolog.Nop(), dir, "w1", noStore{})
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(KEKPath(dir))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", st, err)
	}
	b, err := Load(zerolog.Nop(), dir, "w1", noStore{})
	if err != nil {
		t.Fatal(err)
	}
	if b.Public().Fingerprint != a.Public().Fingerprint {
		t.Fatal("a restarted agent made a new key")
	}
}

// twoWorkers are a source and a target custodian sharing one control
// plane, which holds the recovery key rk.
func twoWorkers(t *testing.T) (cp *envCP, src, dst *Custodian, rk *sealing.PrivateKey) {
	rk, _ = sealing.Generate()
	cp = &envCP{envs: map[string]fsm.Envelope{}, workers: map[string]fsm.PublicKey{}, recovery: rk.Public()}
	src = newTestCustodian(t, cp, "src")
	dst = newTestCustodian(t, cp, "dst")
	for _, a := range []*Custodian{src, dst} {
		_ = cp.SetWorkerKey(t.Context(), a.worker, a.Public())
	}
	return cp, src, dst, rk
}

func TestVolumeKeysSealedAndCarried(t *testing.T) {
	ctx := t.Context()
	cp, src, dst, rk := twoWorkers(t)

	// A new volume: a fresh 64-character passphrase, sealed to the owner
	// and the recovery key before it is used; a retry gets the same key.
	k1, err := src.NewVolumeKey(ctx, "vol1")
	if err != nil || len(k1) != 64 {
		t.Fatalf("new key %q: %v", k1, err)
	}
	again, err := src.NewVolumeKey(ctx, "vol1")
	if err != nil || !bytes.Equal(again, k1) {
		t.Fatalf("retry made another key: %v", err)
	}
	k2, _ := src.NewVolumeKey(ctx, "vol2")
	if bytes.Equal(k1, k2) {
		t.Fatal("two volumes got the same key")
	}
	rec := cp.envs[envKey("vol1", fsm.PurposeRecovery)]
	if got, err := sealing.Open(rk, rec, sealing.Binding{Volume: "vol1", Recipient: fsm.RecoveryRecipient, Purpose: fsm.PurposeRecovery}); err != nil || !bytes.Equal(got, k1) {
		t.Fatalf("recovery envelope: %v", err)
	}
	// The target cannot open the owner envelope.
	if _, err := sealing.Open(dst.kek, cp.envs[envKey("vol1", fsm.PurposeOwner)], sealing.Binding{Volume: "vol1", Recipient: "src", Purpose: fsm.PurposeOwner}); err == nil {
		t.Fatal("the target opened the source's owner envelope")
	}

	// A migration: the source seals to the target; the target opens it and
	// becomes the owner of the destination volume with its own envelopes.
	m := &fsm.Migration{ID: "m1", Volume: "vol1", Source: "src", Target: "dst", TargetVol: "vol1-m1"}
	if err := src.SealForTarget(ctx, m); err != nil {
		t.Fatal(err)
	}
	got, err := dst.MigrationKey(ctx, m)
	if err != nil || !bytes.Equal(got, k1) {
		t.Fatalf("target key: %v", err)
	}
	own := cp.envs[envKey("vol1-m1", fsm.PurposeOwner)]
	if own.Recipient != "dst" || own.Fingerprint != dst.Public().Fingerprint {
		t.Fatalf("destination owner envelope: %+v", own)
	}
	if _, ok := cp.envs[envKey("vol1-m1", fsm.PurposeRecovery)]; !ok {
		t.Fatal("destination has no recovery envelope")
	}
	// Later reads (restart, hydration) use the destination's owner envelope,
	// not the migration envelope (which the servers drop at the end).
	delete(cp.envs, envKey("vol1", fsm.PurposeMigration))
	if got, err := dst.MigrationKey(ctx, m); err != nil || !bytes.Equal(got, k1) {
		t.Fatalf("target key after the migration envelope is gone: %v", err)
	}
}

// The target gets the key before its own envelopes are sealed; they exist
// once settle returned, and from then on the key comes from its owner
// envelope with nothing left to seal. A settle without a key seals them
// too, and a failed seal fails settle and every later key.
func TestCloneKey(t *testing.T) {
	ctx := t.Context()
	cp, src, dst, _ := twoWorkers(t)
	k, err := src.NewVolumeKey(ctx, "vol1")
	if err != nil {
		t.Fatal(err)
	}
	m := &fsm.Migration{ID: "m1", Volume: "vol1", Source: "src", Target: "dst", TargetVol: "vol1-m1"}
	gate := make(chan struct{})
	held := newTestCustodian(t, gatedPuts{cp, gate}, "dst")
	held.kek = dst.kek
	key, settle := held.CloneKey(m)
	if _, err := key(ctx); err == nil {
		t.Fatal("a key before the source sealed one to the target")
	}
	if err := src.SealForTarget(ctx, m); err != nil {
		t.Fatal(err)
	}
	got, err := key(ctx) // its seal waits on gate

	if err != nil || !bytes.Equal(got, k) {
		t.Fatalf("first key: %v", err)
	}
	if _, ok := cp.envs[envKey("vol1-m1", fsm.PurposeOwner)]; ok {
		t.Fatal("the destination's owner envelope was sealed before the key was handed over")
	}
	close(gate)
	if err := settle(ctx); err != nil {
		t.Fatal(err)
	}
	if own := cp.envs[envKey("vol1-m1", fsm.PurposeOwner)]; own.Recipient != "dst" {
		t.Fatalf("destination owner envelope after settle: %+v", own)
	}
	if got, err = key(ctx); err != nil || !bytes.Equal(got, k) {
		t.Fatalf("second key: %v", err)
	}
	if err := settle(ctx); err != nil {
		t.Fatal(err)
	}

	// Never asked for the key (an adopted datapath): settle seals.
	m2 := &fsm.Migration{ID: "m2", Volume: "vol1", Source: "src", Target: "dst", TargetVol: "vol1-m2"}
	if err := src.SealForTarget(ctx, m2); err != nil {
		t.Fatal(err)
	}
	if _, settle := dst.CloneKey(m2); settle(ctx) != nil {
		t.Fatal("settle without a key did not seal")
	}
	if own := cp.envs[envKey("vol1-m2", fsm.PurposeOwner)]; own.Recipient != "dst" {
		t.Fatalf("destination owner envelope after a settle alone: %+v", own)
	}

	// The recovery key cannot be read: the seal fails, and says so twice.
	m3 := &fsm.Migration{ID: "m3", Volume: "vol1", Source: "src", Target: "dst", TargetVol: "vol1-m3"}
	if err := src.SealForTarget(ctx, m3); err != nil {
		t.Fatal(err)
	}
	bad := newTestCustodian(t, failingPuts{cp}, "dst")
	bad.kek = dst.kek
	key, settle = bad.CloneKey(m3)
	if _, err := key(ctx); err != nil {
		t.Fatal(err)
	}
	if err := settle(ctx); err == nil {
		t.Fatal("settle passed a failed seal")
	}
	if _, err := key(ctx); err == nil {
		t.Fatal("a key after a failed seal")
	}
	if err := settle(ctx); err == nil {
		t.Fatal("a second settle forgot the failed seal")
	}
}

// gatedPuts stores envelopes once gate is closed.
type gatedPuts struct {
	*envCP
	gate chan struct{}
}

func (g gatedPuts) PutEnvelopes(ctx context.Context, vol string, envs []fsm.Envelope) error {
	<-g.gate
	return g.envCP.PutEnvelopes(ctx, vol, envs)
}

// failingPuts stores no envelope.
type failingPuts struct{ *envCP }

func (failingPuts) PutEnvelopes(context.Context, string, []fsm.Envelope) error {
	return errors.New("store unreachable")
}
