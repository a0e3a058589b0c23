package agent

import (
	"context"
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
		case v.State == fsm.VolCreating && v.Layout == nil:
			a.createVolume(ctx, v)
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

func (a *Agent) migratingMachines() map[string]bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make(map[string]bool, len(a.active))
	for _, m := range a.active {
		out[m] = true
	}
	return out
}
