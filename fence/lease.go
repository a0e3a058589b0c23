// Package fence keeps a worker's lease and fences the worker when it cannot.
//
// A worker's lease is the servers' promise not to act as if it were gone;
// the worker keeps its side by stopping, before the lease can have ended,
// every machine whose place is not settled: the machines of migrations not
// past a committed cutover, and machines the store does not assign to this
// worker. After that the servers (and an operator saying the worker is
// gone, which the store accepts only after the lease and fsm.FenceMargin)
// may restart them elsewhere without two copies running.
//
// Lease math uses CLOCK_BOOTTIME: Go's monotonic clock stops while the host
// is suspended, so a worker resumed after a long suspend would believe its
// lease still valid. With the send time of the last acknowledged heartbeat
// t, the lease TTL L, clock drift rho and the margin m (time to stop the
// machines), the worker stops machines at t + L(1-rho) - m; the server's
// expiry is at least t + L on its own clock.
package fence

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/atomicfile"
	"github.com/ferry-dev/ferry/internal/retry"
	"github.com/ferry-dev/ferry/machine"
)

// maxClockDrift bounds the rate difference between a worker's clock and the
// servers' (1%, far above real quartz drift).
const maxClockDrift = 0.01

// ErrFenced refuses to start a machine while the lease is not known valid.
var ErrFenced = errors.New("this worker's lease could not be renewed: it fenced itself and starts no machine until a heartbeat succeeds")

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

// Config of a worker's lease.
type Config struct {
	Worker string
	// TTL is the lease the servers grant (default fsm.DefaultLeaseTTL).
	TTL time.Duration
	// Heartbeat is how often the lease is renewed (default TTL/4).
	Heartbeat time.Duration
	// Margin is how long before its lease can end the worker stops the
	// machines whose place is not settled here (the time a stop takes, plus
	// slack); default a quarter of TTL.
	Margin time.Duration
	// MountPoint names a machine's mount, for stopping a machine whose spec
	// this process never saw.
	MountPoint func(machine string) string
	// StateFile keeps the fence deadline across agent restarts (machines
	// outlive the agent): a restarted agent that cannot renew its lease
	// fences at the deadline its predecessor had, not never. "" keeps none.
	StateFile string
}

// Lease is a worker's lease state, its last view of the store, and the gate
// every machine start passes.
type Lease struct {
	cfg  Config
	log  zerolog.Logger
	mach machine.Driver

	mu       sync.RWMutex // RLock: starting a machine; Lock: becoming fenced
	clock    func() time.Duration
	deadline time.Duration // boottime at which machines must be stopped; 0 before the first renewal
	fenced   bool
	since    time.Duration // when it fenced

	viewMu   sync.Mutex
	migs     map[string]*fsm.Migration // latest record of each migration naming this worker
	assigned map[string]bool           // machines the store assigns to this worker, as last listed
	listed   bool                      // assigned was filled at least once
	specs    map[string]machine.Spec   // last spec used for each machine (a script machine stops only with it)

	stopped func(machine string) // see OnStop

	guarding atomic.Bool
	persist  sync.Mutex // orders writes of StateFile

	fencedGauge prometheus.Gauge
	stops       prometheus.Counter
}

// OnStop has fn told of every machine the fence stopped (the restart
// policy forgets it: a fenced stop is no crash). Call it before Run.
func (f *Lease) OnStop(fn func(machine string)) { f.stopped = fn }

// New makes the lease of a worker whose machines mach runs.
func New(log zerolog.Logger, cfg Config, mach machine.Driver) *Lease {
	// The servers clamp a requested lease the same way: a fence timed from
	// a longer one would fire after the servers already gave up on it.
	if ttl := fsm.ClampLeaseTTL(cfg.TTL); ttl != cfg.TTL {
		if cfg.TTL != 0 {
			log.Warn().Dur("requested", cfg.TTL).Dur("lease_ttl", ttl).Msg("lease TTL clamped to what the servers grant")
		}
		cfg.TTL = ttl
	}
	if cfg.Heartbeat == 0 {
		cfg.Heartbeat = cfg.TTL / 4
	}
	if cfg.Margin <= 0 || cfg.Margin >= cfg.TTL {
		if cfg.Margin != 0 {
			log.Warn().Dur("requested", cfg.Margin).Dur("lease_ttl", cfg.TTL).Msg("fence margin must be shorter than the lease; using a quarter of it")
		}
		cfg.Margin = cfg.TTL / 4
	}
	if cfg.MountPoint == nil {
		cfg.MountPoint = func(string) string { return "" }
	}
	f := &Lease{cfg: cfg, log: log, mach: mach, clock: boottime, migs: map[string]*fsm.Migration{}, specs: map[string]machine.Spec{},
		fencedGauge: prometheus.NewGauge(prometheus.GaugeOpts{Name: "ferry_agent_fenced",
			Help: "1 while the agent's lease could not be renewed in time and it fenced itself."}),
		stops: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_agent_fence_stops_total",
			Help: "Machines the agent stopped because it fenced itself."}),
	}
	f.restore()
	return f
}

// leaseState is what StateFile holds: the fence deadline on CLOCK_BOOTTIME,
// which is meaningful only within the boot that wrote it.
type leaseState struct {
	BootID   string        `json:"boot_id"`
	Deadline time.Duration `json:"deadline_ns"`
}

// bootID names this boot of the host (a new one after every reboot).
var bootID = func() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// restore takes the deadline a previous agent process persisted in this
// boot. Another boot's (or none) leaves no deadline: no machine of this
// worker outlived the reboot.
func (f *Lease) restore() {
	if f.cfg.StateFile == "" {
		return
	}
	b, err := os.ReadFile(f.cfg.StateFile)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			f.log.Warn().Err(err).Str("path", f.cfg.StateFile).Msg("cannot read the persisted lease; a restarted agent that cannot renew fences at once")
		}
		return
	}
	var st leaseState
	if err := json.Unmarshal(b, &st); err != nil {
		f.log.Warn().Err(err).Str("path", f.cfg.StateFile).Msg("persisted lease unreadable; ignored")
		return
	}
	if id := bootID(); id == "" || st.BootID != id {
		return
	}
	f.mu.Lock()
	f.deadline = st.Deadline
	f.mu.Unlock()
	f.log.Info().Dur("deadline_in", st.Deadline-f.clock()).Msg("fence deadline restored from the previous agent process")
}

// save persists deadline d (best effort: a failed write leaves an older,
// earlier deadline on disk, which only fences sooner).
func (f *Lease) save(d time.Duration) {
	if f.cfg.StateFile == "" {
		return
	}
	f.persist.Lock()
	defer f.persist.Unlock()
	b, _ := json.Marshal(leaseState{BootID: bootID(), Deadline: d})
	if err := atomicfile.WriteFile(f.cfg.StateFile, b, 0o600); err != nil {
		f.log.Warn().Err(err).Msg("cannot persist the lease deadline")
	}
}

// Describe and Collect make the lease's metrics a prometheus.Collector.
func (f *Lease) Describe(ch chan<- *prometheus.Desc) {
	f.fencedGauge.Describe(ch)
	f.stops.Describe(ch)
}

func (f *Lease) Collect(ch chan<- prometheus.Metric) {
	f.fencedGauge.Collect(ch)
	f.stops.Collect(ch)
}

// noteSpec remembers how to stop a machine.
func (f *Lease) noteSpec(s machine.Spec) {
	f.viewMu.Lock()
	f.specs[s.ID] = s
	f.viewMu.Unlock()
}

func (f *Lease) spec(id string) (machine.Spec, bool) {
	f.viewMu.Lock()
	defer f.viewMu.Unlock()
	s, ok := f.specs[id]
	return s, ok
}

// renewed records a lease renewal acknowledged for a request sent at sent
// (boottime, taken before sending: the server's lease starts later).
func (f *Lease) renewed(sent time.Duration) {
	d := sent + time.Duration(float64(f.cfg.TTL)*(1-maxClockDrift)) - f.cfg.Margin
	f.mu.Lock()
	moved := d > f.deadline
	if moved {
		f.deadline = d
	}
	f.mu.Unlock()
	if moved {
		f.save(d)
	}
}

// Renew calls renew (a registration or a heartbeat); when it succeeds the
// lease runs from the time it was sent.
func (f *Lease) Renew(ctx context.Context, renew func(context.Context) error) error {
	sent := f.clock()
	if err := renew(ctx); err != nil {
		return err
	}
	f.renewed(sent)
	if f.guarding.Load() {
		f.check(ctx) // lift a fence now, not at the next tick: a start may follow at once
	}
	return nil
}

// NoteMigrations records the newest records of migrations naming us.
func (f *Lease) NoteMigrations(ms []*fsm.Migration) {
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

// NoteAssigned records the machines the store assigns to this worker.
func (f *Lease) NoteAssigned(ms []*fsm.Machine) {
	as := make(map[string]bool, len(ms))
	for _, m := range ms {
		if m.Worker == f.cfg.Worker {
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
func (f *Lease) toStop(running []string) []string {
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
			if !(m.Target == f.cfg.Worker && m.State.AfterCutover()) {
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
func (f *Lease) known() []string {
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

// Gated is the worker's machine driver behind the fence: it remembers each
// spec it is given (the fence stops machines with them) and starts nothing
// while the worker is fenced.
func (f *Lease) Gated() *Gated { return &Gated{f: f} }

// Gated is a machine.Driver whose starts pass the fence.
type Gated struct{ f *Lease }

// Start starts a machine unless this worker is fenced. The check and the
// start happen under the fence's read lock, so a fence that begins
// meanwhile sees the machine running and stops it.
func (g *Gated) Start(ctx context.Context, spec machine.Spec) error {
	g.f.noteSpec(spec)
	g.f.mu.RLock()
	defer g.f.mu.RUnlock()
	if g.f.fenced {
		return ErrFenced
	}
	return g.f.mach.Start(ctx, spec)
}

func (g *Gated) Stop(ctx context.Context, spec machine.Spec) error {
	g.f.noteSpec(spec)
	return g.f.mach.Stop(ctx, spec)
}

func (g *Gated) Status(ctx context.Context, spec machine.Spec) (machine.State, error) {
	g.f.noteSpec(spec)
	return g.f.mach.Status(ctx, spec)
}

// StopSpec is how machine id is stopped in a hurry (the fence, a dead
// datapath): with its last known spec, and SIGKILL after a second.
func (g *Gated) StopSpec(id string) machine.Spec { return g.f.stopSpec(id) }

// Pause freezes a machine if the driver behind the gate can (it wraps
// machine.ErrCannotPause otherwise). A pause is no start: it passes
// while fenced, and the fence still stops a paused machine.
func (g *Gated) Pause(ctx context.Context, spec machine.Spec) error {
	if p, ok := g.f.mach.(machine.Pauser); ok {
		return p.Pause(ctx, spec)
	}
	return fmt.Errorf("machine %s: %w", spec.ID, machine.ErrCannotPause)
}

// Resume thaws a paused machine: it continues where it was, so it is not a
// start either (a fenced worker's fence stops it if it must not run).
func (g *Gated) Resume(ctx context.Context, spec machine.Spec) error {
	if p, ok := g.f.mach.(machine.Pauser); ok {
		return p.Resume(ctx, spec)
	}
	return fmt.Errorf("machine %s: %w", spec.ID, machine.ErrCannotPause)
}

// Fenced reports whether the worker is fenced (its lease not known valid).
func (f *Lease) Fenced() bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.fenced
}

// Run renews the lease with renew every Heartbeat (after a failure sooner,
// jittered, since the fence deadline is less than a lease away) and fences
// or unfences the worker, until ctx ends.
func (f *Lease) Run(ctx context.Context, renew func(context.Context) error) {
	go f.heartbeat(ctx, renew)
	f.Guard(ctx)
}

// Guard fences or unfences the worker as the deadline passes or moves,
// until ctx ends; without Run nothing renews. An agent starts it before
// it could register when its first attempt failed: the machines its
// predecessor left running are then fenced at the persisted deadline. A
// second call returns at once. With no deadline known (no renewal, none
// persisted in this boot) the worker fences at once.
func (f *Lease) Guard(ctx context.Context) {
	if f.guarding.CompareAndSwap(false, true) {
		f.guardLoop(ctx)
	}
}

func (f *Lease) guardLoop(ctx context.Context) {
	tick := min(f.cfg.Heartbeat/4, 250*time.Millisecond)
	t := time.NewTicker(max(tick, 10*time.Millisecond))
	defer t.Stop()
	for {
		f.check(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (f *Lease) heartbeat(ctx context.Context, renew func(context.Context) error) {
	bo := retry.New(100*time.Millisecond, f.cfg.Heartbeat)
	wait := f.cfg.Heartbeat
	for {
		if !retry.Sleep(ctx, wait) {
			return
		}
		if err := f.heartbeatOnce(ctx, renew); err != nil {
			if ctx.Err() != nil {
				return
			}
			wait = bo.Next()
			f.log.Warn().Err(err).Dur("retry_in", wait).Msg("heartbeat failed")
			continue
		}
		bo.Reset()
		wait = f.cfg.Heartbeat
	}
}

// heartbeatOnce renews the lease; a success moves the fence deadline.
func (f *Lease) heartbeatOnce(ctx context.Context, renew func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, f.cfg.TTL/2)
	defer cancel()
	if err := f.Renew(ctx, renew); err != nil {
		return fmt.Errorf("heartbeat: %w", err)
	}
	return nil
}

// check fences when the deadline passed and lifts the fence once a renewal
// moved it ahead again.
func (f *Lease) check(ctx context.Context) {
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
		f.fencedGauge.Set(1)
		f.log.Error().Dur("lease_ttl", f.cfg.TTL).Dur("margin", f.cfg.Margin).
			Msg("lease not renewed in time: fencing (stopping machines not settled here, starting none) until a heartbeat succeeds")
		f.stopUnsettled(ctx)
	case expired:
		// Stay fenced; stop anything that got started or survived a failed stop.
		f.stopUnsettled(ctx)
	case was:
		f.fencedGauge.Set(0)
		f.log.Warn().Dur("fenced_for", now-since).Msg("lease renewed: fence lifted")
	}
}

// stopUnsettled stops every running machine the fence rules out.
func (f *Lease) stopUnsettled(ctx context.Context) {
	seen := map[string]bool{}
	var running []string
	if l, ok := f.mach.(machine.Lister); ok {
		ids, err := l.Running(ctx)
		if err != nil {
			f.log.Error().Err(err).Msg("fence: cannot list running machines; checking every machine the store knows here")
		}
		for _, id := range ids {
			seen[id] = true
			running = append(running, id)
		}
	}
	// Machines a driver cannot list (scripts) are asked one by one.
	for _, id := range f.known() {
		if seen[id] {
			continue
		}
		if st, err := f.mach.Status(ctx, f.stopSpec(id)); err == nil && st == machine.Running {
			running = append(running, id)
		}
	}
	for _, id := range f.toStop(running) {
		if err := f.mach.Stop(ctx, f.stopSpec(id)); err != nil {
			f.log.Error().Err(err).Str("machine", id).Msg("fence: could not stop machine; retrying")
			continue
		}
		f.stops.Inc()
		if f.stopped != nil {
			f.stopped(id)
		}
		f.log.Warn().Str("machine", id).Msg("fence: machine stopped (its place is not settled on this worker while the lease is unknown)")
	}
}

// stopSpec is how the fence stops machine id: with its last known spec,
// and quickly (the fence's margin is short), failing the volume I/O a
// killed machine is stuck in (a target cut off from its source mid-read).
func (f *Lease) stopSpec(id string) machine.Spec {
	spec, ok := f.spec(id)
	if !ok {
		spec = machine.Spec{ID: id, MountDir: f.cfg.MountPoint(id)}
	}
	spec.KillSignal, spec.KillTimeout = "SIGKILL", time.Second
	spec.FailStuckIO = true
	return spec
}
