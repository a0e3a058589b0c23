package failpoint

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
)

func TestPause(t *testing.T) {
	bg := context.Background()
	if err := Pause(bg, bg, zerolog.Nop(), fsm.EvTrimmed, 0); err != nil {
		t.Fatalf("no failpoint: %v", err)
	}
	// A pause outlives the step's deadline: it sleeps on the run's context.
	step, cancel := context.WithTimeout(bg, time.Millisecond)
	defer cancel()
	t0 := time.Now()
	if err := Pause(step, bg, zerolog.Nop(), fsm.EvTrimmed, 50*time.Millisecond); err != nil || time.Since(t0) < 50*time.Millisecond {
		t.Fatalf("pause = %v after %v; want nil after 50ms", err, time.Since(t0))
	}
	run, stop := context.WithCancel(bg)
	stop()
	if err := Pause(bg, run, zerolog.Nop(), fsm.EvTrimmed, time.Hour); !errors.Is(err, context.Canceled) {
		t.Fatalf("pause with the run ended = %v, want context.Canceled", err)
	}
	// Hang holds until the step's context ends, with its cause.
	why := errors.New("the downtime budget is spent")
	step, cancel = context.WithDeadlineCause(bg, time.Now().Add(20*time.Millisecond), why)
	defer cancel()
	if err := Pause(step, bg, zerolog.Nop(), fsm.EvTrimmed, Hang); !errors.Is(err, why) {
		t.Fatalf("hang = %v, want the step's cause", err)
	}
}
