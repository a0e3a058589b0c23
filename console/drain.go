package console

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

// A drain moves every machine off a worker. The servers do not record
// drains (`ferry drain` is a client-side loop), so the console runs no loop
// either: each apply plans the migrations the servers admit now and lists
// the rest as waiting, in the servers' words; applying again (or `ferry
// drain`) continues, skipping machines already on the move.

// drainJob is one machine of a drain plan.
type drainJob struct {
	Machine   string
	Target    string
	Migration string // an active migration already moving it
}

// drainPlan is what draining a worker would do now.
type drainPlan struct {
	Worker   string
	Alive    bool
	Targets  []string
	Jobs     []drainJob
	Moving   []migrationView // active migrations off the worker
	Problems []string
}

// planDrain assigns the worker's machines round-robin to every other live
// worker, as `ferry drain` does.
func (c *Console) planDrain(ctx context.Context, name string) (drainPlan, error) {
	p := drainPlan{Worker: name}
	now := time.Now()
	w, err := c.client.GetWorker(ctx, name)
	if err != nil {
		return p, err
	}
	p.Alive = w.Alive(now)
	ws, err := c.client.ListWorkers(ctx)
	if err != nil {
		return p, err
	}
	for _, o := range ws {
		if o.Name != name && o.Alive(now) {
			p.Targets = append(p.Targets, o.Name)
		}
	}
	sort.Strings(p.Targets)
	ms, err := c.client.ListMigrations(ctx, name)
	if err != nil {
		return p, err
	}
	moving := map[string]string{}
	var active []*fsm.Migration
	for _, m := range ms {
		if m.Source == name && m.Active() {
			moving[m.Machine] = m.ID
			active = append(active, m)
		}
	}
	p.Moving = viewMigrations(active, now)
	machines, err := c.client.ListMachines(ctx, name)
	if err != nil {
		return p, err
	}
	sort.Slice(machines, func(i, j int) bool { return machines[i].ID < machines[j].ID })
	i := 0
	for _, m := range machines {
		if m.Worker != name {
			continue
		}
		j := drainJob{Machine: m.ID, Migration: moving[m.ID]}
		if j.Migration == "" && len(p.Targets) > 0 {
			j.Target = p.Targets[i%len(p.Targets)]
			i++
		}
		p.Jobs = append(p.Jobs, j)
	}
	if len(p.Targets) == 0 {
		p.Problems = append(p.Problems, "no other worker has a valid lease: there is nowhere to move the machines")
	}
	return p, nil
}

func (c *Console) drainPlanPage(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	p, err := c.planDrain(ctx, name)
	if err != nil {
		c.apiFailure(w, "worker "+name, err)
		return
	}
	c.render(w, http.StatusOK, "drain", map[string]any{"Plan": p})
}

// drainOutcome is what one apply did for one machine.
type drainOutcome struct {
	Machine, Target, Migration string
	Waiting                    bool       // admission or a lock said later
	Refusal                    *api.Error // the servers' words
	Err                        string
}

func (c *Console) drainApply(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	ctx, cancel := context.WithTimeout(r.Context(), 30*time.Second)
	defer cancel()
	p, err := c.planDrain(ctx, name)
	if err != nil {
		c.apiFailure(w, "worker "+name, err)
		return
	}
	if typed := strings.TrimSpace(r.PostForm.Get("confirm")); typed != name {
		c.render(w, http.StatusUnprocessableEntity, "drain", map[string]any{"Plan": p, "Typed": typed,
			"Problem": fmt.Sprintf("Nothing was sent: the confirmation %q is not the worker's name. Type %s exactly to drain it.", typed, name)})
		return
	}
	var out []drainOutcome
	full := false // once admission refuses, the rest wait without asking
	for _, j := range p.Jobs {
		if j.Migration != "" || j.Target == "" {
			continue
		}
		o := drainOutcome{Machine: j.Machine, Target: j.Target}
		if full {
			o.Waiting = true
			out = append(out, o)
			continue
		}
		m, err := c.client.CreateMigration(ctx, api.PlanRequest{Machine: j.Machine, Target: j.Target})
		var e *api.Error
		switch {
		case err == nil:
			o.Migration = m.ID
		case errors.As(err, &e) && (e.Code == fsm.CodeAdmission || e.Code == fsm.CodeLocked):
			o.Waiting, o.Refusal = true, e
			full = e.Code == fsm.CodeAdmission
		case errors.As(err, &e):
			o.Refusal = e
		default:
			o.Err = err.Error()
		}
		out = append(out, o)
	}
	c.log.Info().Str("worker", name).Int("planned", countStarted(out)).Int("considered", len(out)).Msg("drain applied")
	c.render(w, http.StatusOK, "drained", map[string]any{"Worker": name, "Outcomes": out,
		"Started": countStarted(out), "Waiting": slices.ContainsFunc(out, func(o drainOutcome) bool { return o.Waiting })})
}

func countStarted(out []drainOutcome) int {
	n := 0
	for _, o := range out {
		if o.Migration != "" {
			n++
		}
	}
	return n
}

func (c *Console) drainEvents(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	c.stream(w, r, func(ctx context.Context, idx uint64) ([]byte, uint64, error) {
		ms, next, err := c.client.WatchMigrations(ctx, name, idx)
		if err != nil {
			return nil, 0, err
		}
		var off []*fsm.Migration
		for _, m := range ms {
			if m.Source == name {
				off = append(off, m)
			}
		}
		html, err := c.fragment("migrations", viewMigrations(off, time.Now()))
		return html, next, err
	})
}
