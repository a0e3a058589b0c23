package netrewrite

import (
	"errors"
	"net/netip"
	"testing"
	"time"
)

// The record half of the cutover steps: plain files, no privileges needed.
func TestRecordSidesJoinAndDrop(t *testing.T) {
	s := Store{Dir: t.TempDir()}
	old, new := MustBuild(testOrg, srcHost, testMachine), MustBuild(testOrg, tgtHost, testMachine)
	tp := TargetPlan{Machine: MachineNet{MachineNS: "m-tgt", Addr: new}, Old: old}
	sp := SourcePlan{Machine: MachineNet{MachineNS: "m-src", Addr: old}, Via: netip.MustParseAddr("fd00:fe::b")}
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

	// The source side alone needs the new address to make a record.
	if err := s.noteSource("m1", sp, Addr{}, now, time.Minute); !errors.Is(err, ErrBadAddr) {
		t.Fatalf("source record without --new: %v, want ErrBadAddr", err)
	}
	if err := s.noteTarget("m1", tp, now, time.Minute); err != nil {
		t.Fatal(err)
	}
	// The source joins the target's record (one host, both workers) and
	// keeps its grace period.
	if err := s.noteSource("m1", sp, Addr{}, now.Add(30*time.Second), time.Hour); err != nil {
		t.Fatal(err)
	}
	rec, ok, err := s.Get(old)
	if err != nil || !ok {
		t.Fatalf("record of %s: %v, %v", old, ok, err)
	}
	if rec.Target == nil || rec.Source == nil || rec.New != new || rec.Machine != "m1" || !rec.Until.Equal(now.Add(time.Minute)) {
		t.Fatalf("joined record %+v", rec)
	}
	// The target again (a retried step) keeps the source side.
	if err := s.noteTarget("m1", tp, now, time.Minute); err != nil {
		t.Fatal(err)
	}
	if rec, _, _ = s.Get(old); rec.Source == nil || rec.Source.Via != sp.Via {
		t.Fatalf("retried target step lost the source side: %+v", rec)
	}

	// Rolling back one side keeps the record for the other; the last side
	// removes it; dropping again is a no-op.
	if err := s.dropSide(old, true); err != nil {
		t.Fatal(err)
	}
	if rec, ok, _ = s.Get(old); !ok || rec.Target != nil || rec.Source == nil {
		t.Fatalf("after the target's rollback: %+v, %v", rec, ok)
	}
	for range 2 {
		if err := s.dropSide(old, false); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok, _ = s.Get(old); ok {
		t.Fatal("record survived the rollback of both sides")
	}

	// A stale record for another new address is replaced, not joined.
	other := MustBuild(testOrg, tgtHost+1, testMachine)
	if err := s.Put(Mapping{Machine: "m0", Old: old, New: other, Until: now, Target: &TargetPlan{Old: old}}); err != nil {
		t.Fatal(err)
	}
	if err := s.noteSource("m1", sp, new, now, time.Minute); err != nil {
		t.Fatal(err)
	}
	if rec, _, _ = s.Get(old); rec.New != new || rec.Target != nil || rec.Machine != "m1" {
		t.Fatalf("stale record joined: %+v", rec)
	}

	// Bad pairs are refused before anything is written.
	bad := tp
	bad.Old = new
	if err := s.noteTarget("m1", bad, now, time.Minute); !errors.Is(err, ErrBadAddr) {
		t.Fatalf("old == new: %v, want ErrBadAddr", err)
	}
}

// The full steps on two worker namespaces: record, kernel state, rollback.
func TestStoreCutoverAndRollback(t *testing.T) {
	w := newWorld(t)
	sp, tp := w.plans(ModeAlias)
	old, new := sp.Machine.Addr, tp.Machine.Addr
	if err := SetupMachineNet(w.ctx, w.log, sp.Machine); err != nil {
		t.Fatal(err)
	}
	stop := w.echo(sp.Machine.MachineNS, "source")
	w.mustReach(old, "source")
	before := w.state(w.src, w.tgt, sp.Machine.MachineNS)
	stop()

	s := Store{Dir: t.TempDir()}
	now := time.Now()
	if err := s.CutoverTarget(w.ctx, w.log, "m1", tp, now, time.Minute); err != nil {
		t.Fatal(err)
	}
	w.echo(tp.Machine.MachineNS, "target")
	if err := s.CutoverSource(w.ctx, w.log, "m1", sp, new, now, time.Minute); err != nil {
		t.Fatal(err)
	}
	w.mustReach(new, "target")
	w.mustReach(old, "target")
	if rec, ok, err := s.Get(old); err != nil || !ok || rec.Target == nil || rec.Source == nil {
		t.Fatalf("record after both cutover steps: %+v, %v, %v", rec, ok, err)
	}

	if err := s.RollbackTarget(w.ctx, w.log, tp); err != nil {
		t.Fatal(err)
	}
	if err := s.RollbackSource(w.ctx, w.log, sp); err != nil {
		t.Fatal(err)
	}
	sameState(t, "rollback through the store", before, w.state(w.src, w.tgt, sp.Machine.MachineNS))
	if left, err := s.List(); err != nil || len(left) != 0 {
		t.Fatalf("records after rollback: %+v, %v", left, err)
	}
}
