package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
	mnts, _ := os.ReadDir(a.vols.MountPoint(""))
	for _, e := range mnts {
		mnt := a.vols.MountPoint(e.Name())
		if _, ok := mountedAt(mnt); ok {
			if err := unmountRetry(mnt); err != nil {
				errs = append(errs, err)
			}
		}
	}
	vols, _ := os.ReadDir(filepath.Join(a.cfg.DataDir, "fuse"))
	for _, e := range vols {
		if err := a.vols.Detach(ctx, e.Name()); err != nil {
			errs = append(errs, err)
		}
		fuseDir := a.vols.FuseDir(e.Name())
		if _, ok := mountedAt(fuseDir); ok {
			// The datapath died without unmounting: a lazy unmount releases it.
			if out, err := exec.Command("fusermount3", "-u", "-z", fuseDir).CombinedOutput(); err != nil {
				errs = append(errs, fmt.Errorf("unmount FUSE %s: %w: %s", fuseDir, err, strings.TrimSpace(string(out))))
			}
		}
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

func unmountRetry(mnt string) error {
	var err error
	for i := 0; i < 50; i++ {
		out, e := exec.Command("umount", mnt).CombinedOutput()
		if e == nil {
			return nil
		}
		err = fmt.Errorf("unmount %s: %w: %s", mnt, e, strings.TrimSpace(string(out)))
		time.Sleep(100 * time.Millisecond)
	}
	return err
}
