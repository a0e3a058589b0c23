package operator

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/sealing"
)

// RecoveryClient is what RecoveryInit needs.
type RecoveryClient interface {
	RecoveryKey(ctx context.Context) (*fsm.PublicKey, error)
	SetRecoveryKey(ctx context.Context, k fsm.PublicKey) error
}

// RecoveryInit makes the cluster's recovery key pair on this machine,
// writes the private half to out (0600, never replacing a file) and then
// registers the public half. The private half exists only in out: keep
// it offline; it opens every volume's recovery envelope.
func RecoveryInit(ctx context.Context, c RecoveryClient, out string) (fsm.PublicKey, error) {
	if out == "" {
		return fsm.PublicKey{}, fmt.Errorf("%w: --out FILE is required: the private recovery key is written there once", ErrInvalid)
	}
	old, err := c.RecoveryKey(ctx)
	if err == nil {
		return fsm.PublicKey{}, fmt.Errorf("%w: the cluster already has recovery key %s; it is never replaced (every recovery envelope is sealed to it)", ErrRefused, old.Fingerprint)
	}
	var r *fsm.Refusal
	if !errors.As(err, &r) || r.Code != fsm.CodeNoRecoveryKey {
		return fsm.PublicKey{}, fmt.Errorf("reading the cluster's recovery key: %w", err)
	}
	k, err := sealing.Generate()
	if err != nil {
		return fsm.PublicKey{}, err
	}
	// The file first: a registered key whose private half was never saved
	// would make every recovery envelope useless.
	if err := sealing.Write(out, k, true); err != nil {
		return fsm.PublicKey{}, fmt.Errorf("writing the recovery key: %w", err)
	}
	if err := c.SetRecoveryKey(ctx, k.Public()); err != nil {
		_ = os.Remove(out)
		return fsm.PublicKey{}, fmt.Errorf("registering the recovery key (removed %s): %w", out, err)
	}
	return k.Public(), nil
}

// RecoverClient is what RecoverVolume needs.
type RecoverClient interface {
	GetVolume(ctx context.Context, id string) (*fsm.Volume, error)
	GetWorker(ctx context.Context, name string) (*fsm.Worker, error)
	GetEnvelope(ctx context.Context, id string, purpose fsm.Purpose, index uint64) (*fsm.Envelope, error)
	PutEnvelopes(ctx context.Context, id string, envs []fsm.Envelope) (*fsm.Volume, error)
}

// RecoverVolume opens volume id's recovery envelope with the private
// recovery key in keyFile and seals the key again to worker to's
// registered key as the volume's owner envelope. The key is opened here,
// on the operator's machine; the servers only store the new envelope.
// to defaults to the volume's worker, and must be it: an owner envelope
// names the worker holding the volume (after a worker lost its key and
// registered a new one, this re-seals to the new key).
func RecoverVolume(ctx context.Context, c RecoverClient, id, keyFile, to string) (*fsm.Envelope, error) {
	k, err := sealing.Load(keyFile)
	if err != nil {
		return nil, fmt.Errorf("%w: recovery key: %v", ErrInvalid, err)
	}
	v, err := c.GetVolume(ctx, id)
	if err != nil {
		return nil, err
	}
	if to == "" {
		to = v.Worker
	}
	if to != v.Worker {
		return nil, fmt.Errorf("%w: volume %s is on worker %s: its owner envelope can only be sealed to that worker, not %s", ErrInvalid, id, v.Worker, to)
	}
	w, err := c.GetWorker(ctx, to)
	if err != nil {
		return nil, err
	}
	if w.KEK == nil {
		return nil, fmt.Errorf("%w: worker %s has registered no key-encryption key yet (start its agent)", ErrRefused, to)
	}
	env, err := c.GetEnvelope(ctx, id, fsm.PurposeRecovery, 0)
	if err != nil {
		return nil, fmt.Errorf("reading the recovery envelope of volume %s: %w", id, err)
	}
	pass, err := sealing.Open(k, *env, sealing.Binding{Volume: id, Recipient: fsm.RecoveryRecipient, Purpose: fsm.PurposeRecovery})
	if err != nil {
		return nil, fmt.Errorf("%w: %v (is %s the cluster's recovery key?)", ErrRefused, err, keyFile)
	}
	defer clear(pass)
	owner, err := sealing.Seal(*w.KEK, sealing.Binding{Volume: id, Epoch: env.Epoch, Recipient: to, Purpose: fsm.PurposeOwner}, pass, "operator recovery")
	if err != nil {
		return nil, err
	}
	if _, err := c.PutEnvelopes(ctx, id, []fsm.Envelope{owner}); err != nil {
		return nil, fmt.Errorf("storing the re-sealed owner envelope of volume %s: %w", id, err)
	}
	return &owner, nil
}
