package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
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

// lazyUnmountFUSE releases a FUSE mount whose datapath died without unmounting.
func lazyUnmountFUSE(fuseDir string) error {
	if _, ok := mountedAt(fuseDir); !ok {
		return nil
	}
	if out, err := exec.Command("fusermount3", "-u", "-z", fuseDir).CombinedOutput(); err != nil {
		return fmt.Errorf("unmount FUSE %s: %w: %s", fuseDir, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// unmountRetry tries for about five seconds; each attempt is bounded, since
// an unmount whose writeback waits on a dead source would otherwise hang.
func unmountRetry(mnt string) error {
	var err error
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		out, e := exec.CommandContext(ctx, "umount", mnt).CombinedOutput()
		cancel()
		if e == nil {
			return nil
		}
		if _, ok := mountedAt(mnt); !ok {
			return nil
		}
		err = fmt.Errorf("unmount %s: %w: %s", mnt, e, strings.TrimSpace(string(out)))
		time.Sleep(100 * time.Millisecond)
	}
	return err
}
