package server

import (
	"fmt"
	"sync"

	"golang.org/x/time/rate"

	"github.com/ferry-dev/ferry/fsm"
)

// Write rate limits, per certificate identity. A worker proposes a few
// writes per migration step and a heartbeat every few seconds; the limit
// stops one identity (a compromised worker, a runaway script) from filling
// the log every replica must apply.
const (
	DefaultWriteRate  = 50  // writes per second per identity
	DefaultWriteBurst = 100 // writes in a burst
	maxLimiters       = 4096
)

type writeLimits struct {
	rate  rate.Limit
	burst int

	mu sync.Mutex
	m  map[fsm.Identity]*rate.Limiter
}

// newWriteLimits returns per-identity limits: perSec 0 takes the default,
// a negative perSec disables them (benchmarks).
func newWriteLimits(perSec float64, burst int) *writeLimits {
	if perSec == 0 {
		perSec = DefaultWriteRate
	}
	if burst <= 0 {
		burst = DefaultWriteBurst
	}
	l := rate.Limit(perSec)
	if perSec < 0 {
		l = rate.Inf
	}
	return &writeLimits{rate: l, burst: burst, m: map[fsm.Identity]*rate.Limiter{}}
}

// allow takes one write from id's budget, or refuses with rate_limited.
func (w *writeLimits) allow(id fsm.Identity) *fsm.Refusal {
	if w.rate == rate.Inf {
		return nil
	}
	w.mu.Lock()
	lim, ok := w.m[id]
	if !ok {
		if len(w.m) >= maxLimiters {
			// Identities come from certificates of our CA, so this is
			// unusual; forget the full ones' history rather than grow.
			for k, l := range w.m {
				if l.Tokens() >= float64(w.burst) {
					delete(w.m, k)
				}
			}
		}
		lim = rate.NewLimiter(w.rate, w.burst)
		w.m[id] = lim
	}
	w.mu.Unlock()
	if !lim.Allow() {
		return &fsm.Refusal{Kind: fsm.RefuseBusy, Code: fsm.CodeRateLimited,
			Reason: fmt.Sprintf("%s exceeded %v writes per second (burst %d); slow down and retry", id, float64(w.rate), w.burst)}
	}
	return nil
}
