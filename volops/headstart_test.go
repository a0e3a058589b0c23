package volops

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
)

// countingClone's count of fetched bytes grows while the machine "fetches".
type countingClone struct {
	datapath.CloneHandle
	fetched atomic.Int64
}

func (c *countingClone) Status(context.Context) (*datapath.Status, error) {
	return &datapath.Status{Progress: &datapath.Progress{FetchedBytes: c.fetched.Load()}}, nil
}

// The background copy waits while the machine fetches and starts once its
// fetches stop; without byte counters it waits the whole head start.
func TestHeadStartEndsWhenTheMachineStopsFetching(t *testing.T) {
	ctx := context.Background()
	var runFrom func(counters bool, fetchFrom, fetchFor time.Duration) (time.Duration, time.Time)
	run := func(counters bool, fetchFor time.Duration) (time.Duration, time.Time) {
		return runFrom(counters, 0, fetchFor)
	}
	runFrom = func(counters bool, fetchFrom, fetchFor time.Duration) (time.Duration, time.Time) {
		c := &countingClone{}
		cutover := time.Now()
		stop := make(chan struct{})
		lastFetch := make(chan time.Time, 1)
		go func() {
			t := time.NewTicker(5 * time.Millisecond)
			defer t.Stop()
			last := time.Now()
			defer func() { lastFetch <- last }()
			for time.Since(cutover) < fetchFrom {
				select {
				case <-stop:
					return
				case <-t.C:
				}
			}
			for time.Since(cutover) < fetchFrom+fetchFor {
				select {
				case <-stop:
					return
				case <-t.C:
					c.fetched.Add(4096)
					last = time.Now()
				}
			}
		}()
		if err := HeadStart(ctx, zerolog.Nop(), c, counters, cutover); err != nil {
			t.Fatal(err)
		}
		took := time.Since(cutover)
		close(stop)
		return took, <-lastFetch
	}

	took, _ := run(false, 0)
	if took < MachineHeadStart {
		t.Errorf("without byte counters the copy waited %v, want the whole head start %v", took, MachineHeadStart)
	}
	took, _ = run(true, time.Second)
	if took < MachineHeadStart {
		t.Errorf("with the machine fetching throughout, the copy waited %v, want the whole head start %v", took, MachineHeadStart)
	}
	start := time.Now()
	took, last := run(true, 100*time.Millisecond)
	if ended := start.Add(took); ended.Sub(last) < HeadStartQuiet {
		t.Errorf("the copy started %v after the machine's last fetch, want at least %v of quiet", ended.Sub(last), HeadStartQuiet)
	}
	if took >= MachineHeadStart {
		t.Errorf("the machine stopped fetching after 100ms, yet the copy waited the whole head start (%v)", took)
	}
	// A machine whose process takes 70 ms to start reading: the quiet
	// before its first fetch does not end the head start.
	start = time.Now()
	took, last = runFrom(true, 70*time.Millisecond, 40*time.Millisecond)
	if ended := start.Add(took); ended.Sub(last) < HeadStartQuiet || took < 110*time.Millisecond {
		t.Errorf("the copy started %v after cutover, %v after the machine's last fetch (its reads ran 70-110 ms): want after them and %v of quiet", took, ended.Sub(last), HeadStartQuiet)
	}
}
