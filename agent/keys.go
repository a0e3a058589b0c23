package agent

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/passphrase"
	"github.com/ferry-dev/ferry/internal/sealing"
)

// Volume keys on the worker. The agent holds the worker's key-encryption
// private key (made at first start, never sent anywhere); the servers hold
// only envelopes sealed to it, to the offline recovery key and, during a
// migration, to the target's key. A plaintext passphrase exists only in
// this process between opening an envelope and handing it to the datapath.

// KEKPath is where the worker's private key-encryption key lives.
func KEKPath(dataDir string) string { return filepath.Join(dataDir, "keys", "worker-kek.pem") }

func isNotFound(err error) bool {
	var r *fsm.Refusal
	return errors.As(err, &r) && r.Kind == fsm.RefuseNotFound
}

// ownerKey opens the owner envelope of a volume this worker holds.
func (a *Agent) ownerKey(ctx context.Context, vol string) ([]byte, error) {
	env, err := a.cp.Envelope(ctx, vol, fsm.PurposeOwner)
	if err != nil {
		return nil, fmt.Errorf("fetch the owner envelope of volume %s: %w", vol, err)
	}
	return sealing.Open(a.kek, *env, sealing.Binding{Volume: vol, Recipient: a.cfg.Worker, Purpose: fsm.PurposeOwner})
}

// sealOwned seals pass to this worker and to the recovery key and stores
// both envelopes in one command (an owner envelope needs its recovery one).
func (a *Agent) sealOwned(ctx context.Context, vol string, epoch uint64, pass []byte) error {
	rk, err := a.cp.RecoveryKey(ctx)
	if err != nil {
		return fmt.Errorf("read the cluster's recovery key (an operator runs `ferry keys recovery-init` once): %w", err)
	}
	by := "worker " + a.cfg.Worker
	owner, err := sealing.Seal(a.kek.Public(), sealing.Binding{Volume: vol, Epoch: epoch, Recipient: a.cfg.Worker, Purpose: fsm.PurposeOwner}, pass, by)
	if err != nil {
		return err
	}
	rec, err := sealing.Seal(*rk, sealing.Binding{Volume: vol, Epoch: epoch, Recipient: fsm.RecoveryRecipient, Purpose: fsm.PurposeRecovery}, pass, by)
	if err != nil {
		return err
	}
	if err := a.cp.PutEnvelopes(ctx, vol, []fsm.Envelope{owner, rec}); err != nil {
		return fmt.Errorf("store the envelopes of volume %s: %w", vol, err)
	}
	return nil
}

// newVolumeKey returns the key of a volume being created here: the one
// already sealed (a retry after a crash), or a fresh passphrase sealed to
// this worker and the recovery key before anything is formatted with it.
func (a *Agent) newVolumeKey(ctx context.Context, vol string) ([]byte, error) {
	key, err := a.ownerKey(ctx, vol)
	if err == nil || !isNotFound(err) {
		return key, err
	}
	pass := passphrase.New()
	if err := a.sealOwned(ctx, vol, 1, pass); err != nil {
		clear(pass)
		return nil, err
	}
	return pass, nil
}

// sealForTarget seals the key of the migrating volume to the target's
// registered key; the servers accept it only from this source, for this
// migration's target, while the source exports.
func (a *Agent) sealForTarget(ctx context.Context, m *fsm.Migration) error {
	tw, err := a.cp.GetWorker(ctx, m.Target)
	if err != nil {
		return err
	}
	if tw.KEK == nil {
		return fmt.Errorf("target worker %s registered no key-encryption key; it cannot receive the volume key", m.Target)
	}
	env, err := a.cp.Envelope(ctx, m.Volume, fsm.PurposeOwner)
	if err != nil {
		return fmt.Errorf("fetch the owner envelope of volume %s: %w", m.Volume, err)
	}
	pass, err := sealing.Open(a.kek, *env, sealing.Binding{Volume: m.Volume, Recipient: a.cfg.Worker, Purpose: fsm.PurposeOwner})
	if err != nil {
		return err
	}
	defer clear(pass)
	mig, err := sealing.Seal(*tw.KEK, sealing.Binding{Volume: m.Volume, Epoch: env.Epoch, Recipient: m.Target, Purpose: fsm.PurposeMigration, Migration: m.ID},
		pass, "worker "+a.cfg.Worker)
	if err != nil {
		return err
	}
	if err := a.cp.PutEnvelopes(ctx, m.Volume, []fsm.Envelope{mig}); err != nil {
		return fmt.Errorf("store the migration envelope of volume %s for %s: %w", m.Volume, m.Target, err)
	}
	return nil
}

// migrationKey returns the key of an incoming volume on the target. The
// first time it opens the migration envelope and seals a fresh owner
// envelope (and a recovery one) for the destination volume, which this
// worker owns; later calls (restarts, hydration) open that owner envelope.
// So after cutover the destination's key no longer depends on the
// migration envelope, which the servers drop when the migration ends.
func (a *Agent) migrationKey(ctx context.Context, m *fsm.Migration) ([]byte, error) {
	key, err := a.ownerKey(ctx, m.TargetVol)
	if err == nil || !isNotFound(err) {
		return key, err
	}
	env, err := a.cp.Envelope(ctx, m.Volume, fsm.PurposeMigration)
	if err != nil {
		return nil, fmt.Errorf("fetch the migration envelope of volume %s: %w", m.Volume, err)
	}
	pass, err := sealing.Open(a.kek, *env, sealing.Binding{Volume: m.Volume, Recipient: a.cfg.Worker, Purpose: fsm.PurposeMigration, Migration: m.ID})
	if err != nil {
		return nil, err
	}
	if err := a.sealOwned(ctx, m.TargetVol, env.Epoch, pass); err != nil {
		clear(pass)
		return nil, err
	}
	return pass, nil
}
