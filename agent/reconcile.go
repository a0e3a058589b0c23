package agent

import (
	"context"
	"os"
	"time"

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
	vols, err := a.Control.ListVolumes(ctx, a.cfg.Worker)
	if err != nil {
		a.log.Debug().Err(err).Msg("reconcile: list volumes")
		return
	}
	for _, v := range vols {
		if v.Worker != a.cfg.Worker || localID("volume", v.ID) != nil {
			continue
		}
		switch {
		case v.RemoteFork() && v.Forking():
			a.forkJob(ctx, v, a.Volumes.HydrateFork)
		case v.Forking() && v.Layout == nil:
			a.forkJob(ctx, v, a.Volumes.Fork)
		case v.State == fsm.VolCreating && v.Layout == nil:
			a.Volumes.Create(ctx, v)
		case v.State == fsm.VolCreated && v.Extending() && v.Layout != nil:
			// Hold machMu so a migration's source step cannot stop the
			// machine (and export the volume) halfway through the growth.
			a.machMu.Lock()
			if v.AttachedMachine == "" || !a.migratingMachines()[v.AttachedMachine] {
				a.Volumes.Extend(ctx, v)
			} // else the store refuses to plan it while extending: a stale listing
			a.machMu.Unlock()
		case v.State == fsm.VolDestroyed && v.AttachedMachine == "" && !a.forkBusy(v.ID):
			// (A fork's hydration still running releases its clone itself.)
			// The server destroys a volume only after its retention window
			// (and, for a migrated source, after hydrated): the files go now.
			if _, err := os.Stat(a.Data.VolumeDir(v.ID)); err == nil {
				if err := a.Data.Remove(ctx, v.ID); err != nil {
					a.log.Warn().Err(err).Str("volume", v.ID).Msg("remove destroyed volume")
				} else {
					a.log.Info().Str("volume", v.ID).Msg("destroyed volume removed from disk")
				}
			}
		}
	}
	// Forks to other workers of volumes here: this worker makes, serves
	// and finally releases their copies.
	if forks, err := a.Control.ForksFrom(ctx, a.cfg.Worker); err != nil {
		a.log.Debug().Err(err).Msg("reconcile: list forks from here")
	} else {
		for _, f := range forks {
			if f.ForkFrom == a.cfg.Worker && localID("volume", f.ID) == nil {
				a.forkJob(ctx, f, a.Volumes.ServeFork)
			}
		}
	}
	machs, err := a.Control.ListMachines(ctx, a.cfg.Worker)
	if err != nil {
		return
	}
	a.Lease.NoteAssigned(machs)
	if a.Lease.Fenced() {
		return // a fenced worker starts nothing; the fence decides what stops
	}
	for _, m := range machs {
		a.reconcileMachine(ctx, m)
	}
}

// forkJob runs job for fork v in the background, once at a time per fork:
// a copy or a hydration outlasts a reconcile pass.
func (a *Agent) forkJob(ctx context.Context, v *fsm.Volume, job func(context.Context, *fsm.Volume)) {
	if _, busy := a.forks.LoadOrStore(v.ID, struct{}{}); busy {
		return
	}
	a.forkWG.Add(1)
	go func() {
		defer a.forkWG.Done()
		defer a.forks.Delete(v.ID)
		job(ctx, v)
	}()
}

func (a *Agent) forkBusy(id string) bool {
	_, busy := a.forks.Load(id)
	return busy
}

// reconcileMachine hands a machine no migration owns to the supervisor. It
// holds machMu so a migration of this machine cannot be registered (and its
// source step stop the machine) between the check and the action: without
// it a reconcile that looked before the migration arrived restarted the
// machine the migration had just stopped (it then ran on two workers).
func (a *Agent) reconcileMachine(ctx context.Context, m *fsm.Machine) {
	a.machMu.Lock()
	defer a.machMu.Unlock()
	if m.Worker != a.cfg.Worker || a.migratingMachines()[m.ID] || localID("machine", m.ID) != nil {
		a.Machines.Forget(m.ID)
		return
	}
	a.Machines.Reconcile(ctx, m)
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
