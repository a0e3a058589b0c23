package agent

import (
	"context"
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
	defer a.Volumes.WaitJobs()
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
	// Forks to other workers of volumes here: this worker makes, serves
	// and finally releases their copies.
	forks, err := a.Control.ForksFrom(ctx, a.cfg.Worker)
	if err != nil {
		a.log.Debug().Err(err).Msg("reconcile: list forks from here")
	}
	a.Volumes.Reconcile(ctx, vols, forks, a.unlessMigrating)
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

// unlessMigrating runs fn unless a migration moves machine, holding machMu
// so none stops it (and exports its volume) while fn runs.
func (a *Agent) unlessMigrating(machine string, fn func()) {
	a.machMu.Lock()
	defer a.machMu.Unlock()
	if machine == "" || !a.migratingMachines()[machine] {
		fn()
	}
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
