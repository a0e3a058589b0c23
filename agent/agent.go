// Package agent is ferry's worker agent: it registers its worker, keeps its
// lease alive, watches the migrations that name it and, for each, performs
// its role's step for the committed state, then proposes the next event with
// a step ID. Every step is idempotent and every side effect is recorded (in
// the store or under the data dir) before anything relies on it, so an agent
// killed at any point resumes by doing the step for the committed state again.
package agent

import (
	"context"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/retry"
	"github.com/ferry-dev/ferry/stepdriver"
	"github.com/ferry-dev/ferry/supervisor"
	"github.com/ferry-dev/ferry/volops"
)

// Config of one agent.
type Config struct {
	Worker  string // this worker's name (its certificate's identity)
	HostID  uint32 // the worker's 32-bit 6PN host id
	Address string // IP where peers reach this worker's exports (the fabric address)
	DataDir string
	// Retry is the first backoff after a failed step; it doubles up to
	// RetryMax, each delay jittered by half either way.
	Retry, RetryMax time.Duration
	// StallAfter: a step failing (or running) this long is reported as stalled.
	StallAfter time.Duration
	// FirstRegistration bounds the first registration attempt; if it
	// fails, the fence guards the machines left running (default 5s).
	FirstRegistration time.Duration
	// StepTimeout bounds one attempt of a step (and so every tool it runs),
	// except hydration's, which waits for the whole copy and reports its
	// own stalls. Steps between source_stopped and cutover are bounded
	// tighter, by what is left of the migration's downtime budget.
	StepTimeout time.Duration
	// MaxPreCutoverAttempts: a pre-cutover step failing this many times fails the migration (rollback).
	MaxPreCutoverAttempts int
	// HydrationRate caps background hydration, bytes/s (0: none).
	HydrationRate int64
	// NoIdleBatches keeps background copies at their normal size while the
	// migrated machine is idle (datapath.CloneSpec.NoIdleBatches).
	NoIdleBatches bool
	// StartBeforeCutover starts the machine on the target before cutover
	// commits (one commit less downtime), relying on the self-fence to stop
	// it if the target is cut off before the commit. Off by default.
	StartBeforeCutover bool
	// PauseBefore delays proposing an event: a failpoint for chaos and crash
	// tests (internal/failpoint).
	PauseBefore map[fsm.Event]time.Duration
}

func (c *Config) defaults() {
	if c.FirstRegistration == 0 {
		c.FirstRegistration = 5 * time.Second
	}
	if c.Retry == 0 {
		c.Retry = 200 * time.Millisecond
	}
	if c.RetryMax == 0 {
		c.RetryMax = 10 * time.Second
	}
	if c.StallAfter == 0 {
		c.StallAfter = 30 * time.Second
	}
	if c.StepTimeout == 0 {
		c.StepTimeout = 5 * time.Minute
	}
	if c.MaxPreCutoverAttempts == 0 {
		c.MaxPreCutoverAttempts = 5
	}
}

// Agent runs one worker's side of every migration.
type Agent struct {
	cfg Config
	log zerolog.Logger
	Parts
	met *metrics

	// machMu orders the reconcile loop's machine starts and stops against
	// migrations taking a machine over: a reconcile that decided a machine
	// is not migrating finishes acting on it before a new migration is
	// registered (and its steps stop the machine), never after.
	machMu  sync.Mutex
	mu      sync.Mutex
	active  map[string]string // active migration id -> its machine
	reaping map[string]bool   // ended migrations being reaped
	// steps runs each migration's steps (stepFor) in its own goroutine.
	steps *stepdriver.Driver
	// runCtx is Run's context: failpoint pauses sleep on it, not on a
	// step's deadline, so a test's pause is not cut short.
	runCtx context.Context
	// firstWatch closes once the first list of our migrations arrived.
	firstWatch chan struct{}
	firstOnce  sync.Once
	wg         sync.WaitGroup // the reapers
	// trims are the fstrim runs the trim step started: they run on beside
	// the machine's start, and hydration and a teardown wait for them.
	trims *volops.Trims
	// earlyLogins: migration id -> the portal its destination's prestarted
	// datapath was asked to log in to (loginEarly).
	earlyLogins sync.Map
	// arrivals: migration id -> the arriving machine's network (an
	// arrival), made while its clone was built (buildClone), for the
	// cutover step.
	arrivals sync.Map
	watched  *watched // the newest record of each migration the watch delivered
}

// New builds an agent from the worker's parts (all required).
func New(log zerolog.Logger, cfg Config, p Parts) (*Agent, error) {
	cfg.defaults()
	if cfg.Worker == "" || cfg.DataDir == "" {
		return nil, fmt.Errorf("agent: worker name and data dir are required")
	}
	for name, part := range map[string]any{"Control": p.Control, "Exports": p.Exports, "Data": p.Data, "Machines": p.Machines,
		"Lease": p.Lease, "Keys": p.Keys, "Volumes": p.Volumes, "Marks": p.Marks} {
		if part == nil {
			return nil, fmt.Errorf("agent: Parts.%s is missing; cmd/ferry wires every part", name)
		}
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("agent data dir: %w", err)
	}
	if caps := p.Data.Capabilities(); cfg.HydrationRate > 0 && !caps.HydrationRateLimit {
		log.Warn().Str("backend", caps.Name).Int64("hydration_rate", cfg.HydrationRate).
			Msg("this data path has no hydration rate limit; hydration runs unthrottled")
	}
	a := &Agent{cfg: cfg, log: log.With().Str("worker", cfg.Worker).Logger(), Parts: p, met: newMetrics(),
		active: map[string]string{}, reaping: map[string]bool{}, firstWatch: make(chan struct{}), watched: newWatched(),
		trims: volops.NewTrims(p.Marks, p.Volumes.Trim, cfg.StepTimeout)}
	a.steps = stepdriver.New(a.log, stepdriver.Config{Retry: cfg.Retry, RetryMax: cfg.RetryMax, StallAfter: cfg.StallAfter,
		StepTimeout: cfg.StepTimeout, MaxPreCutoverAttempts: cfg.MaxPreCutoverAttempts}, p.Control, a.stepFor, stepdriver.Hooks{
		StepDone:   func(s fsm.State) { a.met.steps.WithLabelValues(string(s)).Inc() },
		StepFailed: func(s fsm.State) { a.met.stepFailures.WithLabelValues(string(s)).Inc() },
		Stalled:    a.met.stalls.Inc,
		Ended:      func(id string) { a.earlyLogins.Delete(id); a.arrivals.Delete(id) },
	})
	for _, part := range []any{p.Lease, p.Keys, p.Machines, p.Volumes} {
		if c, ok := part.(prometheus.Collector); ok {
			a.met.reg.MustRegister(c)
		}
	}
	return a, nil
}

// arrival is what a clone's build made of the arriving machine's network.
type arrival struct {
	supervisor.Arrival
	// mapped: its old address reaches it here already (MapOld).
	mapped bool
}

// Run registers the worker and serves until ctx ends. Work in progress is
// left where it is (exports, datapaths and machines keep running) so a new
// agent process resumes it.
func (a *Agent) Run(ctx context.Context) error {
	a.runCtx = ctx
	w := fsm.Worker{Name: a.cfg.Worker, HostID: a.cfg.HostID, Address: a.cfg.Address}
	register := func() error {
		return a.Lease.Renew(ctx, func(ctx context.Context) error { return a.Control.RegisterWorker(ctx, w) })
	}
	// Machines outlive the agent. If the servers cannot be reached now,
	// what the previous agent process left running is fenced at the
	// deadline it persisted, as if that process had lived on.
	first, cancel := context.WithTimeout(ctx, a.cfg.FirstRegistration)
	err := a.Lease.Renew(first, func(ctx context.Context) error { return a.Control.RegisterWorker(ctx, w) })
	cancel()
	if err != nil {
		a.log.Warn().Err(err).Msg("cannot register yet: the fence guards the machines left running until a registration succeeds")
		go a.Lease.Guard(ctx)
		if err := retryUntil(ctx, a.log, "register worker", register); err != nil {
			return err
		}
	}
	// Registration granted a lease: from now on it is renewed, or the
	// fence acts, even while the steps below still retry.
	go a.Lease.Run(ctx, func(ctx context.Context) error { return a.Control.Heartbeat(ctx, a.cfg.Worker) })
	if err := retryUntil(ctx, a.log, "register worker key", func() error { return a.Control.SetWorkerKey(ctx, a.cfg.Worker, a.Keys.Public()) }); err != nil {
		return err
	}
	a.log.Info().Uint32("host_id", a.cfg.HostID).Str("address", a.cfg.Address).Str("kek", a.Keys.Public().Fingerprint).Msg("worker registered")
	go a.reconcileLoop(ctx)
	var index uint64
	watchBackoff := retry.New(200*time.Millisecond, 5*time.Second)
	for ctx.Err() == nil {
		ms, next, err := a.Control.WatchMigrations(ctx, a.cfg.Worker, index)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			d := watchBackoff.Next()
			a.log.Warn().Err(err).Dur("retry_in", d).Msg("watch migrations failed; retrying")
			sleep(ctx, d)
			continue
		}
		watchBackoff.Reset()
		index = next
		a.Lease.NoteMigrations(ms)
		a.watched.put(ms)
		a.machMu.Lock()
		a.mu.Lock()
		for _, m := range ms {
			if m.State.Terminal() {
				delete(a.active, m.ID)
			} else {
				a.active[m.ID] = m.Machine
			}
		}
		a.met.active.Set(float64(len(a.active)))
		a.mu.Unlock()
		a.machMu.Unlock()
		a.firstOnce.Do(func() { close(a.firstWatch) })
		for _, m := range ms {
			if err := migrationIDsLocal(m); err != nil {
				a.log.Warn().Err(err).Msg("ignoring a migration record with unsafe IDs")
				continue
			}
			a.dispatch(ctx, m)
		}
		a.reap(ctx, ms)
	}
	a.steps.Wait()
	a.wg.Wait()
	a.trims.WaitAll()
	if ps, ok := a.Data.(datapath.Prestarter); ok {
		ps.ReleasePrestarted()
	}
	return nil
}

// dispatch removes a dissolved clone's metadata and hands the record to
// the migration's step driver.
func (a *Agent) dispatch(ctx context.Context, m *fsm.Migration) {
	if _, hydrated := m.EnteredAt[fsm.Hydrated]; hydrated && m.Target == a.cfg.Worker && m.TargetVol != "" {
		// The clone's metadata (all regions hydrated) is needed to rebuild
		// the clone only until hydrated is committed: the first record
		// from then on removes it, in any later state, the terminal one
		// included (an agent restarted in between too).
		if err := os.Remove(a.Data.MetaPath(m.TargetVol)); err == nil {
			a.log.Info().Str("migration", m.ID).Msg("removed the dissolved clone's metadata")
		} else if !os.IsNotExist(err) {
			a.log.Warn().Err(err).Str("migration", m.ID).Msg("removing the dissolved clone's metadata")
		}
	}
	a.steps.Dispatch(ctx, m)
}

func sleep(ctx context.Context, d time.Duration) bool { return retry.Sleep(ctx, d) }

// retryUntil calls fn until it succeeds or ctx ends, with jittered backoff.
func retryUntil(ctx context.Context, log zerolog.Logger, what string, fn func() error) error {
	err := retry.Do(ctx, 200*time.Millisecond, 5*time.Second, fn, func(err error, next time.Duration) {
		log.Warn().Err(err).Dur("retry_in", next).Msg(what + " failed; retrying")
	})
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}
