package fsm

import (
	"bytes"
	"io"
	"strings"
	"testing"
	"time"
)

// drainHarness registers the usual workers and machine, without a plan.
func drainHarness(t *testing.T) *harness {
	h := newHarness(t)
	for i, w := range []Identity{srcW, dstW, otherW} {
		h.must(h.apply(CmdRegisterWorker, &RegisterWorkerCmd{Header: h.hdr(w), Worker: Worker{Name: w.Name, HostID: uint32(i + 1)}, LeaseTTL: time.Hour}))
	}
	h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(srcW), Volume: Volume{ID: "vol1", Worker: srcW.Name, Size: 80 << 20, State: VolCreated, Layout: testLayout()}}))
	h.must(h.apply(CmdCreateMachine, &CreateMachineCmd{Header: h.hdr(operator), Machine: Machine{ID: "mach1", Worker: srcW.Name, Volume: "vol1", Network: 7, State: MachineRunning}}))
	h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(dstW), Volume: Volume{ID: "vol1-dst", Worker: dstW.Name, Size: 80 << 20, State: VolHydrating}}))
	return h
}

func TestDrainCordonsAndMarksOnce(t *testing.T) {
	h := drainHarness(t)
	d := h.must(h.apply(CmdDrain, &DrainCmd{Header: h.hdr(operator), ID: "d1", Worker: srcW.Name, Deadline: time.Hour})).Drain
	if d.State != DrainRunning || d.Parallel != DefaultDrainParallel || !d.Deadline.Equal(h.now.Add(time.Hour)) {
		t.Fatalf("drain: %+v", d)
	}
	if w, _ := h.s.Worker(srcW.Name); !w.Cordoned {
		t.Fatal("drained worker not cordoned")
	}
	// A second drain of the same worker is refused; the same one is a duplicate.
	if r := h.apply(CmdDrain, &DrainCmd{Header: h.hdr(operator), ID: "d2", Worker: srcW.Name}); r.Refusal == nil {
		t.Fatal("second drain accepted")
	}
	if r := h.apply(CmdDrain, &DrainCmd{Header: h.hdr(operator), ID: "d1", Worker: srcW.Name}); !r.Duplicate {
		t.Fatalf("retried drain: %+v", r)
	}
	// Workers may not drain, nor start a drain's migrations.
	if r := h.apply(CmdDrain, &DrainCmd{Header: h.hdr(dstW), ID: "d3", Worker: dstW.Name}); r.Refusal == nil || r.Refusal.Kind != RefuseForbidden {
		t.Fatalf("worker drain: %+v", r)
	}
	start := []DrainStart{{Machine: "mach1", Target: dstW.Name, Migration: "d1-1-mach1"}}
	if r := h.apply(CmdDrainUpdate, &DrainUpdateCmd{Header: h.hdr(operator), ID: "d1", Start: start}); r.Refusal == nil || r.Refusal.Kind != RefuseForbidden {
		t.Fatalf("operator start: %+v", r)
	}
	// The server's start plans and marks in one entry.
	d = h.must(h.apply(CmdDrainUpdate, &DrainUpdateCmd{Header: h.hdr(server), ID: "d1", Start: start})).Drain
	if d.Started["mach1"] != "d1-1-mach1" || d.Attempts["mach1"] != 1 {
		t.Fatalf("marks: %+v", d)
	}
	if m, ok := h.s.Migration("d1-1-mach1"); !ok || m.State != Planned || m.Target != dstW.Name {
		t.Fatalf("migration: %+v", m)
	}
	// The same machine again (a new leader re-proposing) starts nothing.
	d = h.must(h.apply(CmdDrainUpdate, &DrainUpdateCmd{Header: h.hdr(server), ID: "d1", Start: []DrainStart{{Machine: "mach1", Target: otherW.Name, Migration: "d1-2-mach1"}}})).Drain
	if _, ok := h.s.Migration("d1-2-mach1"); ok || d.Attempts["mach1"] != 1 {
		t.Fatal("a marked machine was started twice")
	}
	if len(h.s.Migrations("")) != 1 {
		t.Fatalf("migrations: %d", len(h.s.Migrations("")))
	}
	// A plan to a cordoned target is refused in Apply too.
	h.must(h.apply(CmdCordon, &CordonCmd{Header: h.hdr(operator), Worker: otherW.Name, Cordoned: true, Reason: "disk swap"}))
	if r := h.apply(CmdCordon, &CordonCmd{Header: h.hdr(operator), Worker: srcW.Name, Cordoned: false}); r.Refusal == nil {
		t.Fatal("uncordoned a worker under drain")
	}
	// Cancel by the operator records what is left.
	d = h.must(h.apply(CmdDrainUpdate, &DrainUpdateCmd{Header: h.hdr(operator), ID: "d1", Finish: DrainCancelled,
		Left: []DrainLeft{{Machine: "mach1", Migration: "d1-1-mach1", Reason: "running"}}})).Drain
	if d.State != DrainCancelled || len(d.Left) != 1 || d.FinishedAt.IsZero() {
		t.Fatalf("cancelled: %+v", d)
	}
	if r := h.apply(CmdDrainUpdate, &DrainUpdateCmd{Header: h.hdr(server), ID: "d1", Start: start}); r.Refusal == nil || r.Refusal.Code != CodeWrongState {
		t.Fatalf("start after cancel: %+v", r)
	}
	// A cordon survives the agent re-registering.
	h.must(h.apply(CmdRegisterWorker, &RegisterWorkerCmd{Header: h.hdr(otherW), Worker: Worker{Name: otherW.Name, HostID: 3}}))
	if w, _ := h.s.Worker(otherW.Name); !w.Cordoned || w.CordonReason != "disk swap" {
		t.Fatalf("re-registration dropped the cordon: %+v", w)
	}
}

func TestPlanRefusesCordonedTarget(t *testing.T) {
	h := drainHarness(t)
	h.must(h.apply(CmdCordon, &CordonCmd{Header: h.hdr(operator), Worker: dstW.Name, Cordoned: true}))
	r := h.apply(CmdPlan, &PlanCmd{Header: h.hdr(operator), ID: "m1", Machine: "mach1", Target: dstW.Name})
	if r.Refusal == nil || r.Refusal.Code != CodeCordoned || !strings.Contains(r.Refusal.Reason, "cordoned") {
		t.Fatalf("plan to a cordoned worker: %+v", r.Refusal)
	}
}

func TestDrainRetryAfterRollback(t *testing.T) {
	h := drainHarness(t)
	h.must(h.apply(CmdDrain, &DrainCmd{Header: h.hdr(operator), ID: "d1", Worker: srcW.Name}))
	h.must(h.apply(CmdDrainUpdate, &DrainUpdateCmd{Header: h.hdr(server), ID: "d1", Start: []DrainStart{{Machine: "mach1", Target: dstW.Name, Migration: "a1"}}}))
	for _, ev := range []Event{EvAbort, EvTargetTornDown, EvSourceRestored} {
		id := map[Event]Identity{EvAbort: operator, EvTargetTornDown: dstW, EvSourceRestored: srcW}[ev]
		h.must(h.apply(CmdPropose, &ProposeCmd{Header: h.hdr(id), ID: "a1", Event: ev, StepID: "s-" + string(ev), Payload: payloadOf(ev)}))
	}
	d := h.must(h.apply(CmdDrainUpdate, &DrainUpdateCmd{Header: h.hdr(server), ID: "d1", Start: []DrainStart{{Machine: "mach1", Target: dstW.Name, Migration: "a2"}}})).Drain
	if d.Started["mach1"] != "a2" || d.Attempts["mach1"] != 2 {
		t.Fatalf("retry after rollback: %+v", d)
	}
}

func TestHeartbeatReportAndIndexes(t *testing.T) {
	h := drainHarness(t)
	bad := &WorkerReport{FreeBytes: 10, TotalBytes: 5}
	if r := h.apply(CmdHeartbeat, &HeartbeatCmd{Header: h.hdr(srcW), Name: srcW.Name, Report: bad}); r.Refusal == nil {
		t.Fatal("inverted report accepted")
	}
	rep := &WorkerReport{FreeBytes: 100 << 30, TotalBytes: 200 << 30, SlotsIn: 4, SlotsOut: 1}
	w := h.must(h.apply(CmdHeartbeat, &HeartbeatCmd{Header: h.hdr(srcW), Name: srcW.Name, Report: rep})).Worker
	if w.LimitIn() != 4 || w.LimitOut() != 1 || w.Report.FreeBytes != 100<<30 {
		t.Fatalf("report: %+v", w)
	}
	if rep.Differs(&WorkerReport{FreeBytes: 100<<30 - 1<<20, TotalBytes: 200 << 30, SlotsIn: 4, SlotsOut: 1}) {
		t.Fatal("1 MiB less free counted as a change")
	}
	if !rep.Differs(&WorkerReport{FreeBytes: 90 << 30, TotalBytes: 200 << 30, SlotsIn: 4, SlotsOut: 1}) {
		t.Fatal("10 GiB less free not counted as a change")
	}
	// The per-worker indexes follow a migration and are rebuilt on restore.
	h.must(h.apply(CmdPlan, &PlanCmd{Header: h.hdr(operator), ID: "m1", Machine: "mach1", Target: dstW.Name}))
	if n := len(h.s.Migrations(dstW.Name)); n != 1 || len(h.s.Migrations(otherW.Name)) != 0 || len(h.s.ActiveMigrations()) != 1 {
		t.Fatalf("by worker: dst %d", n)
	}
	if h.s.MigrationsIndex(dstW.Name) != h.index || h.s.MigrationsIndex(otherW.Name) != 1 {
		t.Fatalf("index: %d %d", h.s.MigrationsIndex(dstW.Name), h.s.MigrationsIndex(otherW.Name))
	}
	ch := h.s.MigrationsChanged(otherW.Name)
	chDst := h.s.MigrationsChanged(dstW.Name)
	h.must(h.apply(CmdPropose, &ProposeCmd{Header: h.hdr(dstW), ID: "m1", Event: EvTargetPrepared, StepID: "tp", Payload: payloadOf(EvTargetPrepared)}))
	select {
	case <-chDst:
	default:
		t.Fatal("a change of a migration naming w-dst did not wake its watchers")
	}
	select {
	case <-ch:
		t.Fatal("a change not naming w-other woke its watchers")
	default:
	}
	snap, err := h.s.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	s2 := NewStore(h.s.log)
	if err := s2.Restore(io.NopCloser(bytes.NewReader(snap.b))); err != nil {
		t.Fatal(err)
	}
	if len(s2.Migrations(dstW.Name)) != 1 || s2.MigrationsIndex(dstW.Name) != h.s.MigrationsIndex(dstW.Name) || len(s2.Machines(srcW.Name)) != 1 {
		t.Fatal("indexes not rebuilt on restore")
	}
}

// GC forgets a migration only once it is terminal and past the
// retention, keeps the per-worker index in step, and takes ended drains.
func TestGCOnlyTerminal(t *testing.T) {
	h := drainHarness(t)
	h.must(h.apply(CmdPlan, &PlanCmd{Header: h.hdr(operator), ID: "m1", Machine: "mach1", Target: dstW.Name}))
	if r := h.apply(CmdGC, &GCCmd{Header: h.hdr(operator), Retention: time.Second}); r.Refusal == nil {
		t.Fatal("an operator collected garbage")
	}
	h.now = h.now.Add(time.Hour)
	h.must(h.apply(CmdGC, &GCCmd{Header: h.hdr(server), Retention: time.Second}))
	if _, ok := h.s.Migration("m1"); !ok {
		t.Fatal("an active migration was collected")
	}
	for _, ev := range []Event{EvAbort, EvTargetTornDown, EvSourceRestored} {
		id := map[Event]Identity{EvAbort: operator, EvTargetTornDown: dstW, EvSourceRestored: srcW}[ev]
		h.must(h.propose(id, ev, "s-"+string(ev), payloadOf(ev)))
	}
	h.must(h.apply(CmdDrain, &DrainCmd{Header: h.hdr(operator), ID: "d1", Worker: srcW.Name}))
	h.must(h.apply(CmdDrainUpdate, &DrainUpdateCmd{Header: h.hdr(operator), ID: "d1", Finish: DrainCancelled}))
	if h.s.Collectable(h.now, time.Hour) {
		t.Fatal("records that ended just now are collectable with an hour's retention")
	}
	h.now = h.now.Add(2 * time.Hour)
	if !h.s.Collectable(h.now, time.Hour) {
		t.Fatal("a terminal migration past its retention is not collectable")
	}
	h.must(h.apply(CmdGC, &GCCmd{Header: h.hdr(server), Retention: time.Hour}))
	if _, ok := h.s.Migration("m1"); ok || len(h.s.Migrations(dstW.Name)) != 0 {
		t.Fatal("terminal migration not collected")
	}
	if _, ok := h.s.Drain("d1"); ok {
		t.Fatal("ended drain not collected")
	}
}
