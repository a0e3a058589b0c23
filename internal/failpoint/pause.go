package failpoint

import (
	"context"
	"fmt"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
)

// Pause holds an agent's step for d (its PauseBefore failpoint) before it
// proposes ev. A positive d sleeps on run, the agent's own context, so the
// step's deadline does not cut a test's pause short; Hang blocks until step
// (the step's context) ends, as a hung tool run with it would. It returns
// the error of the context that ended the hold.
func Pause(step, run context.Context, log zerolog.Logger, ev fsm.Event, d time.Duration) error {
	switch {
	case d < 0:
		log.Warn().Str("event", string(ev)).Msg("failpoint: hanging before proposing until the step's context ends")
		<-step.Done()
		return fmt.Errorf("propose %s: %w", ev, context.Cause(step))
	case d > 0:
		log.Warn().Str("event", string(ev)).Dur("pause", d).Msg("failpoint: pausing before proposing")
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
		case <-run.Done():
			return run.Err()
		}
	}
	return nil
}
