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
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/machine"
)

// Config of one agent.
type Config struct {
	Worker    string // this worker's name (its certificate's identity)
	HostID    uint32 // the worker's 32-bit 6PN host id
	Address   string // IP where peers reach this worker's exports (the fabric address)
	DataDir   string
	Exe       string // path of the ferry binary, for child processes
	Heartbeat time.Duration
	LeaseTTL  time.Duration
	// Retry is the first backoff after a failed step; it doubles up to RetryMax.
	Retry, RetryMax time.Duration
	// StallAfter: a step failing this long is reported as stalled.
	StallAfter time.Duration
	// MaxPreCutoverAttempts: a pre-cutover step failing this many times fails the migration (rollback).
	MaxPreCutoverAttempts int
	// HydrationRate caps background hydration, bytes/s (0: none).
	HydrationRate int64
	// PauseBefore delays proposing an event: a failpoint for chaos and crash
	// tests (FERRY_FAILPOINT_PAUSE_BEFORE="clone_built=30s,exported=5s").
	PauseBefore map[fsm.Event]time.Duration
}

// ParsePauseBefore reads the FERRY_FAILPOINT_PAUSE_BEFORE syntax.
func ParsePauseBefore(s string) (map[fsm.Event]time.Duration, error) {
	out := map[fsm.Event]time.Duration{}
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		ev, d, ok := strings.Cut(part, "=")
		dur, err := time.ParseDuration(d)
		if !ok || err != nil || !fsm.KnownEvent(fsm.Event(ev)) {
			return nil, fmt.Errorf("failpoint %q: use EVENT=DURATION with a known event", part)
		}
		out[fsm.Event(ev)] = dur
	}
	return out, nil
}

func (c *Config) defaults() {
	if c.LeaseTTL == 0 {
		c.LeaseTTL = fsm.DefaultLeaseTTL
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = c.LeaseTTL / 4
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
	if c.MaxPreCutoverAttempts == 0 {
		c.MaxPreCutoverAttempts = 5
	}
}

// Agent runs one worker's side of every migration.
type Agent struct {
	cfg  Config
	log  zerolog.Logger
	cp   ControlPlane
	exp  Exporter
	net  Network
	mach machine.Driver
	vols Backend
	met  *metrics

	// machMu orders the reconcile loop's machine starts and stops against
	// migrations taking a machine over: a reconcile that decided a machine
	// is not migrating finishes acting on it before a new migration is
	// registered (and its steps stop the machine), never after.
	machMu  sync.Mutex
	mu      sync.Mutex
	running map[string]chan *fsm.Migration // migration id -> its driver goroutine's inbox
	active  map[string]string              // active migration id -> its machine
	// firstWatch closes once the first list of our migrations arrived.
	firstWatch chan struct{}
	firstOnce  sync.Once
	wg         sync.WaitGroup
}

// New builds an agent. exp, net and mach are the worker's export, network
// and machine drivers; vols its data path (Volumes or KernelVolumes).
func New(log zerolog.Logger, cfg Config, cp ControlPlane, exp Exporter, net Network, mach machine.Driver, vols Backend) (*Agent, error) {
	cfg.defaults()
	if cfg.Worker == "" || cfg.DataDir == "" {
		return nil, fmt.Errorf("agent: worker name and data dir are required")
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("agent data dir: %w", err)
	}
	return &Agent{cfg: cfg, log: log.With().Str("worker", cfg.Worker).Logger(),
		cp: cp, exp: exp, net: net, mach: mach, vols: vols, met: newMetrics(), running: map[string]chan *fsm.Migration{}, active: map[string]string{},
		firstWatch: make(chan struct{})}, nil
}

// Run registers the worker and serves until ctx ends. Work in progress is
// left where it is (exports, datapaths and machines keep running) so a new
// agent process resumes it.
func (a *Agent) Run(ctx context.Context) error {
	w := fsm.Worker{Name: a.cfg.Worker, HostID: a.cfg.HostID, Address: a.cfg.Address}
	if err := retry(ctx, a.log, "register worker", func() error { return a.cp.RegisterWorker(ctx, w) }); err != nil {
		return err
	}
	a.log.Info().Uint32("host_id", a.cfg.HostID).Str("address", a.cfg.Address).Msg("worker registered")
	go a.heartbeat(ctx)
	go a.reconcileLoop(ctx)
	var index uint64
	for ctx.Err() == nil {
		ms, next, err := a.cp.WatchMigrations(ctx, a.cfg.Worker, index)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			a.log.Warn().Err(err).Msg("watch migrations failed; retrying")
			sleep(ctx, time.Second)
			continue
		}
		index = next
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
			a.dispatch(ctx, m)
		}
	}
	a.wg.Wait()
	return nil
}

func (a *Agent) heartbeat(ctx context.Context) {
	t := time.NewTicker(a.cfg.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			// Bounded: a request stuck on a connection that died with a
			// link outage would otherwise hold every later heartbeat and
			// let the lease lapse with the worker healthy again.
			hctx, cancel := context.WithTimeout(ctx, a.cfg.LeaseTTL/2)
			err := a.cp.Heartbeat(hctx, a.cfg.Worker)
			cancel()
			if err != nil && ctx.Err() == nil {
				a.log.Warn().Err(err).Msg("heartbeat failed")
			}
		}
	}
}

// dispatch hands a migration's latest record to its driver goroutine,
// starting one if needed. One goroutine per migration keeps steps ordered.
func (a *Agent) dispatch(ctx context.Context, m *fsm.Migration) {
	if _, hydrated := m.EnteredAt[fsm.Hydrated]; hydrated && m.Target == a.cfg.Worker && m.TargetVol != "" {
		// The hydrate step removes the clone's metadata once hydrated is
		// committed; an agent killed between the two finds it here, in
		// any later state, the terminal one included.
		if err := os.Remove(a.vols.MetaPath(m.TargetVol)); err == nil {
			a.log.Info().Str("migration", m.ID).Msg("removed the dissolved clone's metadata left by an earlier run")
		} else if !os.IsNotExist(err) {
			a.log.Warn().Err(err).Str("migration", m.ID).Msg("removing the dissolved clone's metadata")
		}
	}
	if m.State.Terminal() {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	inbox, ok := a.running[m.ID]
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
	}()
	log := a.log.With().Str("migration", id).Logger()
	var m *fsm.Migration
	backoff := a.cfg.Retry
	var failingSince time.Time
	attempts := 0
	for {
		if m == nil {
			select {
			case <-ctx.Done():
				return
			case m = <-inbox:
			}
		}
		// Prefer the newest record if one arrived.
		select {
		case m = <-inbox:
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
		err := step(ctx, log, m)
		if err == nil {
			a.met.steps.WithLabelValues(string(m.State)).Inc()
			backoff, attempts, failingSince = a.cfg.Retry, 0, time.Time{}
			fresh, gerr := a.cp.GetMigration(ctx, id)
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
			if fresh, gerr := a.cp.GetMigration(ctx, id); gerr == nil && fresh.State != m.State {
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
		log.Warn().Err(err).Str("state", string(m.State)).Int("attempt", attempts).Dur("backoff", backoff).Msg("step failed; retrying")
		a.reportFailure(ctx, log, m, err, attempts, failingSince)
		if !sleep(ctx, backoff) {
			return
		}
		if backoff *= 2; backoff > a.cfg.RetryMax {
			backoff = a.cfg.RetryMax
		}
		if fresh, gerr := a.cp.GetMigration(ctx, id); gerr == nil {
			m = fresh
		}
	}
}

// reportFailure records a failing step: before cutover, after enough
// attempts, it fails the migration (rollback); after cutover the only way is
// forward, so it marks the migration stalled with the reason.
func (a *Agent) reportFailure(ctx context.Context, log zerolog.Logger, m *fsm.Migration, stepErr error, attempts int, since time.Time) {
	if m.State.BeforeCutover() && attempts >= a.cfg.MaxPreCutoverAttempts {
		_, err := a.cp.Propose(ctx, m.ID, fsm.EvFailed, stepID(m, "failed", string(m.State)),
			fsm.EventPayload{Reason: fmt.Sprintf("%s step failed %d times", m.State, attempts), Error: stepErr.Error()})
		if err != nil {
			log.Warn().Err(err).Msg("could not fail the migration")
		}
		return
	}
	stalled := time.Since(since) >= a.cfg.StallAfter
	if stalled {
		a.met.stalls.Inc()
	}
	_, err := a.cp.Propose(ctx, m.ID, fsm.EvReport, "", fsm.EventPayload{Error: stepErr.Error(), Stalled: &stalled})
	if err != nil {
		log.Debug().Err(err).Msg("could not report the failure")
	}
}

// stepID names a step deterministically so every retry proposes the same ID.
func stepID(m *fsm.Migration, parts ...string) string {
	id := m.ID
	for _, p := range parts {
		id += "/" + p
	}
	return id
}

func sleep(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

func retry(ctx context.Context, log zerolog.Logger, what string, fn func() error) error {
	backoff := 200 * time.Millisecond
	for {
		err := fn()
		if err == nil {
			return nil
		}
		log.Warn().Err(err).Msg(what + " failed; retrying")
		if !sleep(ctx, backoff) {
			return fmt.Errorf("%s: %w", what, err)
		}
		if backoff < 5*time.Second {
			backoff *= 2
		}
	}
}

// paths under the data dir.
func (a *Agent) stateDir(parts ...string) string {
	return filepath.Join(append([]string{a.cfg.DataDir}, parts...)...)
}
