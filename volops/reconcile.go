package volops

import (
	"context"
	"os"

	"github.com/ferry-dev/ferry/fsm"
)

// Guard runs fn unless a migration moves machine ("" for none), and keeps
// migrations off it while fn runs (the agent's lock).
type Guard func(machine string, fn func())

// Reconcile brings the volumes the store assigns to this worker (vols) and
// the forks to other workers whose copy this worker makes (forks) to their
// recorded state: it formats new volumes, grows extended ones, makes,
// serves and hydrates forks, and removes destroyed volumes' files. A
// fork's copy or hydration outlasts a pass: it runs in the background, one
// job at a time per volume, until ctx ends (WaitJobs waits for them). guard
// runs a volume's growth so no migration's source step stops its machine
// (and exports the volume) halfway through.
func (o *Ops) Reconcile(ctx context.Context, vols, forks []*fsm.Volume, guard Guard) {
	for _, v := range vols {
		if v.Worker != o.worker || fsm.LocalID("volume", v.ID) != nil {
			continue
		}
		switch {
		case v.RemoteFork() && v.Forking():
			o.job(ctx, v, o.HydrateFork)
		case v.Forking() && v.Layout == nil:
			o.job(ctx, v, o.Fork)
		case v.State == fsm.VolCreating && v.Layout == nil:
			o.Create(ctx, v)
		case v.State == fsm.VolCreated && v.Extending() && v.Layout != nil:
			// A machine being migrated is skipped: the store refuses to
			// plan a migration while extending, so the listing was stale.
			guard(v.AttachedMachine, func() { o.Extend(ctx, v) })
		case v.State == fsm.VolDestroyed && v.AttachedMachine == "" && !o.jobBusy(v.ID):
			// (A fork's hydration still running releases its clone itself.)
			// The server destroys a volume only after its retention window
			// (and, for a migrated source, after hydrated): the files go now.
			if _, err := os.Stat(o.vols.VolumeDir(v.ID)); err == nil {
				if err := o.vols.Remove(ctx, v.ID); err != nil {
					o.log.Warn().Err(err).Str("volume", v.ID).Msg("remove destroyed volume")
				} else {
					o.log.Info().Str("volume", v.ID).Msg("destroyed volume removed from disk")
				}
			}
		}
	}
	for _, f := range forks {
		if f.ForkFrom == o.worker && fsm.LocalID("volume", f.ID) == nil {
			o.job(ctx, f, o.ServeFork)
		}
	}
}

// job runs fn for volume v in the background unless a job of v still runs.
func (o *Ops) job(ctx context.Context, v *fsm.Volume, fn func(context.Context, *fsm.Volume)) {
	if _, busy := o.jobs.LoadOrStore(v.ID, struct{}{}); busy {
		return
	}
	o.jobWG.Add(1)
	go func() {
		defer o.jobWG.Done()
		defer o.jobs.Delete(v.ID)
		fn(ctx, v)
	}()
}

func (o *Ops) jobBusy(id string) bool {
	_, busy := o.jobs.Load(id)
	return busy
}

// WaitJobs waits for the background jobs Reconcile started; only the
// caller of Reconcile calls it, once it stopped calling Reconcile.
func (o *Ops) WaitJobs() { o.jobWG.Wait() }
