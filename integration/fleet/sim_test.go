// Package fleet tests drains and placement at fleet scale: real servers,
// simulated agents. A simulated agent speaks the real API with its own
// worker certificate (registration, heartbeats with a capacity report,
// blocking watches, the steps of its roles with idempotent step IDs) and
// replaces the data path with a timing model: fixed step delays before
// cutover, and hydrations sharing the source's link (each at most the
// clone's rate, together at most the link).
package fleet

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
	"sync"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

// Fabric is the timing model shared by every simulated agent.
type Fabric struct {
	LinkBPS   int64         // each worker's link, shared by the hydrations it sources
	CloneBPS  int64         // one clone's hydration cap
	StepDelay time.Duration // each step before cutover (stop, export, build, trim, start)
	Tick      time.Duration // hydration model resolution

	mu     sync.Mutex
	active map[string]int // source worker -> hydrations running
}

func (f *Fabric) join(src string, d int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.active == nil {
		f.active = map[string]int{}
	}
	f.active[src] += d
}

// rate is what one hydration from src gets now.
func (f *Fabric) rate(src string) int64 {
	f.mu.Lock()
	n := max(f.active[src], 1)
	f.mu.Unlock()
	return min(f.CloneBPS, f.LinkBPS/int64(n))
}

// Latencies records the duration of agents' short API calls, by kind.
type Latencies struct {
	mu   sync.Mutex
	d    []time.Duration
	kind map[string][]time.Duration
	on   bool
}

func (l *Latencies) add(kind string, d time.Duration) {
	l.mu.Lock()
	if l.on {
		l.d = append(l.d, d)
		l.kind[kind] = append(l.kind[kind], d)
	}
	l.mu.Unlock()
}

// Start clears and starts recording.
func (l *Latencies) Start() {
	l.mu.Lock()
	l.d, l.kind, l.on = nil, map[string][]time.Duration{}, true
	l.mu.Unlock()
}

// Stop stops recording and returns the p-th percentile and the count.
func (l *Latencies) Stop(p float64) (time.Duration, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.on = false
	return percentile(l.d, p), len(l.d)
}

// Kinds returns the p-th percentile and the count of each kind of call
// recorded until Stop, as "kind: p (n)" sorted by kind.
func (l *Latencies) Kinds(p float64) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for k, d := range l.kind {
		out = append(out, fmt.Sprintf("%s %s (%d)", k, percentile(d, p).Round(100*time.Microsecond), len(d)))
	}
	sort.Strings(out)
	return out
}

func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	i := int(math.Ceil(p/100*float64(len(d)))) - 1
	return d[max(i, 0)]
}

// SimAgent is one simulated worker.
type SimAgent struct {
	Name      string
	HostID    uint32
	C         *api.Client
	F         *Fabric
	TTL       time.Duration // lease; beats every TTL/4 like the real agent
	Reconcile time.Duration // period of the list-volumes/list-machines loop (the real agent: 1s); 0: off
	Lat       *Latencies
	SlotsIn   int
	SlotsOut  int
	Logf      func(format string, args ...any) // heartbeat failures; nil: quiet

	mu       sync.Mutex
	free     int64
	total    int64
	inflight map[string]bool
	errs     int
}

// NewSimAgent returns an agent whose volume store has total bytes, free bytes free.
func NewSimAgent(name string, host uint32, c *api.Client, f *Fabric, total, free int64) *SimAgent {
	return &SimAgent{Name: name, HostID: host, C: c, F: f, TTL: 10 * time.Second, total: total, free: free,
		SlotsIn: 4, SlotsOut: 8, inflight: map[string]bool{}}
}

func (a *SimAgent) report() *fsm.WorkerReport {
	a.mu.Lock()
	defer a.mu.Unlock()
	return &fsm.WorkerReport{FreeBytes: min(max(a.free, 0), a.total), TotalBytes: a.total, SlotsIn: a.SlotsIn, SlotsOut: a.SlotsOut,
		HydrateBPS: a.F.CloneBPS, LinkBPS: a.F.LinkBPS}
}

func (a *SimAgent) addFree(d int64) {
	a.mu.Lock()
	a.free += d
	a.mu.Unlock()
}

// Register records the worker (once, before Run).
func (a *SimAgent) Register(ctx context.Context) error {
	_, err := a.C.RegisterWorker(ctx, fsm.Worker{Name: a.Name, HostID: a.HostID, Address: "127.0.0.1", Report: a.report()}, a.TTL)
	return err
}

// Run heartbeats, reconciles and performs its migration steps until ctx ends.
func (a *SimAgent) Run(ctx context.Context) {
	go a.beat(ctx)
	if a.Reconcile > 0 {
		go a.reconcile(ctx)
	}
	var idx uint64
	for ctx.Err() == nil {
		ms, next, err := a.C.WatchMigrations(ctx, a.Name, idx)
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
			continue
		}
		idx = next
		for _, m := range ms {
			a.dispatch(ctx, m)
		}
	}
}

func (a *SimAgent) timed(kind string, fn func() error) error {
	t := time.Now()
	err := fn()
	if a.Lat != nil && err == nil {
		a.Lat.add(kind, time.Since(t))
	}
	return err
}

// phase waits a random part of period: agents started together would
// otherwise call at the same instants, a burst no fleet of agents started
// at different times makes (and what a p99 would measure).
func (a *SimAgent) phase(ctx context.Context, period time.Duration) bool {
	return a.pause(ctx, rand.N(period)) == nil
}

func (a *SimAgent) beat(ctx context.Context) {
	if !a.phase(ctx, a.TTL/4) {
		return
	}
	t := time.NewTicker(a.TTL / 4)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		t0 := time.Now()
		err := a.timed("heartbeat", func() error { _, err := a.C.HeartbeatReport(ctx, a.Name, a.TTL, a.report()); return err })
		if a.Logf != nil && (err != nil || time.Since(t0) > a.TTL/4) && ctx.Err() == nil {
			a.Logf("%s: heartbeat took %s: %v", a.Name, time.Since(t0).Round(time.Millisecond), err)
		}
	}
}

func (a *SimAgent) reconcile(ctx context.Context) {
	if !a.phase(ctx, a.Reconcile) {
		return
	}
	t := time.NewTicker(a.Reconcile)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		_ = a.timed("list-volumes", func() error { _, err := a.C.ListVolumes(ctx, a.Name); return err })
		_ = a.timed("list-machines", func() error { _, err := a.C.ListMachines(ctx, a.Name); return err })
	}
}

// dispatch starts the step this worker owes m, once at a time per migration.
func (a *SimAgent) dispatch(ctx context.Context, m *fsm.Migration) {
	if m.State.Terminal() {
		return // a stalled flag is the servers' note: the steps go on
	}
	step := a.stepFor(m)
	if step == nil {
		return
	}
	a.mu.Lock()
	if a.inflight[m.ID] {
		a.mu.Unlock()
		return
	}
	a.inflight[m.ID] = true
	a.mu.Unlock()
	go func() {
		defer func() {
			a.mu.Lock()
			delete(a.inflight, m.ID)
			a.mu.Unlock()
		}()
		// Follow the migration while the next step is this worker's too: a
		// watch that fired while this step ran found it in flight.
		for step != nil && ctx.Err() == nil {
			if err := step(ctx, m); err != nil && ctx.Err() == nil {
				a.mu.Lock()
				a.errs++
				a.mu.Unlock()
			}
			fresh, err := a.C.GetMigration(ctx, m.ID)
			if err != nil || fresh.State.Terminal() {
				return
			}
			if fresh.ModifyIndex == m.ModifyIndex && fresh.State == m.State {
				// Nothing moved (a refused or failed step): the watch retries it.
				a.pause(ctx, 200*time.Millisecond)
			}
			m, step = fresh, a.stepFor(fresh)
		}
	}()
}

func (a *SimAgent) propose(ctx context.Context, m *fsm.Migration, ev fsm.Event, p fsm.EventPayload) error {
	_, err := a.C.Propose(ctx, m.ID, ev, m.ID+"/"+string(ev), p)
	var r *api.Error
	if errors.As(err, &r) && r.Code == fsm.CodeWrongState {
		return nil // another copy of this step got there first
	}
	return err
}

func (a *SimAgent) pause(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

type stepFn func(context.Context, *fsm.Migration) error

// stepFor returns what this worker does for m in its state, or nil.
func (a *SimAgent) stepFor(m *fsm.Migration) stepFn {
	src, dst := m.Source == a.Name, m.Target == a.Name
	simple := func(ev fsm.Event, p fsm.EventPayload) stepFn {
		return func(ctx context.Context, m *fsm.Migration) error {
			if err := a.pause(ctx, a.F.StepDelay); err != nil {
				return err
			}
			return a.propose(ctx, m, ev, p)
		}
	}
	switch {
	case dst && m.State == fsm.Planned:
		return a.prepareTarget
	case src && m.State == fsm.TargetPrepared:
		return simple(fsm.EvSourceStopped, fsm.EventPayload{})
	case src && m.State == fsm.SourceStopped:
		return simple(fsm.EvExported, fsm.EventPayload{Export: &fsm.Export{Portal: "127.0.0.1:3260", IQN: "iqn.2026-01.dev.ferry:ferry:" + m.ID}})
	case dst && m.State == fsm.Exported:
		return simple(fsm.EvCloneBuilt, fsm.EventPayload{})
	case dst && m.State == fsm.CloneBuilt:
		return simple(fsm.EvTrimmed, fsm.EventPayload{})
	case dst && m.State == fsm.Trimmed:
		return simple(fsm.EvCutover, fsm.EventPayload{})
	case dst && m.State == fsm.Cutover:
		return func(ctx context.Context, m *fsm.Migration) error {
			return a.propose(ctx, m, fsm.EvHydrationStarted, fsm.EventPayload{})
		}
	case dst && m.State == fsm.Hydrating:
		return a.hydrate
	case src && m.State == fsm.Hydrated:
		return func(ctx context.Context, m *fsm.Migration) error {
			if err := a.propose(ctx, m, fsm.EvSourceReleased, fsm.EventPayload{}); err != nil {
				return err
			}
			a.addFree(volSize(m))
			return nil
		}
	case dst && m.State == fsm.RollingBack && (m.Rollback == nil || !m.Rollback.TargetTornDown):
		return func(ctx context.Context, m *fsm.Migration) error {
			a.addFree(volSize(m))
			return a.propose(ctx, m, fsm.EvTargetTornDown, fsm.EventPayload{})
		}
	case src && m.State == fsm.RollingBack && m.Rollback != nil && m.Rollback.TargetTornDown:
		return func(ctx context.Context, m *fsm.Migration) error {
			return a.propose(ctx, m, fsm.EvSourceRestored, fsm.EventPayload{})
		}
	}
	return nil
}

// volSize is the size of m's volume: the layout the record carries says it.
func volSize(m *fsm.Migration) int64 {
	if m.Layout != nil {
		return m.Layout.PayloadSize + m.Layout.DataOffset
	}
	return 0
}

// prepareTarget records the destination volume (its space is taken now).
func (a *SimAgent) prepareTarget(ctx context.Context, m *fsm.Migration) error {
	if err := a.pause(ctx, a.F.StepDelay); err != nil {
		return err
	}
	size := volSize(m)
	dst := m.ID + "-dst"
	v := fsm.Volume{ID: dst, Worker: a.Name, Size: size, State: fsm.VolHydrating, Layout: m.Layout}
	if _, err := a.C.CreateVolume(ctx, v); err != nil {
		return fmt.Errorf("creating the destination volume: %w", err)
	}
	a.addFree(-size)
	return a.propose(ctx, m, fsm.EvTargetPrepared, fsm.EventPayload{TargetVolume: dst, Layout: m.Layout})
}

// hydrate runs the timing model: bytes move at the source's share of its
// link, capped by the clone's rate; progress is proposed at each decile.
func (a *SimAgent) hydrate(ctx context.Context, m *fsm.Migration) error {
	total := volSize(m)
	done := int64(0)
	if m.Progress != nil && m.Progress.TotalBytes == total {
		done = m.Progress.HydratedBytes
	}
	a.F.join(m.Source, 1)
	defer a.F.join(m.Source, -1)
	decile := done * 10 / max(total, 1)
	last := time.Now()
	for done < total {
		if err := a.pause(ctx, a.F.Tick); err != nil {
			return err
		}
		now := time.Now()
		r := a.F.rate(m.Source)
		done = min(total, done+int64(float64(r)*now.Sub(last).Seconds()))
		last = now
		if d := done * 10 / max(total, 1); d != decile && done < total {
			decile = d
			p := &fsm.Progress{HydratedBytes: done, TotalBytes: total, FetchedBytes: done, RateBPS: r, ETASeconds: (total - done) / max(r, 1)}
			if _, err := a.C.Propose(ctx, m.ID, fsm.EvProgress, "", fsm.EventPayload{Progress: p}); err != nil && ctx.Err() != nil {
				return err
			}
		}
	}
	p := &fsm.Progress{HydratedBytes: total, TotalBytes: total, FetchedBytes: total}
	return a.propose(ctx, m, fsm.EvHydrated, fsm.EventPayload{Progress: p})
}

// simLayout is a LUKS2 layout for a volume of size bytes.
func simLayout(size int64) *fsm.LUKSLayout {
	return &fsm.LUKSLayout{UUID: "sim", DataOffset: 16 << 20, MetadataSize: 16384, KeyslotsSize: 16744448,
		SectorSize: 4096, Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: size - 16<<20}
}

// seedMachines creates n running machines with volumes of size on worker,
// through the operator's client, ids prefixed with the worker's name.
func seedMachines(ctx context.Context, op *api.Client, worker string, n int, size int64, group func(i int) string) error {
	for i := range n {
		id := fmt.Sprintf("%s-m%d", worker, i)
		if _, err := op.CreateVolume(ctx, fsm.Volume{ID: "v-" + id, Worker: worker, Size: size, State: fsm.VolCreated, Layout: simLayout(size)}); err != nil {
			return fmt.Errorf("volume of %s: %w", id, err)
		}
		m := fsm.Machine{ID: id, Worker: worker, Volume: "v-" + id, State: fsm.MachineRunning}
		if group != nil {
			m.Group = group(i)
		}
		if _, err := op.CreateMachine(ctx, m); err != nil {
			return fmt.Errorf("machine %s: %w", id, err)
		}
	}
	return nil
}
