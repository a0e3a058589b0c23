package agent

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath/userspace"
	"github.com/ferry-dev/ferry/fence"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/stepmark"
	"github.com/ferry-dev/ferry/keycustody"
	"github.com/ferry-dev/ferry/machine"
	"github.com/ferry-dev/ferry/supervisor"
	"github.com/ferry-dev/ferry/volops"
)

// fakeCP is a unit-test stand-in for the server: it records proposals.
type fakeCP struct {
	mu       sync.Mutex
	m        *fsm.Migration
	proposed []fsm.Event
	steps    []string
	payloads []fsm.EventPayload
	refuse   error
}

func (f *fakeCP) RegisterWorker(context.Context, fsm.Worker) error { return nil }
func (f *fakeCP) Heartbeat(context.Context, string) error          { return nil }
func (f *fakeCP) WatchMigrations(ctx context.Context, _ string, _ uint64) ([]*fsm.Migration, uint64, error) {
	<-ctx.Done()
	return nil, 0, ctx.Err()
}
func (f *fakeCP) GetMigration(context.Context, string) (*fsm.Migration, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.m.Clone(), nil
}
func (f *fakeCP) Propose(_ context.Context, _ string, ev fsm.Event, step string, p fsm.EventPayload) (*fsm.Migration, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.proposed = append(f.proposed, ev)
	f.payloads = append(f.payloads, p)
	f.steps = append(f.steps, step)
	if f.refuse != nil && ev != fsm.EvReport && ev != fsm.EvFailed {
		return nil, f.refuse
	}
	if ev == fsm.EvFailed {
		f.m.State = fsm.RollingBack
	}
	return f.m.Clone(), nil
}
func (f *fakeCP) GetVolume(context.Context, string) (*fsm.Volume, error) {
	return nil, errors.New("none")
}
func (f *fakeCP) ListVolumes(context.Context, string) ([]*fsm.Volume, error)    { return nil, nil }
func (f *fakeCP) ForksFrom(context.Context, string) ([]*fsm.Volume, error)      { return nil, nil }
func (f *fakeCP) ServeFork(context.Context, fsm.ForkServeCmd) error             { return nil }
func (f *fakeCP) CreateVolume(context.Context, fsm.Volume) (*fsm.Volume, error) { return nil, nil }
func (f *fakeCP) UpdateVolume(context.Context, fsm.UpdateVolumeCmd) error       { return nil }
func (f *fakeCP) GetMachine(context.Context, string) (*fsm.Machine, error) {
	return nil, errors.New("none")
}
func (f *fakeCP) ListMachines(context.Context, string) ([]*fsm.Machine, error) { return nil, nil }
func (f *fakeCP) UpdateMachine(context.Context, fsm.UpdateMachineCmd) error    { return nil }
func (f *fakeCP) GetWorker(context.Context, string) (*fsm.Worker, error) {
	return &fsm.Worker{Address: "fd00::2"}, nil
}
func (f *fakeCP) Envelope(context.Context, string, fsm.Purpose) (*fsm.Envelope, error) {
	return nil, errors.New("no envelope")
}
func (f *fakeCP) PutEnvelopes(context.Context, string, []fsm.Envelope) error { return nil }
func (f *fakeCP) SetWorkerKey(context.Context, string, fsm.PublicKey) error  { return nil }
func (f *fakeCP) RecoveryKey(context.Context) (*fsm.PublicKey, error)        { return nil, errors.New("none") }
func (f *fakeCP) events() []fsm.Event {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]fsm.Event(nil), f.proposed...)
}

// fakeExporter fails every export, or with hang blocks it until its
// context ends, like a tool that hangs.
type fakeExporter struct{ live, hang bool }

func (x *fakeExporter) Export(ctx context.Context, _, _, _, _ string) (string, string, error) {
	if x.hang {
		<-ctx.Done()
		return "", "", ctx.Err()
	}
	return "", "", errors.New("export: source file unreadable")
}
func (x *fakeExporter) Unexport(context.Context, string) error { return nil }
func (x *fakeExporter) Live(string) bool                       { return x.live }

// testStore is the control plane as each part of a worker sees it.
type testStore interface {
	ControlPlane
	keycustody.Store
	supervisor.Store
	volops.Store
}

// newTestAgent builds an agent on cp; opts adjust its config before New.
func newTestAgent(t *testing.T, cp testStore, worker string, opts ...func(*Config)) *Agent {
	dir := t.TempDir()
	log := zerolog.Nop()
	vols := &userspace.Backend{DataDir: dir, Log: log}
	lease := fence.New(log, fence.Config{Worker: worker, MountPoint: vols.MountPoint}, &machine.Exec{StateDir: filepath.Join(dir, "machines"), Log: log})
	keys, err := keycustody.Load(log, dir, worker, cp)
	if err != nil {
		t.Fatal(err)
	}
	sup := supervisor.New(log, supervisor.Config{Worker: worker}, cp, lease.Gated(), vols, keys, nil)
	lease.OnStop(sup.Forget)
	exp := &fakeExporter{} // one exporter, as cmd/ferry wires it
	cfg := Config{Worker: worker, DataDir: dir, Retry: time.Millisecond, RetryMax: 2 * time.Millisecond, MaxPreCutoverAttempts: 3}
	for _, o := range opts {
		o(&cfg)
	}
	a, err := New(log, cfg, Parts{Control: cp, Exports: exp, Data: vols, Machines: sup, Lease: lease, Keys: keys,
		Volumes: volops.New(log, worker, cp, keys, vols, sup, exp), Marks: stepmark.Dir(filepath.Join(dir, "steps"))})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestStepTable(t *testing.T) {
	a := newTestAgent(t, &fakeCP{}, "src")
	cases := []struct {
		state  fsm.State
		worker string
		want   bool
	}{
		{fsm.Planned, "src", true}, {fsm.Planned, "dst", true}, // the source starts its export early
		{fsm.TargetPrepared, "src", true}, {fsm.TargetPrepared, "dst", false},
		{fsm.SourceStopped, "src", true}, {fsm.Exported, "dst", true},
		{fsm.CloneBuilt, "dst", true}, {fsm.Trimmed, "dst", true}, {fsm.Trimmed, "src", false},
		{fsm.Cutover, "dst", true}, {fsm.Hydrating, "dst", true}, {fsm.Hydrated, "src", true},
		{fsm.Hydrated, "dst", false}, {fsm.SourceReleased, "dst", false}, {fsm.Completed, "src", false},
		{fsm.Completed, "dst", false},
	}
	for _, c := range cases {
		a.cfg.Worker = c.worker
		m := &fsm.Migration{ID: "mig-1", Source: "src", Target: "dst", State: c.state, Old6PN: ""}
		// The source's post-cutover network step is recorded locally; mark it done.
		a.markDone(m, "net-source")
		if got := a.stepFor(m) != nil; got != c.want {
			t.Errorf("%s as %s: step = %v, want %v", c.state, c.worker, got, c.want)
		}
	}
	// The early export runs once.
	a.cfg.Worker = "src"
	pm := &fsm.Migration{ID: "mig-3", Source: "src", Target: "dst", State: fsm.Planned}
	if err := a.stepFor(pm)(context.Background(), zerolog.Nop(), pm); err != nil {
		t.Fatalf("early export: %v", err)
	}
	if a.stepFor(pm) != nil {
		t.Fatal("the source starts its export early again")
	}
	// Rollback: the source restores only after the target's teardown is committed (invariant 2).
	m := &fsm.Migration{ID: "mig-2", Source: "src", Target: "dst", State: fsm.RollingBack, Rollback: &fsm.RollbackInfo{}}
	if a.stepFor(m) != nil {
		t.Fatal("the source acts on a rollback before the target's teardown is committed")
	}
	m.Rollback.TargetTornDown = true
	if a.stepFor(m) == nil {
		t.Fatal("the source does not restore after the target's teardown")
	}
	a.cfg.Worker = "dst"
	if a.stepFor(m) != nil {
		t.Fatal("the target tears down twice")
	}
}

// TestEveryDutyHasAStep reads the table in fsm: in every state, each agent role
// (source, target) that must act there has a step for some record in that
// state. Adding a state or a duty to fsm.Transitions fails here until the agent
// knows what to do.
func TestEveryDutyHasAStep(t *testing.T) {
	a := newTestAgent(t, &fakeCP{}, "src")
	steps := a.duties()
	for _, s := range fsm.AllStates {
		for _, role := range s.Actors() {
			var worker string
			switch role {
			case fsm.RoleSource:
				worker = "src"
			case fsm.RoleTarget:
				worker = "dst"
			default:
				continue // the server's and the operator's duties are not the agent's
			}
			found := false
			for _, row := range fsm.Duties(s) {
				if _, ok := steps[row.Event]; slices.Contains(row.Roles, role) && ok {
					found = true
				}
			}
			if !found {
				t.Errorf("%s must act in state %s (fsm.Transitions) but the agent has no step for it", role, s)
				continue
			}
			// Some record in this state makes stepFor pick a step.
			a.cfg.Worker = worker
			picked := false
			for _, rb := range []*fsm.RollbackInfo{nil, {}, {TargetTornDown: true}} {
				m := &fsm.Migration{ID: "mig-d-" + string(s), Source: "src", Target: "dst", State: s, Rollback: rb}
				a.markDone(m, "net-source")
				if a.stepFor(m) != nil {
					picked = true
				}
			}
			if !picked {
				t.Errorf("%s must act in state %s but stepFor picks nothing", role, s)
			}
		}
	}
	// Every step answers a Duty row of an agent role: none is left over from a removed state.
	for ev := range steps {
		tr, ok := fsm.Lookup(ev)
		if !ok || tr.Kind != fsm.Duty || (!slices.Contains(tr.Roles, fsm.RoleSource) && !slices.Contains(tr.Roles, fsm.RoleTarget)) {
			t.Errorf("the agent has a step for %s, which is no duty of the source or the target", ev)
		}
	}
}

func TestPreCutoverFailureRollsBack(t *testing.T) {
	cp := &fakeCP{m: &fsm.Migration{ID: "mig-f", Source: "src", Target: "dst", State: fsm.SourceStopped, Volume: "v"}}
	a := newTestAgent(t, cp, "src")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	a.dispatch(ctx, cp.m.Clone())
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		for _, ev := range cp.events() {
			if ev == fsm.EvFailed {
				cancel()
				a.steps.Wait()
				return
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("a failing export step never failed the migration; proposals: %v", cp.events())
}

func TestNewNamesAMissingPart(t *testing.T) {
	_, err := New(zerolog.Nop(), Config{Worker: "w1", DataDir: t.TempDir()}, Parts{Control: &fakeCP{}})
	if err == nil || !strings.Contains(err.Error(), "Parts.") {
		t.Fatalf("New without its parts: %v, want an error naming the missing part", err)
	}
}
