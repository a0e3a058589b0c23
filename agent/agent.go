// Package agent is ferry's worker agent: it registers its worker, keeps its
// lease alive, watches the migrations that name it and, for each, performs
// its role's step for the committed state, then proposes the next event with
// a step ID. Every step is idempotent and every side effect is recorded (in
// the store or under the data dir) before anything relies on it, so an agent
// killed at any point resumes by doing the step for the committed state again.
package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/retry"
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
	running map[string]chan *fsm.Migration // migration id -> its driver goroutine's inbox
	active  map[string]string              // active migration id -> its machine
	reaping map[string]bool                // ended migrations being reaped
	// runCtx is Run's context: failpoint pauses sleep on it, not on a
	// step's deadline, so a test's pause is not cut short.
	runCtx context.Context
	// firstWatch closes once the first list of our migrations arrived.
	firstWatch chan struct{}
	firstOnce  sync.Once
	wg         sync.WaitGroup
	// trims are the fstrim runs the trim step started: they run on beside
	// the machine's start, and hydration and a teardown wait for them.
	trims *volops.Trims
	// earlyLogins: migration id -> the portal its destination's prestarted
	// datapath was asked to log in to (loginEarly).
	earlyLogins sync.Map
	// arrivals: migration id -> the arriving machine's network, made
	// while its clone was built (buildClone), for the cutover step.
	arrivals sync.Map
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
		running: map[string]chan *fsm.Migration{}, active: map[string]string{}, reaping: map[string]bool{}, firstWatch: make(chan struct{}),
		trims: volops.NewTrims(p.Marks, p.Volumes.Trim, cfg.StepTimeout)}
	for _, part := range []any{p.Lease, p.Keys, p.Machines, p.Volumes} {
		if c, ok := part.(prometheus.Collector); ok {
			a.met.reg.MustRegister(c)
		}
	}
	return a, nil
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
	a.wg.Wait()
	a.trims.WaitAll()
	if ps, ok := a.Data.(datapath.Prestarter); ok {
		ps.ReleasePrestarted()
	}
	return nil
}

// dispatch hands a migration's latest record to its driver goroutine,
// starting one if needed. One goroutine per migration keeps steps ordered.
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
	a.mu.Lock()
	defer a.mu.Unlock()
	inbox, ok := a.running[m.ID]
	if m.State.Terminal() && !ok {
		return
	}
	// A terminal record still reaches a running driver: it stops there
	// (and the reaper, which waits for it, can release what it set up).
	if !ok {
		inbox = make(chan *fsm.Migration, 1)
		a.running[m.ID] = inbox
		a.wg.Add(1)
		go a.drive(ctx, m.ID, inbox)
	}
	// Keep only the newest record.
	select {
	case <-inbox:
	default:
	}
	inbox <- m
}

// drive performs this worker's steps of one migration until it ends or no
// longer needs this worker.
func (a *Agent) drive(ctx context.Context, id string, inbox chan *fsm.Migration) {
	defer a.wg.Done()
	defer func() {
		a.mu.Lock()
		delete(a.running, id)
		a.mu.Unlock()
		a.earlyLogins.Delete(id)
	}()
	log := a.log.With().Str("migration", id).Logger()
	var m *fsm.Migration
	bo := retry.New(a.cfg.Retry, a.cfg.RetryMax)
	var failingSince time.Time
	attempts := 0
	// The newest record's raft index: a record the watch delivered while a
	// step ran can be older than the one the step's proposal returned, and
	// would run the step again (a second prestarted process, a second
	// proposal) right as the source stops the machine.
	var seen uint64
	newer := func(n *fsm.Migration) bool { return n.ModifyIndex >= seen }
	for {
		for m == nil {
			select {
			case <-ctx.Done():
				return
			case n := <-inbox:
				if newer(n) {
					m = n
				}
			}
		}
		seen = max(seen, m.ModifyIndex)
		// Prefer the newest record if one arrived.
		select {
		case n := <-inbox:
			if newer(n) {
				m, seen = n, n.ModifyIndex
			}
		default:
		}
		if m.State.Terminal() {
			return
		}
		step := a.stepFor(m)
		if step == nil {
			// Nothing for us in this state: wait for the next change.
			m = nil
			continue
		}
		stepCtx, cancel, budgetEnd := a.stepContext(ctx, m)
		stopWatch := a.watchStep(stepCtx, log, m)
		err := step(stepCtx, log, m)
		stopWatch()
		if err != nil && stepCtx.Err() != nil && ctx.Err() == nil {
			err = fmt.Errorf("%w (%v)", err, context.Cause(stepCtx))
		}
		cancel()
		if err == nil {
			a.met.steps.WithLabelValues(string(m.State)).Inc()
			attempts, failingSince = 0, time.Time{}
			bo.Reset()
			fresh, gerr := a.Control.GetMigration(ctx, id)
			if gerr != nil || fresh.State == m.State {
				// A step that proposed nothing (or whose event is not visible
				// yet) waits for the next change instead of repeating.
				m = nil
			} else {
				m = fresh
			}
			continue
		}
		if ctx.Err() != nil {
			return
		}
		if isRefusal(err) {
			// The store moved on (another proposal won, or an abort): re-read and re-decide.
			if fresh, gerr := a.Control.GetMigration(ctx, id); gerr == nil && fresh.State != m.State {
				log.Info().Err(err).Msg("proposal refused; the migration moved on")
				m = fresh
				continue
			}
		}
		attempts++
		a.met.stepFailures.WithLabelValues(string(m.State)).Inc()
		if failingSince.IsZero() {
			failingSince = time.Now()
		}
		backoff := bo.Next()
		log.Warn().Err(err).Str("state", string(m.State)).Int("attempt", attempts).Dur("backoff", backoff).Msg("step failed; retrying")
		if !budgetEnd.IsZero() && !time.Now().Before(budgetEnd) {
			a.failOverBudget(ctx, log, m, err)
		} else {
			a.reportFailure(ctx, log, m, err, attempts, failingSince)
		}
		if !sleep(ctx, backoff) {
			return
		}
		if fresh, gerr := a.Control.GetMigration(ctx, id); gerr == nil {
			m = fresh
		}
	}
}

// reportFailure records a failing step: before cutover, after enough
// attempts, it fails the migration (rollback); after cutover the only way is
// forward, so it marks the migration stalled with the reason.
func (a *Agent) reportFailure(ctx context.Context, log zerolog.Logger, m *fsm.Migration, stepErr error, attempts int, since time.Time) {
	if m.State.BeforeCutover() && attempts >= a.cfg.MaxPreCutoverAttempts {
		a.fail(ctx, log, m, fmt.Sprintf("%s step failed %d times: %v", m.State, attempts, stepErr), stepErr)
		return
	}
	stalled := time.Since(since) >= a.cfg.StallAfter
	if stalled {
		a.met.stalls.Inc()
	}
	_, err := a.Control.Propose(ctx, m.ID, fsm.EvReport, "", fsm.EventPayload{Error: stepErr.Error(), Stalled: &stalled})
	if err != nil {
		log.Debug().Err(err).Msg("could not report the failure")
	}
}

// fail fails the migration (rollback) for reason.
func (a *Agent) fail(ctx context.Context, log zerolog.Logger, m *fsm.Migration, reason string, stepErr error) {
	_, err := a.Control.Propose(ctx, m.ID, fsm.EvFailed, stepID(m, "failed", string(m.State)), fsm.EventPayload{Reason: reason, Error: stepErr.Error()})
	if err != nil {
		log.Warn().Err(err).Msg("could not fail the migration")
	}
}

// errBudget is the cause of a step cancelled because the migration's
// downtime budget is spent.
var errBudget = errors.New("the downtime budget is spent")

// errStepTimeout is the cause of a step cancelled after StepTimeout.
var errStepTimeout = errors.New("the step timed out")

// stepContext bounds one attempt of m's step: by StepTimeout, and between
// source_stopped and cutover by the end of the downtime budget (returned,
// zero outside that window). Hydration waits for the whole copy.
func (a *Agent) stepContext(ctx context.Context, m *fsm.Migration) (context.Context, context.CancelFunc, time.Time) {
	if m.State == fsm.Hydrating {
		c, cancel := context.WithCancel(ctx)
		return c, cancel, time.Time{}
	}
	deadline, cause := time.Now().Add(a.cfg.StepTimeout), errStepTimeout
	var budgetEnd time.Time
	if t0, ok := m.EnteredAt[fsm.SourceStopped]; ok && m.State.BeforeCutover() {
		budgetEnd = t0.Add(m.Budget())
		if budgetEnd.Before(deadline) {
			deadline, cause = budgetEnd, errBudget
		}
	}
	c, cancel := context.WithDeadlineCause(ctx, deadline, cause)
	return c, cancel, budgetEnd
}

// failOverBudget rolls back a migration whose downtime budget ran out
// before cutover: the machine is better back on the source than waiting.
func (a *Agent) failOverBudget(ctx context.Context, log zerolog.Logger, m *fsm.Migration, stepErr error) {
	reason := fmt.Sprintf("downtime budget %v spent before cutover: the %s step did not finish", m.Budget(), m.State)
	log.Error().Err(stepErr).Str("reason", reason).Msg("rolling back")
	a.fail(ctx, log, m, reason, stepErr)
}

// watchStep reports a step after cutover that runs StallAfter without
// finishing as stalled, with what it is doing: after cutover the migration
// can only wait for it. It returns a function that ends the watch.
func (a *Agent) watchStep(ctx context.Context, log zerolog.Logger, m *fsm.Migration) func() {
	if !m.State.AfterCutover() || m.State == fsm.Hydrating {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		t := time.NewTimer(a.cfg.StallAfter)
		defer t.Stop()
		select {
		case <-done:
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
		stalled := true
		reason := fmt.Sprintf("the %s step has run for %v without finishing (a hung tool or an unreachable peer); it is cancelled and retried after %v", m.State, a.cfg.StallAfter, a.cfg.StepTimeout)
		log.Warn().Str("reason", reason).Msg("step stalled")
		a.met.stalls.Inc()
		rc := a.runCtx
		if rc == nil {
			rc = ctx
		}
		if _, err := a.Control.Propose(rc, m.ID, fsm.EvReport, "", fsm.EventPayload{Error: reason, Stalled: &stalled}); err != nil {
			log.Debug().Err(err).Msg("could not report the stall")
		}
	}()
	return func() { close(done) }
}

// stepID names a step deterministically so every retry proposes the same ID.
func stepID(m *fsm.Migration, parts ...string) string {
	id := m.ID
	for _, p := range parts {
		id += "/" + p
	}
	return id
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
