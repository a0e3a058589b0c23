package fsm

import (
	"sort"
	"time"
)

// Drain defaults and bounds.
const (
	DefaultDrainParallel = 2   // migrations a drain runs at once
	MaxDrainParallel     = 256 // no drain runs more at once
	MaxDrainAttempts     = 3   // a machine whose migrations rolled back this often is left for the operator
	maxDrainBatch        = 512 // placements one drain_update may carry
	maxDrainTargets      = 4096
	maxDrainReasons      = 100000 // waiting or left entries one drain_update may carry
)

// DrainState is where a drain is.
type DrainState string

const (
	DrainRunning   DrainState = "running"
	DrainComplete  DrainState = "complete"        // no machine is left on the worker
	DrainCancelled DrainState = "cancelled"       // an operator stopped it; running migrations go on
	DrainDeadline  DrainState = "deadline_passed" // the deadline came first: Left says what stayed
)

// Terminal reports whether the drain starts nothing any more.
func (s DrainState) Terminal() bool { return s != DrainRunning }

// Drain is the replicated record of moving every machine off a worker. The
// leader's drainer works from it alone, so a drain goes on across leader
// changes with no client connected.
type Drain struct {
	ID           string     `json:"id"`
	Worker       string     `json:"worker"`
	State        DrainState `json:"state"`
	Deadline     time.Time  `json:"deadline,omitzero"`       // zero: none
	Parallel     int        `json:"parallel"`                // migrations using the source's link at once
	Targets      []string   `json:"targets,omitempty"`       // empty: any worker placement allows
	BandwidthBPS int64      `json:"bandwidth_bps,omitempty"` // budget of the source's link for hydrations; 0: the worker's report, or none
	By           string     `json:"by"`
	CreatedAt    time.Time  `json:"created_at"`
	UpdatedAt    time.Time  `json:"updated_at"`
	FinishedAt   time.Time  `json:"finished_at,omitzero"`
	ModifyIndex  uint64     `json:"modify_index"`

	// Started marks each machine with the migration the drain started for
	// it, in the same raft entry as the plan: a machine marked with an
	// active or completed migration is never started again.
	Started  map[string]string `json:"started,omitempty"`
	Attempts map[string]int    `json:"attempts,omitempty"` // machine -> migrations started (retries after a rollback)
	Waiting  map[string]string `json:"waiting,omitempty"`  // machine -> why placement could not start it yet
	Left     []DrainLeft       `json:"left,omitempty"`     // what stayed on the worker when the drain ended unfinished
}

// DrainStart is one placement the drainer applies: migration ID moves
// machine to target.
type DrainStart struct {
	Machine   string `json:"machine"`
	Target    string `json:"target"`
	Migration string `json:"migration"`
}

// DrainLeft is a machine still on the drained worker when its drain ended,
// and why.
type DrainLeft struct {
	Machine   string `json:"machine"`
	Migration string `json:"migration,omitempty"` // still running, when one is
	Reason    string `json:"reason"`
}

func (d *Drain) clone() *Drain {
	c := *d
	c.Targets = append([]string(nil), d.Targets...)
	c.Started = copyMap(d.Started)
	c.Attempts = copyMap(d.Attempts)
	c.Waiting = copyMap(d.Waiting)
	c.Left = append([]DrainLeft(nil), d.Left...)
	return &c
}

func copyMap[V any](m map[string]V) map[string]V {
	if m == nil {
		return nil
	}
	c := make(map[string]V, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// validate checks a drain update's shape before it is proposed: IDs in the
// store's form, bounded sizes, a known finish.
func (c *DrainUpdateCmd) validate() *Refusal {
	if r := CheckID("drain", c.ID); r != nil {
		return r
	}
	if len(c.Start) > maxDrainBatch || len(c.Waiting) > maxDrainReasons || len(c.Left) > maxDrainReasons {
		return refuse(RefuseInvalid, CodeInvalid, "drain update too large: at most %d placements", maxDrainBatch)
	}
	switch c.Finish {
	case "", DrainComplete, DrainCancelled, DrainDeadline:
	default:
		return refuse(RefuseInvalid, CodeInvalid, "drain cannot finish as %q", c.Finish)
	}
	for _, st := range c.Start {
		for _, id := range [][2]string{{"machine", st.Machine}, {"worker", st.Target}, {"migration", st.Migration}} {
			if r := CheckID(id[0], id[1]); r != nil {
				return r
			}
		}
	}
	for m := range c.Waiting {
		if r := CheckID("machine", m); r != nil {
			return r
		}
	}
	for _, l := range c.Left {
		if r := CheckID("machine", l.Machine); r != nil {
			return r
		}
		if l.Migration != "" {
			if r := CheckID("migration", l.Migration); r != nil {
				return r
			}
		}
	}
	return nil
}

func (s *Store) applyDrain(index uint64, c *DrainCmd) *Result {
	if !c.Actor.privileged() {
		return forbidden(c.Actor, "drain a worker (operator or server certificate needed)")
	}
	if !validID(c.ID) {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "drain id %q is not valid", c.ID)}
	}
	if old, ok := s.d.Drains[c.ID]; ok {
		if old.Worker == c.Worker {
			return &Result{Drain: old.clone(), Duplicate: true}
		}
		return &Result{Refusal: refuse(RefuseConflict, CodeConflict, "drain %s already exists", c.ID)}
	}
	w, ok := s.d.Workers[c.Worker]
	if !ok {
		return &Result{Refusal: notFound("worker", c.Worker)}
	}
	for _, d := range s.d.Drains {
		if d.Worker == c.Worker && d.State == DrainRunning {
			return &Result{Refusal: refuse(RefuseConflict, CodeConflict, "worker %s is already being drained by %s: cancel it first to change its limits", c.Worker, d.ID)}
		}
	}
	if c.Parallel < 0 || c.Parallel > MaxDrainParallel || c.Deadline < 0 || c.BandwidthBPS < 0 {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "drain needs 0..%d parallel migrations, a deadline >= 0 and a bandwidth >= 0", MaxDrainParallel)}
	}
	if len(c.Targets) > maxDrainTargets {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "drain names more than %d targets", maxDrainTargets)}
	}
	for _, t := range c.Targets {
		if t == c.Worker {
			return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "worker %s cannot be a target of its own drain", t)}
		}
		if _, ok := s.d.Workers[t]; !ok {
			return &Result{Refusal: notFound("target worker", t)}
		}
	}
	p := c.Parallel
	if p == 0 {
		p = DefaultDrainParallel
	}
	d := &Drain{ID: c.ID, Worker: c.Worker, State: DrainRunning, Parallel: p, Targets: append([]string(nil), c.Targets...),
		BandwidthBPS: c.BandwidthBPS, By: c.Actor.Name, CreatedAt: c.Now, UpdatedAt: c.Now, ModifyIndex: index}
	if c.Deadline > 0 {
		d.Deadline = c.Now.Add(c.Deadline)
	}
	s.d.Drains[d.ID] = d
	w.Cordoned = true
	w.CordonReason = "drain " + d.ID
	return &Result{Drain: d.clone()}
}

func (s *Store) applyDrainUpdate(index uint64, c *DrainUpdateCmd) *Result {
	d, ok := s.d.Drains[c.ID]
	if !ok {
		return &Result{Refusal: notFound("drain", c.ID)}
	}
	switch {
	case c.Actor.Kind == KindServer:
	case c.Actor.Kind == KindOperator && len(c.Start) == 0 && c.Finish == DrainCancelled:
	default:
		return forbidden(c.Actor, "update drain "+d.ID+" (operators may only cancel it)")
	}
	if d.State.Terminal() {
		if c.Finish == d.State {
			return &Result{Drain: d.clone(), Duplicate: true}
		}
		return &Result{Refusal: refuse(RefuseConflict, CodeWrongState, "drain %s is %s already", d.ID, d.State)}
	}
	if len(c.Start) > maxDrainBatch || len(c.Waiting) > maxDrainReasons || len(c.Left) > maxDrainReasons {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "drain update too large: at most %d placements", maxDrainBatch)}
	}
	switch c.Finish {
	case "", DrainComplete, DrainCancelled, DrainDeadline:
	default:
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "drain cannot finish as %q", c.Finish)}
	}
	if c.Finish != "" && len(c.Start) > 0 {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "a drain update either starts migrations or finishes the drain")}
	}
	if d.Started == nil {
		d.Started = map[string]string{}
	}
	if d.Attempts == nil {
		d.Attempts = map[string]int{}
	}
	if c.Finish == "" {
		// The drainer sends the whole waiting set each time it changes.
		d.Waiting = nil
		for k, v := range c.Waiting {
			if d.Waiting == nil {
				d.Waiting = map[string]string{}
			}
			d.Waiting[k] = truncate(v, 256)
		}
	}
	for _, st := range c.Start {
		if err := s.drainCanStart(d, st); err != "" {
			continue // a stale placement (another entry moved on first): nothing to do
		}
		res := s.applyPlan(index, &PlanCmd{Header: c.Header, ID: st.Migration, Machine: st.Machine, Target: st.Target, StepID: "drain-" + st.Migration})
		if res.Refusal != nil {
			if d.Waiting == nil {
				d.Waiting = map[string]string{}
			}
			d.Waiting[st.Machine] = truncate(res.Refusal.Reason, 256)
			continue
		}
		d.Started[st.Machine] = st.Migration
		d.Attempts[st.Machine]++
		delete(d.Waiting, st.Machine)
	}
	if c.Finish != "" {
		d.Waiting = nil
		d.State = c.Finish
		d.FinishedAt = c.Now
		d.Left = append([]DrainLeft(nil), c.Left...)
		for i := range d.Left {
			d.Left[i].Reason = truncate(d.Left[i].Reason, 256)
		}
		sort.Slice(d.Left, func(i, j int) bool { return d.Left[i].Machine < d.Left[j].Machine })
	}
	d.UpdatedAt = c.Now
	d.ModifyIndex = index
	return &Result{Drain: d.clone()}
}

// drainCanStart says why st must not start ("" when it may): the machine
// must be on the drained worker and not marked with a migration that is
// running or completed.
func (s *Store) drainCanStart(d *Drain, st DrainStart) string {
	mach, ok := s.d.Machines[st.Machine]
	if !ok {
		return "machine not found"
	}
	if mach.Worker != d.Worker {
		return "machine is on " + mach.Worker + ", not on the drained worker"
	}
	if len(d.Targets) > 0 && !contains(d.Targets, st.Target) {
		return "target " + st.Target + " is not one of the drain's targets"
	}
	if _, marked := d.Started[st.Machine]; marked && !s.drainRetryable(d, st.Machine) {
		return "already started by this drain"
	}
	return ""
}

// drainRetryable reports whether a machine the drain started may be
// started again: its migration rolled back and attempts remain.
func (s *Store) drainRetryable(d *Drain, machine string) bool {
	id, ok := d.Started[machine]
	if !ok {
		return true
	}
	m, ok := s.d.Migrations[id]
	if !ok {
		return false // collected: it ended long ago; the machine's worker decides
	}
	return m.State == RolledBack && d.Attempts[machine] < MaxDrainAttempts
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// Drains returns copies of the drains (of worker, or all when empty), newest first.
func (s *Store) Drains(worker string) []*Drain {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := []*Drain{}
	for _, d := range s.d.Drains {
		if worker == "" || d.Worker == worker {
			out = append(out, d.clone())
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.After(out[j].CreatedAt)
		}
		return out[i].ID < out[j].ID
	})
	return out
}

// Drain returns one drain.
func (s *Store) Drain(id string) (*Drain, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	d, ok := s.d.Drains[id]
	if !ok {
		return nil, false
	}
	return d.clone(), true
}

// DrainsIndex is the highest ModifyIndex among the drains (at least 1).
func (s *Store) DrainsIndex() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var idx uint64 = 1
	for _, d := range s.d.Drains {
		idx = max(idx, d.ModifyIndex)
	}
	return idx
}

// ActiveMigrations returns copies of the migrations not yet terminal: what
// the leader's loops look at every second, without the history.
func (s *Store) ActiveMigrations() []*Migration {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*Migration, 0, len(s.idx.active))
	for id := range s.idx.active {
		out = append(out, s.d.Migrations[id].Clone())
	}
	sortMigrations(out)
	return out
}

// StateCounts counts the migrations by state, and the stalled ones,
// without copying them (metrics scrapes with a long history).
func (s *Store) StateCounts() (map[State]int, int) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	counts := map[State]int{}
	stalled := 0
	for _, m := range s.d.Migrations {
		counts[m.State]++
		if m.Stalled {
			stalled++
		}
	}
	return counts, stalled
}
