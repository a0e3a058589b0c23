package fence

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/machine"
)

// fakeMachines is a unit-test machine driver that records starts and stops.
type fakeMachines struct {
	mu      sync.Mutex
	running map[string]bool
	stopped []string
	specs   []machine.Spec // of every Stop
}

func (f *fakeMachines) Start(_ context.Context, s machine.Spec) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.running[s.ID] = true
	return nil
}
func (f *fakeMachines) Stop(_ context.Context, s machine.Spec) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.specs = append(f.specs, s)
	if f.running[s.ID] {
		f.stopped = append(f.stopped, s.ID)
	}
	delete(f.running, s.ID)
	return nil
}
func (f *fakeMachines) Status(_ context.Context, s machine.Spec) (machine.State, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.running[s.ID] {
		return machine.Running, nil
	}
	return machine.Stopped, nil
}
func (f *fakeMachines) Running(context.Context) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for id := range f.running {
		out = append(out, id)
	}
	slices.Sort(out)
	return out, nil
}

func (f *fakeMachines) stoppedIDs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.stopped)
}

func TestFenceToStop(t *testing.T) {
	f := New(zerolog.Nop(), Config{Worker: "w1"}, &fakeMachines{running: map[string]bool{}})
	running := []string{"settled", "stray", "pre-target", "post-target", "post-source", "rollback-src"}
	// Without a view of the store nothing is known settled: stop all.
	if got := f.toStop(running); !slices.Equal(got, running) {
		t.Fatalf("without a view: stop %v, want all %v", got, running)
	}
	f.NoteAssigned([]*fsm.Machine{
		{ID: "settled", Worker: "w1"}, {ID: "post-target", Worker: "w1"}, {ID: "rollback-src", Worker: "w1"},
		{ID: "elsewhere", Worker: "w2"},
	})
	f.NoteMigrations([]*fsm.Migration{
		{ID: "m1", Machine: "pre-target", Source: "w2", Target: "w1", State: fsm.Trimmed},
		{ID: "m2", Machine: "post-target", Source: "w2", Target: "w1", State: fsm.Hydrating},
		{ID: "m3", Machine: "post-source", Source: "w1", Target: "w2", State: fsm.Cutover},
		{ID: "m4", Machine: "rollback-src", Source: "w1", Target: "w2", State: fsm.RollingBack},
		{ID: "m5", Machine: "settled", Source: "w1", Target: "w2", State: fsm.RolledBack}, // ended: settled again
	})
	got := f.toStop(running)
	slices.Sort(got)
	want := []string{"post-source", "pre-target", "rollback-src", "stray"}
	if !slices.Equal(got, want) {
		t.Fatalf("fenced worker stops %v, want %v", got, want)
	}
}

func TestFenceStopsAndLifts(t *testing.T) {
	fm := &fakeMachines{running: map[string]bool{}}
	var forgotten []string
	f := New(zerolog.Nop(), Config{Worker: "w1", TTL: 10 * time.Second, Margin: 2 * time.Second}, fm)
	f.OnStop(func(id string) { forgotten = append(forgotten, id) })
	g := f.Gated()
	var now time.Duration
	f.clock = func() time.Duration { return now }
	ctx := context.Background()

	f.NoteAssigned([]*fsm.Machine{{ID: "settled", Worker: "w1"}})
	f.NoteMigrations([]*fsm.Migration{{ID: "m1", Machine: "incoming", Source: "w2", Target: "w1", State: fsm.Trimmed}})
	now = time.Hour
	f.renewed(now)
	for _, id := range []string{"settled", "incoming"} {
		if err := g.Start(ctx, machine.Spec{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	// 7.8s after the send: inside the lease minus drift and margin.
	now += 7800 * time.Millisecond
	f.check(ctx)
	if f.Fenced() || len(fm.stopped) != 0 {
		t.Fatalf("fenced (%v) or stopped %v before the deadline", f.Fenced(), fm.stopped)
	}
	// Past send + TTL*(1-drift) - margin = 7.9s.
	now += 200 * time.Millisecond
	f.check(ctx)
	if !f.Fenced() || !slices.Equal(fm.stopped, []string{"incoming"}) {
		t.Fatalf("after the deadline: fenced %v, stopped %v; want fenced with [incoming] stopped", f.Fenced(), fm.stopped)
	}
	// Quickly, and failing the volume I/O a killed machine is stuck in:
	// the margin is short.
	for _, sp := range fm.specs {
		if sp.KillSignal != "SIGKILL" || !sp.FailStuckIO {
			t.Fatalf("the fence stopped %s with signal %q, FailStuckIO %v; want SIGKILL and its stuck I/O failed", sp.ID, sp.KillSignal, sp.FailStuckIO)
		}
	}
	if !slices.Equal(forgotten, []string{"incoming"}) {
		t.Fatalf("the restart policy was told of %v, want [incoming] (a fenced stop is no crash)", forgotten)
	}
	if err := g.Start(ctx, machine.Spec{ID: "incoming"}); !errors.Is(err, ErrFenced) {
		t.Fatalf("start while fenced: %v, want ErrFenced", err)
	}
	if st, _ := fm.Status(ctx, machine.Spec{ID: "settled"}); st != machine.Running {
		t.Fatal("a machine the store assigns here was stopped by the fence")
	}
	// A renewal lifts the fence.
	f.renewed(now)
	f.check(ctx)
	if f.Fenced() {
		t.Fatal("still fenced after a renewal")
	}
	if err := g.Start(ctx, machine.Spec{ID: "incoming"}); err != nil {
		t.Fatalf("start after the fence lifted: %v", err)
	}
}

// Heartbeats move the deadline from the time the request was sent, not the
// time the answer came back: the server's lease may have started any time
// in between.
func TestHeartbeatRenewsFromSendTime(t *testing.T) {
	f := New(zerolog.Nop(), Config{Worker: "w1", TTL: 10 * time.Second, Margin: 2 * time.Second}, &fakeMachines{running: map[string]bool{}})
	var now time.Duration = time.Hour
	f.clock = func() time.Duration { return now }
	slow := func(context.Context) error {
		now += 3 * time.Second
		return nil
	}
	if err := f.heartbeatOnce(context.Background(), slow); err != nil {
		t.Fatal(err)
	}
	want := time.Hour + time.Duration(float64(10*time.Second)*(1-maxClockDrift)) - 2*time.Second
	if f.deadline != want {
		t.Fatalf("deadline %v, want %v (send time + TTL(1-drift) - margin)", f.deadline, want)
	}
}

// A pause passes the gate even while fenced (it starts nothing), and a
// driver that cannot pause says so.
func TestGatedPause(t *testing.T) {
	f := New(zerolog.Nop(), Config{Worker: "w1"}, &fakeMachines{running: map[string]bool{}})
	f.fenced = true
	if err := f.Gated().Pause(context.Background(), machine.Spec{ID: "m1"}); !errors.Is(err, machine.ErrCannotPause) {
		t.Fatalf("Pause through a driver that cannot: %v, want ErrCannotPause", err)
	}
	p := &pausingMachines{fakeMachines: fakeMachines{running: map[string]bool{}}}
	f = New(zerolog.Nop(), Config{Worker: "w1"}, p)
	f.fenced = true
	g := f.Gated()
	if err := g.Pause(context.Background(), machine.Spec{ID: "m1"}); err != nil {
		t.Fatal(err)
	}
	if err := g.Resume(context.Background(), machine.Spec{ID: "m1"}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(p.ops, []string{"pause m1", "resume m1"}) {
		t.Fatalf("driver saw %v", p.ops)
	}
}

type pausingMachines struct {
	fakeMachines
	ops []string
}

func (p *pausingMachines) Pause(_ context.Context, s machine.Spec) error {
	p.ops = append(p.ops, "pause "+s.ID)
	return nil
}
func (p *pausingMachines) Resume(_ context.Context, s machine.Spec) error {
	p.ops = append(p.ops, "resume "+s.ID)
	return nil
}

// A lease longer than the servers grant, or a margin not shorter than the
// lease, would time the fence after the servers gave the lease up.
func TestLeaseSettingsBoundedByWhatServersGrant(t *testing.T) {
	l := New(zerolog.Nop(), Config{Worker: "w1", TTL: 10 * time.Minute, Margin: time.Second}, nil)
	if l.cfg.TTL != fsm.MaxLeaseTTL {
		t.Fatalf("lease TTL %v, want the servers' maximum %v", l.cfg.TTL, fsm.MaxLeaseTTL)
	}
	l = New(zerolog.Nop(), Config{Worker: "w1", TTL: 8 * time.Second, Margin: 8 * time.Second}, nil)
	if l.cfg.Margin >= l.cfg.TTL || l.cfg.Margin <= 0 {
		t.Fatalf("margin %v with a lease of %v", l.cfg.Margin, l.cfg.TTL)
	}
}

// The fence deadline survives the agent process: a new process in the same
// boot restores it, one in another boot does not; a restored deadline that
// passes while the new process cannot register fences the machines its
// predecessor left running, and the first registration lifts the fence.
func TestDeadlinePersistsAcrossAgentRestarts(t *testing.T) {
	state := filepath.Join(t.TempDir(), "lease.json")
	oldBoot := bootID
	t.Cleanup(func() { bootID = oldBoot })
	bootID = func() string { return "boot-1" }
	cfg := Config{Worker: "w1", TTL: 10 * time.Second, Margin: 2 * time.Second, StateFile: state}
	var now atomic.Int64
	now.Store(int64(time.Hour))
	clock := func() time.Duration { return time.Duration(now.Load()) }

	f := New(zerolog.Nop(), cfg, &fakeMachines{running: map[string]bool{}})
	f.clock = clock
	if err := f.Renew(context.Background(), func(context.Context) error { return nil }); err != nil {
		t.Fatal(err)
	}
	want := f.deadline

	// The agent restarts; its machine kept running.
	fm := &fakeMachines{running: map[string]bool{"left-running": true}}
	g := New(zerolog.Nop(), cfg, fm)
	g.clock = clock
	if g.deadline != want {
		t.Fatalf("restored deadline %v, want %v", g.deadline, want)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go g.Guard(ctx)
	time.Sleep(50 * time.Millisecond)
	if g.Fenced() || len(fm.stopped) != 0 {
		t.Fatalf("fenced (%v) or stopped %v before the persisted deadline", g.Fenced(), fm.stopped)
	}
	now.Store(int64(want + time.Millisecond)) // the servers were never reached meanwhile
	deadline := time.Now().Add(5 * time.Second)
	for !g.Fenced() || len(fm.stoppedIDs()) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("past the persisted deadline: fenced %v, stopped %v", g.Fenced(), fm.stoppedIDs())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := fm.stoppedIDs(); !slices.Equal(got, []string{"left-running"}) {
		t.Fatalf("stopped %v, want the machine the previous process left running", got)
	}
	// A registration lifts the fence at once.
	if err := g.Renew(ctx, func(context.Context) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if g.Fenced() {
		t.Fatal("still fenced right after a renewal")
	}

	// Another boot: nothing restored.
	bootID = func() string { return "boot-2" }
	h := New(zerolog.Nop(), cfg, &fakeMachines{running: map[string]bool{}})
	if h.deadline != 0 {
		t.Fatalf("a deadline of another boot was restored: %v", h.deadline)
	}
}
