package fsm

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestDocsFSMIsGenerated(t *testing.T) {
	want, err := FSMDoc()
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile("../docs/fsm.md")
	if err != nil {
		t.Fatalf("reading docs/fsm.md: %v (regenerate: go run ./cmd/ferry fsm graph --doc > docs/fsm.md)", err)
	}
	if string(got) != want {
		t.Fatal("docs/fsm.md differs from the code's state machine: regenerate with `go run ./cmd/ferry fsm graph --doc > docs/fsm.md`")
	}
	for _, tr := range Transitions {
		if !strings.Contains(want, fmt.Sprintf("%s --> %s: %s", tr.From[0], tr.To, tr.Event)) {
			t.Errorf("diagram lacks %s", tr.Event)
		}
	}
}

func TestGraphFormats(t *testing.T) {
	dot, err := Graph("dot")
	if err != nil || !strings.Contains(dot, "digraph") || !strings.Contains(dot, `"trimmed" -> "cutover"`) {
		t.Fatalf("dot graph: %v\n%s", err, dot)
	}
	if _, err := Graph("png"); err == nil {
		t.Fatal("unknown format accepted")
	}
}

func TestTableIsConsistent(t *testing.T) {
	seen := map[Event]bool{}
	for _, tr := range Transitions {
		if seen[tr.Event] {
			t.Errorf("event %s appears twice", tr.Event)
		}
		seen[tr.Event] = true
		if !tr.To.Valid() || len(tr.Roles) == 0 || len(tr.From) == 0 {
			t.Errorf("row %s is incomplete", tr.Event)
		}
		for _, f := range tr.From {
			if f.Terminal() {
				t.Errorf("%s leaves terminal state %s", tr.Event, f)
			}
		}
	}
	// Every non-terminal state has a way out.
	for _, s := range AllStates {
		if s.Terminal() {
			continue
		}
		out := false
		for _, tr := range Transitions {
			if slices.Contains(tr.From, s) && tr.To != s {
				out = true
			}
		}
		if !out {
			t.Errorf("state %s has no way out", s)
		}
	}
}

// TestEveryAllowedTransition drives a fresh migration to every source state
// of every row and proposes the event with each allowed role.
func TestEveryAllowedTransition(t *testing.T) {
	n := 0
	for _, tr := range Transitions {
		for _, from := range tr.From {
			for _, role := range tr.Roles {
				name := fmt.Sprintf("%s/%s/%s", from, tr.Event, role)
				t.Run(name, func(t *testing.T) {
					h := driveTo(t, from)
					if tr.Event == EvSourceRestored {
						h.must(h.propose(dstW, EvTargetTornDown, "td", EventPayload{}))
					}
					if tr.Event == EvTargetTornDown && role == RoleOperator {
						// An operator vouches for a target only after its lease and the fence margin.
						w, _ := h.s.Worker(dstW.Name)
						h.now = w.LeaseExpiry.Add(FenceMargin)
					}
					r := h.must(h.propose(actorFor(role), tr.Event, "step-x", payloadOf(tr.Event)))
					if r.Migration.State != tr.To {
						t.Fatalf("state %s, want %s", r.Migration.State, tr.To)
					}
					if _, ok := r.Migration.EnteredAt[tr.To]; !ok {
						t.Fatalf("no timestamp for %s", tr.To)
					}
				})
				n++
			}
		}
	}
	if n < 25 {
		t.Fatalf("only %d transitions tested", n)
	}
}

// TestEveryDisallowedTransition proposes every event in every state where the
// table does not allow it, with a role that could otherwise propose it.
func TestEveryDisallowedTransition(t *testing.T) {
	for _, st := range AllStates {
		for _, tr := range Transitions {
			if slices.Contains(tr.From, st) {
				continue
			}
			t.Run(fmt.Sprintf("%s/%s", st, tr.Event), func(t *testing.T) {
				h := driveTo(t, st)
				before := migJSON(t, h.s)
				r := h.propose(actorFor(tr.Roles[0]), tr.Event, "bad", payloadOf(tr.Event))
				if r.Refusal == nil {
					t.Fatalf("%s accepted in %s", tr.Event, st)
				}
				if r.Refusal.State != st {
					t.Fatalf("refusal names state %q, want %q", r.Refusal.State, st)
				}
				if !r.Refusal.Kind.ClientSide() {
					t.Fatalf("kind %s", r.Refusal.Kind)
				}
				wantCode := CodeWrongState
				if (tr.Event == EvAbort || tr.Event == EvFailed) && st.AfterCutover() {
					wantCode = CodePastCutover
					if !strings.Contains(r.Refusal.Reason, string(st)) {
						t.Fatalf("abort refusal does not name the state: %s", r.Refusal.Reason)
					}
				}
				if r.Refusal.Code != wantCode {
					t.Fatalf("code %s, want %s (%s)", r.Refusal.Code, wantCode, r.Refusal.Reason)
				}
				if after := migJSON(t, h.s); after != before {
					t.Fatalf("refused proposal changed the migration:\n%s\n%s", before, after)
				}
			})
		}
	}
}

func TestWrongRoleRefused(t *testing.T) {
	all := []Identity{server, operator, srcW, dstW, otherW}
	for _, tr := range Transitions {
		from := tr.From[0]
		for _, id := range all {
			h := driveTo(t, from)
			m, _ := h.s.Migration("m1")
			if allowed(RolesOf(id, m), tr.Roles) {
				continue
			}
			if tr.Event == EvSourceRestored {
				h.must(h.propose(dstW, EvTargetTornDown, "td", EventPayload{}))
			}
			before := migJSON(t, h.s)
			r := h.propose(id, tr.Event, "wrong-role", payloadOf(tr.Event))
			if r.Refusal == nil || r.Refusal.Code != CodeForbidden || r.Refusal.Kind != RefuseForbidden {
				t.Errorf("%s by %s in %s: want forbidden, got %+v", tr.Event, id, from, r.Refusal)
				continue
			}
			if migJSON(t, h.s) != before {
				t.Errorf("%s by %s changed the migration", tr.Event, id)
			}
		}
	}
}

func TestDuplicateStepAppliesOnce(t *testing.T) {
	h := driveTo(t, Planned)
	r1 := h.must(h.propose(dstW, EvTargetPrepared, "s-1", payloadOf(EvTargetPrepared)))
	before := migJSON(t, h.s)
	r2 := h.propose(dstW, EvTargetPrepared, "s-1", payloadOf(EvTargetPrepared))
	if r2.Refusal != nil || !r2.Duplicate || r2.Migration.State != r1.Migration.State {
		t.Fatalf("duplicate: %+v", r2)
	}
	if migJSON(t, h.s) != before {
		t.Fatal("duplicate changed the migration")
	}
	// Same step ID, other event: refused, nothing changes.
	r3 := h.propose(srcW, EvSourceStopped, "s-1", EventPayload{})
	if r3.Refusal == nil || r3.Refusal.Code != CodeConflict {
		t.Fatalf("reused step for another event: %+v", r3.Refusal)
	}
	if migJSON(t, h.s) != before {
		t.Fatal("reused step changed the migration")
	}
	// A duplicate of an old step after the state moved on still answers as the first time.
	h.must(h.propose(srcW, EvSourceStopped, "s-2", EventPayload{}))
	if r := h.propose(dstW, EvTargetPrepared, "s-1", payloadOf(EvTargetPrepared)); !r.Duplicate || r.Refusal != nil {
		t.Fatalf("late duplicate: %+v", r)
	}
}

func TestRollbackNeedsTargetTeardownFirst(t *testing.T) {
	h := driveTo(t, Exported)
	h.must(h.propose(operator, EvAbort, "a", EventPayload{Reason: "operator changed their mind"}))
	r := h.propose(srcW, EvSourceRestored, "r1", EventPayload{})
	if r.Refusal == nil || r.Refusal.Code != CodeNotTornDown || r.Refusal.State != RollingBack {
		t.Fatalf("source restored before teardown: %+v", r.Refusal)
	}
	if m, _ := h.s.Machine("mach1"); m.State != MachineStopped {
		t.Fatalf("machine %s before teardown", m.State)
	}
	h.must(h.propose(dstW, EvTargetTornDown, "t1", EventPayload{}))
	m := h.must(h.propose(srcW, EvSourceRestored, "r2", EventPayload{})).Migration
	if m.State != RolledBack || !m.Rollback.SourceStopped || m.Rollback.Reason != "operator changed their mind" || m.Rollback.From != Exported {
		t.Fatalf("rolled back record: %+v %+v", m.State, m.Rollback)
	}
	if len(h.s.Locks()) != 0 {
		t.Fatalf("locks left: %v", h.s.Locks())
	}
	if mach, _ := h.s.Machine("mach1"); mach.State != MachineRunning || mach.Worker != srcW.Name {
		t.Fatalf("machine after rollback: %+v", mach)
	}
}

func TestAbortAfterCutoverRefused(t *testing.T) {
	for _, st := range []State{Cutover, Hydrating, Hydrated, SourceReleased} {
		h := driveTo(t, st)
		r := h.propose(operator, EvAbort, "late", EventPayload{Reason: "too late"})
		if r.Refusal == nil || r.Refusal.Code != CodePastCutover || !strings.Contains(r.Refusal.Reason, string(st)) {
			t.Fatalf("abort in %s: %+v", st, r.Refusal)
		}
	}
}

func TestTargetPreparedNeedsCarriedLayout(t *testing.T) {
	h := newHarness(t)
	h.setup(false)
	r := h.propose(dstW, EvTargetPrepared, "p", EventPayload{})
	if r.Refusal == nil || r.Refusal.Code != CodeLayoutNeeded {
		t.Fatalf("prepared without layout: %+v", r.Refusal)
	}
	l := testLayout()
	h.must(h.apply(CmdUpdateVolume, &UpdateVolumeCmd{Header: h.hdr(srcW), ID: "vol1", Layout: l}))
	// The plan copied the volume's (then missing) layout; the source reports it when it stops,
	// but the target must not prepare before: still refused.
	if r := h.propose(dstW, EvTargetPrepared, "p2", EventPayload{}); r.Refusal == nil {
		t.Fatal("prepared with a layout the migration does not carry")
	}
}

func TestSourceLayoutMismatchRefused(t *testing.T) {
	h := driveTo(t, TargetPrepared)
	l := testLayout()
	l.DataOffset = 4 << 20 // a cryptsetup 2.0 header
	r := h.propose(srcW, EvSourceStopped, "s", EventPayload{Layout: l})
	if r.Refusal == nil || r.Refusal.State != TargetPrepared {
		t.Fatalf("mismatching layout accepted: %+v", r.Refusal)
	}
	h.must(h.propose(srcW, EvSourceStopped, "s2", EventPayload{Layout: testLayout()}))
}

func TestForwardPathRecord(t *testing.T) {
	h := driveTo(t, Completed)
	m, _ := h.s.Migration("m1")
	if d, ok := m.Downtime(); !ok || d <= 0 {
		t.Fatalf("downtime %v %v", d, ok)
	}
	if m.Export == nil || m.Old6PN == "" || m.New6PN == "" || m.Layout == nil || m.TargetVol != "vol1-dst" {
		t.Fatalf("record incomplete: %+v", m)
	}
	mach, _ := h.s.Machine("mach1")
	if mach.Worker != dstW.Name || mach.Volume != "vol1-dst" || mach.Addr6PN != m.New6PN || !mach.Migrated {
		t.Fatalf("machine not moved: %+v", mach)
	}
	v, _ := h.s.Volume("vol1")
	if v.State != VolPendingDelete || !v.DestroyAfter.After(m.EnteredAt[SourceReleased]) {
		t.Fatalf("source volume: %+v", v)
	}
	if dv, _ := h.s.Volume("vol1-dst"); dv.State != VolCreated || dv.AttachedMachine != "mach1" {
		t.Fatalf("target volume: %+v", dv)
	}
	if len(h.s.Locks()) != 0 {
		t.Fatalf("locks left: %v", h.s.Locks())
	}
}

func TestProgressRateLimited(t *testing.T) {
	h := driveTo(t, Hydrating)
	p := func(n int64, _ bool) *Result {
		return h.propose(dstW, EvProgress, "", EventPayload{Progress: &Progress{HydratedBytes: n, TotalBytes: 100 << 20}})
	}
	if r := p(1<<20, false); r.Ignored || r.Refusal != nil {
		t.Fatalf("first progress: %+v", r)
	}
	// The harness clock moves 1s per command; within ProgressInterval and the same decile: dropped.
	if r := p(2<<20, false); !r.Ignored {
		t.Fatal("second progress within the interval was applied")
	}
	// The limit is the store's alone: a client cannot mark its update a
	// milestone to skip it (the field no longer exists on the wire).
	if r := p(3<<20, true); !r.Ignored {
		t.Fatal("a progress update within the interval was applied")
	}
	if r := p(30<<20, false); r.Ignored {
		t.Fatal("a new decile was dropped")
	}
	m, _ := h.s.Migration("m1")
	if m.Progress.HydratedBytes != 30<<20 {
		t.Fatalf("progress %d", m.Progress.HydratedBytes)
	}
	if r := h.propose(srcW, EvProgress, "", payloadOf(EvProgress)); r.Refusal == nil || r.Refusal.Code != CodeForbidden {
		t.Fatalf("source progress: %+v", r.Refusal)
	}
}

func TestReportAndStall(t *testing.T) {
	h := driveTo(t, Cutover)
	yes := true
	m := h.must(h.propose(dstW, EvReport, "", EventPayload{Error: "iscsi read: timeout", Stalled: &yes, Reason: "no progress for 150s"})).Migration
	if !m.Stalled || m.StallCause != "no progress for 150s" || m.Attempts != 1 || m.LastError == "" || m.State != Cutover {
		t.Fatalf("report: %+v", m)
	}
	h.must(h.propose(dstW, EvHydrationStarted, "h", EventPayload{}))
	m = h.must(h.propose(dstW, EvProgress, "", payloadOf(EvProgress))).Migration
	if m.Stalled {
		t.Fatal("progress did not clear stalled")
	}
}

func TestExportedCarriesKnownZero(t *testing.T) {
	h := driveTo(t, SourceStopped)
	bad := payloadOf(EvExported)
	bad.KnownZero = []Range{{Off: 0, Len: -1}}
	before := migJSON(t, h.s)
	if r := h.propose(srcW, EvExported, "e1", bad); r.Refusal == nil || r.Refusal.Code != CodeInvalid {
		t.Fatalf("bad range accepted: %+v", r.Refusal)
	}
	if migJSON(t, h.s) != before {
		t.Fatal("refused exported changed the migration")
	}
	good := payloadOf(EvExported)
	good.KnownZero = []Range{{Off: 16 << 20, Len: 1 << 20}} // in the data area, past the header
	m := h.must(h.propose(srcW, EvExported, "e2", good)).Migration
	if len(m.KnownZero) != 1 || m.KnownZero[0].Len != 1<<20 {
		t.Fatalf("known zero: %+v", m.KnownZero)
	}
	// trimmed without ranges keeps the source's.
	h.must(h.propose(dstW, EvCloneBuilt, "c", EventPayload{}))
	if m := h.must(h.propose(dstW, EvTrimmed, "t", EventPayload{})).Migration; len(m.KnownZero) != 1 {
		t.Fatalf("trimmed dropped the known zero ranges: %+v", m.KnownZero)
	}
}

// TestDerivedSetsMatchTheFormerHandLists pins the sets derived from the table
// to the lists that were written by hand before: a change to the table that
// moves a state between sets must show up here on purpose.
func TestDerivedSetsMatchTheFormerHandLists(t *testing.T) {
	wantAll := []State{Planned, TargetPrepared, SourceStopped, Exported, CloneBuilt, Trimmed,
		Cutover, Hydrating, Hydrated, SourceReleased, Completed, RollingBack, RolledBack}
	if !slices.Equal(AllStates, wantAll) {
		t.Fatalf("AllStates = %v, want %v", AllStates, wantAll)
	}
	in := func(list ...State) func(State) bool { return func(s State) bool { return slices.Contains(list, s) } }
	sets := []struct {
		name    string
		derived func(State) bool
		want    func(State) bool
	}{
		{"Terminal", State.Terminal, in(Completed, RolledBack)},
		{"BeforeCutover", State.BeforeCutover, in(Planned, TargetPrepared, SourceStopped, Exported, CloneBuilt, Trimmed)},
		{"AfterCutover", State.AfterCutover, in(Cutover, Hydrating, Hydrated, SourceReleased, Completed)},
		{"ServesExport", State.ServesExport, in(Exported, CloneBuilt, Trimmed, Cutover, Hydrating)},
	}
	for _, c := range sets {
		for _, s := range AllStates {
			if c.derived(s) != c.want(s) {
				t.Errorf("%s(%s) = %v, want %v", c.name, s, c.derived(s), c.want(s))
			}
		}
	}
	// Who acts: the agent's step table (source / target) and the server's completion.
	wantActors := map[State][]Role{
		Planned: {RoleTarget}, TargetPrepared: {RoleSource}, SourceStopped: {RoleSource}, Exported: {RoleTarget},
		CloneBuilt: {RoleTarget}, Trimmed: {RoleTarget}, Cutover: {RoleTarget}, Hydrating: {RoleTarget},
		Hydrated: {RoleSource}, SourceReleased: {RoleServer}, RollingBack: {RoleTarget, RoleOperator, RoleSource},
	}
	for _, s := range AllStates {
		if got := s.Actors(); !slices.Equal(got, wantActors[s]) {
			t.Errorf("Actors(%s) = %v, want %v", s, got, wantActors[s])
		}
	}
	// Progress is accepted while the clone exists, report in every non-terminal state.
	p, _ := lookupAnnotation(EvProgress)
	if want := []State{Exported, CloneBuilt, Trimmed, Cutover, Hydrating, Hydrated}; !slices.Equal(p.In, want) {
		t.Errorf("progress accepted in %v, want %v", p.In, want)
	}
	a, _ := lookupAnnotation(EvReport)
	if want := []State{Planned, TargetPrepared, SourceStopped, Exported, CloneBuilt, Trimmed, Cutover,
		Hydrating, Hydrated, SourceReleased, RollingBack}; !slices.Equal(a.In, want) {
		t.Errorf("report accepted in %v, want %v", a.In, want)
	}
	if State("nonsense").Valid() || State("nonsense").Terminal() {
		t.Error("an unknown state belongs to a set")
	}
}

// TestDutiesAreDuties: every Duty row leaving a state is returned by Duties,
// and an escape row (abort, failed) gives nobody a step.
func TestDutiesAreDuties(t *testing.T) {
	for _, s := range AllStates {
		for _, d := range Duties(s) {
			if d.Kind != Duty || !slices.Contains(d.From, s) {
				t.Errorf("Duties(%s) has %s", s, d.Event)
			}
			if d.Event == EvAbort || d.Event == EvFailed {
				t.Errorf("%s is a duty in %s", d.Event, s)
			}
		}
		if !s.Terminal() && len(Duties(s)) == 0 {
			t.Errorf("nobody must act in non-terminal state %s: the migration would wait forever", s)
		}
	}
}

// An operator's word that a silent target is gone counts only once the
// target's lease expired plus FenceMargin: before that its agent may still
// run the machine (it fences itself by its lease's end).
func TestOperatorTargetGoneWaitsForLeaseAndMargin(t *testing.T) {
	h := driveTo(t, Exported)
	h.must(h.propose(operator, EvAbort, "a", EventPayload{Reason: "target silent"}))
	w, _ := h.s.Worker(dstW.Name)
	// setup gave the workers an hour's lease.
	r := h.propose(operator, EvTargetTornDown, "gone-1", EventPayload{})
	if r.Refusal == nil || r.Refusal.Code != CodeTargetMayRun || !strings.Contains(r.Refusal.Reason, dstW.Name) {
		t.Fatalf("operator target_torn_down with the target's lease valid: %+v", r.Refusal)
	}
	if m, _ := h.s.Migration("m1"); m.Rollback.TargetTornDown {
		t.Fatal("a refused target_torn_down was recorded")
	}
	// Just past the expiry, inside the margin: still refused.
	h.now = w.LeaseExpiry.Add(FenceMargin - 3*time.Second)
	if r := h.propose(operator, EvTargetTornDown, "gone-2", EventPayload{}); r.Refusal == nil || r.Refusal.Code != CodeTargetMayRun {
		t.Fatalf("operator target_torn_down inside the fence margin: %+v", r.Refusal)
	}
	h.now = w.LeaseExpiry.Add(FenceMargin)
	h.must(h.propose(operator, EvTargetTornDown, "gone-3", EventPayload{}))
	h.must(h.propose(srcW, EvSourceRestored, "r", EventPayload{}))
}

// The target itself may confirm its own teardown at any time.
func TestTargetConfirmsOwnTeardownWithLiveLease(t *testing.T) {
	h := driveTo(t, Exported)
	h.must(h.propose(operator, EvAbort, "a", EventPayload{}))
	h.must(h.propose(dstW, EvTargetTornDown, "t", EventPayload{}))
}

// The source republishes a moved export; only the source may, only while it
// serves the export, and only at its registered address with the
// migration's IQN.
func TestExportMoved(t *testing.T) {
	h := driveTo(t, CloneBuilt)
	moved := &Export{Portal: "127.0.0.1:3261", IQN: "iqn.2026-01.dev.ferry:ferry:m1"}
	if r := h.propose(dstW, EvExportMoved, "x1", EventPayload{Export: moved}); r.Refusal == nil || r.Refusal.Code != CodeForbidden {
		t.Fatalf("target moved the export: %+v", r.Refusal)
	}
	if r := h.propose(srcW, EvExportMoved, "x2", EventPayload{Export: &Export{Portal: "nope", IQN: "i"}}); r.Refusal == nil || r.Refusal.Code != CodeInvalid {
		t.Fatalf("a portal without a port accepted: %+v", r.Refusal)
	}
	// Only where exported could have pointed: the source's registered
	// address, the migration's IQN.
	if r := h.propose(srcW, EvExportMoved, "x2b", EventPayload{Export: &Export{Portal: "10.0.0.9:3261", IQN: moved.IQN}}); r.Refusal == nil || r.Refusal.Code != CodeInvalid {
		t.Fatalf("a portal away from the source's address accepted: %+v", r.Refusal)
	}
	if r := h.propose(srcW, EvExportMoved, "x2c", EventPayload{Export: &Export{Portal: moved.Portal, IQN: "iqn.2026-01.dev.ferry:ferry:m2"}}); r.Refusal == nil || r.Refusal.Code != CodeInvalid {
		t.Fatalf("another migration's IQN accepted: %+v", r.Refusal)
	}
	m := h.must(h.propose(srcW, EvExportMoved, "x3", EventPayload{Export: moved})).Migration
	if m.State != CloneBuilt || m.Export == nil || *m.Export != *moved {
		t.Fatalf("after export_moved: state %s export %+v", m.State, m.Export)
	}
	h2 := driveTo(t, TargetPrepared)
	if r := h2.propose(srcW, EvExportMoved, "x4", EventPayload{Export: moved}); r.Refusal == nil || r.Refusal.Code != CodeWrongState {
		t.Fatalf("export moved before it existed: %+v", r.Refusal)
	}
}

// The source publishes the export it started early: only the source, only
// before exported, only at its registered address and with the
// migration's IQN; the record's export is what the target logs in to.
func TestExportStarted(t *testing.T) {
	h := driveTo(t, TargetPrepared)
	early := &Export{Portal: "127.0.0.1:3260", IQN: "iqn.2026-01.dev.ferry:ferry:m1"}
	if r := h.propose(dstW, EvExportStarted, "e1", EventPayload{Export: early}); r.Refusal == nil || r.Refusal.Code != CodeForbidden {
		t.Fatalf("target published the export: %+v", r.Refusal)
	}
	if r := h.propose(srcW, EvExportStarted, "e2", EventPayload{Export: &Export{Portal: "10.9.9.9:3260", IQN: early.IQN}}); r.Refusal == nil || r.Refusal.Code != CodeInvalid {
		t.Fatalf("a portal away from the source's address accepted: %+v", r.Refusal)
	}
	if r := h.propose(srcW, EvExportStarted, "e3", EventPayload{Export: &Export{Portal: early.Portal, IQN: "iqn.2026-01.dev.ferry:ferry:other"}}); r.Refusal == nil || r.Refusal.Code != CodeInvalid {
		t.Fatalf("another migration's IQN accepted: %+v", r.Refusal)
	}
	m := h.must(h.propose(srcW, EvExportStarted, "e4", EventPayload{Export: early})).Migration
	if m.State != TargetPrepared || m.Export == nil || *m.Export != *early {
		t.Fatalf("after export_started: state %s export %+v", m.State, m.Export)
	}
	h2 := driveTo(t, Exported)
	if r := h2.propose(srcW, EvExportStarted, "e5", EventPayload{Export: early}); r.Refusal == nil || r.Refusal.Code != CodeWrongState {
		t.Fatalf("export_started after exported: %+v", r.Refusal)
	}
}
