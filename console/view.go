package console

import (
	"fmt"
	"html/template"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// paths are the two lines a migration's stepper draws, derived from
// fsm.Transitions so a new state shows up without touching the console.
type paths struct {
	Forward  []fsm.State // from the state no row leads to, to the end of the forward line
	Rollback []fsm.State // from where the branch rows (abort, failed) lead, to its end
}

var statePaths = derivePaths(fsm.Transitions)

// derivePaths follows, from a state, the one row that leaves only that state
// for another; rows leaving several states at once are the branch-offs
// (abort, failed) and start the rollback line.
func derivePaths(table []fsm.Transition) paths {
	incoming := map[fsm.State]bool{}
	var states []fsm.State
	seen := map[fsm.State]bool{}
	add := func(s fsm.State) {
		if !seen[s] {
			seen[s] = true
			states = append(states, s)
		}
	}
	var branchTo []fsm.State
	for _, t := range table {
		for _, f := range t.From {
			add(f)
			if f != t.To {
				incoming[t.To] = true
			}
		}
		add(t.To)
		if len(t.From) > 1 && !slices.Contains(branchTo, t.To) {
			branchTo = append(branchTo, t.To)
		}
	}
	follow := func(s fsm.State) []fsm.State {
		line := []fsm.State{s}
		for len(line) <= len(states) {
			var next []fsm.State
			for _, t := range table {
				if len(t.From) == 1 && t.From[0] == s && t.To != s {
					next = append(next, t.To)
				}
			}
			if len(next) != 1 || slices.Contains(line, next[0]) {
				break
			}
			s = next[0]
			line = append(line, s)
		}
		return line
	}
	var p paths
	for _, s := range states {
		if !incoming[s] {
			p.Forward = follow(s)
			break
		}
	}
	if len(branchTo) > 0 {
		p.Rollback = follow(branchTo[0])
	}
	return p
}

// abortableFrom are the states an operator abort is accepted in: the From of
// the abort row.
func abortableFrom() []fsm.State {
	if t, ok := fsm.Lookup(fsm.EvAbort); ok {
		return t.From
	}
	return nil
}

// step is one state on a stepper.
type step struct {
	State  fsm.State
	Status string // done, current, todo
	At     time.Time
}

// stepper draws m's position: the forward line, or the forward line up to
// where the rollback began followed by the rollback line.
func stepper(m *fsm.Migration) []step {
	var line []fsm.State
	if slices.Contains(statePaths.Rollback, m.State) {
		for _, s := range statePaths.Forward {
			if m.Rollback == nil {
				break
			}
			line = append(line, s)
			if s == m.Rollback.From {
				break
			}
		}
		line = append(line, statePaths.Rollback...)
	} else {
		line = statePaths.Forward
	}
	cur := slices.Index(line, m.State)
	out := make([]step, len(line))
	for i, s := range line {
		st := step{State: s, Status: "todo", At: m.EnteredAt[s]}
		switch {
		case i < cur:
			st.Status = "done"
		case i == cur && m.State.Terminal():
			st.Status = "done"
		case i == cur:
			st.Status = "current"
		}
		out[i] = st
	}
	return out
}

// migrationView is what the templates show of a migration.
type migrationView struct {
	M         *fsm.Migration
	Steps     []step
	Downtime  time.Duration
	HasDown   bool
	Abortable bool
	Age       time.Duration
}

func viewMigration(m *fsm.Migration, now time.Time) migrationView {
	d, ok := m.Downtime()
	return migrationView{M: m, Steps: stepper(m), Downtime: d, HasDown: ok,
		Abortable: slices.Contains(abortableFrom(), m.State), Age: now.Sub(m.CreatedAt)}
}

// viewMigrations sorts active migrations first, newest first within each group.
func viewMigrations(ms []*fsm.Migration, now time.Time) []migrationView {
	ms = slices.Clone(ms)
	sort.SliceStable(ms, func(i, j int) bool {
		if ms[i].Active() != ms[j].Active() {
			return ms[i].Active()
		}
		if !ms[i].CreatedAt.Equal(ms[j].CreatedAt) {
			return ms[i].CreatedAt.After(ms[j].CreatedAt)
		}
		return ms[i].ID < ms[j].ID
	})
	out := make([]migrationView, len(ms))
	for i, m := range ms {
		out[i] = viewMigration(m, now)
	}
	return out
}

// timelineEntry is one line of a migration's history.
type timelineEntry struct {
	At    time.Time
	What  string
	Who   string
	Index uint64
}

// timeline merges what the record carries: when each state was committed,
// the applied step IDs (raft index, event, result, refusal), who was handed
// the key, and who rolled it back. The records name the proposer of a
// rollback only; for the other states the table's roles say who may have
// proposed the row leading there, which is exact when one role may.
func timeline(m *fsm.Migration) (states []timelineEntry, steps []fsm.StepResult, keys []fsm.KeyAccess) {
	for s, t := range m.EnteredAt {
		e := timelineEntry{At: t, What: string(s), Who: proposers(m, s)}
		if s == fsm.RollingBack && m.Rollback != nil {
			e.Who = m.Rollback.By
			e.What += " (from " + string(m.Rollback.From) + ": " + m.Rollback.Reason + ")"
		}
		states = append(states, e)
	}
	sort.Slice(states, func(i, j int) bool { return states[i].At.Before(states[j].At) })
	steps = slices.Clone(m.Steps)
	sort.SliceStable(steps, func(i, j int) bool { return steps[i].Index < steps[j].Index })
	return states, steps, m.KeyAccess
}

// proposers names who may propose the rows entering s, from the table, with
// the migration's workers for the source and target roles.
func proposers(m *fsm.Migration, s fsm.State) string {
	var who []string
	for _, t := range fsm.Transitions {
		if t.To != s || slices.Contains(t.From, s) {
			continue
		}
		for _, r := range t.Roles {
			name := string(r)
			switch r {
			case fsm.RoleSource:
				name = "source " + m.Source
			case fsm.RoleTarget:
				name = "target " + m.Target
			}
			if !slices.Contains(who, name) {
				who = append(who, name)
			}
		}
	}
	return strings.Join(who, " or ")
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for x := n / unit; x >= unit; x /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func humanDuration(d time.Duration) string {
	switch {
	case d <= 0:
		return "0s"
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	case d < time.Hour:
		return d.Round(time.Second).String()
	}
	return d.Round(time.Minute).String()
}

var funcs = template.FuncMap{
	"bytes": humanBytes,
	"dur":   humanDuration,
	"secs":  func(s int64) string { return humanDuration(time.Duration(s) * time.Second) },
	"rate": func(bps int64) string {
		if bps <= 0 {
			return "–"
		}
		return humanBytes(bps) + "/s"
	},
	"when": func(t time.Time) string {
		if t.IsZero() {
			return "–"
		}
		return t.UTC().Format("2006-01-02 15:04:05.000Z")
	},
	"iso":   func(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) },
	"pct":   func(p *fsm.Progress) string { return fmt.Sprintf("%.1f", p.Percent()) },
	"words": func(s fsm.State) string { return strings.ReplaceAll(string(s), "_", " ") },
	"join": func(ss []fsm.State) string {
		out := make([]string, len(ss))
		for i, s := range ss {
			out[i] = string(s)
		}
		return strings.Join(out, ", ")
	},
}
