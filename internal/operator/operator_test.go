package operator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/machine"
)

// fake is a control plane in memory for these tests only.
type fake struct {
	volumes    map[string]*fsm.Volume
	workers    map[string]*fsm.Worker
	machines   map[string]*fsm.Machine
	migrations map[string][]*fsm.Migration // id -> the records GetMigration returns in turn
	reads      int
	formatted  int // GetVolume reads after which a creating volume is created (0: never)
}

func newFake() *fake {
	return &fake{volumes: map[string]*fsm.Volume{}, workers: map[string]*fsm.Worker{},
		machines: map[string]*fsm.Machine{}, migrations: map[string][]*fsm.Migration{}}
}

func notFound(what string) error {
	return &api.Error{Kind: fsm.RefuseNotFound, Code: "not_found", Reason: what + " not found"}
}

func (f *fake) CreateVolume(_ context.Context, v fsm.Volume) (*fsm.Volume, error) {
	if f.volumes[v.ID] != nil {
		return nil, &api.Error{Kind: fsm.RefuseConflict, Code: "exists", Reason: "exists"}
	}
	f.volumes[v.ID] = &v
	cp := v
	return &cp, nil
}
func (f *fake) GetVolume(_ context.Context, id string) (*fsm.Volume, error) {
	v := f.volumes[id]
	if v == nil {
		return nil, notFound("volume")
	}
	f.reads++
	if f.formatted > 0 && f.reads >= f.formatted {
		v.State = fsm.VolCreated
	}
	cp := *v
	return &cp, nil
}
func (f *fake) GetWorker(_ context.Context, name string) (*fsm.Worker, error) {
	if w := f.workers[name]; w != nil {
		return w, nil
	}
	return nil, notFound("worker")
}
func (f *fake) CreateMachine(_ context.Context, m fsm.Machine) (*fsm.Machine, error) {
	f.machines[m.ID] = &m
	cp := m
	return &cp, nil
}
func (f *fake) GetMachine(_ context.Context, id string) (*fsm.Machine, error) {
	if m := f.machines[id]; m != nil {
		return m, nil
	}
	return nil, notFound("machine")
}
func (f *fake) GetMigration(_ context.Context, id string) (*fsm.Migration, error) {
	seq := f.migrations[id]
	if len(seq) == 0 {
		return nil, notFound("migration")
	}
	m := seq[0]
	if len(seq) > 1 {
		f.migrations[id] = seq[1:]
	}
	return m, nil
}

func TestCreateVolumeWaits(t *testing.T) {
	f := newFake()
	f.formatted = 3
	v, err := CreateVolume(t.Context(), f, "vol1", "w1", 1<<30, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if v.State != fsm.VolCreated || v.Size != 1<<30 || v.Worker != "w1" {
		t.Fatalf("volume %+v", v)
	}
	if _, err := CreateVolume(t.Context(), f, "vol2", "w1", 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	if f.volumes["vol2"].State != fsm.VolCreating {
		t.Fatal("no wait: the volume must be returned as created by the server")
	}
	for _, bad := range []struct {
		worker string
		size   int64
	}{{"", 1}, {"w1", 0}, {"w1", -5}} {
		if _, err := CreateVolume(t.Context(), f, "vol3", bad.worker, bad.size, 0); !errors.Is(err, ErrInvalid) {
			t.Fatalf("worker %q size %d: %v, want ErrInvalid", bad.worker, bad.size, err)
		}
	}
	var ae *api.Error
	if _, err := CreateVolume(t.Context(), f, "vol1", "w1", 1, 0); !errors.As(err, &ae) || ae.Kind != fsm.RefuseConflict {
		t.Fatalf("existing volume: %v, want the server's refusal", err)
	}
}

func TestWaitVolumeTimesOutNamingTheState(t *testing.T) {
	f := newFake()
	f.volumes["v"] = &fsm.Volume{ID: "v", State: fsm.VolCreating}
	_, err := waitVolume(t.Context(), f, "v", fsm.VolCreated, 5*time.Millisecond, time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "still creating") {
		t.Fatalf("err %v: want a timeout naming the state", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := waitVolume(ctx, f, "v", fsm.VolCreated, time.Minute, time.Millisecond); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled: %v", err)
	}
}

func TestRunMachineBuildsTheAddress(t *testing.T) {
	f := newFake()
	f.workers["w1"] = &fsm.Worker{Name: "w1", HostID: 0xa}
	f.workers["w0"] = &fsm.Worker{Name: "w0"}
	req := MachineRequest{ID: "m1", Worker: "w1", Volume: "vol1", Org: 0x10, Number: 1,
		Spec: machine.Spec{Command: []string{"sleep", "1"}, KillSignal: "SIGINT", KillTimeout: time.Second}}
	m, err := RunMachine(t.Context(), f, req)
	if err != nil {
		t.Fatal(err)
	}
	if m.Addr6PN != "fdaa:0:10:0:a:0:1:0" || m.State != fsm.MachineRunning || m.Network != 0x10 {
		t.Fatalf("machine %+v", m)
	}
	var spec machine.Spec
	if err := json.Unmarshal(m.Spec, &spec); err != nil || spec.ID != "m1" || spec.Command[0] != "sleep" {
		t.Fatalf("spec %s: %v", m.Spec, err)
	}

	bad := func(mut func(*MachineRequest)) MachineRequest { r := req; mut(&r); return r }
	for name, c := range map[string]struct {
		r    MachineRequest
		want error
	}{
		"bad id":       {bad(func(r *MachineRequest) { r.ID = "../x" }), ErrInvalid},
		"no volume":    {bad(func(r *MachineRequest) { r.Volume = "" }), ErrInvalid},
		"no command":   {bad(func(r *MachineRequest) { r.Spec.Command = nil }), ErrInvalid},
		"bad signal":   {bad(func(r *MachineRequest) { r.Spec.KillSignal = "SIGNOPE" }), ErrInvalid},
		"org zero":     {bad(func(r *MachineRequest) { r.Org = 0 }), ErrInvalid},
		"no host id":   {bad(func(r *MachineRequest) { r.Worker = "w0" }), ErrRefused},
		"unknown host": {bad(func(r *MachineRequest) { r.Worker = "nope" }), nil},
	} {
		_, err := RunMachine(t.Context(), f, c.r)
		if err == nil || (c.want != nil && !errors.Is(err, c.want)) {
			t.Errorf("%s: %v, want %v", name, err, c.want)
		}
	}
}

func TestMigrationPlan(t *testing.T) {
	f := newFake()
	f.machines["m1"] = &fsm.Machine{ID: "m1", Worker: "a", Volume: "vol1", Network: 7, Addr6PN: "fdaa::1"}
	f.volumes["vol1"] = &fsm.Volume{ID: "vol1", Size: 1 << 30, Layout: &fsm.LUKSLayout{DataOffset: 16 << 20}}
	p, err := MakeMigrationPlan(t.Context(), f, "m1", "b")
	if err != nil {
		t.Fatal(err)
	}
	if p.Source != "a" || p.Target != "b" || p.DataOffset != 16<<20 || strings.Join(p.Locks, ",") != "volume/vol1,network/7" {
		t.Fatalf("plan %+v", p)
	}
	if len(p.Steps) == 0 || !strings.HasPrefix(p.Steps[len(p.Steps)-1], string(fsm.Completed)) {
		t.Fatalf("steps %q: want the forward path ending in completed", p.Steps)
	}
	for _, s := range p.Steps {
		if strings.HasPrefix(s, string(fsm.RollingBack)) {
			t.Fatalf("steps list a rollback: %q", s)
		}
	}
	var b strings.Builder
	p.Print(&b)
	if !strings.Contains(b.String(), "1.0 GiB") || !strings.Contains(b.String(), "data offset 16 MiB") {
		t.Fatalf("printed plan:\n%s", b.String())
	}
	if _, err := MakeMigrationPlan(t.Context(), f, "m1", "a"); !errors.Is(err, ErrRefused) {
		t.Fatalf("same worker: %v, want ErrRefused", err)
	}
	if _, err := MakeMigrationPlan(t.Context(), f, "nope", "b"); err == nil {
		t.Fatal("unknown machine planned")
	}
}

func TestProgressLine(t *testing.T) {
	m := &fsm.Migration{ID: "mig1", State: fsm.Hydrating, Progress: &fsm.Progress{TotalBytes: 100, HydratedBytes: 50, RateBPS: 2 << 20, ETASeconds: 3}}
	line := ProgressLine(m)
	if !strings.Contains(line, "[###############...............]") || !strings.Contains(line, "50.0%") ||
		!strings.Contains(line, "2.0 MiB/s") || !strings.Contains(line, "ETA 3s") {
		t.Fatalf("line %q", line)
	}
	// A peer reporting more bytes than the volume holds must not break the bar.
	m.Progress.HydratedBytes = 1000
	if line := ProgressLine(m); !strings.Contains(line, "100.0%") {
		t.Fatalf("overfull progress: %q", line)
	}
	m.Stalled, m.StallCause = true, "source unreachable"
	if line := ProgressLine(m); !strings.HasSuffix(line, "STALLED: source unreachable") {
		t.Fatalf("stalled: %q", line)
	}
	if line := ProgressLine(&fsm.Migration{ID: "x", State: fsm.Completed}); !strings.Contains(line, "100.0%") {
		t.Fatalf("completed without progress: %q", line)
	}
}

func TestFollowMigrations(t *testing.T) {
	f := newFake()
	f.migrations["a"] = []*fsm.Migration{{ID: "a", State: fsm.Planned}, {ID: "a", State: fsm.Planned}, {ID: "a", State: fsm.Completed}}
	f.migrations["b"] = []*fsm.Migration{{ID: "b", State: fsm.RollingBack}, {ID: "b", State: fsm.RolledBack, Rollback: &fsm.RollbackInfo{Reason: "target died"}}}
	var out strings.Builder
	final, err := followMigrations(t.Context(), f, &out, []string{"a", "b"}, false, time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if len(final) != 2 || final["a"].State != fsm.Completed || final["b"].State != fsm.RolledBack {
		t.Fatalf("final %+v", final)
	}
	if n := strings.Count(out.String(), "\n"); n != 4 {
		t.Fatalf("%d lines, want one per change (4):\n%s", n, out.String())
	}
	if got := RolledBack(final); len(got) != 1 || got[0] != "b: target died" {
		t.Fatalf("RolledBack = %q", got)
	}
	if _, err := followMigrations(t.Context(), f, &out, []string{"nope"}, false, time.Millisecond); err == nil {
		t.Fatal("unknown migration followed")
	}
}

// watchFake answers blocking queries from a list of records, one per index.
type watchFake struct {
	seq    []*fsm.Migration
	asked  []uint64
	errAt  int
	served int
}

func (w *watchFake) WatchMigration(_ context.Context, id string, index uint64) (*fsm.Migration, uint64, error) {
	w.asked = append(w.asked, index)
	if w.served == w.errAt {
		return nil, 0, errors.New("server gone")
	}
	m := w.seq[w.served]
	w.served++
	return m, uint64(w.served) * 10, nil
}

func TestWatchMigration(t *testing.T) {
	t0 := time.Now()
	done := &fsm.Migration{ID: "a", State: fsm.Completed,
		EnteredAt: map[fsm.State]time.Time{fsm.SourceStopped: t0, fsm.Cutover: t0.Add(2 * time.Second)}}
	w := &watchFake{errAt: -1, seq: []*fsm.Migration{
		{ID: "a", State: fsm.Planned}, {ID: "a", State: fsm.Planned}, // no change: one line
		{ID: "a", State: fsm.Hydrating, Stalled: true, StallCause: "source slow"},
		done,
	}}
	var out strings.Builder
	m, err := WatchMigration(t.Context(), w, "a", &out)
	if err != nil || m != done {
		t.Fatalf("WatchMigration = %v, %v", m, err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 4 || !strings.Contains(lines[1], "STALLED: source slow") || lines[3] != "completed; downtime 2s" {
		t.Fatalf("output:\n%s", out.String())
	}
	// Each query carries the index of the answer before (blocking queries).
	if fmt.Sprint(w.asked) != "[0 10 20 30]" {
		t.Fatalf("indexes asked %v", w.asked)
	}
	w = &watchFake{errAt: 1, seq: []*fsm.Migration{{ID: "a", State: fsm.Planned}}}
	if _, err := WatchMigration(t.Context(), w, "a", &out); err == nil {
		t.Fatal("a failed query ended the watch without an error")
	}
}

func TestPrintMigrations(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	var b strings.Builder
	PrintMigrations(&b, nil, now)
	if b.String() != "no migrations\n" {
		t.Fatalf("empty: %q", b.String())
	}
	b.Reset()
	ms := []*fsm.Migration{
		{ID: "m-1", Machine: "m1", Volume: "v1", State: fsm.Hydrating, Source: "a", Target: "b", CreatedAt: now.Add(-90 * time.Second),
			Progress: &fsm.Progress{TotalBytes: 4, HydratedBytes: 1}},
		{ID: "m-2", Machine: "m2", Volume: "v2", State: fsm.RolledBack, Source: "a", Target: "c", CreatedAt: now.Add(-3 * time.Hour),
			Rollback: &fsm.RollbackInfo{Reason: strings.Repeat("x", 100)}},
	}
	PrintMigrations(&b, ms, now)
	got := b.String()
	for _, want := range []string{"a -> b", "2m0s", "25%", "3h0m0s", "rollback: xxx", "..."} {
		if !strings.Contains(got, want) {
			t.Errorf("table lacks %q:\n%s", want, got)
		}
	}
	b.Reset()
	ms[0].Export = &fsm.Export{Portal: "[fd00::a]:3260", IQN: "iqn.x"}
	ms[0].EnteredAt = map[fsm.State]time.Time{fsm.Planned: now}
	PrintMigration(&b, ms[0], now)
	for _, want := range []string{"migration m-1: machine m1, volume v1, a -> b", "export:    [fd00::a]:3260 iqn.x", "planned"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("detail lacks %q:\n%s", want, b.String())
		}
	}
}

// The detail view gives the control plane's downtime and, since the store
// never sees the machine's writes, a bound for the part it does see and a
// pointer to where the machine's own figure is measured: never a number
// for the machine's pause itself.
func TestPrintMigrationDowntime(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	m := &fsm.Migration{ID: "m-1", Machine: "m1", Volume: "v1", State: fsm.Completed, Source: "a", Target: "b", CreatedAt: t0,
		EnteredAt: map[fsm.State]time.Time{fsm.TargetPrepared: t0, fsm.SourceStopped: t0.Add(40 * time.Millisecond),
			fsm.Cutover: t0.Add(150 * time.Millisecond)}}
	var b strings.Builder
	PrintMigration(&b, m, t0.Add(time.Minute))
	got := b.String()
	for _, want := range []string{"downtime:  110ms as the control plane saw it (source_stopped -> cutover)",
		"at most 150ms from its stop to the", "plus its start on b and its first write", "measure it from the machine's side"} {
		if !strings.Contains(got, want) {
			t.Errorf("detail lacks %q:\n%s", want, got)
		}
	}
	delete(m.EnteredAt, fsm.Cutover)
	b.Reset()
	PrintMigration(&b, m, t0.Add(time.Minute))
	if strings.Contains(b.String(), "downtime") {
		t.Errorf("a migration not yet cut over shows a downtime:\n%s", b.String())
	}
}
