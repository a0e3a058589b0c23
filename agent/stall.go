package agent

import "time"

// progressWatch notices hydration that stopped moving although the clone
// engine does not call itself stalled: the userspace engine retries a failing
// destination write (a full disk) forever and only marks source failures.
type progressWatch struct {
	last  int64
	since time.Time
}

// stuck reports whether hydrated has not grown for at least after.
func (w *progressWatch) stuck(now time.Time, hydrated int64, after time.Duration) bool {
	if w.since.IsZero() || hydrated != w.last {
		w.last, w.since = hydrated, now
		return false
	}
	return now.Sub(w.since) >= after
}
