package mcp

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

// The servers have no drain of their own: `ferry drain` is a client loop
// that proposes one migration per machine, a few at a time. Here a drain
// plan is the list of migrations that loop would propose, and applying it
// proposes them all once; the servers' admission limits defer the excess,
// which the reply lists so the agent plans and applies again after the
// running ones end (drain_status shows them).

// DrainPlanIn asks for a plan of draining a worker.
type DrainPlanIn struct {
	Worker  string   `json:"worker" jsonschema:"the worker to empty"`
	Targets []string `json:"targets,omitempty" jsonschema:"workers to move machines to, round-robin (default: every other live worker)"`
}

type drainParams struct {
	Worker  string   `json:"worker"`
	Targets []string `json:"targets,omitempty"`
	Batch   string   `json:"batch"` // names the migrations, so the plan says what apply creates
}

// DrainMove is one migration a drain proposes.
type DrainMove struct {
	Machine   string `json:"machine"`
	Target    string `json:"target"`
	Migration string `json:"migration" jsonschema:"the id the migration will have"`
}

// DrainDetails is what a drain plan rests on.
type DrainDetails struct {
	Worker        string      `json:"worker"`
	Targets       []string    `json:"targets"`
	Moves         []DrainMove `json:"moves"`
	AlreadyMoving []string    `json:"already_moving" jsonschema:"machines whose migration off the worker is running already"`
	Skipped       []string    `json:"skipped" jsonschema:"machines that cannot move, and why"`
}

func (s *Server) drainPlan(ctx context.Context, in DrainPlanIn) (Plan[DrainDetails], error) {
	if len(in.Targets) > 64 {
		return Plan[DrainDetails]{}, fmt.Errorf("targets: at most 64 workers")
	}
	return makePlan(ctx, s, "drain", drainParams{Worker: in.Worker, Targets: in.Targets, Batch: api.NewStepID("")[:8]}, s.planDrain)
}

func drainMigrationID(batch, machine string) string {
	id := "drain-" + batch + "-" + machine
	if len(id) > 128 {
		id = id[:128]
	}
	return id
}

func (s *Server) planDrain(ctx context.Context, p drainParams) ([]string, DrainDetails, error) {
	var d DrainDetails
	if _, err := s.c.GetWorker(ctx, p.Worker); err != nil {
		return nil, d, err
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
			if ws[i].Name != p.Worker && ws[i].Alive(now) {
				targets = append(targets, ws[i].Name)
			}
		}
		sort.Strings(targets)
	}
	if len(targets) == 0 {
		return nil, d, fmt.Errorf("no target worker: name them in targets or start another agent")
	}
	ms, err := s.c.ListMachines(ctx, p.Worker)
	if err != nil {
		return nil, d, err
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].ID < ms[j].ID })
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
	d = DrainDetails{Worker: p.Worker, Targets: targets, Moves: []DrainMove{}, AlreadyMoving: []string{}, Skipped: []string{}}
	changes := []string{}
	for _, m := range ms {
		switch {
		case m.Worker != p.Worker:
			continue
		case moving[m.ID]:
			d.AlreadyMoving = append(d.AlreadyMoving, m.ID)
		case m.Volume == "":
			d.Skipped = append(d.Skipped, fmt.Sprintf("machine %s has no volume to migrate", m.ID))
		default:
			mv := DrainMove{Machine: m.ID, Target: targets[len(d.Moves)%len(targets)], Migration: drainMigrationID(p.Batch, m.ID)}
			d.Moves = append(d.Moves, mv)
			changes = append(changes, fmt.Sprintf("start migration %s: machine %s (volume %s) from %s to %s", mv.Migration, m.ID, m.Volume, p.Worker, mv.Target))
		}
	}
	if len(d.Moves) == 0 {
		if len(d.AlreadyMoving) > 0 {
			return nil, d, fmt.Errorf("nothing new to drain on %s: %d machines are already moving (drain_status follows them)", p.Worker, len(d.AlreadyMoving))
		}
		return nil, d, fmt.Errorf("nothing to drain: worker %s runs no machine with a volume", p.Worker)
	}
	changes = append(changes, fmt.Sprintf("each migration as migration_plan describes it; the servers admit %d per worker at a time by default and the rest are reported as deferred", fsm.DefaultMigrationsPerWorker))
	return changes, d, nil
}

// DrainRefusal is a move the servers did not start, in their words.
type DrainRefusal struct {
	Machine string `json:"machine"`
	Target  string `json:"target"`
	Reason  string `json:"reason"`
}

// DrainApplyOut is what a drain apply started and what it could not.
type DrainApplyOut struct {
	Started  []Migration    `json:"started"`
	Deferred []DrainRefusal `json:"deferred" jsonschema:"refused for now by admission limits or locks: plan and apply again after running migrations end"`
	Failed   []DrainRefusal `json:"failed" jsonschema:"refused for another reason"`
}

func (s *Server) drainApply(ctx context.Context, in ApplyIn) (DrainApplyOut, error) {
	out := DrainApplyOut{Started: []Migration{}, Deferred: []DrainRefusal{}, Failed: []DrainRefusal{}}
	_, d, err := checkPlan(ctx, s, "drain", in.PlanToken, s.planDrain)
	if err != nil {
		return out, err
	}
	for _, mv := range d.Moves {
		m, err := s.c.CreateMigration(ctx, api.PlanRequest{ID: mv.Migration, Machine: mv.Machine, Target: mv.Target})
		if err != nil {
			r := DrainRefusal{Machine: mv.Machine, Target: mv.Target, Reason: err.Error()}
			if c := api.ErrorCode(err); c == fsm.CodeAdmission || c == fsm.CodeLocked {
				out.Deferred = append(out.Deferred, r)
			} else {
				out.Failed = append(out.Failed, r)
			}
			continue
		}
		out.Started = append(out.Started, migrationOut(m))
	}
	return out, nil
}
