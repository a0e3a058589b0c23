package fsm

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// checkInvariants asserts the invariants (docs/fsm.md) on the store after a proposal.
func checkInvariants(t *testing.T, s *Store, prev *Migration) {
	t.Helper()
	m, ok := s.Migration("m1")
	if !ok {
		t.Fatal("migration vanished")
	}
	mach, _ := s.Machine("mach1")
	src, _ := s.Volume("vol1")
	_, stopped := m.EnteredAt[SourceStopped]
	_, cut := m.EnteredAt[Cutover]
	_, hydrated := m.EnteredAt[Hydrated]
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf("state %s: "+format+"\nrecord: %+v", append([]any{m.State}, append(args, m)...)...)
	}
	for _, w := range []Identity{srcW, dstW, otherW} {
		if got, want := s.ScopeOf(w), scanScope(s, w); !reflect.DeepEqual(got, want) {
			fail("scope of %s from the indexes %+v, from a scan %+v", w.Name, got, want)
		}
	}
	if !m.State.Valid() {
		fail("unknown state")
	}
	// Terminal states are final, and a migration never goes back on the forward path.
	if prev != nil {
		if prev.State.Terminal() && m.State != prev.State {
			fail("left terminal state %s", prev.State)
		}
		if prev.State.AfterCutover() && !m.State.AfterCutover() {
			fail("went from %s (past cutover) to %s", prev.State, m.State)
		}
		if fi, ti := slices.Index(AllStates, prev.State), slices.Index(AllStates, m.State); prev.State.AfterCutover() && ti < fi {
			fail("went backwards from %s", prev.State)
		}
	}
	// Invariant 2: the machine runs on one worker; the target only after source_stopped is committed.
	if cut {
		if !stopped || m.EnteredAt[Cutover].Before(m.EnteredAt[SourceStopped]) {
			fail("cutover without an earlier source_stopped")
		}
		if mach.Worker != m.Target {
			fail("after cutover the machine is on %s", mach.Worker)
		}
	} else if mach.Worker != m.Source {
		fail("before cutover the machine is on %s", mach.Worker)
	}
	if stopped && !cut && m.State != RolledBack && mach.State != MachineStopped {
		fail("machine %s on the source after source_stopped", mach.State)
	}
	// Rollback only from before cutover, and only complete after both sides.
	if m.State == RollingBack || m.State == RolledBack {
		if cut {
			fail("rolling back after cutover")
		}
		if m.Rollback == nil {
			fail("no rollback record")
		}
	}
	if m.State == RolledBack && (!m.Rollback.TargetTornDown || !m.Rollback.SourceRestored) {
		fail("rolled back without teardown and restore")
	}
	if m.Rollback != nil && m.Rollback.SourceRestored && !m.Rollback.TargetTornDown {
		fail("source restored before target teardown")
	}
	// Invariant 3 (first half): the source volume leaves service only after hydrated.
	if (src.State == VolPendingDelete || src.State == VolDestroyed) && !hydrated {
		fail("source volume %s before hydrated", src.State)
	}
	// Invariant 5: an attached volume is never destroyed.
	if src.State == VolDestroyed && src.AttachedMachine != "" {
		fail("attached volume destroyed")
	}
	// Locks are held exactly while the migration is active.
	locks := s.Locks()
	if m.Active() != (locks["volume/vol1"] == "m1") || m.Active() != (locks["network/7"] == "m1") {
		fail("locks %v while active=%v", locks, m.Active())
	}
}

// TestRandomProposalsKeepInvariants throws thousands of random proposals,
// from every kind of proposer, with repeated and fresh step IDs, at
// migrations, and checks the invariants after each one.
func TestRandomProposalsKeepInvariants(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	events := []Event{"bogus", EvProgress, EvReport}
	for _, tr := range Transitions {
		events = append(events, tr.Event)
	}
	ids := []Identity{server, operator, srcW, dstW, otherW, {Name: "w-dst", Kind: KindOperator}}
	total, applied, episodes := 0, 0, 0
	for total < 6000 {
		episodes++
		h := newHarness(t)
		h.setup(true)
		var used []string
		var prev *Migration
		for i := 0; i < 300 && total < 6000; i++ {
			total++
			ev := events[rng.IntN(len(events))]
			id := ids[rng.IntN(len(ids))]
			if rng.IntN(3) > 0 { // bias towards a proposer that holds a role of the event
				if tr, ok := Lookup(ev); ok {
					id = actorFor(tr.Roles[rng.IntN(len(tr.Roles))])
				}
			}
			step := fmt.Sprintf("s-%d-%d", episodes, i)
			dup := len(used) > 0 && rng.IntN(5) == 0
			if dup {
				step = used[rng.IntN(len(used))]
			}
			p := payloadOf(ev)
			if rng.IntN(6) == 0 {
				p = EventPayload{} // missing fields must be refused, not crash
			}
			before := migJSON(t, h.s)
			r := h.propose(id, ev, step, p)
			if r == nil {
				t.Fatal("nil result")
			}
			if r.Duplicate && r.Refusal == nil && migJSON(t, h.s) != before {
				t.Fatalf("duplicate step %s changed the migration", step)
			}
			if r.Refusal != nil && migJSON(t, h.s) != before {
				t.Fatalf("refused %s (%s) changed the migration", ev, r.Refusal.Reason)
			}
			if r.Refusal == nil && !r.Duplicate && !r.Ignored {
				applied++
				used = append(used, step)
			}
			checkInvariants(t, h.s, prev)
			prev, _ = h.s.Migration("m1")
			if prev.State.Terminal() && rng.IntN(10) == 0 {
				break
			}
		}
		checkReplayAndSnapshot(t, h)
	}
	t.Logf("%d proposals in %d episodes, %d applied", total, episodes, applied)
	if applied < 200 {
		t.Fatalf("only %d proposals applied: the test does not exercise the machine", applied)
	}
}

// checkReplayAndSnapshot: replaying the command log into a new store gives
// the same state (Apply is deterministic), and so does a snapshot restored
// into a new store.
func checkReplayAndSnapshot(t *testing.T, h *harness) {
	t.Helper()
	want := h.s.Dump()
	r := NewStore(zerolog.Nop())
	for i, b := range h.log {
		r.ApplyCommand(uint64(i+1), b)
	}
	if got := r.Dump(); !bytes.Equal(got, want) {
		t.Fatalf("replay differs:\n%s\n%s", got, want)
	}
	snap, err := h.s.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	sink := &memSink{}
	if err := snap.Persist(sink); err != nil {
		t.Fatal(err)
	}
	restored := NewStore(zerolog.Nop())
	if err := restored.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	if got := restored.Dump(); !bytes.Equal(got, want) {
		t.Fatalf("restored snapshot differs:\n%s\n%s", got, want)
	}
	// Step memory survives a restore: a duplicate is still recognised.
	m, _ := restored.Migration("m1")
	for _, st := range m.Steps {
		if _, ok := m.step(st.StepID); !ok {
			t.Fatalf("step %s lost in the snapshot", st.StepID)
		}
	}
}

type memSink struct{ bytes.Buffer }

func (m *memSink) ID() string    { return "mem" }
func (m *memSink) Cancel() error { return nil }
func (m *memSink) Close() error  { return nil }

// scanScope is ScopeOf by a scan of every record: the indexes must give
// the same scope.
func scanScope(s *Store, id Identity) *Scope {
	sc := &Scope{worker: id.Name, workers: map[string]bool{id.Name: true}, volumes: map[string]bool{}, machines: map[string]bool{},
		migrations: map[string]bool{}, specs: map[string]bool{}}
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, v := range s.d.Volumes {
		if v.Worker == id.Name {
			sc.volumes[v.ID] = true
		}
	}
	for _, m := range s.d.Machines {
		if m.Worker == id.Name {
			sc.machines[m.ID], sc.specs[m.ID] = true, true
		}
	}
	for _, m := range s.d.Migrations {
		if m.Source != id.Name && m.Target != id.Name {
			continue
		}
		sc.migrations[m.ID] = true
		sc.workers[m.Source], sc.workers[m.Target] = true, true
		sc.volumes[m.Volume] = true
		if m.TargetVol != "" {
			sc.volumes[m.TargetVol] = true
		}
		sc.machines[m.Machine] = true
		if m.Target == id.Name && m.Active() {
			sc.specs[m.Machine] = true
		}
	}
	return sc
}
