package agent

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/machine"
)

// fakeMachines is a unit-test machine driver that records starts and stops.
type fakeMachines struct {
	mu      sync.Mutex
	running map[string]bool
	stopped []string
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

func TestFenceToStop(t *testing.T) {
	f := newFence()
	running := []string{"settled", "stray", "pre-target", "post-target", "post-source", "rollback-src"}
	// Without a view of the store nothing is known settled: stop all.
	if got := f.toStop("w1", running); !slices.Equal(got, running) {
		t.Fatalf("without a view: stop %v, want all %v", got, running)
	}
	f.noteAssigned("w1", []*fsm.Machine{
		{ID: "settled", Worker: "w1"}, {ID: "post-target", Worker: "w1"}, {ID: "rollback-src", Worker: "w1"},
		{ID: "elsewhere", Worker: "w2"},
	})
	f.noteMigrations([]*fsm.Migration{
		{ID: "m1", Machine: "pre-target", Source: "w2", Target: "w1", State: fsm.Trimmed},
		{ID: "m2", Machine: "post-target", Source: "w2", Target: "w1", State: fsm.Hydrating},
		{ID: "m3", Machine: "post-source", Source: "w1", Target: "w2", State: fsm.Cutover},
		{ID: "m4", Machine: "rollback-src", Source: "w1", Target: "w2", State: fsm.RollingBack},
		{ID: "m5", Machine: "settled", Source: "w1", Target: "w2", State: fsm.RolledBack}, // ended: settled again
	})
	got := f.toStop("w1", running)
	slices.Sort(got)
	want := []string{"post-source", "pre-target", "rollback-src", "stray"}
	if !slices.Equal(got, want) {
		t.Fatalf("fenced worker stops %v, want %v", got, want)
	}
}

func TestFenceStopsAndLifts(t *testing.T) {
	cp := &fakeCP{}
	a := newTestAgent(t, cp, "w1")
	fm := &fakeMachines{running: map[string]bool{}}
	a.mach = fm
	var now time.Duration
	a.fence.clock = func() time.Duration { return now }
	a.cfg.LeaseTTL, a.cfg.FenceMargin = 10*time.Second, 2*time.Second
	ctx := context.Background()

	a.fence.noteAssigned("w1", []*fsm.Machine{{ID: "settled", Worker: "w1"}})
	a.fence.noteMigrations([]*fsm.Migration{{ID: "m1", Machine: "incoming", Source: "w2", Target: "w1", State: fsm.Trimmed}})
	now = time.Hour
	a.fence.renewed(now, a.cfg.LeaseTTL, a.cfg.FenceMargin)
	for _, id := range []string{"settled", "incoming"} {
		if err := a.startMachine(ctx, machine.Spec{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	// 7.8s after the send: inside the lease minus drift and margin.
	now += 7800 * time.Millisecond
	a.checkFence(ctx)
	if a.Fenced() || len(fm.stopped) != 0 {
		t.Fatalf("fenced (%v) or stopped %v before the deadline", a.Fenced(), fm.stopped)
	}
	// Past send + TTL*(1-drift) - margin = 7.9s.
	now += 200 * time.Millisecond
	a.checkFence(ctx)
	if !a.Fenced() || !slices.Equal(fm.stopped, []string{"incoming"}) {
		t.Fatalf("after the deadline: fenced %v, stopped %v; want fenced with [incoming] stopped", a.Fenced(), fm.stopped)
	}
	if err := a.startMachine(ctx, machine.Spec{ID: "incoming"}); !errors.Is(err, errFenced) {
		t.Fatalf("start while fenced: %v, want errFenced", err)
	}
	if st, _ := fm.Status(ctx, machine.Spec{ID: "settled"}); st != machine.Running {
		t.Fatal("a machine the store assigns here was stopped by the fence")
	}
	// A renewal lifts the fence.
	a.fence.renewed(now, a.cfg.LeaseTTL, a.cfg.FenceMargin)
	a.checkFence(ctx)
	if a.Fenced() {
		t.Fatal("still fenced after a renewal")
	}
	if err := a.startMachine(ctx, machine.Spec{ID: "incoming"}); err != nil {
		t.Fatalf("start after the fence lifted: %v", err)
	}
}

// Heartbeats move the deadline from the time the request was sent, not the
// time the answer came back: the server's lease may have started any time
// in between.
func TestHeartbeatRenewsFromSendTime(t *testing.T) {
	cp := &slowHeartbeat{delay: 3 * time.Second}
	a := newTestAgent(t, cp, "w1")
	var now time.Duration = time.Hour
	cp.clock = &now
	a.fence.clock = func() time.Duration { return now }
	a.cfg.LeaseTTL, a.cfg.FenceMargin = 10*time.Second, 2*time.Second
	if err := a.heartbeatOnce(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := time.Hour + time.Duration(float64(10*time.Second)*(1-maxClockDrift)) - 2*time.Second
	if a.fence.deadline != want {
		t.Fatalf("deadline %v, want %v (send time + TTL(1-drift) - margin)", a.fence.deadline, want)
	}
}

type slowHeartbeat struct {
	fakeCP
	delay time.Duration
	clock *time.Duration
}

func (s *slowHeartbeat) Heartbeat(context.Context, string) error {
	*s.clock += s.delay
	return nil
}
