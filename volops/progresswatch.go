package volops

import "time"

// ProgressWatch notices hydration that stopped moving although the clone
// engine does not call itself stalled: the userspace engine retries a failing
// destination write (a full disk) forever and only marks source failures.
// NoProgressReason then says why.
type ProgressWatch struct {
	last  int64
	since time.Time
}

// Stuck reports whether hydrated has not grown for at least after.
func (w *ProgressWatch) Stuck(now time.Time, hydrated int64, after time.Duration) bool {
	if w.since.IsZero() || hydrated != w.last {
		w.last, w.since = hydrated, now
		return false
	}
	return now.Sub(w.since) >= after
}

// Since is when hydrated last changed.
func (w *ProgressWatch) Since() time.Time { return w.since }
