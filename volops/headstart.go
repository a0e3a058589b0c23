package volops

import (
	"context"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/internal/retry"
)

// MachineHeadStart is how long after cutover the background copy waits at
// most: the machine's start-up reads and first fsyncs (its recovery) then
// have the source's export to themselves. Measured with the demo on 2 busy
// cores: with the copy starting at once, the first records' scan and fsync
// took 50 to 160 ms; 300 ms later, 3 to 30 ms.
//
// Where the data path counts the bytes it fetched, the wait ends sooner:
// once headStartMin has passed, the machine fetched, and nothing was
// fetched from the source for
// HeadStartQuiet, the machine's start-up reads are over (its writes are
// local and fetch nothing). On a slow link the fixed wait was idle link
// time: 6 % of a 512 MiB migration at 1 Gbit/s.
const (
	MachineHeadStart = 250 * time.Millisecond
	headStartMin     = 50 * time.Millisecond
	HeadStartQuiet   = 40 * time.Millisecond
	headStartPoll    = 10 * time.Millisecond
)

// HeadStart waits until the machine's start-up reads from clone p are
// over, or until MachineHeadStart after cutover; it returns at once when
// that has passed (an agent restarted later). Without byteCounters (a data
// path that does not count fetched bytes) it waits the whole head start.
func HeadStart(ctx context.Context, log zerolog.Logger, p datapath.CloneHandle, byteCounters bool, cutover time.Time) error {
	deadline := cutover.Add(MachineHeadStart)
	if !byteCounters {
		if !retry.Sleep(ctx, min(time.Until(deadline), MachineHeadStart)) {
			return ctx.Err()
		}
		return nil
	}
	// Quiet counts only once the machine fetched after the first look: the
	// machine's process starts in the tens of milliseconds after cutover,
	// and a quiet start is not the end of its reads (at 20 GiB the trim and
	// the copy began beside its recovery reads).
	last, lastAt, reading := int64(-1), cutover, false
	for {
		now := time.Now()
		if !now.Before(deadline) {
			return nil
		}
		if st, err := p.Status(ctx); err == nil && st.Progress != nil {
			if st.Progress.FetchedBytes != last { // the first look too: what came before it is unknown
				reading = reading || last >= 0
				last, lastAt = st.Progress.FetchedBytes, now
			}
		} else {
			lastAt = now // no count: as if the machine still read
		}
		if reading && now.Sub(cutover) >= headStartMin && now.Sub(lastAt) >= HeadStartQuiet {
			log.Debug().Dur("after_cutover", now.Sub(cutover)).Msg("the machine's start-up reads are over; hydration starts")
			return nil
		}
		if !retry.Sleep(ctx, min(headStartPoll, time.Until(deadline))) {
			return ctx.Err()
		}
	}
}
