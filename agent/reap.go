package agent

import (
	"context"
	"fmt"

	"github.com/ferry-dev/ferry/fsm"
)

// reap releases what this worker still holds for migrations that ended
// without it: a target cut off while its migration rolled back (an operator
// confirmed it gone) still has the clone, its mount, the destination volume
// and maybe the machine; a source may still serve an export. Each migration
// is reaped once (a step marker), and never when the machine is now settled
// here by the store or moved here by another migration.
func (a *Agent) reap(ctx context.Context, ms []*fsm.Migration) {
	for _, m := range ms {
		if !m.State.Terminal() || (m.Source != a.cfg.Worker && m.Target != a.cfg.Worker) || a.done(m, "reaped") {
			continue
		}
		a.mu.Lock()
		busy := a.reaping[m.ID]
		for _, mach := range a.active {
			if mach == m.Machine {
				busy = true // another migration moves this machine: its steps own it
			}
		}
		if !busy {
			a.reaping[m.ID] = true
		}
		a.mu.Unlock()
		if busy {
			continue
		}
		a.wg.Add(1)
		go func(m *fsm.Migration) {
			defer a.wg.Done()
			defer func() {
				a.mu.Lock()
				delete(a.reaping, m.ID)
				a.mu.Unlock()
			}()
			log := a.log.With().Str("migration", m.ID).Str("state", string(m.State)).Logger()
			err := retryUntil(ctx, log, "reap ended migration", func() error {
				// A step of this migration still running (one that began
				// before the end was seen) could set up again what the reap
				// releases: reap once it has stopped.
				if a.steps.Running(m.ID) {
					return fmt.Errorf("migration %s still has a step running; reaping once it stops", m.ID)
				}
				if m.Source == a.cfg.Worker {
					// The export of an ended migration serves no one.
					if err := a.Exports.Unexport(ctx, m.ID); err != nil {
						return err
					}
				}
				if m.Target == a.cfg.Worker && m.State == fsm.RolledBack {
					// Held so no new migration of this machine registers
					// (and mounts at the same place) while we release.
					a.machMu.Lock()
					defer a.machMu.Unlock()
					if a.migratingMachines()[m.Machine] {
						return nil // a new migration's steps own the machine now
					}
					// A machine this worker may not read (scoped reads: it
					// is another worker's once the migration ended) is not
					// ours either.
					mach, err := a.Control.GetMachine(ctx, m.Machine)
					if err != nil && !isNotFound(err) {
						return err
					}
					if mach == nil || mach.Worker != a.cfg.Worker {
						if err := a.releaseTarget(ctx, log, m); err != nil {
							return err
						}
						log.Warn().Msg("reaped a rolled-back migration's target side (the rollback completed without this worker)")
					}
				}
				return a.markDone(m, "reaped")
			})
			if err != nil && ctx.Err() == nil {
				log.Error().Err(err).Msg("reap failed")
			}
		}(m)
	}
}
