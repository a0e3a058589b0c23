package drainer

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
)

// logApplier stands in for raft: it encodes each command and applies it to
// a real store at increasing indexes. failAfter makes the nth call report
// an error after applying, like a leader that committed and then died.
type logApplier struct {
	s         *fsm.Store
	index     uint64
	calls     int
	failAfter int
}

func (a *logApplier) Apply(_ context.Context, typ fsm.CommandType, payload any) (*fsm.Result, error) {
	b, err := fsm.Encode(typ, payload)
	if err != nil {
		return nil, err
	}
	a.index++
	a.calls++
	res := a.s.ApplyCommand(a.index, b)
	if a.failAfter > 0 && a.calls == a.failAfter {
		return nil, errors.New("leadership lost after commit")
	}
	return res, nil
}

type fixture struct {
	t   *testing.T
	log *logApplier
	now time.Time
}

func (f *fixture) clock() time.Time { return f.now }

func (f *fixture) hdr(name string, kind fsm.Kind) fsm.Header {
	return fsm.Header{Actor: fsm.Identity{Name: name, Kind: kind}, Now: f.now}
}

func (f *fixture) must(typ fsm.CommandType, p any) *fsm.Result {
	f.t.Helper()
	r, err := f.log.Apply(context.Background(), typ, p)
	if err != nil || r.Refusal != nil {
		f.t.Fatalf("%s: %v %v", typ, err, r.Refusal)
	}
	return r
}

var layout = &fsm.LUKSLayout{UUID: "u", DataOffset: 16 << 20, MetadataSize: 16384, KeyslotsSize: 16744448,
	SectorSize: 4096, Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: 64 << 20}

// newFixture: worker src holds n machines of 10 GiB; targets have room.
func newFixture(t *testing.T, n int, targets ...string) *fixture {
	f := &fixture{t: t, log: &logApplier{s: fsm.NewStore(zerolog.Nop())}, now: time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC)}
	for i, w := range append([]string{"src"}, targets...) {
		f.must(fsm.CmdRegisterWorker, &fsm.RegisterWorkerCmd{Header: f.hdr("op", fsm.KindOperator), LeaseTTL: 24 * time.Hour,
			Worker: fsm.Worker{Name: w, HostID: uint32(i + 1), Address: fmt.Sprintf("127.0.0.%d", i+1), Report: &fsm.WorkerReport{FreeBytes: 1 << 40, TotalBytes: 2 << 40, SlotsIn: 4, SlotsOut: 8}}})
	}
	for i := range n {
		id := fmt.Sprintf("m%d", i)
		f.must(fsm.CmdCreateVolume, &fsm.CreateVolumeCmd{Header: f.hdr("src", fsm.KindWorker), Volume: fsm.Volume{ID: "v" + id, Worker: "src", Size: 10 << 30, State: fsm.VolCreated, Layout: layout}})
		f.must(fsm.CmdCreateMachine, &fsm.CreateMachineCmd{Header: f.hdr("op", fsm.KindOperator), Machine: fsm.Machine{ID: id, Worker: "src", Volume: "v" + id, State: fsm.MachineRunning}})
	}
	return f
}

func (f *fixture) drainer() *Drainer {
	return New(Config{Self: "s0", Now: f.clock, Logger: zerolog.Nop()}, f.log, f.log.s)
}

// complete drives a migration to completed as its workers and the server would.
func (f *fixture) complete(m *fsm.Migration) {
	f.t.Helper()
	// The target registers its volume, and the source exports at its own
	// address under the migration's IQN, as the records require.
	tv := m.Volume + "-" + m.Target
	f.must(fsm.CmdCreateVolume, &fsm.CreateVolumeCmd{Header: f.hdr(m.Target, fsm.KindWorker), Volume: fsm.Volume{ID: tv, Worker: m.Target, Size: 10 << 30, State: fsm.VolHydrating}})
	src, _ := f.log.s.Worker(m.Source)
	steps := []struct {
		ev  fsm.Event
		who string
		p   fsm.EventPayload
	}{
		{fsm.EvTargetPrepared, m.Target, fsm.EventPayload{TargetVolume: tv}}, {fsm.EvSourceStopped, m.Source, fsm.EventPayload{}},
		{fsm.EvExported, m.Source, fsm.EventPayload{Export: &fsm.Export{Portal: src.Address + ":3260", IQN: "iqn.2026-01.dev.ferry:ferry:" + m.ID}}},
		{fsm.EvCloneBuilt, m.Target, fsm.EventPayload{}}, {fsm.EvTrimmed, m.Target, fsm.EventPayload{}}, {fsm.EvCutover, m.Target, fsm.EventPayload{}},
		{fsm.EvHydrationStarted, m.Target, fsm.EventPayload{}}, {fsm.EvHydrated, m.Target, fsm.EventPayload{}},
		{fsm.EvSourceReleased, m.Source, fsm.EventPayload{}}, {fsm.EvCompleted, "s0", fsm.EventPayload{}},
	}
	for _, s := range steps {
		kind := fsm.KindWorker
		if s.who == "s0" {
			kind = fsm.KindServer
		}
		f.must(fsm.CmdPropose, &fsm.ProposeCmd{Header: f.hdr(s.who, kind), ID: m.ID, Event: s.ev, StepID: m.ID + string(s.ev), Payload: s.p})
	}
}

func (f *fixture) drain(c fsm.DrainCmd) *fsm.Drain {
	c.Header, c.ID, c.Worker = f.hdr("op", fsm.KindOperator), "d1", "src"
	return f.must(fsm.CmdDrain, &c).Drain
}

func (f *fixture) current() *fsm.Drain {
	d, _ := f.log.s.Drain("d1")
	return d
}

func TestDrainRunsToCompletionWithinParallel(t *testing.T) {
	f := newFixture(t, 5, "a", "b")
	f.drain(fsm.DrainCmd{Parallel: 2})
	dr := f.drainer()
	ctx := context.Background()
	for round := 0; round < 10; round++ {
		dr.Pass(ctx)
		if f.current().State == fsm.DrainComplete {
			break
		}
		active := f.log.s.ActiveMigrations()
		if len(active) > 2 {
			t.Fatalf("round %d: %d migrations at once, parallel is 2", round, len(active))
		}
		for _, m := range active {
			f.complete(m)
		}
	}
	d := f.current()
	if d.State != fsm.DrainComplete || len(d.Started) != 5 || len(f.log.s.Machines("src")) != 0 {
		t.Fatalf("drain: %+v, %d machines left", d, len(f.log.s.Machines("src")))
	}
	// Spread: both targets used.
	if len(f.log.s.Machines("a")) == 0 || len(f.log.s.Machines("b")) == 0 {
		t.Fatalf("a %d b %d", len(f.log.s.Machines("a")), len(f.log.s.Machines("b")))
	}
	// Nothing more happens after completion: no writes.
	idx := f.log.index
	dr.Pass(ctx)
	if f.log.index != idx {
		t.Fatal("a pass over a complete drain wrote")
	}
}

func TestNewLeaderNeverDuplicates(t *testing.T) {
	f := newFixture(t, 4, "a", "b")
	f.drain(fsm.DrainCmd{Parallel: 4})
	// The old leader's start commits, then it loses leadership before it hears back.
	f.log.failAfter = f.log.calls + 1
	f.drainer().Pass(context.Background())
	if n := len(f.log.s.ActiveMigrations()); n != 4 {
		t.Fatalf("first pass started %d", n)
	}
	// A new leader's drainer over the same state starts nothing new.
	idx := f.log.index
	f.drainer().Pass(context.Background())
	if n := len(f.log.s.Migrations("")); n != 4 || f.log.index != idx {
		t.Fatalf("after failover: %d migrations, %d new entries", n, f.log.index-idx)
	}
	// Waiting is kept current without a write per pass.
	f.drainer().Pass(context.Background())
	if f.log.index != idx {
		t.Fatal("an idle pass wrote")
	}
}

func TestDeadlineReportsWhatIsLeft(t *testing.T) {
	f := newFixture(t, 3, "a")
	f.drain(fsm.DrainCmd{Parallel: 1, Deadline: time.Minute})
	dr := f.drainer()
	dr.Pass(context.Background())
	first := f.log.s.ActiveMigrations()
	if len(first) != 1 {
		t.Fatalf("started %d", len(first))
	}
	f.now = f.now.Add(2 * time.Minute)
	dr.Pass(context.Background())
	d := f.current()
	if d.State != fsm.DrainDeadline || len(d.Left) != 3 {
		t.Fatalf("at the deadline: %+v", d)
	}
	running := 0
	for _, l := range d.Left {
		if l.Migration == first[0].ID {
			running++
			if !strings.Contains(l.Reason, "goes on") {
				t.Fatalf("running left: %q", l.Reason)
			}
		} else if !strings.Contains(l.Reason, "not started before the deadline") {
			t.Fatalf("left reason %q", l.Reason)
		}
	}
	if running != 1 {
		t.Fatalf("left: %+v", d.Left)
	}
	// The running migration is not killed.
	if m, _ := f.log.s.Migration(first[0].ID); m.State != fsm.Planned {
		t.Fatalf("migration %s after the deadline", m.State)
	}
}

func TestWaitingSaysWhy(t *testing.T) {
	f := newFixture(t, 1, "a")
	// a fills up.
	f.must(fsm.CmdHeartbeat, &fsm.HeartbeatCmd{Header: f.hdr("a", fsm.KindWorker), Name: "a", LeaseTTL: time.Hour,
		Report: &fsm.WorkerReport{FreeBytes: 5 << 30, TotalBytes: 2 << 40}})
	f.drain(fsm.DrainCmd{})
	f.drainer().Pass(context.Background())
	d := f.current()
	if len(d.Started) != 0 || !strings.HasPrefix(d.Waiting["m0"], "no worker has 11 GiB free") {
		t.Fatalf("drain: %+v", d)
	}
}

func TestMigrationID(t *testing.T) {
	if id := MigrationID("drain-1", "m", 2); id != "drain-1-2-m" {
		t.Fatal(id)
	}
	if id := MigrationID("drain-1", strings.Repeat("x", 128), 1); len(id) > 128 {
		t.Fatalf("%d bytes", len(id))
	}
}

func TestLead(t *testing.T) {
	if Lead(nil) != 0 {
		t.Fatal("lead without samples")
	}
	if l := Lead([]time.Duration{5 * time.Second, time.Second, 3 * time.Second}); l != 3*time.Second {
		t.Fatalf("median %s", l)
	}
	if l := Lead([]time.Duration{time.Hour}); l != time.Minute {
		t.Fatalf("capped %s", l)
	}
}
