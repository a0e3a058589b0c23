// Package drain moves every machine off one worker from the operator's
// side: a plan (machine -> target, round robin) and a loop that keeps at
// most Parallel migrations running. It keeps no state of its own: a drain
// started again after a crash counts the migrations already running off the
// worker and skips their machines.
package drain

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

// Client is what a drain needs of the control plane (*api.Client has it).
type Client interface {
	ListWorkers(ctx context.Context) ([]fsm.Worker, error)
	ListMachines(ctx context.Context, worker string) ([]fsm.Machine, error)
	ListMigrations(ctx context.Context, worker string) ([]*fsm.Migration, error)
	CreateMigration(ctx context.Context, p api.PlanRequest) (*fsm.Migration, error)
	GetMigration(ctx context.Context, id string) (*fsm.Migration, error)
}

// ErrNoTarget: no worker other than the source is named or alive.
var ErrNoTarget = errors.New("no target worker: name them with --to or start another agent")

// Job is one machine to move.
type Job struct {
	Machine string `json:"machine"`
	Target  string `json:"target"`
}

// Plan is what a drain will do.
type Plan struct {
	Source   string   `json:"source"`
	Targets  []string `json:"targets"`
	Parallel int      `json:"parallel"`
	Jobs     []Job    `json:"jobs"`
}

// MakePlan assigns each machine of source, in id order, to the targets in
// turn. With no targets it takes every other worker alive at now.
func MakePlan(ctx context.Context, c Client, source string, targets []string, parallel int, now time.Time) (*Plan, error) {
	if parallel < 1 {
		return nil, fmt.Errorf("parallel must be at least 1, not %d", parallel)
	}
	if len(targets) == 0 {
		ws, err := c.ListWorkers(ctx)
		if err != nil {
			return nil, fmt.Errorf("list workers: %w", err)
		}
		for _, w := range ws {
			if w.Name != source && w.Alive(now) {
				targets = append(targets, w.Name)
			}
		}
	}
	if len(targets) == 0 {
		return nil, ErrNoTarget
	}
	ms, err := c.ListMachines(ctx, source)
	if err != nil {
		return nil, fmt.Errorf("list the machines of %s: %w", source, err)
	}
	slices.SortFunc(ms, func(a, b fsm.Machine) int { return strings.Compare(a.ID, b.ID) })
	p := &Plan{Source: source, Targets: targets, Parallel: parallel}
	for _, m := range ms {
		if m.Worker == source {
			p.Jobs = append(p.Jobs, Job{m.ID, targets[len(p.Jobs)%len(targets)]})
		}
	}
	return p, nil
}

// Options tune Run. OnStart and OnEnd, when set, are told of each migration
// started and ended (for the CLI's progress lines).
type Options struct {
	Wait    bool          // keep going until every migration ended (else return once all are started)
	Poll    time.Duration // time between polls; 300ms when zero
	OnStart func(m *fsm.Migration, j Job)
	OnEnd   func(m *fsm.Migration)
}

// Run carries out p and returns the migrations that ended, by id. A refusal
// for a lock or admission puts the job back at the end of the queue (the
// server says "later"); any other refusal stops the drain.
func Run(ctx context.Context, c Client, p *Plan, o Options) (map[string]*fsm.Migration, error) {
	if p.Parallel < 1 {
		return nil, fmt.Errorf("parallel must be at least 1, not %d", p.Parallel)
	}
	poll := o.Poll
	if poll <= 0 {
		poll = 300 * time.Millisecond
	}
	// Resume: migrations already running off this worker count against the limit.
	existing, err := c.ListMigrations(ctx, p.Source)
	if err != nil {
		return nil, fmt.Errorf("list the migrations of %s: %w", p.Source, err)
	}
	var running []string
	started := map[string]bool{}
	for _, m := range existing {
		if m.Source == p.Source && !m.State.Terminal() {
			running = append(running, m.ID)
			started[m.Machine] = true
		}
	}
	jobs := slices.Clone(p.Jobs)
	final := map[string]*fsm.Migration{}
	for len(jobs) > 0 || len(running) > 0 {
		for len(running) < p.Parallel && len(jobs) > 0 {
			j := jobs[0]
			jobs = jobs[1:]
			if started[j.Machine] {
				continue
			}
			m, err := c.CreateMigration(ctx, api.PlanRequest{Machine: j.Machine, Target: j.Target})
			if err != nil {
				if code := api.ErrorCode(err); code == fsm.CodeLocked || code == fsm.CodeAdmission {
					jobs = append(jobs, j)
					break
				}
				return final, fmt.Errorf("migrate %s: %w", j.Machine, err)
			}
			started[j.Machine] = true
			if o.OnStart != nil {
				o.OnStart(m, j)
			}
			running = append(running, m.ID)
		}
		var still []string
		for _, id := range running {
			m, err := c.GetMigration(ctx, id)
			if err != nil {
				return final, fmt.Errorf("follow migration %s: %w", id, err)
			}
			if m.State.Terminal() {
				final[id] = m
				if o.OnEnd != nil {
					o.OnEnd(m)
				}
			} else {
				still = append(still, id)
			}
		}
		running = still
		if !o.Wait && len(jobs) == 0 {
			break
		}
		select {
		case <-ctx.Done():
			return final, ctx.Err()
		case <-time.After(poll):
		}
	}
	return final, nil
}
