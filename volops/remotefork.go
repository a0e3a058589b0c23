package volops

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
)

// A fork to another worker takes two workers, each doing its part from the
// record alone, so either may restart at any point:
//
//   - the source volume's worker (the fork's ForkFrom) makes the fork as a
//     local fork does (freeze, copy aside, re-encrypt under a new master
//     key) into a copy of its own, seals the new key to the fork's worker,
//     serves the copy over iSCSI to that worker alone and publishes it
//     (fork_serve); once the fork is created (or destroyed) it unexports and
//     deletes the copy and says so;
//   - the fork's worker builds a clone of the served copy, mounted at once
//     like a migration's destination, hydrates it in the background,
//     dissolves it, and marks the fork created.

// Exporter serves a local volume file to one worker over iSCSI
// (iscsi/exporter.Exporter).
type Exporter interface {
	Export(ctx context.Context, id, path, target, allow string) (portal, iqn string, err error)
	Unexport(ctx context.Context, id string) error
	Live(id string) bool
}

// ExportTo serves volume vol as export id to worker alone (its
// certificate, from its registered address), or finds it served; it
// returns the portal and IQN.
func (o *Ops) ExportTo(ctx context.Context, id, vol, worker string) (portal, iqn string, err error) {
	w, err := o.store.GetWorker(ctx, worker)
	if err != nil {
		return "", "", fmt.Errorf("worker %s, the reader of %s: %w", worker, vol, err)
	}
	if w.Address == "" {
		return "", "", fmt.Errorf("worker %s registered no address; cannot restrict the export of %s to it", worker, vol)
	}
	return o.exports.Export(ctx, id, o.vols.DataPath(vol), worker, w.Address)
}

// forkExportID names the export of a fork's copy among the worker's
// exports (which are named by migration otherwise).
func forkExportID(fork string) string { return "fork-" + fork }

// forkMount is where the fork's worker mounts the fork while it hydrates.
func (o *Ops) forkMount(fork string) string { return o.vols.MountPoint("fork-" + fork) }

// ServeFork does this worker's part of fork f, whose copy it makes (f is
// one of the store's ForksFrom this worker): make and publish the copy,
// keep serving it, or release it once the fork no longer needs it.
func (o *Ops) ServeFork(ctx context.Context, f *fsm.Volume) {
	log := o.log.With().Str("volume", f.ID).Str("fork_of", f.ForkOf).Str("fork_worker", f.Worker).Logger()
	if !f.RemoteFork() || f.ForkFrom != o.worker {
		return
	}
	var err error
	switch {
	case !f.Forking():
		err = o.releaseForkCopy(ctx, f)
		if err == nil {
			log.Info().Str("state", string(f.State)).Msg("fork's copy released: its worker no longer reads it")
		}
	case f.Layout == nil:
		err = o.makeForkCopy(ctx, f)
	default:
		err = o.keepServing(ctx, f)
	}
	if err != nil {
		log.Warn().Err(err).Msg("fork to another worker: retrying on the next pass")
	}
}

// makeForkCopy makes the re-encrypted copy, serves it and publishes it.
// The fork's key is sealed to the fork's worker before anything is
// formatted with it; a crash before the publication starts over with a new
// key (the store takes envelopes from this worker until then).
func (o *Ops) makeForkCopy(ctx context.Context, f *fsm.Volume) error {
	if !o.vols.Capabilities().Fork {
		return fmt.Errorf("this data path (%s) cannot fork volumes: run the worker with the userspace backend", o.vols.Capabilities().Name)
	}
	src, err := o.store.GetVolume(ctx, f.ForkOf)
	if err != nil {
		return fmt.Errorf("source volume %s: %w", f.ForkOf, err)
	}
	if src.Worker != o.worker {
		return fmt.Errorf("source volume %s is on worker %s, not here: destroy fork %s and fork again", src.ID, src.Worker, f.ID)
	}
	// An earlier attempt may have served a copy it never published: that
	// export holds the old file open, and would serve it under the new key.
	if err := o.exports.Unexport(ctx, forkExportID(f.ID)); err != nil {
		return fmt.Errorf("stop serving an unpublished copy: %w", err)
	}
	key, err := o.keys.NewForkKey(ctx, f)
	if err != nil {
		return err
	}
	defer clear(key)
	srcKey, err := o.keys.OwnerKey(ctx, src.ID)
	if err != nil {
		return err
	}
	defer clear(srcKey)
	layout, st, err := o.vols.Fork(ctx, src.ID, srcKey, f.ID, key)
	if err != nil {
		return err
	}
	o.log.Info().Str("volume", f.ID).Dur("source_frozen", st.Frozen).Int64("copied_bytes", st.CopiedBytes).
		Int64("reencrypted_bytes", st.Reencrypted).Msg("fork's copy made; serving it to the fork's worker")
	return o.publishForkCopy(ctx, f, datapath.StoredLayout(layout))
}

// keepServing serves a published copy again after this agent restarted,
// and republishes it if the portal moved.
func (o *Ops) keepServing(ctx context.Context, f *fsm.Volume) error {
	if o.exports.Live(forkExportID(f.ID)) && f.ForkExport != nil {
		return nil
	}
	return o.publishForkCopy(ctx, f, f.Layout)
}

func (o *Ops) publishForkCopy(ctx context.Context, f *fsm.Volume, layout *fsm.LUKSLayout) error {
	zeros, err := o.KnownZero(f.ID)
	if err != nil {
		return fmt.Errorf("holes of the fork's copy: %w", err)
	}
	portal, iqn, err := o.ExportTo(ctx, forkExportID(f.ID), f.ID, f.Worker)
	if err != nil {
		return fmt.Errorf("serve the fork's copy: %w", err)
	}
	e := &fsm.Export{Portal: portal, IQN: iqn}
	if f.ForkExport != nil && *f.ForkExport == *e && f.Layout != nil {
		return nil
	}
	return o.store.ServeFork(ctx, fsm.ForkServeCmd{ID: f.ID, Layout: layout, Export: e, KnownZero: zeros})
}

// releaseForkCopy stops serving the copy, deletes it and records that.
func (o *Ops) releaseForkCopy(ctx context.Context, f *fsm.Volume) error {
	if err := o.exports.Unexport(ctx, forkExportID(f.ID)); err != nil {
		return fmt.Errorf("stop serving the fork's copy: %w", err)
	}
	if err := o.vols.Remove(ctx, f.ID); err != nil {
		return fmt.Errorf("delete the fork's copy: %w", err)
	}
	return o.store.ServeFork(ctx, fsm.ForkServeCmd{ID: f.ID, Released: true})
}

// forkPoll is how often the fork's worker looks at its clone and at the
// record while it hydrates.
const forkPoll = 200 * time.Millisecond

// forkStallAfter ends a hydration pass that made no progress for that
// long; the next reconcile pass adopts the clone and goes on.
const forkStallAfter = 2 * time.Minute

// HydrateFork does the fork's worker's part of f: clone the copy its source
// worker serves, hydrate it and mark the fork created. It returns at once
// while the copy is not published. Every step finds its work done when
// repeated: the destination file is never shrunk or rewritten, and the
// clone (its metadata on disk) is adopted.
func (o *Ops) HydrateFork(ctx context.Context, f *fsm.Volume) {
	if !f.RemoteFork() || f.Worker != o.worker || !f.Forking() || f.ForkExport == nil || f.Layout == nil {
		return
	}
	log := o.log.With().Str("volume", f.ID).Str("fork_of", f.ForkOf).Str("fork_from", f.ForkFrom).Logger()
	if err := o.hydrateFork(ctx, f); err != nil {
		log.Warn().Err(err).Msg("fork from another worker: retrying on the next pass")
		return
	}
	log.Info().Msg("fork hydrated from its source worker's copy and created")
}

func (o *Ops) hydrateFork(ctx context.Context, f *fsm.Volume) error {
	layout := datapath.LayoutOf(*f.Layout)
	if err := o.Allocate(f.ID, layout.DeviceSize()); err != nil {
		return err
	}
	key, err := o.keys.OwnerKey(ctx, f.ID)
	if err != nil {
		return err
	}
	defer clear(key)
	mnt := o.forkMount(f.ID)
	spec := datapath.CloneSpec{Volume: f.ID, Layout: layout, Portal: f.ForkExport.Portal, IQN: f.ForkExport.IQN, Source: f.ForkFrom,
		KnownZero: datapath.RangesOf(f.ForkKnownZero), Hydrate: true}
	if _, err := o.vols.MountClone(ctx, spec, key, mnt); err != nil {
		return fmt.Errorf("clone the fork's copy: %w", err)
	}
	h, err := o.vols.Clone(ctx, f.ID)
	if err != nil {
		return err
	}
	if err := h.EnableHydration(ctx); err != nil {
		return err
	}
	var last int64 = -1
	moved := time.Now()
	for {
		st, err := h.Status(ctx)
		if err != nil {
			return err
		}
		if st.Complete || st.Dissolved {
			break
		}
		if st.Progress != nil && st.Progress.HydratedBytes != last {
			last, moved = st.Progress.HydratedBytes, time.Now()
		} else if time.Since(moved) > forkStallAfter {
			reason := "no progress"
			if st.Progress != nil && st.Progress.StalledReason != "" {
				reason = st.Progress.StalledReason
			}
			return fmt.Errorf("hydration made no progress for %v (%s): is worker %s serving the copy?", forkStallAfter, reason, f.ForkFrom)
		}
		// A fork destroyed meanwhile is not hydrated further.
		if cur, err := o.store.GetVolume(ctx, f.ID); err == nil && !cur.Forking() {
			if err := o.vols.Abandon(ctx, f.ID, mnt); err != nil {
				return fmt.Errorf("fork %s is %s: release its clone: %w", f.ID, cur.State, err)
			}
			return errors.New("the fork ended while it hydrated; its clone was released")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(forkPoll):
		}
	}
	if err := h.Dissolve(ctx); err != nil {
		return err
	}
	if err := o.vols.Unmount(ctx, f.ID, mnt); err != nil {
		return err
	}
	created := fsm.VolCreated
	if err := o.store.UpdateVolume(ctx, fsm.UpdateVolumeCmd{ID: f.ID, State: &created}); err != nil {
		return err
	}
	// The clone's metadata (every region hydrated) is needed to rebuild
	// the clone only until the fork is recorded created.
	if err := os.Remove(o.vols.MetaPath(f.ID)); err != nil && !os.IsNotExist(err) {
		o.log.Warn().Err(err).Str("volume", f.ID).Msg("removing the dissolved clone's metadata")
	}
	_ = os.Remove(mnt)
	return nil
}
