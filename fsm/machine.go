// Package fsm is the migration state machine and the replicated store that
// applies it: states, events, the roles allowed to propose each event, the
// guards, the registries (workers, volumes, machines, locks) and the raft node.
//
// The transition table (Transitions) is the single source of truth: looplab/fsm
// checks every proposal against it and draws docs/fsm.md from it.
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

// The states, in forward order, then the rollback path (docs/fsm.md).
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

// AllStates lists every state, forward path first.
var AllStates = []State{Planned, TargetPrepared, SourceStopped, Exported, CloneBuilt, Trimmed,
	Cutover, Hydrating, Hydrated, SourceReleased, Completed, RollingBack, RolledBack}

// Terminal reports whether no event leaves s.
func (s State) Terminal() bool { return s == Completed || s == RolledBack }

// BeforeCutover reports whether s is on the forward path before the point of
// no return, where an abort is still allowed.
func (s State) BeforeCutover() bool {
	switch s {
	case Planned, TargetPrepared, SourceStopped, Exported, CloneBuilt, Trimmed:
		return true
	}
	return false
}

// AfterCutover reports whether the target may be writing (cutover or later on the forward path).
func (s State) AfterCutover() bool {
	switch s {
	case Cutover, Hydrating, Hydrated, SourceReleased, Completed:
		return true
	}
	return false
}

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
)

// Transition is one row of the table: Event moves a migration from any of
// From to To, proposed by one of Roles.
type Transition struct {
	Event Event
	From  []State
	To    State
	Roles []Role
	Doc   string
}

var preCutover = []State{Planned, TargetPrepared, SourceStopped, Exported, CloneBuilt, Trimmed}

// Transitions is the migration state machine. Order matters only for docs.
var Transitions = []Transition{
	{EvTargetPrepared, []State{Planned}, TargetPrepared, []Role{RoleTarget}, "destination volume and clone metadata allocated from the carried LUKS2 layout"},
	{EvSourceStopped, []State{TargetPrepared}, SourceStopped, []Role{RoleSource}, "machine stopped, volume flushed and frozen"},
	{EvExported, []State{SourceStopped}, Exported, []Role{RoleSource}, "volume exported read-only over iSCSI to the target only"},
	{EvCloneBuilt, []State{Exported}, CloneBuilt, []Role{RoleTarget}, "iSCSI session up, clone device built with hydration off, plaintext view open"},
	{EvTrimmed, []State{CloneBuilt}, Trimmed, []Role{RoleTarget}, "fstrim marked unused regions hydrated"},
	{EvCutover, []State{Trimmed}, Cutover, []Role{RoleTarget}, "machine started on the target, 6PN rewritten: point of no return"},
	{EvHydrationStarted, []State{Cutover}, Hydrating, []Role{RoleTarget}, "background copy enabled"},
	{EvHydrated, []State{Hydrating}, Hydrated, []Role{RoleTarget}, "every region copied; clone replaced by the plain device"},
	{EvSourceReleased, []State{Hydrated}, SourceReleased, []Role{RoleSource}, "export torn down, source volume pending_destroy"},
	{EvCompleted, []State{SourceReleased}, Completed, []Role{RoleServer}, "locks released"},
	{EvAbort, preCutover, RollingBack, []Role{RoleOperator, RoleServer}, "operator abort, or the server saw a lease expire"},
	{EvFailed, preCutover, RollingBack, []Role{RoleSource, RoleTarget}, "a participant cannot do its step"},
	{EvTargetTornDown, []State{RollingBack}, RollingBack, []Role{RoleTarget, RoleOperator}, "target released its clone and volume; the machine does not run there"},
	{EvSourceRestored, []State{RollingBack}, RolledBack, []Role{RoleSource}, "source unexported and restarted the machine (only after the target's teardown)"},
}

// Annotation is an event recorded on a migration without a state change.
type Annotation struct {
	Event Event
	In    []State
	Roles []Role
}

// Annotations are the events that only update the record.
var Annotations = []Annotation{
	{EvProgress, []State{Exported, CloneBuilt, Trimmed, Cutover, Hydrating, Hydrated}, []Role{RoleTarget}},
	{EvReport, []State{Planned, TargetPrepared, SourceStopped, Exported, CloneBuilt, Trimmed, Cutover,
		Hydrating, Hydrated, SourceReleased, RollingBack}, []Role{RoleSource, RoleTarget, RoleServer}},
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

// machineAt returns a looplab machine positioned at s.
func machineAt(s State) *lfsm.FSM { return lfsm.NewFSM(string(s), eventDescs(), nil) }

// Next checks the transition with looplab/fsm and returns the state ev leads
// to from cur. A self-loop (ev keeps the state) is allowed.
func Next(cur State, ev Event) (State, error) {
	t, ok := Lookup(ev)
	if !ok {
		return "", fmt.Errorf("event %q does not change state", ev)
	}
	m := machineAt(cur)
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
	m := machineAt(Planned)
	switch strings.ToLower(format) {
	case "", "mermaid":
		return lfsm.VisualizeWithType(m, lfsm.MERMAID)
	case "dot", "graphviz":
		return lfsm.VisualizeWithType(m, lfsm.GRAPHVIZ)
	}
	return "", fmt.Errorf("graph format %q: use mermaid or dot", format)
}

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
	b.WriteString("\nGuards on every proposal: the proposer holds a role of the event in this migration; the\n" +
		"migration is in a `from` state (else the refusal names the actual state); a repeated step ID returns\n" +
		"the first result and changes nothing; `abort` only before `cutover`; `source_restored` only after\n" +
		"`target_torn_down` is committed (the machine never runs on two workers).\n")
	return b.String(), nil
}
