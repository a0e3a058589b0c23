package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/machine"
)

// The self-fence. A worker's lease is the servers' promise not to act as if
// it were gone; the agent keeps its side by stopping, before the lease can
// have ended, every machine whose place is not settled: the machines of
// migrations not past a committed cutover, and machines the store does not
// assign to this worker. After that the servers (and an operator saying the
// worker is gone, which the store accepts only after the lease and
// fsm.FenceMargin) may restart them elsewhere without two copies running.
//
// Lease math uses CLOCK_BOOTTIME: Go's monotonic clock stops while the host
// is suspended, so a worker resumed after a long suspend would believe its
// lease still valid. With the send time of the last acknowledged heartbeat
// t, the lease TTL L, clock drift rho and the margin m (time to stop the
// machines), the agent stops machines at t + L(1-rho) - m; the server's
// expiry is at least t + L on its own clock.

// maxClockDrift bounds the rate difference between a worker's clock and the
// servers' (1%, far above real quartz drift).
const maxClockDrift = 0.01

// errFenced refuses to start a machine while the lease is not known valid.
var errFenced = errors.New("this worker's lease could not be renewed: it fenced itself and starts no machine until a heartbeat succeeds")

// boottime is the time since boot, counting suspend.
func boottime() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		// Not on Linux 2.6.39+: the monotonic clock is the next best.
		return time.Since(processStart)
	}
	return time.Duration(ts.Nano())
}

var processStart = time.Now()

// fence is the agent's lease state and its last view of the store.
type fence struct {
	mu       sync.RWMutex // RLock: starting a machine; Lock: becoming fenced
	clock    func() time.Duration
	deadline time.Duration // boottime at which machines must be stopped; 0 before the first renewal
	fenced   bool
	since    time.Duration // when it fenced

	viewMu   sync.Mutex
	migs     map[string]*fsm.Migration // latest record of each migration naming this worker
	assigned map[string]bool           // machines the store assigns to this worker, as last listed
	listed   bool                      // assigned was filled at least once
	specs    map[string]machine.Spec   // last spec built for each machine (a script machine stops only with it)
}

func newFence() *fence {
	return &fence{clock: boottime, migs: map[string]*fsm.Migration{}, specs: map[string]machine.Spec{}}
}

// noteSpec remembers how to stop a machine.
func (f *fence) noteSpec(s machine.Spec) {
	f.viewMu.Lock()
	f.specs[s.ID] = s
	f.viewMu.Unlock()
}

func (f *fence) spec(id string) (machine.Spec, bool) {
	f.viewMu.Lock()
	defer f.viewMu.Unlock()
	s, ok := f.specs[id]
	return s, ok
}

// renewed records a lease renewal acknowledged for a request sent at sent
// (boottime, taken before sending: the server's lease starts later).
func (f *fence) renewed(sent time.Duration, ttl, margin time.Duration) {
	d := sent + time.Duration(float64(ttl)*(1-maxClockDrift)) - margin
	f.mu.Lock()
	if d > f.deadline {
		f.deadline = d
	}
	f.mu.Unlock()
}

// noteMigrations records the newest records of migrations naming us.
func (f *fence) noteMigrations(ms []*fsm.Migration) {
	f.viewMu.Lock()
	defer f.viewMu.Unlock()
	for _, m := range ms {
		if old, ok := f.migs[m.ID]; ok && old.ModifyIndex > m.ModifyIndex {
			continue // an older record arriving late (a watch behind a proposal's reply)
		}
		if m.State.Terminal() {
			delete(f.migs, m.ID)
		} else {
			f.migs[m.ID] = m
		}
	}
}

// noteAssigned records the machines the store assigns to worker.
func (f *fence) noteAssigned(worker string, ms []*fsm.Machine) {
	as := make(map[string]bool, len(ms))
	for _, m := range ms {
		if m.Worker == worker {
			as[m.ID] = true
		}
	}
	f.viewMu.Lock()
	f.assigned, f.listed = as, true
	f.viewMu.Unlock()
}

// toStop picks, among the running machines, those a fenced worker must
// stop. Without a view of the store yet it cannot tell which are settled
// here, so it stops them all.
func (f *fence) toStop(worker string, running []string) []string {
	f.viewMu.Lock()
	defer f.viewMu.Unlock()
	if !f.listed {
		return running
	}
	moving := map[string]*fsm.Migration{}
	for _, m := range f.migs {
		moving[m.Machine] = m
	}
	var out []string
	for _, id := range running {
		if m, ok := moving[id]; ok {
			// Only the target of a committed cutover owns the machine now.
			if !(m.Target == worker && m.State.AfterCutover()) {
				out = append(out, id)
			}
			continue
		}
		if !f.assigned[id] {
			out = append(out, id)
		}
	}
	return out
}

// known lists every machine the view mentions (for drivers that cannot
// list what they run).
func (f *fence) known() []string {
	f.viewMu.Lock()
	defer f.viewMu.Unlock()
	seen := map[string]bool{}
	var out []string
	for id := range f.assigned {
		seen[id] = true
		out = append(out, id)
	}
	for _, m := range f.migs {
		if !seen[m.Machine] {
			seen[m.Machine] = true
			out = append(out, m.Machine)
		}
	}
	return out
}

// startMachine starts a machine unless this worker is fenced. The check and
// the start happen under the fence's read lock, so a fence that begins
// meanwhile sees the machine running and stops it.
func (a *Agent) startMachine(ctx context.Context, spec machine.Spec) error {
	a.fence.mu.RLock()
	defer a.fence.mu.RUnlock()
	if a.fence.fenced {
		return errFenced
	}
	return a.mach.Start(ctx, spec)
}

// Fenced reports whether the agent is fenced (its lease not known valid).
func (a *Agent) Fenced() bool {
	a.fence.mu.RLock()
	defer a.fence.mu.RUnlock()
	return a.fence.fenced
}

// fenceLoop watches the lease deadline and fences or unfences the agent.
func (a *Agent) fenceLoop(ctx context.Context) {
	tick := min(a.cfg.Heartbeat/4, 250*time.Millisecond)
	t := time.NewTicker(max(tick, 10*time.Millisecond))
	defer t.Stop()
	for {
		a.checkFence(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// checkFence fences when the deadline passed and lifts the fence once a
// renewal moved it ahead again.
func (a *Agent) checkFence(ctx context.Context) {
	f := a.fence
	now := f.clock()
	f.mu.Lock()
	expired := now >= f.deadline
	was := f.fenced
	switch {
	case expired && !was:
		f.fenced, f.since = true, now
	case !expired && was:
		f.fenced = false
	}
	since := f.since
	f.mu.Unlock()
	switch {
	case expired && !was:
		a.met.fenced.Set(1)
		a.log.Error().Dur("lease_ttl", a.cfg.LeaseTTL).Dur("margin", a.cfg.FenceMargin).
			Msg("lease not renewed in time: fencing (stopping machines not settled here, starting none) until a heartbeat succeeds")
		a.stopUnsettled(ctx)
	case expired:
		// Stay fenced; stop anything that got started or survived a failed stop.
		a.stopUnsettled(ctx)
	case was:
		a.met.fenced.Set(0)
		a.log.Warn().Dur("fenced_for", now-since).Msg("lease renewed: fence lifted")
	}
}

// stopUnsettled stops every running machine the fence rules out.
func (a *Agent) stopUnsettled(ctx context.Context) {
	seen := map[string]bool{}
	var running []string
	if l, ok := a.mach.(machine.Lister); ok {
		ids, err := l.Running(ctx)
		if err != nil {
			a.log.Error().Err(err).Msg("fence: cannot list running machines; checking every machine the store knows here")
		}
		for _, id := range ids {
			seen[id] = true
			running = append(running, id)
		}
	}
	// Machines a driver cannot list (scripts) are asked one by one.
	for _, id := range a.fence.known() {
		if seen[id] {
			continue
		}
		if st, err := a.mach.Status(ctx, a.stopSpec(id)); err == nil && st == machine.Running {
			running = append(running, id)
		}
	}
	for _, id := range a.fence.toStop(a.cfg.Worker, running) {
		if err := a.mach.Stop(ctx, a.stopSpec(id)); err != nil {
			a.log.Error().Err(err).Str("machine", id).Msg("fence: could not stop machine; retrying")
			continue
		}
		a.met.fenceStops.Inc()
		a.restarts.forget(id)
		a.log.Warn().Str("machine", id).Msg("fence: machine stopped (its place is not settled on this worker while the lease is unknown)")
	}
}

// stopSpec is how the fence stops machine id: with its last known spec,
// and quickly (the fence's margin is short).
func (a *Agent) stopSpec(id string) machine.Spec {
	spec, ok := a.fence.spec(id)
	if !ok {
		spec = machine.Spec{ID: id, MountDir: a.vols.MountPoint(id)}
	}
	spec.KillSignal, spec.KillTimeout = "SIGKILL", time.Second
	return spec
}

// heartbeatOnce renews the lease; a success moves the fence deadline.
func (a *Agent) heartbeatOnce(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, a.cfg.LeaseTTL/2)
	defer cancel()
	sent := a.fence.clock()
	if err := a.cp.Heartbeat(ctx, a.cfg.Worker); err != nil {
		return fmt.Errorf("heartbeat: %w", err)
	}
	a.fence.renewed(sent, a.cfg.LeaseTTL, a.cfg.FenceMargin)
	return nil
}
