// Package keycustody holds a worker's volume keys. The worker's
// key-encryption private key is made at first start and never sent
// anywhere; the servers hold only envelopes sealed to it, to the offline
// recovery key and, during a migration, to the target's key. A plaintext
// passphrase exists only in this process between opening an envelope and
// handing it to the datapath.
package keycustody

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/passphrase"
	"github.com/ferry-dev/ferry/internal/sealing"
)

// Store is what key custody needs from the replicated store (the API
// client implements it).
type Store interface {
	// Envelope returns a sealed copy of a volume's key: the owner envelope
	// of a volume this worker holds, or the migration envelope of a volume
	// it is the target of. Only this worker's private key opens it.
	Envelope(ctx context.Context, volume string, purpose fsm.Purpose) (*fsm.Envelope, error)
	// PutEnvelopes stores sealed copies of a volume's key.
	PutEnvelopes(ctx context.Context, volume string, envs []fsm.Envelope) error
	// RecoveryKey returns the cluster's recovery public key.
	RecoveryKey(ctx context.Context) (*fsm.PublicKey, error)
	GetWorker(ctx context.Context, name string) (*fsm.Worker, error)
}

// KEKPath is where the worker's private key-encryption key lives.
func KEKPath(dataDir string) string { return filepath.Join(dataDir, "keys", "worker-kek.pem") }

// Custodian opens and seals the keys of one worker's volumes.
type Custodian struct {
	worker string
	kek    *sealing.PrivateKey // this worker's key-encryption key; never leaves the worker
	store  Store
}

// Load reads the worker's key-encryption key from dataDir, making it on
// first start.
func Load(log zerolog.Logger, dataDir, worker string, store Store) (*Custodian, error) {
	kek, created, err := sealing.LoadOrCreate(KEKPath(dataDir))
	if err != nil {
		return nil, fmt.Errorf("worker key-encryption key: %w", err)
	}
	if created {
		log.Info().Str("fingerprint", kek.Public().Fingerprint).Str("path", KEKPath(dataDir)).Msg("made this worker's key-encryption key")
	}
	return &Custodian{worker: worker, kek: kek, store: store}, nil
}

// Public is the worker's key-encryption public key, which it registers.
func (c *Custodian) Public() fsm.PublicKey { return c.kek.Public() }

func isNotFound(err error) bool {
	var r *fsm.Refusal
	return errors.As(err, &r) && r.Kind == fsm.RefuseNotFound
}

// OwnerKey opens the owner envelope of a volume this worker holds.
func (c *Custodian) OwnerKey(ctx context.Context, vol string) ([]byte, error) {
	env, err := c.store.Envelope(ctx, vol, fsm.PurposeOwner)
	if err != nil {
		return nil, fmt.Errorf("fetch the owner envelope of volume %s: %w", vol, err)
	}
	return sealing.Open(c.kek, *env, sealing.Binding{Volume: vol, Recipient: c.worker, Purpose: fsm.PurposeOwner})
}

// sealOwned seals pass to this worker and to the recovery key and stores
// both envelopes in one command (an owner envelope needs its recovery one).
func (c *Custodian) sealOwned(ctx context.Context, vol string, epoch uint64, pass []byte) error {
	return c.sealOwnedBy(ctx, vol, epoch, pass, c.worker, c.kek.Public())
}

// sealOwnedBy seals pass to owner (whose key-encryption key is ownerKey)
// and to the recovery key, and stores both envelopes in one command.
func (c *Custodian) sealOwnedBy(ctx context.Context, vol string, epoch uint64, pass []byte, ownerName string, ownerKey fsm.PublicKey) error {
	rk, err := c.store.RecoveryKey(ctx)
	if err != nil {
		return fmt.Errorf("read the cluster's recovery key (an operator runs `ferry keys recovery-init` once): %w", err)
	}
	by := "worker " + c.worker
	owner, err := sealing.Seal(ownerKey, sealing.Binding{Volume: vol, Epoch: epoch, Recipient: ownerName, Purpose: fsm.PurposeOwner}, pass, by)
	if err != nil {
		return err
	}
	rec, err := sealing.Seal(*rk, sealing.Binding{Volume: vol, Epoch: epoch, Recipient: fsm.RecoveryRecipient, Purpose: fsm.PurposeRecovery}, pass, by)
	if err != nil {
		return err
	}
	if err := c.store.PutEnvelopes(ctx, vol, []fsm.Envelope{owner, rec}); err != nil {
		return fmt.Errorf("store the envelopes of volume %s: %w", vol, err)
	}
	return nil
}

// NewVolumeKey returns the key of a volume being created here: the one
// already sealed (a retry after a crash), or a fresh passphrase sealed to
// this worker and the recovery key before anything is formatted with it.
func (c *Custodian) NewVolumeKey(ctx context.Context, vol string) ([]byte, error) {
	key, err := c.OwnerKey(ctx, vol)
	if err == nil || !isNotFound(err) {
		return key, err
	}
	pass := passphrase.New()
	if err := c.sealOwned(ctx, vol, 1, pass); err != nil {
		clear(pass)
		return nil, err
	}
	return pass, nil
}

// NewForkKey makes the key of a fork this worker copies for another
// worker: a fresh passphrase sealed to the fork's worker (its owner) and to
// the recovery key, stored before anything is formatted with it. This
// worker cannot open it again: a retry after a crash makes a new one (the
// store accepts it until the copy is published).
func (c *Custodian) NewForkKey(ctx context.Context, fork *fsm.Volume) ([]byte, error) {
	w, err := c.store.GetWorker(ctx, fork.Worker)
	if err != nil {
		return nil, fmt.Errorf("read worker %s, the fork's owner: %w", fork.Worker, err)
	}
	if w.KEK == nil {
		return nil, fmt.Errorf("worker %s registered no key-encryption key; the fork's key cannot be sealed to it", fork.Worker)
	}
	pass := passphrase.New()
	if err := c.sealOwnedBy(ctx, fork.ID, 1, pass, w.Name, *w.KEK); err != nil {
		clear(pass)
		return nil, err
	}
	return pass, nil
}

// SealForTarget seals the key of the migrating volume to the target's
// registered key; the servers accept it only from this source, for this
// migration's target, while the source exports.
func (c *Custodian) SealForTarget(ctx context.Context, m *fsm.Migration) error {
	tw, err := c.store.GetWorker(ctx, m.Target)
	if err != nil {
		return err
	}
	if tw.KEK == nil {
		return fmt.Errorf("target worker %s registered no key-encryption key; it cannot receive the volume key", m.Target)
	}
	env, err := c.store.Envelope(ctx, m.Volume, fsm.PurposeOwner)
	if err != nil {
		return fmt.Errorf("fetch the owner envelope of volume %s: %w", m.Volume, err)
	}
	pass, err := sealing.Open(c.kek, *env, sealing.Binding{Volume: m.Volume, Recipient: c.worker, Purpose: fsm.PurposeOwner})
	if err != nil {
		return err
	}
	defer clear(pass)
	mig, err := sealing.Seal(*tw.KEK, sealing.Binding{Volume: m.Volume, Epoch: env.Epoch, Recipient: m.Target, Purpose: fsm.PurposeMigration, Migration: m.ID},
		pass, "worker "+c.worker)
	if err != nil {
		return err
	}
	if err := c.store.PutEnvelopes(ctx, m.Volume, []fsm.Envelope{mig}); err != nil {
		return fmt.Errorf("store the migration envelope of volume %s for %s: %w", m.Volume, m.Target, err)
	}
	return nil
}

// MigrationKey returns the key of an incoming volume on the target. The
// first time it opens the migration envelope and seals a fresh owner
// envelope (and a recovery one) for the destination volume, which this
// worker owns; later calls (restarts, hydration) open that owner envelope.
// So after cutover the destination's key no longer depends on the
// migration envelope, which the servers drop when the migration ends.
func (c *Custodian) MigrationKey(ctx context.Context, m *fsm.Migration) ([]byte, error) {
	key, seal, err := c.migrationKeyThenSeal(ctx, m)
	if err != nil || seal == nil {
		return key, err
	}
	if err := seal(ctx); err != nil {
		clear(key)
		return nil, err
	}
	return key, nil
}

// CloneKey is MigrationKey for the clone's build inside the machine's
// pause: key hands the datapath the key as soon as it is open, and this
// worker's own envelopes of the destination (the recovery key's read and
// a commit) are sealed meanwhile. settle waits for that seal, or, when
// key was never asked (a datapath adopted from a previous agent), fetches
// the key to seal them; nothing that relies on those envelopes (the
// clone's build proposed, anything after cutover) may happen before
// settle returned nil. A failed seal fails every later call: the step
// retries with a new CloneKey. key may be called again, from any
// goroutine: it waits for the seal in flight and opens what it sealed.
func (c *Custodian) CloneKey(m *fsm.Migration) (key func(context.Context) ([]byte, error), settle func(context.Context) error) {
	k := &cloneKey{c: c, m: m}
	return k.key, k.settle
}

type cloneKey struct {
	c       *Custodian
	m       *fsm.Migration
	mu      sync.Mutex
	asked   bool
	sealing chan error // the seal in flight, buffered: it holds the result
	failed  error      // a seal's failure, kept
}

func (k *cloneKey) key(ctx context.Context) ([]byte, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.asked = true
	if err := k.waitSeal(ctx); err != nil {
		return nil, err
	}
	pass, seal, err := k.c.migrationKeyThenSeal(ctx, k.m)
	if err == nil && seal != nil {
		k.sealing = make(chan error, 1)
		go func() { k.sealing <- seal(ctx) }()
	}
	return pass, err
}

func (k *cloneKey) settle(ctx context.Context) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.asked {
		k.asked = true
		pass, err := k.c.MigrationKey(ctx, k.m)
		clear(pass)
		return err
	}
	return k.waitSeal(ctx)
}

// waitSeal waits for the seal in flight, if any; k.mu is held.
func (k *cloneKey) waitSeal(ctx context.Context) error {
	if k.sealing != nil {
		select {
		case err := <-k.sealing:
			k.sealing = nil
			if err != nil {
				k.failed = fmt.Errorf("seal this worker's envelopes of the destination %s: %w", k.m.TargetVol, err)
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return k.failed
}

// migrationKeyThenSeal is MigrationKey returning the key as soon as it is
// open: the destination's owner envelope is looked up beside the migration
// envelope (one round trip, not two), and when this worker must still seal
// its own envelopes, seal does that (the recovery key read and a commit).
// The caller runs seal, and nothing that relies on the destination's
// envelopes may happen before it succeeded; seal clears its copy of the
// key either way.
func (c *Custodian) migrationKeyThenSeal(ctx context.Context, m *fsm.Migration) ([]byte, func(context.Context) error, error) {
	type fetched struct {
		env *fsm.Envelope
		err error
	}
	migration := make(chan fetched, 1)
	go func() {
		env, err := c.store.Envelope(ctx, m.Volume, fsm.PurposeMigration)
		migration <- fetched{env, err}
	}()
	key, err := c.OwnerKey(ctx, m.TargetVol)
	mig := <-migration
	if err == nil || !isNotFound(err) {
		return key, nil, err
	}
	if mig.err != nil {
		return nil, nil, fmt.Errorf("fetch the migration envelope of volume %s: %w", m.Volume, mig.err)
	}
	pass, err := sealing.Open(c.kek, *mig.env, sealing.Binding{Volume: m.Volume, Recipient: c.worker, Purpose: fsm.PurposeMigration, Migration: m.ID})
	if err != nil {
		return nil, nil, err
	}
	kept, epoch := bytes.Clone(pass), mig.env.Epoch
	seal := func(ctx context.Context) error {
		defer clear(kept)
		return c.sealOwned(ctx, m.TargetVol, epoch, kept)
	}
	return pass, seal, nil
}
