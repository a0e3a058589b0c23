package mcp

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

// The servers run drains (as for `ferry drain`): applying a drain plan
// records a drain, the worker is cordoned and the leader starts migrations
// within the limits, going on without this process until the worker is
// empty, the deadline passes or the drain is cancelled. A plan is the
// servers' placement of each machine now (where it would go and why); the
// drain places each machine again when it starts it. drain_status follows
// the record.

// DrainPlanIn asks for a plan of draining a worker.
type DrainPlanIn struct {
	Worker   string   `json:"worker" jsonschema:"the worker to empty"`
	Targets  []string `json:"targets,omitempty" jsonschema:"only move machines to these workers (default: any worker placement allows)"`
	Parallel int      `json:"parallel,omitempty" jsonschema:"migrations off the worker at once (default: the servers')"`
	Deadline string   `json:"deadline,omitempty" jsonschema:"stop starting migrations after this long, like 1h, and report what was left (default: none)"`
}

type drainParams struct {
	Worker   string        `json:"worker"`
	Targets  []string      `json:"targets,omitempty"`
	Parallel int           `json:"parallel,omitempty"`
	Deadline time.Duration `json:"deadline,omitempty"`
	ID       string        `json:"id"` // names the drain, so the plan says what apply records
}

// DrainMove is where the servers' placement puts one machine now.
type DrainMove struct {
	Machine string `json:"machine"`
	Volume  string `json:"volume"`
	Target  string `json:"target"`
}

// DrainWaiting is a machine placement has no target for now, and why.
type DrainWaiting struct {
	Machine string `json:"machine"`
	Reason  string `json:"reason"`
}

// DrainDetails is what a drain plan rests on.
type DrainDetails struct {
	Worker        string         `json:"worker"`
	Drain         string         `json:"drain" jsonschema:"the id the drain will have"`
	Targets       []string       `json:"targets" jsonschema:"the workers the drain may move machines to now"`
	Parallel      int            `json:"parallel,omitempty"`
	Deadline      string         `json:"deadline,omitempty"`
	Moves         []DrainMove    `json:"moves"`
	AlreadyMoving []string       `json:"already_moving" jsonschema:"machines whose migration off the worker is running already"`
	Waiting       []DrainWaiting `json:"waiting" jsonschema:"machines no worker can take now: the drain waits for room and reports them"`
}

func (s *Server) drainPlan(ctx context.Context, in DrainPlanIn) (Plan[DrainDetails], error) {
	if len(in.Targets) > 64 {
		return Plan[DrainDetails]{}, fmt.Errorf("targets: at most 64 workers")
	}
	if in.Parallel < 0 || in.Parallel > fsm.MaxDrainParallel {
		return Plan[DrainDetails]{}, fmt.Errorf("parallel must be 1..%d (or 0 for the servers' default)", fsm.MaxDrainParallel)
	}
	var deadline time.Duration
	if in.Deadline != "" {
		d, err := time.ParseDuration(in.Deadline)
		if err != nil || d <= 0 {
			return Plan[DrainDetails]{}, fmt.Errorf("deadline %q: want a positive duration like 1h", in.Deadline)
		}
		deadline = d
	}
	return makePlan(ctx, s, "drain", drainParams{Worker: in.Worker, Targets: in.Targets, Parallel: in.Parallel, Deadline: deadline,
		ID: api.NewStepID("drain-")}, s.planDrain)
}

func (s *Server) planDrain(ctx context.Context, p drainParams) ([]string, DrainDetails, error) {
	var d DrainDetails
	if _, err := s.c.GetWorker(ctx, p.Worker); err != nil {
		return nil, d, err
	}
	ds, err := s.c.ListDrains(ctx, p.Worker)
	if err != nil {
		return nil, d, err
	}
	for _, dr := range ds {
		if dr.State == fsm.DrainRunning && dr.ID != p.ID {
			return nil, d, fmt.Errorf("worker %s is already being drained by %s: drain_status follows it; drain_cancel_plan stops it", p.Worker, dr.ID)
		}
	}
	now := time.Now()
	var targets []string
	if len(p.Targets) > 0 {
		for _, t := range p.Targets {
			if t == p.Worker {
				return nil, d, fmt.Errorf("target %s is the worker being drained", t)
			}
			w, err := s.c.GetWorker(ctx, t)
			if err != nil {
				return nil, d, err
			}
			if !w.Alive(now) {
				return nil, d, fmt.Errorf("target worker %s has no valid lease (last until %s): is its agent running?", w.Name, w.LeaseExpiry.UTC().Format(time.RFC3339))
			}
			targets = append(targets, w.Name)
		}
	} else {
		ws, err := s.c.ListWorkers(ctx)
		if err != nil {
			return nil, d, err
		}
		for i := range ws {
			if ws[i].Name != p.Worker && ws[i].Alive(now) && !ws[i].Cordoned {
				targets = append(targets, ws[i].Name)
			}
		}
		sort.Strings(targets)
	}
	if len(targets) == 0 {
		return nil, d, fmt.Errorf("no target worker: name them in targets, uncordon one or start another agent")
	}
	migs, err := s.c.ListMigrations(ctx, p.Worker)
	if err != nil {
		return nil, d, err
	}
	moving := map[string]bool{}
	for _, m := range migs {
		if m.Source == p.Worker && !m.State.Terminal() {
			moving[m.Machine] = true
		}
	}
	plan, err := s.c.PlanDrain(ctx, api.DrainRequest{Worker: p.Worker, Targets: p.Targets, Parallel: p.Parallel, Deadline: api.Duration(p.Deadline)})
	if err != nil {
		return nil, d, err
	}
	d = DrainDetails{Worker: p.Worker, Drain: p.ID, Targets: targets, Parallel: p.Parallel, Moves: []DrainMove{}, AlreadyMoving: []string{}, Waiting: []DrainWaiting{}}
	if p.Deadline > 0 {
		d.Deadline = p.Deadline.String()
	}
	changes := []string{fmt.Sprintf("record drain %s of worker %s and cordon it (no new placements on it); the servers run the drain without this session", p.ID, p.Worker)}
	sort.Slice(plan.Placements, func(i, j int) bool { return plan.Placements[i].Machine < plan.Placements[j].Machine })
	for _, pl := range plan.Placements {
		if moving[pl.Machine] {
			d.AlreadyMoving = append(d.AlreadyMoving, pl.Machine)
			continue
		}
		d.Moves = append(d.Moves, DrainMove{Machine: pl.Machine, Volume: pl.Volume, Target: pl.Target})
		changes = append(changes, fmt.Sprintf("migrate machine %s (volume %s, %s) to %s: %s", pl.Machine, pl.Volume, humanBytes(pl.Bytes), pl.Target, pl.Reason))
	}
	sort.Slice(plan.Unplaced, func(i, j int) bool { return plan.Unplaced[i].Machine < plan.Unplaced[j].Machine })
	for _, u := range plan.Unplaced {
		if moving[u.Machine] {
			d.AlreadyMoving = append(d.AlreadyMoving, u.Machine)
			continue
		}
		d.Waiting = append(d.Waiting, DrainWaiting{Machine: u.Machine, Reason: u.Reason})
		changes = append(changes, fmt.Sprintf("machine %s waits: %s", u.Machine, u.Reason))
	}
	sort.Strings(d.AlreadyMoving)
	if len(d.Moves) == 0 && len(d.Waiting) == 0 {
		if len(d.AlreadyMoving) > 0 {
			return nil, d, fmt.Errorf("nothing new to drain on %s: %d machines are already moving (drain_status follows them)", p.Worker, len(d.AlreadyMoving))
		}
		return nil, d, fmt.Errorf("nothing to drain: worker %s runs no machine", p.Worker)
	}
	par := fmt.Sprintf("at most %d", fsm.DefaultDrainParallel)
	if p.Parallel > 0 {
		par = fmt.Sprintf("at most %d", p.Parallel)
	}
	changes = append(changes, fmt.Sprintf("the drain starts %s migrations off %s at a time, within each worker's slots, free space and the source's bandwidth; each is placed again when it starts; the rest wait, with their reasons in drain_status", par, p.Worker))
	if p.Deadline > 0 {
		changes = append(changes, fmt.Sprintf("after %s the drain stops starting migrations and reports what was left (running ones go on)", p.Deadline))
	}
	return changes, d, nil
}

// DrainLeft is a machine still on the worker when its drain ended, and why.
type DrainLeft struct {
	Machine   string `json:"machine"`
	Migration string `json:"migration,omitempty" jsonschema:"its migration, still running"`
	Reason    string `json:"reason"`
}

// Drain is a drain record as the tools show it.
type Drain struct {
	ID         string            `json:"id"`
	Worker     string            `json:"worker"`
	State      string            `json:"state" jsonschema:"running, complete, cancelled or deadline_passed"`
	Parallel   int               `json:"parallel"`
	Targets    []string          `json:"targets,omitempty"`
	Deadline   *time.Time        `json:"deadline,omitempty"`
	CreatedAt  time.Time         `json:"created_at"`
	FinishedAt *time.Time        `json:"finished_at,omitempty"`
	Started    map[string]string `json:"started" jsonschema:"machine -> the migration the drain started for it"`
	Waiting    map[string]string `json:"waiting" jsonschema:"machine -> why the drain cannot start it yet"`
	Left       []DrainLeft       `json:"left,omitempty" jsonschema:"what stayed on the worker when the drain ended unfinished"`
}

func drainOut(d *fsm.Drain) *Drain {
	if d == nil {
		return nil
	}
	o := &Drain{ID: d.ID, Worker: d.Worker, State: string(d.State), Parallel: d.Parallel, Targets: d.Targets, CreatedAt: d.CreatedAt,
		Started: map[string]string{}, Waiting: map[string]string{}}
	if !d.Deadline.IsZero() {
		t := d.Deadline
		o.Deadline = &t
	}
	if !d.FinishedAt.IsZero() {
		t := d.FinishedAt
		o.FinishedAt = &t
	}
	for k, v := range d.Started {
		o.Started[k] = v
	}
	for k, v := range d.Waiting {
		o.Waiting[k] = v
	}
	for _, l := range d.Left {
		o.Left = append(o.Left, DrainLeft(l))
	}
	return o
}

// drainRecord returns the worker's running drain, else its newest one (nil
// when it was never drained).
func (s *Server) drainRecord(ctx context.Context, worker string) (*Drain, error) {
	ds, err := s.c.ListDrains(ctx, worker)
	if err != nil {
		return nil, err
	}
	var cur *fsm.Drain
	for _, d := range ds {
		if d.State == fsm.DrainRunning {
			return drainOut(d), nil
		}
		if cur == nil || d.CreatedAt.After(cur.CreatedAt) {
			cur = d
		}
	}
	return drainOut(cur), nil
}

// DrainApplyOut is the drain a drain apply recorded.
type DrainApplyOut struct {
	Drain *Drain `json:"drain"`
	Note  string `json:"note"`
}

func (s *Server) drainApply(ctx context.Context, in ApplyIn) (DrainApplyOut, error) {
	p, _, err := checkPlan(ctx, s, "drain", in.PlanToken, s.planDrain)
	if err != nil {
		return DrainApplyOut{}, err
	}
	d, err := s.c.Drain(ctx, api.DrainRequest{ID: p.ID, Worker: p.Worker, Targets: p.Targets, Parallel: p.Parallel, Deadline: api.Duration(p.Deadline)})
	if err != nil {
		return DrainApplyOut{}, err
	}
	return DrainApplyOut{Drain: drainOut(d), Note: fmt.Sprintf("the servers run drain %s without this session: drain_status shows what it started and why the rest wait", d.ID)}, nil
}

// DrainCancelPlanIn asks for a plan of cancelling a worker's running drain.
type DrainCancelPlanIn struct {
	Worker string `json:"worker"`
}

type drainCancelParams struct {
	Worker string `json:"worker"`
}

// DrainCancelDetails is the drain a cancel would stop.
type DrainCancelDetails struct {
	Drain   string   `json:"drain"`
	Running []string `json:"running" jsonschema:"migrations the drain started that are still running: they go on"`
}

// signed: the cancel stays valid while the drain's migrations finish; only
// another drain makes the plan stale.
func (d DrainCancelDetails) signed() any { return struct{ Drain string }{d.Drain} }

func (s *Server) drainCancelPlan(ctx context.Context, in DrainCancelPlanIn) (Plan[DrainCancelDetails], error) {
	return makePlan(ctx, s, "drain_cancel", drainCancelParams(in), s.planDrainCancel)
}

func (s *Server) planDrainCancel(ctx context.Context, p drainCancelParams) ([]string, DrainCancelDetails, error) {
	var d DrainCancelDetails
	ds, err := s.c.ListDrains(ctx, p.Worker)
	if err != nil {
		return nil, d, err
	}
	var run *fsm.Drain
	for _, dr := range ds {
		if dr.State == fsm.DrainRunning {
			run = dr
		}
	}
	if run == nil {
		return nil, d, fmt.Errorf("worker %s has no running drain", p.Worker)
	}
	d = DrainCancelDetails{Drain: run.ID, Running: []string{}}
	for _, id := range run.Started {
		if m, err := s.c.GetMigration(ctx, id); err == nil && m.Active() {
			d.Running = append(d.Running, id)
		}
	}
	sort.Strings(d.Running)
	return []string{
		fmt.Sprintf("cancel drain %s of worker %s: no further migration starts", run.ID, p.Worker),
		fmt.Sprintf("the %d migrations it started that are still running go on (migration_abort_plan stops one before cutover)", len(d.Running)),
		fmt.Sprintf("worker %s stays cordoned", p.Worker),
	}, d, nil
}

func (s *Server) drainCancelApply(ctx context.Context, in ApplyIn) (Drain, error) {
	p, _, err := checkPlan(ctx, s, "drain_cancel", in.PlanToken, s.planDrainCancel)
	if err != nil {
		return Drain{}, err
	}
	d, err := s.c.CancelDrain(ctx, p.Worker)
	if err != nil {
		return Drain{}, err
	}
	return *drainOut(d), nil
}
