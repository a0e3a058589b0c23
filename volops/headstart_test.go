package volops

import (
	"context"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
)

// countingClone's count of fetched bytes grows while the machine "fetches":
// 4 KiB every 5 ms from cutover+from for dur. Worked out from the clock at
// each status read, so a test goroutine descheduled on a loaded host
// cannot fake a quiet spell.
type countingClone struct {
	datapath.CloneHandle
	cutover   time.Time
	from, dur time.Duration
}

func (c *countingClone) Status(context.Context) (*datapath.Status, error) {
	e := min(time.Since(c.cutover), c.from+c.dur) - c.from
	var fetched int64
	if e > 0 {
		fetched = 4096 * int64(e/(5*time.Millisecond))
	}
	return &datapath.Status{Progress: &datapath.Progress{FetchedBytes: fetched}}, nil
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
		cutover := time.Now()
		c := &countingClone{cutover: cutover, from: fetchFrom, dur: fetchFor}
		if err := HeadStart(ctx, zerolog.Nop(), c, counters, cutover); err != nil {
			t.Fatal(err)
		}
		took := time.Since(cutover)
		return took, cutover.Add(fetchFrom + fetchFor.Truncate(5*time.Millisecond))
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
