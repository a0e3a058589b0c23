package agent

import (
	"context"
	"errors"
	"os"
	"time"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
)

// reconcileLoop brings volumes and machines that are not migrating to their
// recorded state: new volumes get formatted, machines recorded as running on
// this worker run here (after an agent or host restart too). Machines in an
// active migration belong to the migration's steps alone.
func (a *Agent) reconcileLoop(ctx context.Context) {
	// Wait for the first view of our migrations: until then we cannot tell
	// which machines a migration owns.
	select {
	case <-ctx.Done():
		return
	case <-a.firstWatch:
	}
	defer a.forkWG.Wait()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		a.reconcile(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (a *Agent) reconcile(ctx context.Context) {
	vols, err := a.cp.ListVolumes(ctx, a.cfg.Worker)
	if err != nil {
		a.log.Debug().Err(err).Msg("reconcile: list volumes")
		return
	}
	for _, v := range vols {
		if v.Worker != a.cfg.Worker || localID("volume", v.ID) != nil {
			continue
		}
		switch {
		case v.Forking() && v.Layout == nil:
			if _, busy := a.forks.LoadOrStore(v.ID, struct{}{}); !busy {
				a.forkWG.Add(1)
				go func() {
					defer a.forkWG.Done()
					defer a.forks.Delete(v.ID)
					a.forkVolume(ctx, v)
				}()
			}
		case v.State == fsm.VolCreating && v.Layout == nil:
			a.createVolume(ctx, v)
		case v.State == fsm.VolCreated && v.Extending() && v.Layout != nil:
			a.extendVolume(ctx, v)
		case v.State == fsm.VolDestroyed && v.AttachedMachine == "":
			// The server destroys a volume only after its retention window
			// (and, for a migrated source, after hydrated): the files go now.
			if _, err := os.Stat(a.vols.VolumeDir(v.ID)); err == nil {
				if err := a.vols.Remove(ctx, v.ID); err != nil {
					a.log.Warn().Err(err).Str("volume", v.ID).Msg("remove destroyed volume")
				} else {
					a.log.Info().Str("volume", v.ID).Msg("destroyed volume removed from disk")
				}
			}
		}
	}
	machs, err := a.cp.ListMachines(ctx, a.cfg.Worker)
	if err != nil {
		return
	}
	a.fence.noteAssigned(a.cfg.Worker, machs)
	if a.Fenced() {
		return // a fenced worker starts nothing; the fence decides what stops
	}
	for _, m := range machs {
		a.reconcileMachine(ctx, m)
	}
}

// reconcileMachine starts or stops one machine that no migration owns. It
// holds machMu so a migration of this machine cannot be registered (and its
// source step stop the machine) between the check and the action: without
// it a reconcile that looked before the migration arrived restarted the
// machine the migration had just stopped (it then ran on two workers).
func (a *Agent) reconcileMachine(ctx context.Context, m *fsm.Machine) {
	a.machMu.Lock()
	defer a.machMu.Unlock()
	if m.Worker != a.cfg.Worker || a.migratingMachines()[m.ID] || localID("machine", m.ID) != nil {
		a.restarts.forget(m.ID)
		return
	}
	spec, err := a.machineSpec(m, a.machineNS(m.ID))
	if err != nil {
		return
	}
	if m.State == fsm.MachineRunning {
		a.superviseLocal(ctx, m, spec)
	}
	st, _ := a.mach.Status(ctx, spec)
	switch {
	case m.State == fsm.MachineRunning && st == "running":
		a.restarts.sawRunning(m.ID)
		// Already here: keep its volume and datapath up (idempotent).
		if err := a.startLocal(ctx, m); err != nil {
			a.log.Warn().Err(err).Str("machine", m.ID).Msg("cannot start machine")
		}
		return
	case m.State != fsm.MachineRunning && st != "running":
		a.restarts.forget(m.ID)
		return
	case m.State == fsm.MachineRunning:
		// Recorded running, not running: a crash (or a first start).
		if !a.restartPolicy(ctx, m) {
			return
		}
	}
	// The record was listed before the lock and may be stale (a migration
	// may have moved the machine meanwhile): act on a fresh one.
	fresh, err := a.cp.GetMachine(ctx, m.ID)
	if err != nil || fresh.Worker != a.cfg.Worker {
		return
	}
	switch fresh.State {
	case fsm.MachineRunning:
		if err := a.startLocal(ctx, fresh); err != nil {
			a.log.Warn().Err(err).Str("machine", m.ID).Msg("cannot start machine")
		} else {
			a.restarts.sawRunning(m.ID)
		}
	case fsm.MachineStopped, fsm.MachineFailed:
		a.restarts.forget(m.ID)
		if st == "running" {
			if err := a.mach.Stop(ctx, spec); err != nil {
				a.log.Warn().Err(err).Str("machine", m.ID).Msg("cannot stop machine")
			}
		}
	}
}

// restartPolicy applies the restart policy to a machine recorded running
// that does not run; it reports whether to start it now.
func (a *Agent) restartPolicy(ctx context.Context, m *fsm.Machine) bool {
	v := a.restarts.stopped(m.ID, time.Now())
	log := a.log.With().Str("machine", m.ID).Logger()
	if v.Crashed {
		a.met.crashes.Inc()
		n := v.Crashes
		cmd := fsm.UpdateMachineCmd{ID: m.ID, Crashes: &n}
		if v.Failed {
			failed := fsm.MachineFailed
			cmd.State = &failed
			a.met.failed.Inc()
			log.Error().Int("crashes", n).Dur("window", a.cfg.RestartWindow).
				Msg("machine crashed too often: marked failed, not restarted (fix it, then `ferry machine start`)")
		} else {
			log.Warn().Int("crashes", n).Dur("restart_in", v.Wait).Msg("machine crashed; restarting after a backoff")
		}
		if err := a.cp.UpdateMachine(ctx, cmd); err != nil {
			log.Warn().Err(err).Msg("could not record the crash")
		}
		if v.Failed {
			return false
		}
	}
	return v.Wait == 0
}

func (a *Agent) createVolume(ctx context.Context, v *fsm.Volume) {
	log := a.log.With().Str("volume", v.ID).Logger()
	key, err := a.newVolumeKey(ctx, v.ID)
	if err != nil {
		log.Warn().Err(err).Msg("cannot make or open the volume's key")
		return
	}
	defer clear(key)
	layout, err := a.vols.Create(ctx, v.ID, v.Size, key)
	if err != nil {
		log.Error().Err(err).Msg("create volume")
		return
	}
	created := fsm.VolCreated
	if err := a.cp.UpdateVolume(ctx, fsm.UpdateVolumeCmd{ID: v.ID, State: &created, Layout: datapath.StoredLayout(layout)}); err != nil {
		log.Error().Err(err).Msg("record created volume")
		return
	}
	log.Info().Int64("size", v.Size).Int64("data_offset", layout.DataOffset).Msg("volume created")
}

// extendVolume grows a volume an operator extended, under its running
// machine if it runs here, and reports the new size and layout, which ends
// the request. A failure is retried on the next pass: every step of the
// data path's Extend finds its work done when repeated.
func (a *Agent) extendVolume(ctx context.Context, v *fsm.Volume) {
	log := a.log.With().Str("volume", v.ID).Int64("size", v.Size).Int64("want_size", v.WantSize).Logger()
	if !a.vols.Capabilities().Extend {
		log.Warn().Str("backend", a.vols.Capabilities().Name).Msg("extend requested but this data path cannot extend volumes; run the worker with the userspace backend")
		return
	}
	// Hold machMu so a migration's source step cannot stop the machine
	// (and export the volume) halfway through the growth.
	a.machMu.Lock()
	defer a.machMu.Unlock()
	if v.AttachedMachine != "" && a.migratingMachines()[v.AttachedMachine] {
		return // the store refuses to plan it while extending; a stale listing
	}
	key, err := a.ownerKey(ctx, v.ID)
	if err != nil {
		log.Warn().Err(err).Msg("extend: volume key")
		return
	}
	defer clear(key)
	layout, err := a.vols.Extend(ctx, v.ID, datapath.LayoutOf(*v.Layout), v.WantSize, key)
	if errors.Is(err, datapath.ErrOnlineResizeDenied) {
		// The volume grew; the mounted filesystem grows once the machine
		// stopped: then its mount goes and this same step runs offline.
		if !a.unmountStopped(ctx, v) {
			log.Warn().Err(err).Msg("extend: the filesystem grows once the machine stops")
			return
		}
		layout, err = a.vols.Extend(ctx, v.ID, datapath.LayoutOf(*v.Layout), v.WantSize, key)
	}
	if err != nil {
		log.Error().Err(err).Msg("extend volume")
		return
	}
	size := v.WantSize
	if err := a.cp.UpdateVolume(ctx, fsm.UpdateVolumeCmd{ID: v.ID, Size: &size, Layout: datapath.StoredLayout(layout)}); err != nil {
		log.Error().Err(err).Msg("record extended volume")
		return
	}
	log.Info().Int64("payload_size", layout.PayloadSize).Msg("volume extended")
}

// unmountStopped unmounts v if the machine it is attached to is recorded
// stopped and does not run here; it reports whether it did.
func (a *Agent) unmountStopped(ctx context.Context, v *fsm.Volume) bool {
	if v.AttachedMachine == "" {
		return false
	}
	m, err := a.cp.GetMachine(ctx, v.AttachedMachine)
	if err != nil || m.Worker != a.cfg.Worker || m.State != fsm.MachineStopped {
		return false
	}
	spec, err := a.machineSpec(m, a.machineNS(m.ID))
	if err != nil {
		return false
	}
	if st, _ := a.mach.Status(ctx, spec); st == "running" {
		return false
	}
	if err := a.vols.Unmount(ctx, v.ID, a.vols.MountPoint(m.ID)); err != nil {
		a.log.Warn().Err(err).Str("volume", v.ID).Msg("extend: unmount the stopped machine's volume")
		return false
	}
	return true
}

// forkVolume makes the copy an operator's fork asked for, from the source
// volume on this worker while its machine keeps running, and marks the fork
// created. The fork's key is its own: a fresh passphrase this worker seals to itself and the recovery key.
// It takes no machine lock: the store refuses to migrate or extend the
// source while the fork is being made.
func (a *Agent) forkVolume(ctx context.Context, v *fsm.Volume) {
	log := a.log.With().Str("volume", v.ID).Str("fork_of", v.ForkOf).Logger()
	if !a.vols.Capabilities().Fork {
		log.Warn().Str("backend", a.vols.Capabilities().Name).Msg("fork requested but this data path cannot fork volumes; run the worker with the userspace backend")
		return
	}
	src, err := a.cp.GetVolume(ctx, v.ForkOf)
	if err != nil {
		log.Warn().Err(err).Msg("fork: source volume")
		return
	}
	if src.Worker != a.cfg.Worker {
		log.Warn().Str("source_worker", src.Worker).Msg("fork: the source is on another worker; forks across workers are not supported")
		return
	}
	dstKey, err := a.newVolumeKey(ctx, v.ID)
	if err != nil {
		log.Warn().Err(err).Msg("fork: seal the fork's new key")
		return
	}
	defer clear(dstKey)
	srcKey, err := a.ownerKey(ctx, src.ID)
	if err != nil {
		log.Warn().Err(err).Msg("fork: source volume key")
		return
	}
	defer clear(srcKey)
	layout, st, err := a.vols.Fork(ctx, src.ID, srcKey, v.ID, dstKey)
	if err != nil {
		log.Error().Err(err).Msg("fork volume")
		return
	}
	created := fsm.VolCreated
	if err := a.cp.UpdateVolume(ctx, fsm.UpdateVolumeCmd{ID: v.ID, State: &created, Layout: datapath.StoredLayout(layout)}); err != nil {
		log.Error().Err(err).Msg("record forked volume")
		return
	}
	log.Info().Dur("source_frozen", st.Frozen).Int64("copied_bytes", st.CopiedBytes).Int64("reencrypted_bytes", st.Reencrypted).Msg("volume forked")
}

func (a *Agent) migratingMachines() map[string]bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[string]bool, len(a.active))
	for _, m := range a.active {
		out[m] = true
	}
	return out
}
