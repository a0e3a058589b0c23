// Package fsm is the migration state machine and the replicated store that
// applies it: states, events, the roles allowed to propose each event, the
// guards and the registries (workers, volumes, machines, locks). Raft and HTTP
// live in package server: fsm imports neither.
//
// The transition table (Transitions) is the single source of truth: looplab/fsm
// checks every proposal against it, every state set (terminal, before and
// after cutover, who acts, where the source serves its export) is derived from
// it, and docs/fsm.md is drawn from it.
package fsm

import (
	"context"
	"fmt"
	"slices"
	"strings"

	lfsm "github.com/looplab/fsm"
)

// State is a migration state.
type State string

// The states, in forward order, then the rollback path. Which sets they
// belong to (terminal, before or after cutover, who acts) is derived from
// Transitions below, never listed by hand.
const (
	Planned        State = "planned"
	TargetPrepared State = "target_prepared"
	SourceStopped  State = "source_stopped"
	Exported       State = "exported"
	CloneBuilt     State = "clone_built"
	Trimmed        State = "trimmed"
	Cutover        State = "cutover"
	Hydrating      State = "hydrating"
	Hydrated       State = "hydrated"
	SourceReleased State = "source_released"
	Completed      State = "completed"
	RollingBack    State = "rolling_back"
	RolledBack     State = "rolled_back"
)

// Valid reports whether s is a known state.
func (s State) Valid() bool { return slices.Contains(AllStates, s) }

// Role is who may propose an event.
type Role string

const (
	RoleServer   Role = "server"   // the server's own reconciler (leases, completion)
	RoleSource   Role = "source"   // the agent of the migration's source worker
	RoleTarget   Role = "target"   // the agent of the migration's target worker
	RoleOperator Role = "operator" // a human or automation holding an operator certificate
)

// Event names what happened; proposing it asks the store to move the migration.
type Event string

const (
	EvTargetPrepared   Event = "target_prepared"
	EvSourceStopped    Event = "source_stopped"
	EvExported         Event = "exported"
	EvCloneBuilt       Event = "clone_built"
	EvTrimmed          Event = "trimmed"
	EvCutover          Event = "cutover"
	EvHydrationStarted Event = "hydration_started"
	EvHydrated         Event = "hydrated"
	EvSourceReleased   Event = "source_released"
	EvCompleted        Event = "completed"
	EvAbort            Event = "abort"            // operator or server decides to roll back
	EvFailed           Event = "failed"           // a participant cannot do its step before cutover
	EvTargetTornDown   Event = "target_torn_down" // target released everything; machine not running there
	EvSourceRestored   Event = "source_restored"  // source unexported and restarted the machine

	// Annotations: recorded without changing the state (see Annotations).
	EvProgress Event = "progress"
	EvReport   Event = "report" // an error or stall report from a participant
	// EvExportMoved republishes the export's portal and IQN: the source
	// restarted and serves the same frozen volume elsewhere; the target
	// reconnects there.
	EvExportMoved Event = "export_moved"
	// EvExportStarted publishes the export's portal and IQN before
	// exported: the source started it while the target prepared, and the
	// target's prestarted datapath logs in ahead of the machine's pause.
	// Nothing is read until exported is committed (after the freeze).
	EvExportStarted Event = "export_started"
)

// RowKind says whether a row is somebody's job.
type RowKind uint8

const (
	// Duty: when the migration is in a From state, the row's roles must do
	// their step and propose the event; nothing else moves the migration on.
	Duty RowKind = iota
	// Escape: proposed only when something fails or someone decides to stop;
	// no role has to act for it, so it gives nobody a step.
	Escape
)

// Transition is one row of the table: Event moves a migration from any of
// From to To, proposed by one of Roles.
type Transition struct {
	Kind  RowKind
	Event Event
	From  []State
	To    State
	Roles []Role
	Doc   string
}

// preCutover is where abort and failed are allowed: the forward path before
// the target may write. BeforeCutover is read from the abort row, not from here.
var preCutover = []State{Planned, TargetPrepared, SourceStopped, Exported, CloneBuilt, Trimmed}

// Transitions is the migration state machine. Order matters only for docs.
var Transitions = []Transition{
	{Duty, EvTargetPrepared, []State{Planned}, TargetPrepared, []Role{RoleTarget}, "destination volume and clone metadata allocated from the carried LUKS2 layout"},
	{Duty, EvSourceStopped, []State{TargetPrepared}, SourceStopped, []Role{RoleSource}, "machine stopped, volume flushed and frozen"},
	{Duty, EvExported, []State{SourceStopped}, Exported, []Role{RoleSource}, "volume exported read-only over iSCSI to the target only"},
	{Duty, EvCloneBuilt, []State{Exported}, CloneBuilt, []Role{RoleTarget}, "iSCSI session up, clone device built with hydration off, plaintext view open"},
	{Duty, EvTrimmed, []State{CloneBuilt}, Trimmed, []Role{RoleTarget}, "clone ready for the machine (its fstrim runs after the machine's start, before hydration)"},
	{Duty, EvCutover, []State{Trimmed}, Cutover, []Role{RoleTarget}, "machine started on the target, 6PN rewritten: point of no return"},
	{Duty, EvHydrationStarted, []State{Cutover}, Hydrating, []Role{RoleTarget}, "background copy enabled"},
	{Duty, EvHydrated, []State{Hydrating}, Hydrated, []Role{RoleTarget}, "every region copied; clone replaced by the plain device"},
	{Duty, EvSourceReleased, []State{Hydrated}, SourceReleased, []Role{RoleSource}, "export torn down, source volume pending_destroy"},
	{Duty, EvCompleted, []State{SourceReleased}, Completed, []Role{RoleServer}, "locks released"},
	{Escape, EvAbort, preCutover, RollingBack, []Role{RoleOperator, RoleServer}, "operator abort, or the server saw a lease expire"},
	{Escape, EvFailed, preCutover, RollingBack, []Role{RoleSource, RoleTarget}, "a participant cannot do its step"},
	{Duty, EvTargetTornDown, []State{RollingBack}, RollingBack, []Role{RoleTarget, RoleOperator}, "target released its clone and volume; the machine does not run there"},
	{Duty, EvSourceRestored, []State{RollingBack}, RolledBack, []Role{RoleSource}, "source unexported and restarted the machine (only after the target's teardown)"},
}

// Annotation is an event recorded on a migration without a state change.
type Annotation struct {
	Event Event
	In    []State
	Roles []Role
}

// Annotations are the events that only update the record.
var Annotations = []Annotation{
	{EvProgress, progressStates(), []Role{RoleTarget}},
	{EvReport, nonTerminal(), []Role{RoleSource, RoleTarget, RoleServer}},
	{EvExportMoved, exportStates(), []Role{RoleSource}},
	{EvExportStarted, earlyExportStates(), []Role{RoleSource}},
}

// Lookup returns the transition row for ev, if ev changes state.
func Lookup(ev Event) (Transition, bool) {
	for _, t := range Transitions {
		if t.Event == ev {
			return t, true
		}
	}
	return Transition{}, false
}

func lookupAnnotation(ev Event) (Annotation, bool) {
	for _, a := range Annotations {
		if a.Event == ev {
			return a, true
		}
	}
	return Annotation{}, false
}

// KnownEvent reports whether ev is a transition or an annotation.
func KnownEvent(ev Event) bool {
	_, t := Lookup(ev)
	_, a := lookupAnnotation(ev)
	return t || a
}

// eventDescs converts the table for looplab/fsm.
func eventDescs() []lfsm.EventDesc {
	out := make([]lfsm.EventDesc, 0, len(Transitions))
	for _, t := range Transitions {
		src := make([]string, len(t.From))
		for i, s := range t.From {
			src[i] = string(s)
		}
		out = append(out, lfsm.EventDesc{Name: string(t.Event), Src: src, Dst: string(t.To)})
	}
	return out
}

// lfsmAt returns a looplab state machine positioned at s.
func lfsmAt(s State) *lfsm.FSM { return lfsm.NewFSM(string(s), eventDescs(), nil) }

// Next checks the transition with looplab/fsm and returns the state ev leads
// to from cur. A self-loop (ev keeps the state) is allowed.
func Next(cur State, ev Event) (State, error) {
	t, ok := Lookup(ev)
	if !ok {
		return "", fmt.Errorf("event %q does not change state", ev)
	}
	m := lfsmAt(cur)
	if !m.Can(string(ev)) {
		return "", fmt.Errorf("event %q is not allowed in state %q", ev, cur)
	}
	err := m.Event(context.Background(), string(ev))
	var noTr lfsm.NoTransitionError
	if err != nil && !asNoTransition(err, &noTr) {
		return "", fmt.Errorf("event %q in state %q: %w", ev, cur, err)
	}
	if State(m.Current()) != t.To {
		return "", fmt.Errorf("event %q in state %q led to %q, table says %q", ev, cur, m.Current(), t.To)
	}
	return t.To, nil
}

func asNoTransition(err error, target *lfsm.NoTransitionError) bool {
	e, ok := err.(lfsm.NoTransitionError)
	if ok {
		*target = e
	}
	return ok
}

// Graph renders the state machine: format "mermaid" (a stateDiagram) or "dot".
func Graph(format string) (string, error) {
	m := lfsmAt(Planned)
	switch strings.ToLower(format) {
	case "", "mermaid":
		return lfsm.VisualizeWithType(m, lfsm.MERMAID)
	case "dot", "graphviz":
		return lfsm.VisualizeWithType(m, lfsm.GRAPHVIZ)
	}
	return "", fmt.Errorf("graph format %q: use mermaid or dot", format)
}

// invariants are what the store, the agent and the tests keep true; comments
// cite them by number ("invariant 2").
const invariants = `1. The source volume does not change after ` + "`source_stopped`" + ` is committed: it is frozen, and the
   target reads exactly what the machine last wrote.
2. The machine runs on one worker at a time: on the target only after ` + "`source_stopped`" + ` is committed,
   on the source again (rollback) only after ` + "`target_torn_down`" + ` is committed.
3. The source volume leaves service only after ` + "`hydrated`" + `, and is then kept for the retention window
   (` + "`pending_destroy`" + `) before it is destroyed.
4. A volume's key is stored only as envelopes: to its owner worker (put by that worker or by an
   operator recovering it), to the recovery key (an owner envelope needs one), and to a
   migration's target (put by the source only, in ` + "`source_stopped`/`exported`" + `, dropped when the
   migration ends). Destroyed volumes lose theirs. ` + "`set_volume_key`" + ` and ` + "`key_access`" + ` are retired:
   old log entries apply as no-ops and old snapshots' plaintext keys are dropped on restore.
5. A volume attached to a machine is never destroyed.
`

// FSMDoc is the content of docs/fsm.md, generated from the table; a test keeps
// the file equal to it (regenerate with `ferry fsm graph --doc > docs/fsm.md`).
func FSMDoc() (string, error) {
	g, err := Graph("mermaid")
	if err != nil {
		return "", err
	}
	var b strings.Builder
	b.WriteString("# Migration state machine\n\n")
	b.WriteString("Generated from `fsm.Transitions` by `ferry fsm graph --doc`; `go test ./fsm` fails when this file differs.\n\n")
	b.WriteString("```mermaid\n")
	b.WriteString(g)
	b.WriteString("```\n\n")
	b.WriteString("| event | from | to | proposed by | what happened |\n|---|---|---|---|---|\n")
	for _, t := range Transitions {
		from := make([]string, len(t.From))
		for i, s := range t.From {
			from[i] = "`" + string(s) + "`"
		}
		roles := make([]string, len(t.Roles))
		for i, r := range t.Roles {
			roles[i] = string(r)
		}
		fmt.Fprintf(&b, "| `%s` | %s | `%s` | %s | %s |\n", t.Event, strings.Join(from, ", "), t.To, strings.Join(roles, ", "), t.Doc)
	}
	b.WriteString("\nEvents that update the record without a state change:\n\n")
	for _, a := range Annotations {
		roles := make([]string, len(a.Roles))
		for i, r := range a.Roles {
			roles[i] = string(r)
		}
		in := make([]string, len(a.In))
		for i, s := range a.In {
			in[i] = string(s)
		}
		fmt.Fprintf(&b, "- `%s` (by %s) in %s\n", a.Event, strings.Join(roles, ", "), strings.Join(in, ", "))
	}
	b.WriteString("\nState sets, derived from the table: who must act (the roles of the rows that are someone's duty),\n" +
		"abort allowed (the `from` of `abort`), target may write (`cutover` and all it leads to), source serves\n" +
		"its export (from `exported` until `hydrated`), terminal (no row leaves it). The agent picks its steps\n" +
		"from these; nothing lists them by hand.\n\n")
	b.WriteString("| state | who must act | abort allowed | target may write | source serves export | terminal |\n|---|---|---|---|---|---|\n")
	yes := func(v bool) string {
		if v {
			return "yes"
		}
		return ""
	}
	for _, s := range AllStates {
		roles := make([]string, 0, 2)
		for _, r := range s.Actors() {
			roles = append(roles, string(r))
		}
		fmt.Fprintf(&b, "| `%s` | %s | %s | %s | %s | %s |\n", s, strings.Join(roles, ", "),
			yes(s.BeforeCutover()), yes(s.AfterCutover()), yes(s.ServesExport()), yes(s.Terminal()))
	}
	b.WriteString("\nGuards on every proposal: the proposer holds a role of the event in this migration; the\n" +
		"migration is in a `from` state (else the refusal names the actual state); a repeated step ID returns\n" +
		"the first result and changes nothing; `abort` only before `cutover`; `source_restored` only after\n" +
		"`target_torn_down` is committed (the machine never runs on two workers).\n")
	b.WriteString("\n## Invariants\n\nThe code and its tests refer to these by number.\n\n" + invariants)
	return b.String(), nil
}
