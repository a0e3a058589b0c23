package supervisor

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"time"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/machine"
)

// Detacher removes a machine's network namespace; idempotent.
type Detacher interface {
	Detach(ctx context.Context, machine string) error
}

// Unexporter tears an export down; idempotent.
type Unexporter interface {
	Unexport(ctx context.Context, id string) error
}

// Cleanup tears down everything a worker runs from its data dir: machines,
// mounts, loop devices, datapaths, exports and machine network namespaces.
// It is what `ferry agent cleanup` and the demo's exit run, and it is safe
// to run twice. net and exp may be nil. It returns every error it met,
// joined.
func Cleanup(ctx context.Context, dataDir string, mach machine.Driver, net Detacher, vols datapath.Backend, exp Unexporter) error {
	var errs []error
	ents, _ := os.ReadDir(filepath.Join(dataDir, "machines"))
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		// A teardown must end: a machine killed inside its volume's I/O
		// (its clone's source already torn down) has that I/O failed.
		spec := machine.Spec{ID: e.Name(), KillTimeout: 2 * time.Second, MountDir: vols.MountPoint(e.Name()), FailStuckIO: true}
		if err := mach.Stop(ctx, spec); err != nil {
			errs = append(errs, err)
		}
		if net != nil {
			if err := net.Detach(ctx, e.Name()); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := vols.CleanupAll(ctx); err != nil {
		errs = append(errs, err)
	}
	if exp != nil {
		exps, _ := os.ReadDir(filepath.Join(dataDir, "exports"))
		for _, e := range exps {
			if !e.IsDir() {
				continue
			}
			if err := exp.Unexport(ctx, e.Name()); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
