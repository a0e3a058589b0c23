package stepdriver

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
)

// wait bounds every wait on the driver: generous, for a loaded CI host.
const wait = 10 * time.Second

// proposal is one call of fakeControl.Propose.
type proposal struct {
	ctx    context.Context
	ev     fsm.Event
	stepID string
	p      fsm.EventPayload
	at     time.Time
}

// fakeControl is the store for one migration: it records proposals and
// applies failed (rolling_back) and whatever apply does, each change with
// a new raft index.
type fakeControl struct {
	mu    sync.Mutex
	m     *fsm.Migration
	props []proposal
	apply func(m *fsm.Migration, ev fsm.Event, p fsm.EventPayload) // optional
	ch    chan proposal                                            // every proposal, in order
	gets  int                                                      // GetMigration calls
}

func newControl(m *fsm.Migration) *fakeControl {
	return &fakeControl{m: m, ch: make(chan proposal, 10000)}
}

func (c *fakeControl) GetMigration(context.Context, string) (*fsm.Migration, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.gets++
	return c.m.Clone(), nil
}

func (c *fakeControl) Propose(ctx context.Context, _ string, ev fsm.Event, stepID string, p fsm.EventPayload) (*fsm.Migration, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	pr := proposal{ctx: ctx, ev: ev, stepID: stepID, p: p, at: time.Now()}
	c.props = append(c.props, pr)
	select {
	case c.ch <- pr:
	default:
	}
	switch {
	case ev == fsm.EvFailed:
		c.m.State = fsm.RollingBack
		c.m.ModifyIndex++
	case c.apply != nil:
		c.apply(c.m, ev, p)
	}
	return c.m.Clone(), nil
}

func (c *fakeControl) proposals() []proposal {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]proposal(nil), c.props...)
}

func (c *fakeControl) events() []fsm.Event {
	var evs []fsm.Event
	for _, p := range c.proposals() {
		evs = append(evs, p.ev)
	}
	return evs
}

// next waits for the next proposal that match accepts.
func (c *fakeControl) next(t *testing.T, what string, match func(proposal) bool) proposal {
	t.Helper()
	deadline := time.After(wait)
	for {
		select {
		case p := <-c.ch:
			if match(p) {
				return p
			}
		case <-deadline:
			t.Fatalf("no %s within %v; proposals: %v", what, wait, c.events())
		}
	}
}

// testConfig retries at once and never reports a stall unless a test says so.
func testConfig() Config {
	return Config{Retry: time.Millisecond, RetryMax: 2 * time.Millisecond, StallAfter: time.Hour, StepTimeout: time.Minute,
		MaxPreCutoverAttempts: 3}
}

// start makes a driver; the test's end stops it and waits for its goroutines.
func start(t *testing.T, cfg Config, c Control, stepFor func(*fsm.Migration) Step, h Hooks) (context.Context, *Driver) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	d := New(zerolog.Nop(), cfg, c, stepFor, h)
	t.Cleanup(func() {
		cancel()
		d.Wait()
	})
	return ctx, d
}

// only returns step for state and nil (nothing to do) for any other.
func only(state fsm.State, step Step) func(*fsm.Migration) Step {
	return func(m *fsm.Migration) Step {
		if m.State == state {
			return step
		}
		return nil
	}
}

// A step failing before cutover is retried, each failure reported, and the
// MaxPreCutoverAttempts-th fails the migration under the step ID of its state.
func TestPreCutoverFailureFailsTheMigration(t *testing.T) {
	c := newControl(&fsm.Migration{ID: "mig-f", Source: "src", Target: "dst", State: fsm.TargetPrepared, ModifyIndex: 1})
	var calls, failed atomic.Int32
	ctx, d := start(t, testConfig(), c, only(fsm.TargetPrepared, func(context.Context, zerolog.Logger, *fsm.Migration) error {
		calls.Add(1)
		return errors.New("stop: the machine did not stop")
	}), Hooks{StepFailed: func(s fsm.State) {
		if s == fsm.TargetPrepared {
			failed.Add(1)
		}
	}})
	m, _ := c.GetMigration(ctx, "mig-f")
	d.Dispatch(ctx, m)
	got := c.next(t, "failed", func(p proposal) bool { return p.ev == fsm.EvFailed })
	if got.stepID != "mig-f/failed/target_prepared" {
		t.Errorf("failed proposed with step ID %q, want mig-f/failed/target_prepared", got.stepID)
	}
	if want := "target_prepared step failed 3 times: stop: the machine did not stop"; got.p.Reason != want {
		t.Errorf("reason %q, want %q", got.p.Reason, want)
	}
	if got.p.Error != "stop: the machine did not stop" {
		t.Errorf("error %q, want the step's", got.p.Error)
	}
	// The failure is proposed before the backoff; the step does not run
	// again once the store rolls back.
	if n := calls.Load(); n != 3 {
		t.Errorf("the step ran %d times before failed, want 3", n)
	}
	if n := failed.Load(); n != 3 {
		t.Errorf("StepFailed called %d times, want 3", n)
	}
	ps := c.proposals()
	if len(ps) != 3 || ps[0].ev != fsm.EvReport || ps[1].ev != fsm.EvReport {
		t.Fatalf("proposals %v, want two reports, then failed", c.events())
	}
	for _, p := range ps[:2] {
		if p.p.Stalled == nil || *p.p.Stalled || p.p.Error != "stop: the machine did not stop" {
			t.Errorf("report %+v: want the step's error, not stalled", p.p)
		}
	}
}

// A step between source_stopped and cutover runs under what is left of the
// downtime budget; once it is spent the step's context ends with errBudget
// and the migration fails at once, whatever the attempts.
func TestBudgetSpentFailsTheMigration(t *testing.T) {
	stopped := time.Now().Add(-time.Second)
	c := newControl(&fsm.Migration{ID: "mig-b", Source: "src", Target: "dst", State: fsm.SourceStopped, ModifyIndex: 1,
		MaxDowntime: 300 * time.Millisecond, EnteredAt: map[fsm.State]time.Time{fsm.SourceStopped: stopped}})
	cfg := testConfig()
	cfg.MaxPreCutoverAttempts = 1000 // only the budget may fail it
	causes := make(chan error, 1)    // the first attempt's
	ctx, d := start(t, cfg, c, only(fsm.SourceStopped, func(ctx context.Context, _ zerolog.Logger, _ *fsm.Migration) error {
		<-ctx.Done()
		select {
		case causes <- context.Cause(ctx):
		default:
		}
		return fmt.Errorf("export: %w", ctx.Err())
	}), Hooks{})
	m, _ := c.GetMigration(ctx, "mig-b")
	d.Dispatch(ctx, m)
	got := c.next(t, "failed", func(p proposal) bool { return p.ev == fsm.EvFailed })
	if cause := <-causes; !errors.Is(cause, errBudget) { // sent before failed was proposed
		t.Errorf("the step's context ended with %v, want errBudget", cause)
	}
	if want := "downtime budget 300ms spent before cutover: the source_stopped step did not finish"; got.p.Reason != want {
		t.Errorf("reason %q, want %q", got.p.Reason, want)
	}
	if want := "export: context deadline exceeded (the downtime budget is spent)"; got.p.Error != want {
		t.Errorf("error %q, want %q", got.p.Error, want)
	}
	if got.stepID != "mig-b/failed/source_stopped" {
		t.Errorf("step ID %q", got.stepID)
	}
}

// After cutover the only way is forward: a failing step is reported, as
// stalled once it has failed for StallAfter, and never fails the migration.
func TestFailureAfterCutoverIsReportedStalled(t *testing.T) {
	c := newControl(&fsm.Migration{ID: "mig-s", Source: "src", Target: "dst", State: fsm.Hydrated, ModifyIndex: 1})
	cfg := testConfig()
	cfg.MaxPreCutoverAttempts = 1
	cfg.StallAfter = 50 * time.Millisecond
	var calls, stalls atomic.Int32
	var first time.Time // the first failure's end
	ctx, d := start(t, cfg, c, only(fsm.Hydrated, func(context.Context, zerolog.Logger, *fsm.Migration) error {
		if calls.Add(1) == 1 {
			first = time.Now()
		}
		return errors.New("release: unexport failed")
	}), Hooks{Stalled: func() { stalls.Add(1) }})
	m, _ := c.GetMigration(ctx, "mig-s")
	d.Dispatch(ctx, m)
	got := c.next(t, "stalled report", func(p proposal) bool {
		return p.ev == fsm.EvReport && p.p.Stalled != nil && *p.p.Stalled && p.p.Error == "release: unexport failed"
	})
	if el := got.at.Sub(first); el < cfg.StallAfter {
		t.Errorf("reported stalled %v after the first failure, before StallAfter (%v)", el, cfg.StallAfter)
	}
	if n := calls.Load(); n < 2 {
		t.Errorf("the step ran %d times, want retries", n)
	}
	if stalls.Load() == 0 {
		t.Error("Stalled hook not called")
	}
	for _, p := range c.proposals() {
		if p.ev != fsm.EvReport {
			t.Fatalf("after cutover the driver proposed %s (%v), want reports only", p.ev, c.events())
		}
	}
}

// A step running StallAfter after cutover is reported stalled with what it
// is, under the driver's context (not the step's, whose deadline could cut
// the report short).
func TestHungStepAfterCutoverReportedStalled(t *testing.T) {
	c := newControl(&fsm.Migration{ID: "mig-h", Source: "src", Target: "dst", State: fsm.Hydrated, ModifyIndex: 1})
	cfg := testConfig()
	cfg.StallAfter = 20 * time.Millisecond
	ctx, d := start(t, cfg, c, only(fsm.Hydrated, func(ctx context.Context, _ zerolog.Logger, _ *fsm.Migration) error {
		<-ctx.Done()
		return ctx.Err()
	}), Hooks{})
	m, _ := c.GetMigration(ctx, "mig-h")
	d.Dispatch(ctx, m)
	got := c.next(t, "stall report", func(p proposal) bool { return p.ev == fsm.EvReport })
	if got.p.Stalled == nil || !*got.p.Stalled || !strings.Contains(got.p.Error, "the hydrated step has run for 20ms without finishing") {
		t.Fatalf("report %+v: want stalled, naming the step", got.p)
	}
	if got.ctx != ctx {
		t.Error("the stall was reported under the step's context, not the driver's")
	}
}

// A refusal the store has moved past (another proposal won) re-reads the
// migration and goes on from its new state; it is no failed attempt.
func TestRefusalMovesOnWithoutAnAttempt(t *testing.T) {
	c := newControl(&fsm.Migration{ID: "mig-r", Source: "src", Target: "dst", State: fsm.Exported, ModifyIndex: 2})
	cfg := testConfig()
	cfg.MaxPreCutoverAttempts = 1 // one counted attempt would fail the migration
	var failed atomic.Int32
	movedOn := make(chan struct{})
	var once sync.Once
	ctx, d := start(t, cfg, c, func(m *fsm.Migration) Step {
		switch m.State {
		case fsm.SourceStopped:
			return func(context.Context, zerolog.Logger, *fsm.Migration) error {
				return fmt.Errorf("propose exported: %w", &fsm.Refusal{Kind: fsm.RefuseConflict, Code: fsm.CodeWrongState,
					Reason: "exported is not allowed", State: fsm.Exported})
			}
		case fsm.Exported:
			return func(context.Context, zerolog.Logger, *fsm.Migration) error {
				once.Do(func() { close(movedOn) })
				return nil
			}
		}
		return nil
	}, Hooks{StepFailed: func(fsm.State) { failed.Add(1) }})
	// The watch's record lags the store.
	d.Dispatch(ctx, &fsm.Migration{ID: "mig-r", Source: "src", Target: "dst", State: fsm.SourceStopped, ModifyIndex: 1})
	select {
	case <-movedOn:
	case p := <-c.ch:
		t.Fatalf("proposed %s (%+v) after a refusal the store had moved past", p.ev, p.p)
	case <-time.After(wait):
		t.Fatalf("the driver did not move on to exported; proposals: %v", c.events())
	}
	if n := failed.Load(); n != 0 {
		t.Errorf("the refusal counted as %d failed attempts", n)
	}
	if evs := c.events(); len(evs) != 0 {
		t.Errorf("proposals %v, want none", evs)
	}
}

// A record the watch delivered while a step ran (here export_started's,
// during the target's prepare) is older than the one the step's proposal
// made: the driver drops it instead of preparing again.
func TestDriverSkipsARecordOlderThanItsProposal(t *testing.T) {
	c := newControl(&fsm.Migration{ID: "mig-1", Source: "w-a", Target: "w-b", State: fsm.Planned, ModifyIndex: 1})
	c.apply = func(m *fsm.Migration, ev fsm.Event, _ fsm.EventPayload) {
		if ev == fsm.EvTargetPrepared {
			m.State = fsm.TargetPrepared
			m.ModifyIndex++
		}
	}
	var prepares atomic.Int32
	started, proceed := make(chan struct{}), make(chan struct{})
	decided := make(chan uint64, 100) // the index of each record the driver acts on
	prepare := func(ctx context.Context, _ zerolog.Logger, m *fsm.Migration) error {
		if prepares.Add(1) == 1 {
			close(started)
			select {
			case <-proceed:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		_, err := c.Propose(ctx, m.ID, fsm.EvTargetPrepared, StepID(m, string(fsm.EvTargetPrepared)), fsm.EventPayload{})
		return err
	}
	ctx, d := start(t, testConfig(), c, func(m *fsm.Migration) Step {
		select {
		case decided <- m.ModifyIndex:
		default: // a driver gone wrong never blocks
		}
		return only(fsm.Planned, prepare)(m)
	}, Hooks{})
	first, _ := c.GetMigration(ctx, "mig-1")
	d.Dispatch(ctx, first)
	select {
	case <-started:
	case <-time.After(wait):
		t.Fatal("the prepare step never ran")
	}
	// The source publishes its export while the target prepares.
	c.mu.Lock()
	c.m.Export = &fsm.Export{Portal: "[fd00::1]:3260", IQN: "iqn.2026-12.dev.ferry:mig-1"}
	c.m.ModifyIndex++
	published := c.m.Clone()
	c.mu.Unlock()
	d.Dispatch(ctx, published)
	close(proceed)
	var seq []uint64
	for len(seq) == 0 || seq[len(seq)-1] < 3 {
		select {
		case i := <-decided:
			seq = append(seq, i)
		case <-time.After(wait):
			t.Fatalf("the driver acted on records %v, never on the proposal's (3)", seq)
		}
	}
	if len(seq) != 2 || seq[0] != 1 || seq[1] != 3 {
		t.Errorf("the driver acted on records %v, want 1 then the proposal's 3 (the export's 2 is older)", seq)
	}
	if n := prepares.Load(); n != 1 {
		t.Errorf("prepared %d times, want once", n)
	}
}

// A terminal record stops a running driver; Ended runs once Running is
// false (the reaper waits for that). A terminal record starts none.
func TestTerminalRecordEndsTheDriver(t *testing.T) {
	c := newControl(&fsm.Migration{ID: "mig-t", State: fsm.Planned, ModifyIndex: 1})
	ended := make(chan bool, 2) // Running when Ended ran
	var d *Driver
	ctx, d := start(t, testConfig(), c, func(*fsm.Migration) Step { return nil }, Hooks{Ended: func(id string) { ended <- d.Running(id) }})
	d.Dispatch(ctx, &fsm.Migration{ID: "gone", State: fsm.Completed, ModifyIndex: 5})
	if d.Running("gone") {
		t.Fatal("a terminal record started a driver")
	}
	d.Dispatch(ctx, &fsm.Migration{ID: "mig-t", State: fsm.Planned, ModifyIndex: 1})
	if !d.Running("mig-t") {
		t.Fatal("no driver after the first record")
	}
	d.Dispatch(ctx, &fsm.Migration{ID: "mig-t", State: fsm.RolledBack, ModifyIndex: 2})
	select {
	case running := <-ended:
		if running {
			t.Error("Ended ran while Running still reported the driver")
		}
	case <-time.After(wait):
		t.Fatal("a terminal record did not stop the driver")
	}
	select {
	case <-ended:
		t.Error("Ended ran twice, or for a migration without a driver")
	default:
	}
}

// stepContext bounds each attempt by StepTimeout, and between
// source_stopped and cutover by the budget's end (which it returns).
func TestStepContext(t *testing.T) {
	cfg := testConfig()
	d := New(zerolog.Nop(), cfg, nil, nil, Hooks{})
	now := time.Now()
	entered := map[fsm.State]time.Time{fsm.SourceStopped: now}

	ctx, cancel, end := d.stepContext(context.Background(), &fsm.Migration{State: fsm.Hydrating, EnteredAt: entered})
	if _, ok := ctx.Deadline(); ok || !end.IsZero() {
		t.Error("hydration's step has a deadline")
	}
	cancel()

	ctx, cancel, end = d.stepContext(context.Background(), &fsm.Migration{State: fsm.TargetPrepared})
	if dl, ok := ctx.Deadline(); !ok || dl.Before(now.Add(cfg.StepTimeout)) || !end.IsZero() {
		t.Errorf("before source_stopped: deadline %v (%v), budget end %v; want StepTimeout and none", dl, ok, end)
	}
	cancel()

	// A budget longer than StepTimeout: the step's deadline is StepTimeout.
	ctx, cancel, end = d.stepContext(context.Background(), &fsm.Migration{State: fsm.Exported, EnteredAt: entered, MaxDowntime: time.Hour})
	if dl, _ := ctx.Deadline(); !end.Equal(now.Add(time.Hour)) || !dl.Before(end) {
		t.Errorf("exported, budget an hour: deadline %v, budget end %v", dl, end)
	}
	cancel()

	ctx, cancel, end = d.stepContext(context.Background(), &fsm.Migration{State: fsm.Exported, MaxDowntime: time.Second,
		EnteredAt: map[fsm.State]time.Time{fsm.SourceStopped: now.Add(-2 * time.Second)}})
	<-ctx.Done()
	if !errors.Is(context.Cause(ctx), errBudget) || !end.Equal(now.Add(-time.Second)) {
		t.Errorf("budget spent: cause %v, budget end %v", context.Cause(ctx), end)
	}
	cancel()

	ctx, cancel, end = d.stepContext(context.Background(), &fsm.Migration{State: fsm.Hydrated, EnteredAt: entered})
	if dl, ok := ctx.Deadline(); !ok || dl.Before(now.Add(cfg.StepTimeout)) || !end.IsZero() {
		t.Errorf("after cutover: deadline %v (%v), budget end %v; want StepTimeout and no budget", dl, ok, end)
	}
	cancel()

	cfg.StepTimeout = time.Nanosecond
	ctx, cancel, _ = New(zerolog.Nop(), cfg, nil, nil, Hooks{}).stepContext(context.Background(), &fsm.Migration{State: fsm.Planned})
	<-ctx.Done()
	if !errors.Is(context.Cause(ctx), errStepTimeout) {
		t.Errorf("StepTimeout passed: cause %v", context.Cause(ctx))
	}
	cancel()
}

func TestStepIDsAreDeterministic(t *testing.T) {
	m := &fsm.Migration{ID: "mig-x"}
	first, retry := StepID(m, "exported"), StepID(m, "exported")
	if first != retry || StepID(m, "a") == StepID(m, "b") {
		t.Fatal("step IDs must be equal for a retry and differ between steps")
	}
	if got := StepID(m, "failed", "exported"); got != "mig-x/failed/exported" {
		t.Fatalf("StepID = %q", got)
	}
}

func TestIsRefusal(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{&fsm.Refusal{Kind: fsm.RefuseConflict}, true},
		{fmt.Errorf("propose: %w", &fsm.Refusal{Kind: fsm.RefuseNotFound}), true},
		{&fsm.Refusal{Kind: fsm.RefuseNotLeader}, false}, // the same request may succeed elsewhere
		{&fsm.Refusal{Kind: fsm.RefuseInternal}, false},
		{errors.New("connection refused"), false},
	} {
		if got := IsRefusal(c.err); got != c.want {
			t.Errorf("IsRefusal(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

// A step that hands the driver the record its proposal returned (Note) is
// followed by the next state's step without reading the migration again.
func TestGoesOnFromTheProposedRecord(t *testing.T) {
	c := newControl(&fsm.Migration{ID: "mig-n", State: fsm.Exported, ModifyIndex: 1})
	c.apply = func(m *fsm.Migration, ev fsm.Event, _ fsm.EventPayload) {
		m.State = map[fsm.Event]fsm.State{fsm.EvCloneBuilt: fsm.CloneBuilt, fsm.EvTrimmed: fsm.Trimmed}[ev]
		m.ModifyIndex++
	}
	var d *Driver
	reached := make(chan int, 1) // the reads of the migration before the trimmed step
	proposing := func(ev fsm.Event) Step {
		return func(ctx context.Context, _ zerolog.Logger, m *fsm.Migration) error {
			got, err := c.Propose(ctx, m.ID, ev, StepID(m, string(ev)), fsm.EventPayload{})
			d.Note(got)
			return err
		}
	}
	steps := map[fsm.State]Step{
		fsm.Exported:   proposing(fsm.EvCloneBuilt),
		fsm.CloneBuilt: proposing(fsm.EvTrimmed),
		fsm.Trimmed: func(context.Context, zerolog.Logger, *fsm.Migration) error {
			c.mu.Lock()
			gets := c.gets
			c.mu.Unlock()
			select {
			case reached <- gets:
			default:
			}
			return nil
		},
	}
	ctx, dd := start(t, testConfig(), c, func(m *fsm.Migration) Step { return steps[m.State] }, Hooks{})
	d = dd
	m, _ := c.GetMigration(ctx, "mig-n")
	c.mu.Lock()
	c.gets = 0
	c.mu.Unlock()
	d.Dispatch(ctx, m)
	var gets int
	select {
	case gets = <-reached:
	case <-time.After(wait):
		t.Fatalf("the trimmed step did not run; proposals: %v", c.events())
	}
	if gets != 0 {
		t.Fatalf("the driver read the migration %d times between steps whose proposals it was handed", gets)
	}
	if evs := c.events(); len(evs) != 2 || evs[0] != fsm.EvCloneBuilt || evs[1] != fsm.EvTrimmed {
		t.Fatalf("proposals %v, want clone_built then trimmed", evs)
	}
}
