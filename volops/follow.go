package volops

import (
	"context"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/retry"
)

// HydrationReports are where FollowHydration says what it sees of a copy
// (the agent proposes them to the store and keeps its metrics).
type HydrationReports struct {
	// Stalled: the copy stopped, for reason.
	Stalled func(reason string)
	// Progress reports at most once a second and returns the export the
	// store records now (nil when unknown): the source may have moved it.
	Progress func(p *datapath.Progress) *fsm.Export
	// Polled sees every status read; nil for none.
	Polled func(p *datapath.Progress)
}

// followPoll is how often FollowHydration reads the clone's status.
const followPoll = 100 * time.Millisecond

// FollowHydration waits for clone p of volume vol to finish its background
// copy, reporting progress and stalls to r, reconnecting to the export
// when the source moved it (a restart elsewhere), then dissolves the
// clone into the plain destination. It returns the copy's last progress
// (nil when the data path reports none). A copy that stops moving is
// reported stalled after stallAfter, with why (NoProgressReason): the
// userspace engine retries a failing destination write forever and marks
// only source failures itself.
func (o *Ops) FollowHydration(ctx context.Context, log zerolog.Logger, p datapath.CloneHandle, vol string, export *fsm.Export,
	stallAfter time.Duration, r HydrationReports) (*datapath.Progress, error) {
	if err := p.EnableHydration(ctx); err != nil { // idempotent; after a datapath restart
		return nil, err
	}
	follow := func(e *fsm.Export) bool {
		rt, ok := p.(datapath.Retargeter)
		if e == nil || !ok {
			return true // nothing to follow, or a data path that cannot
		}
		if err := rt.Retarget(ctx, e.Portal, e.IQN); err != nil {
			log.Warn().Err(err).Str("portal", e.Portal).Msg("cannot reconnect to the export's recorded portal yet")
			return false
		}
		return true
	}
	follow(export)
	var watch ProgressWatch
	var lastReport time.Time
	for {
		st, err := p.Status(ctx)
		if err != nil {
			return nil, err
		}
		pr := st.Progress
		switch {
		case pr != nil && pr.Stalled:
			r.Stalled(pr.StalledReason)
		case pr != nil && !st.Complete && !st.Dissolved && watch.Stuck(time.Now(), pr.HydratedBytes, stallAfter):
			r.Stalled(o.NoProgressReason(vol, pr, time.Since(watch.Since())))
		}
		if st.Complete || st.Dissolved {
			if err := p.Dissolve(ctx); err != nil {
				return nil, err
			}
			log.Info().Msg("hydrated; clone dissolved into the destination")
			return pr, nil
		}
		if pr != nil && r.Polled != nil {
			r.Polled(pr)
		}
		if pr != nil && time.Since(lastReport) >= time.Second {
			lastReport = time.Now()
			if cur := r.Progress(pr); cur != nil && (export == nil || *cur != *export) {
				log.Info().Str("portal", cur.Portal).Msg("the source moved its export; reconnecting")
				if follow(cur) {
					export = cur
				}
			}
		}
		if !retry.Sleep(ctx, followPoll) {
			return nil, ctx.Err()
		}
	}
}
