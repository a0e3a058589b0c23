package fsm

import "slices"

// Every set of states is derived from Transitions, once, here.

// AllStates lists every state in the order the table first names it: the
// forward path, then the rollback path.
var AllStates = allStates()

// sets holds every state set, derived once from Transitions.
var sets = deriveSets()

type stateSets struct {
	terminal, before, after, serves map[State]bool
	actors                          map[State][]Role
	duties                          map[State][]Transition
}

func allStates() []State {
	var out []State
	add := func(s State) {
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	for _, t := range Transitions {
		for _, f := range t.From {
			add(f)
		}
		add(t.To)
	}
	return out
}

func deriveSets() stateSets {
	d := stateSets{terminal: map[State]bool{}, before: map[State]bool{}, after: map[State]bool{},
		serves: map[State]bool{}, actors: map[State][]Role{}, duties: map[State][]Transition{}}
	for _, s := range allStates() {
		d.terminal[s] = true
	}
	for _, t := range Transitions {
		for _, f := range t.From {
			d.terminal[f] = false // a row leaves it
			if t.Kind != Duty {
				continue
			}
			d.duties[f] = append(d.duties[f], t)
			for _, r := range t.Roles {
				if !slices.Contains(d.actors[f], r) {
					d.actors[f] = append(d.actors[f], r)
				}
			}
		}
	}
	abort, _ := Lookup(EvAbort)
	for _, s := range abort.From {
		d.before[s] = true
	}
	// The target may write from cutover on, and every state after it.
	d.after = reachable(Cutover, func(Transition) bool { return true })
	// The source serves the frozen volume from the state exported enters
	// until the target has every region (hydrated): the forward steps between.
	d.serves = reachable(forwardSince(EvExported, EvHydrated))
	return d
}

// forwardSince is the state event enters and the states the duty rows lead
// to from there, up to (not including) the state until enters.
func forwardSince(event, until Event) (State, func(Transition) bool) {
	t, _ := Lookup(event)
	return t.To, func(t Transition) bool { return t.Kind == Duty && t.Event != until }
}

// inOrder lists the members of set in AllStates order.
func inOrder(set map[State]bool) []State {
	var out []State
	for _, s := range allStates() {
		if set[s] {
			out = append(out, s)
		}
	}
	return out
}

// progressStates: the target reports hydration progress from exported until
// the source releases its volume (hydrated included: the last report).
// exportStates are where the source serves its export (and may move it).
func exportStates() []State { return inOrder(reachable(forwardSince(EvExported, EvHydrated))) }

// earlyExportStates are where the source may publish an export it started
// early: from the migration's first state until exported records it.
func earlyExportStates() []State {
	first, _ := Lookup(EvTargetPrepared)
	return inOrder(reachable(first.From[0], func(t Transition) bool { return t.Kind == Duty && t.Event != EvExported }))
}

func progressStates() []State { return inOrder(reachable(forwardSince(EvExported, EvSourceReleased))) }

// reachable is from and every state reachable from it over the rows follow accepts.
func reachable(from State, follow func(Transition) bool) map[State]bool {
	seen := map[State]bool{from: true}
	for queue := []State{from}; len(queue) > 0; queue = queue[1:] {
		for _, t := range Transitions {
			if follow(t) && slices.Contains(t.From, queue[0]) && !seen[t.To] {
				seen[t.To] = true
				queue = append(queue, t.To)
			}
		}
	}
	return seen
}

func nonTerminal() []State {
	var out []State
	for _, s := range AllStates {
		if !s.Terminal() {
			out = append(out, s)
		}
	}
	return out
}

// Terminal reports whether no row of the table leaves s.
func (s State) Terminal() bool { return sets.terminal[s] }

// BeforeCutover reports whether s is before the point of no return, where an
// abort is still allowed: the From states of the abort row.
func (s State) BeforeCutover() bool { return sets.before[s] }

// AfterCutover reports whether the target may be writing: cutover and every
// state reachable from it.
func (s State) AfterCutover() bool { return sets.after[s] }

// ServesExport reports whether the source serves its export in s, so the
// target may read it: from exported until the target reports hydrated.
func (s State) ServesExport() bool { return sets.serves[s] }

// Actors returns the roles that must act in s: the roles of the Duty rows
// leaving it, in table order.
func (s State) Actors() []Role { return slices.Clone(sets.actors[s]) }

// Duties returns the Duty rows leaving s: what someone must do there.
func Duties(s State) []Transition { return slices.Clone(sets.duties[s]) }
