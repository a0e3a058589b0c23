package drain

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

// fakeCluster is a control plane in memory: every migration completes after
// `polls` reads, and at most `limit` may run at once (like the server's
// admission); it records the highest concurrency it saw.
type fakeCluster struct {
	workers    []fsm.Worker
	machines   []fsm.Machine
	migrations map[string]*fsm.Migration
	reads      map[string]int
	polls      int
	limit      int
	maxRunning int
	refuse     map[string]error // machine -> refusal for its first create
	created    []string
}

func newFake(source string, n int) *fakeCluster {
	f := &fakeCluster{migrations: map[string]*fsm.Migration{}, reads: map[string]int{}, polls: 2, limit: 100, refuse: map[string]error{}}
	now := time.Now()
	f.workers = []fsm.Worker{
		{Name: source, LeaseExpiry: now.Add(time.Minute)},
		{Name: "b", LeaseExpiry: now.Add(time.Minute)},
		{Name: "dead", LeaseExpiry: now.Add(-time.Minute)},
		{Name: "c", LeaseExpiry: now.Add(time.Minute)},
	}
	for i := n; i > 0; i-- { // reverse order: the plan must sort
		f.machines = append(f.machines, fsm.Machine{ID: fmt.Sprintf("m%d", i), Worker: source})
	}
	return f
}

func (f *fakeCluster) running() int {
	n := 0
	for _, m := range f.migrations {
		if !m.State.Terminal() {
			n++
		}
	}
	return n
}

func (f *fakeCluster) ListWorkers(context.Context) ([]fsm.Worker, error) { return f.workers, nil }
func (f *fakeCluster) ListMachines(_ context.Context, w string) ([]fsm.Machine, error) {
	var out []fsm.Machine
	for _, m := range f.machines {
		if m.Worker == w {
			out = append(out, m)
		}
	}
	return out, nil
}
func (f *fakeCluster) ListMigrations(_ context.Context, w string) ([]*fsm.Migration, error) {
	var out []*fsm.Migration
	for _, m := range f.migrations {
		if m.Source == w || m.Target == w {
			cp := *m
			out = append(out, &cp)
		}
	}
	return out, nil
}
func (f *fakeCluster) CreateMigration(_ context.Context, p api.PlanRequest) (*fsm.Migration, error) {
	if err := f.refuse[p.Machine]; err != nil {
		delete(f.refuse, p.Machine)
		return nil, err
	}
	if f.running() >= f.limit {
		return nil, &api.Error{Kind: fsm.RefuseBusy, Code: fsm.CodeAdmission, Reason: "limit"}
	}
	id := "mig-" + p.Machine
	f.migrations[id] = &fsm.Migration{ID: id, Machine: p.Machine, Source: "a", Target: p.Target, State: fsm.Planned}
	f.created = append(f.created, p.Machine+"->"+p.Target)
	f.maxRunning = max(f.maxRunning, f.running())
	return f.migrations[id], nil
}
func (f *fakeCluster) GetMigration(_ context.Context, id string) (*fsm.Migration, error) {
	m, ok := f.migrations[id]
	if !ok {
		return nil, errors.New("no such migration")
	}
	f.reads[id]++
	if f.reads[id] >= f.polls {
		m.State = fsm.Completed
	}
	cp := *m
	return &cp, nil
}

func TestPlanRoundRobinOverLiveWorkers(t *testing.T) {
	f := newFake("a", 5)
	p, err := MakePlan(t.Context(), f, "a", nil, 2, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(p.Targets, []string{"b", "c"}) {
		t.Fatalf("targets %v: want the live workers other than the source", p.Targets)
	}
	want := []Job{{"m1", "b"}, {"m2", "c"}, {"m3", "b"}, {"m4", "c"}, {"m5", "b"}}
	if !slices.Equal(p.Jobs, want) {
		t.Fatalf("jobs %v, want %v", p.Jobs, want)
	}
	p, err = MakePlan(t.Context(), f, "a", []string{"x"}, 1, time.Now())
	if err != nil || len(p.Jobs) != 5 || p.Jobs[3].Target != "x" {
		t.Fatalf("named target: %+v, %v", p, err)
	}
}

func TestPlanRefusals(t *testing.T) {
	f := newFake("a", 1)
	f.workers = f.workers[:1]
	if _, err := MakePlan(t.Context(), f, "a", nil, 1, time.Now()); !errors.Is(err, ErrNoTarget) {
		t.Fatalf("no live target: %v, want ErrNoTarget", err)
	}
	if _, err := MakePlan(t.Context(), f, "a", []string{"b"}, 0, time.Now()); err == nil {
		t.Fatal("parallel 0 accepted")
	}
}

func TestRunBoundsParallelismAndRetriesAdmission(t *testing.T) {
	f := newFake("a", 5)
	f.limit = 3 // the server admits one more than the drain's own limit
	f.refuse["m2"] = &api.Error{Kind: fsm.RefuseConflict, Code: fsm.CodeLocked, Reason: "locked"}
	p, err := MakePlan(t.Context(), f, "a", nil, 2, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	var started, ended []string
	final, err := Run(t.Context(), f, p, Options{Wait: true, Poll: time.Millisecond,
		OnStart: func(m *fsm.Migration, j Job) { started = append(started, j.Machine) },
		OnEnd:   func(m *fsm.Migration) { ended = append(ended, m.Machine) }})
	if err != nil {
		t.Fatal(err)
	}
	if len(final) != 5 || len(started) != 5 || len(ended) != 5 {
		t.Fatalf("final %d, started %v, ended %v: want all 5", len(final), started, ended)
	}
	if f.maxRunning > 2 {
		t.Fatalf("%d migrations ran at once; --parallel was 2", f.maxRunning)
	}
	if started[0] != "m1" || slices.Index(started, "m2") < slices.Index(started, "m3") {
		t.Fatalf("start order %v: m2 was refused as locked and must be retried after the others", started)
	}
	for _, m := range final {
		if m.State != fsm.Completed {
			t.Fatalf("%s ended %s", m.ID, m.State)
		}
	}
}

func TestRunResumesWithoutRestarting(t *testing.T) {
	f := newFake("a", 3)
	f.polls = 3
	// A drain that crashed left m1 migrating.
	f.migrations["mig-m1"] = &fsm.Migration{ID: "mig-m1", Machine: "m1", Source: "a", Target: "b", State: fsm.Planned}
	p, err := MakePlan(t.Context(), f, "a", nil, 1, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	final, err := Run(t.Context(), f, p, Options{Wait: true, Poll: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(f.created, []string{"m2->c", "m3->b"}) {
		t.Fatalf("created %v: m1 was already migrating and must not be started again", f.created)
	}
	if f.maxRunning > 1 {
		t.Fatalf("%d ran at once with parallel 1 (the resumed one counts)", f.maxRunning)
	}
	if len(final) != 3 {
		t.Fatalf("final %d, want 3 (the resumed one too)", len(final))
	}
}

func TestRunStopsOnOtherRefusal(t *testing.T) {
	f := newFake("a", 2)
	bad := &api.Error{Kind: fsm.RefuseInvalid, Code: fsm.CodeInvalid, Reason: "no"}
	f.refuse["m1"] = bad
	p, _ := MakePlan(t.Context(), f, "a", []string{"b"}, 1, time.Now())
	_, err := Run(t.Context(), f, p, Options{Wait: true, Poll: time.Millisecond})
	var ae *api.Error
	if !errors.As(err, &ae) || ae != bad {
		t.Fatalf("err %v: want the refusal, wrapped", err)
	}
}

func TestRunWithoutWaitReturnsOnceStarted(t *testing.T) {
	f := newFake("a", 2)
	f.polls = 1000
	p, _ := MakePlan(t.Context(), f, "a", []string{"b"}, 5, time.Now())
	final, err := Run(t.Context(), f, p, Options{Poll: time.Millisecond})
	if err != nil || len(final) != 0 || len(f.created) != 2 {
		t.Fatalf("final %v, created %v, err %v: want both started, none ended", final, f.created, err)
	}
}

func TestRunHonoursContext(t *testing.T) {
	f := newFake("a", 1)
	f.polls = 1 << 30
	p, _ := MakePlan(t.Context(), f, "a", []string{"b"}, 1, time.Now())
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
	defer cancel()
	if _, err := Run(ctx, f, p, Options{Wait: true, Poll: time.Millisecond}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err %v, want the context's", err)
	}
}
