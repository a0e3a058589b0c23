package supervisor

import (
	"sync"
	"time"

	"github.com/ferry-dev/ferry/internal/retry"
)

// restarts is the restart policy for machines that crash on this worker
// (Nomad's restart block, Kubernetes' CrashLoopBackOff): each crash waits
// a jittered, doubling delay before the next start, and MaxCrashes crashes
// within RestartWindow mark the machine failed, after which only an
// operator starts it again.
type restarts struct {
	mu      sync.Mutex
	first   time.Duration
	max     time.Duration
	window  time.Duration
	limit   int
	running map[string]bool           // seen running since the last start we made
	crashes map[string][]time.Time    // crash times within the window
	next    map[string]time.Time      // no start before
	backoff map[string]*retry.Backoff // per machine
}

func newRestarts(first, max, window time.Duration, limit int) *restarts {
	return &restarts{first: first, max: max, window: window, limit: limit,
		running: map[string]bool{}, crashes: map[string][]time.Time{}, next: map[string]time.Time{}, backoff: map[string]*retry.Backoff{}}
}

// sawRunning records that the machine runs.
func (r *restarts) sawRunning(id string) {
	r.mu.Lock()
	r.running[id] = true
	r.mu.Unlock()
}

// forget drops what is known of a machine that stopped on purpose (a
// migration or the fence stopped it, or it is no longer ours).
func (r *restarts) forget(id string) {
	r.mu.Lock()
	delete(r.running, id)
	delete(r.crashes, id)
	delete(r.next, id)
	delete(r.backoff, id)
	r.mu.Unlock()
}

// crashVerdict is what to do about a machine found not running.
type crashVerdict struct {
	Crashed bool          // it ran and died (not a first start)
	Crashes int           // within the window, this one included
	Failed  bool          // too many: mark it failed
	Wait    time.Duration // start no sooner than this from now
}

// stopped is called when a machine recorded running is found not running;
// it says whether to start it now.
func (r *restarts) stopped(id string, now time.Time) crashVerdict {
	r.mu.Lock()
	defer r.mu.Unlock()
	var v crashVerdict
	if r.running[id] {
		delete(r.running, id)
		v.Crashed = true
		kept := r.crashes[id][:0]
		for _, t := range r.crashes[id] {
			if now.Sub(t) < r.window {
				kept = append(kept, t)
			}
		}
		b, ok := r.backoff[id]
		if !ok {
			b = retry.New(r.first, r.max)
			r.backoff[id] = b
		}
		if len(kept) == 0 {
			b.Reset() // it ran a whole window without crashing: start over
		}
		kept = append(kept, now)
		r.crashes[id] = kept
		r.next[id] = now.Add(b.Next())
	}
	v.Crashes = len(r.crashes[id])
	v.Failed = r.limit > 0 && v.Crashes >= r.limit
	if w := r.next[id].Sub(now); w > 0 {
		v.Wait = w
	}
	return v
}
