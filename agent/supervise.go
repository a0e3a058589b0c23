package agent

import (
	"context"
	"fmt"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/machine"
)

// reviveDatapath repairs vol when its datapath died under a mounted
// filesystem: the machine on it is stopped (its disk fails every I/O; what
// it saw acknowledged is in the volume's files), the dead chain released,
// and the caller mounts the volume and starts the machine again. It reports
// whether it did anything.
func (a *Agent) reviveDatapath(ctx context.Context, log zerolog.Logger, vol string, spec machine.Spec) (bool, error) {
	rv, ok := a.vols.(datapath.Reviver)
	if !ok || !rv.DatapathDead(ctx, vol) {
		return false, nil
	}
	log.Error().Str("volume", vol).Msg("the volume's datapath died under its mount: stopping the machine, restarting the datapath, remounting")
	a.met.datapathRestarts.Inc()
	spec.KillSignal = "SIGKILL" // its disk is gone: nothing to flush
	if err := a.mach.Stop(ctx, spec); err != nil {
		return true, fmt.Errorf("stop machine %s over the dead datapath of volume %s: %w", spec.ID, vol, err)
	}
	if err := rv.ReleaseDead(ctx, vol, a.vols.MountPoint(spec.ID)); err != nil {
		return true, err
	}
	return true, nil
}

// superviseLocal revives the datapath of a machine that runs here outside
// any migration, then starts it again.
func (a *Agent) superviseLocal(ctx context.Context, m *fsm.Machine, spec machine.Spec) {
	log := a.log.With().Str("machine", m.ID).Logger()
	revived, err := a.reviveDatapath(ctx, log, m.Volume, spec)
	if err != nil {
		log.Error().Err(err).Msg("cannot revive the datapath yet")
		return
	}
	if !revived {
		return
	}
	if err := a.startLocal(ctx, m); err != nil {
		log.Error().Err(err).Msg("datapath revived but the machine did not start; retrying")
		return
	}
	log.Warn().Msg("datapath restarted and the machine started again")
}
