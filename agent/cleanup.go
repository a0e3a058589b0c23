package agent

import (
	"context"
	"errors"
	"os"
	"time"

	"github.com/ferry-dev/ferry/machine"
)

// Cleanup tears down everything this worker runs from its data dir:
// machines, mounts, loop devices, datapaths, exports and machine network
// namespaces. It is what `ferry agent cleanup` and the demo's exit run, and
// it is safe to run twice. It returns every error it met, joined.
func (a *Agent) Cleanup(ctx context.Context) error {
	var errs []error
	ents, _ := os.ReadDir(a.stateDir("machines"))
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		spec := machine.Spec{ID: e.Name(), KillTimeout: 2 * time.Second}
		if err := a.mach.Stop(ctx, spec); err != nil {
			errs = append(errs, err)
		}
		if a.net != nil {
			if err := a.net.Detach(ctx, e.Name()); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := a.vols.CleanupAll(ctx); err != nil {
		errs = append(errs, err)
	}
	if a.exp != nil {
		exps, _ := os.ReadDir(a.stateDir("exports"))
		for _, e := range exps {
			if !e.IsDir() {
				continue
			}
			if err := a.exp.Unexport(ctx, e.Name()); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
