package operator

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/sealing"
)

// keyFake keeps a recovery key and envelopes in memory for these tests only.
type keyFake struct {
	*fake
	recovery *fsm.PublicKey
	envs     map[fsm.Purpose]fsm.Envelope
	put      []fsm.Envelope
}

func (f *keyFake) RecoveryKey(context.Context) (*fsm.PublicKey, error) {
	if f.recovery == nil {
		return nil, &fsm.Refusal{Kind: fsm.RefuseConflict, Code: fsm.CodeNoRecoveryKey, Reason: "none"}
	}
	return f.recovery, nil
}
func (f *keyFake) SetRecoveryKey(_ context.Context, k fsm.PublicKey) error {
	f.recovery = &k
	return nil
}
func (f *keyFake) GetEnvelope(_ context.Context, id string, p fsm.Purpose, _ uint64) (*fsm.Envelope, error) {
	e, ok := f.envs[p]
	if !ok || e.Volume != id {
		return nil, notFound("envelope")
	}
	return &e, nil
}
func (f *keyFake) PutEnvelopes(_ context.Context, id string, envs []fsm.Envelope) (*fsm.Volume, error) {
	f.put = append(f.put, envs...)
	return f.GetVolume(context.Background(), id)
}

func TestRecoveryInitAndRecover(t *testing.T) {
	ctx := t.Context()
	f := &keyFake{fake: newFake(), envs: map[fsm.Purpose]fsm.Envelope{}}
	out := filepath.Join(t.TempDir(), "recovery.key")
	pub, err := RecoveryInit(ctx, f, out)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(out); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("recovery key file: %v %v", st, err)
	}
	if f.recovery == nil || f.recovery.Fingerprint != pub.Fingerprint {
		t.Fatal("the public half was not registered")
	}
	// Once only: a second run refuses and leaves the file alone.
	other := filepath.Join(t.TempDir(), "again.key")
	if _, err := RecoveryInit(ctx, f, other); !errors.Is(err, ErrRefused) {
		t.Fatalf("second recovery-init: %v", err)
	}
	if _, err := os.Stat(other); err == nil {
		t.Fatal("a second private key was written")
	}

	// A volume whose worker lost its key: re-seal from the recovery envelope.
	pass := []byte("6b1f0c6e0d2f4a1e9c3b5a7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f")
	rec, err := sealing.Seal(pub, sealing.Binding{Volume: "vol1", Recipient: fsm.RecoveryRecipient, Purpose: fsm.PurposeRecovery}, pass, "w1")
	if err != nil {
		t.Fatal(err)
	}
	f.envs[fsm.PurposeRecovery] = rec
	wk, _ := sealing.Generate()
	kek := wk.Public()
	f.workers["w1"] = &fsm.Worker{Name: "w1", KEK: &kek}
	f.workers["w2"] = &fsm.Worker{Name: "w2", KEK: &kek}
	f.volumes["vol1"] = &fsm.Volume{ID: "vol1", Worker: "w1", State: fsm.VolCreated}
	if _, err := RecoverVolume(ctx, f, "vol1", out, "w2"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("re-seal to a worker that does not hold the volume: %v", err)
	}
	env, err := RecoverVolume(ctx, f, "vol1", out, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(f.put) != 1 || f.put[0].Purpose != fsm.PurposeOwner || f.put[0].Recipient != "w1" {
		t.Fatalf("stored: %+v", f.put)
	}
	got, err := sealing.Open(wk, *env, sealing.Binding{Volume: "vol1", Recipient: "w1", Purpose: fsm.PurposeOwner})
	if err != nil || !bytes.Equal(got, pass) {
		t.Fatalf("the worker cannot open the re-sealed key: %v", err)
	}
	// Another recovery key opens nothing.
	wrong := filepath.Join(t.TempDir(), "wrong.key")
	k2, _ := sealing.Generate()
	if err := sealing.Write(wrong, k2, true); err != nil {
		t.Fatal(err)
	}
	if _, err := RecoverVolume(ctx, f, "vol1", wrong, ""); !errors.Is(err, ErrRefused) {
		t.Fatalf("wrong recovery key: %v", err)
	}
}
