// Package stepdriver runs one worker's steps of each migration: one
// goroutine per migration keeps its steps ordered; each attempt is bounded
// (StepTimeout, and the downtime budget between source_stopped and
// cutover); failures are retried with jittered backoff, reported, and before
// cutover fail the migration after MaxPreCutoverAttempts; a step after
// cutover that runs StallAfter is reported stalled. What each step does is
// the caller's (the agent's); the driver only decides when it runs.
package stepdriver

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/retry"
)

// Control is what the driver needs from the replicated store.
type Control interface {
	GetMigration(ctx context.Context, id string) (*fsm.Migration, error)
	Propose(ctx context.Context, id string, ev fsm.Event, stepID string, p fsm.EventPayload) (*fsm.Migration, error)
}

// Step performs one attempt of a worker's step for m's committed state
// (and proposes its event). It must be idempotent: any attempt may be cut
// short and run again.
type Step func(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error

// Config bounds and paces the steps.
type Config struct {
	// Retry is the first backoff after a failed step; it doubles up to
	// RetryMax, each delay jittered by half either way.
	Retry, RetryMax time.Duration
	// StallAfter: a step failing (or running, after cutover) this long is
	// reported as stalled.
	StallAfter time.Duration
	// StepTimeout bounds one attempt of a step, hydration's excepted.
	StepTimeout time.Duration
	// MaxPreCutoverAttempts: a pre-cutover step failing this many times
	// fails the migration (rollback).
	MaxPreCutoverAttempts int
}

// Hooks tell the driver's owner what happened; any may be nil.
type Hooks struct {
	StepDone   func(fsm.State) // a step succeeded
	StepFailed func(fsm.State) // an attempt failed (a refusal the store moved past is none)
	Stalled    func()          // a step was reported stalled
	// Ended runs when a migration's driver stops, once Running reports
	// false for it.
	Ended func(id string)
}

// Driver runs the steps of every migration dispatched to it.
type Driver struct {
	log     zerolog.Logger
	cfg     Config
	control Control
	stepFor func(*fsm.Migration) Step
	hooks   Hooks

	mu      sync.Mutex
	running map[string]chan *fsm.Migration // migration id -> its driver goroutine's inbox
	noted   map[string]*fsm.Migration      // migration id -> the newest record a step's proposal returned
	wg      sync.WaitGroup
}

// New returns a driver that runs stepFor(m) for each record m it is
// handed; stepFor returns nil when the state waits on someone else.
func New(log zerolog.Logger, cfg Config, c Control, stepFor func(*fsm.Migration) Step, h Hooks) *Driver {
	if h.StepDone == nil {
		h.StepDone = func(fsm.State) {}
	}
	if h.StepFailed == nil {
		h.StepFailed = func(fsm.State) {}
	}
	if h.Stalled == nil {
		h.Stalled = func() {}
	}
	if h.Ended == nil {
		h.Ended = func(string) {}
	}
	return &Driver{log: log, cfg: cfg, control: c, stepFor: stepFor, hooks: h, running: map[string]chan *fsm.Migration{}, noted: map[string]*fsm.Migration{}}
}

// Dispatch hands a migration's latest record to its driver goroutine,
// starting one if needed. One goroutine per migration keeps steps ordered.
// ctx is the owner's (Run's): it ends the drivers, and stall reports use
// it rather than a step's deadline.
func (d *Driver) Dispatch(ctx context.Context, m *fsm.Migration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	inbox, ok := d.running[m.ID]
	if m.State.Terminal() && !ok {
		return
	}
	// A terminal record still reaches a running driver: it stops there
	// (and the reaper, which waits for it, can release what it set up).
	if !ok {
		inbox = make(chan *fsm.Migration, 1)
		d.running[m.ID] = inbox
		d.wg.Add(1)
		go d.drive(ctx, m.ID, inbox)
	}
	// Keep only the newest record.
	select {
	case <-inbox:
	default:
	}
	inbox <- m
}

// Note hands the driver the record a step's proposal returned. After the
// step the driver goes on from it instead of reading the migration again:
// a round trip to the servers per step, three of them inside a
// migration's pause.
func (d *Driver) Note(m *fsm.Migration) {
	if m == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.running[m.ID]; !ok {
		return
	}
	if old := d.noted[m.ID]; old == nil || m.ModifyIndex > old.ModifyIndex {
		d.noted[m.ID] = m
	}
}

// takeNoted returns and forgets what Note kept for id.
func (d *Driver) takeNoted(id string) *fsm.Migration {
	d.mu.Lock()
	defer d.mu.Unlock()
	m := d.noted[id]
	delete(d.noted, id)
	return m
}

// Running reports whether migration id has a driver (a step may be running).
func (d *Driver) Running(id string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	_, ok := d.running[id]
	return ok
}

// Wait waits for every driver to stop (they stop when their ctx ends or
// their migration does).
func (d *Driver) Wait() { d.wg.Wait() }

// drive performs this worker's steps of one migration until it ends or no
// longer needs this worker.
func (d *Driver) drive(ctx context.Context, id string, inbox chan *fsm.Migration) {
	defer d.wg.Done()
	defer func() {
		d.mu.Lock()
		delete(d.running, id)
		delete(d.noted, id)
		d.mu.Unlock()
		d.hooks.Ended(id)
	}()
	log := d.log.With().Str("migration", id).Logger()
	var m *fsm.Migration
	bo := retry.New(d.cfg.Retry, d.cfg.RetryMax)
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
		step := d.stepFor(m)
		if step == nil {
			// Nothing for us in this state: wait for the next change.
			m = nil
			continue
		}
		d.takeNoted(id) // what an earlier attempt's proposals returned
		stepCtx, cancel, budgetEnd := d.stepContext(ctx, m)
		stopWatch := d.watchStep(stepCtx, ctx, log, m)
		err := step(stepCtx, log, m)
		stopWatch()
		if err != nil && stepCtx.Err() != nil && ctx.Err() == nil {
			err = fmt.Errorf("%w (%v)", err, context.Cause(stepCtx))
		}
		cancel()
		if err == nil {
			d.hooks.StepDone(m.State)
			attempts, failingSince = 0, time.Time{}
			bo.Reset()
			fresh := d.takeNoted(id)
			if fresh == nil || fresh.ModifyIndex <= m.ModifyIndex || fresh.State == m.State {
				var gerr error
				if fresh, gerr = d.control.GetMigration(ctx, id); gerr != nil {
					fresh = nil
				}
			}
			if fresh == nil || fresh.State == m.State {
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
		if IsRefusal(err) {
			// The store moved on (another proposal won, or an abort): re-read and re-decide.
			if fresh, gerr := d.control.GetMigration(ctx, id); gerr == nil && fresh.State != m.State {
				log.Info().Err(err).Msg("proposal refused; the migration moved on")
				m = fresh
				continue
			}
		}
		attempts++
		d.hooks.StepFailed(m.State)
		if failingSince.IsZero() {
			failingSince = time.Now()
		}
		backoff := bo.Next()
		log.Warn().Err(err).Str("state", string(m.State)).Int("attempt", attempts).Dur("backoff", backoff).Msg("step failed; retrying")
		if !budgetEnd.IsZero() && !time.Now().Before(budgetEnd) {
			d.failOverBudget(ctx, log, m, err)
		} else {
			d.reportFailure(ctx, log, m, err, attempts, failingSince)
		}
		if !retry.Sleep(ctx, backoff) {
			return
		}
		if fresh, gerr := d.control.GetMigration(ctx, id); gerr == nil {
			m = fresh
		}
	}
}

// reportFailure records a failing step: before cutover, after enough
// attempts, it fails the migration (rollback); after cutover the only way is
// forward, so it marks the migration stalled with the reason.
func (d *Driver) reportFailure(ctx context.Context, log zerolog.Logger, m *fsm.Migration, stepErr error, attempts int, since time.Time) {
	if m.State.BeforeCutover() && attempts >= d.cfg.MaxPreCutoverAttempts {
		d.fail(ctx, log, m, fmt.Sprintf("%s step failed %d times: %v", m.State, attempts, stepErr), stepErr)
		return
	}
	stalled := time.Since(since) >= d.cfg.StallAfter
	if stalled {
		d.hooks.Stalled()
	}
	_, err := d.control.Propose(ctx, m.ID, fsm.EvReport, "", fsm.EventPayload{Error: stepErr.Error(), Stalled: &stalled})
	if err != nil {
		log.Debug().Err(err).Msg("could not report the failure")
	}
}

// fail fails the migration (rollback) for reason.
func (d *Driver) fail(ctx context.Context, log zerolog.Logger, m *fsm.Migration, reason string, stepErr error) {
	_, err := d.control.Propose(ctx, m.ID, fsm.EvFailed, StepID(m, "failed", string(m.State)), fsm.EventPayload{Reason: reason, Error: stepErr.Error()})
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
func (d *Driver) stepContext(ctx context.Context, m *fsm.Migration) (context.Context, context.CancelFunc, time.Time) {
	if m.State == fsm.Hydrating {
		c, cancel := context.WithCancel(ctx)
		return c, cancel, time.Time{}
	}
	deadline, cause := time.Now().Add(d.cfg.StepTimeout), errStepTimeout
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
func (d *Driver) failOverBudget(ctx context.Context, log zerolog.Logger, m *fsm.Migration, stepErr error) {
	reason := fmt.Sprintf("downtime budget %v spent before cutover: the %s step did not finish", m.Budget(), m.State)
	log.Error().Err(stepErr).Str("reason", reason).Msg("rolling back")
	d.fail(ctx, log, m, reason, stepErr)
}

// watchStep reports a step after cutover that runs StallAfter without
// finishing as stalled, with what it is doing: after cutover the migration
// can only wait for it. The report is proposed under runCtx (the
// driver's), not the step's ctx, whose deadline may cut it short. It
// returns a function that ends the watch.
func (d *Driver) watchStep(ctx, runCtx context.Context, log zerolog.Logger, m *fsm.Migration) func() {
	if !m.State.AfterCutover() || m.State == fsm.Hydrating {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		t := time.NewTimer(d.cfg.StallAfter)
		defer t.Stop()
		select {
		case <-done:
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
		stalled := true
		reason := fmt.Sprintf("the %s step has run for %v without finishing (a hung tool or an unreachable peer); it is cancelled and retried after %v", m.State, d.cfg.StallAfter, d.cfg.StepTimeout)
		log.Warn().Str("reason", reason).Msg("step stalled")
		d.hooks.Stalled()
		if _, err := d.control.Propose(runCtx, m.ID, fsm.EvReport, "", fsm.EventPayload{Error: reason, Stalled: &stalled}); err != nil {
			log.Debug().Err(err).Msg("could not report the stall")
		}
	}()
	return func() { close(done) }
}

// StepID names a step deterministically so every retry proposes the same ID.
func StepID(m *fsm.Migration, parts ...string) string {
	id := m.ID
	for _, p := range parts {
		id += "/" + p
	}
	return id
}

// IsRefusal reports whether err is the store refusing a proposal (state
// moved on, guard failed) rather than a transport failure; the control
// plane reports refusals as *fsm.Refusal.
func IsRefusal(err error) bool {
	var r *fsm.Refusal
	return errors.As(err, &r) && r.Kind.ClientSide()
}
