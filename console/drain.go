package console

import (
	"context"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

// A drain moves every machine off a worker, and the servers run it: the
// plan page shows where their placement would put each machine and why,
// applying records the drain as `ferry drain` does (the worker is cordoned
// and the leader starts migrations within the limits, going on without the
// console), and the page follows the drain's record live until it ends or
// is cancelled.

// drainJob is one machine of a drain plan.
type drainJob struct {
	Machine   string
	Target    string // where placement would put it now ("": nowhere)
	Reason    string // why that target, or why none: the servers' words
	Migration string // an active migration already moving it
}

// drainPlan is what draining a worker would do now.
type drainPlan struct {
	Worker   string
	Alive    bool
	Cordoned bool
	Jobs     []drainJob
	Live     drainLive
	Problems []string
}

// drainLive is the part of the drain page that follows the servers.
type drainLive struct {
	Worker string
	Drain  *drainView      // the running drain, else the newest ended one; nil when none
	Moving []migrationView // migrations off the worker
}

// drainView is a drain record as the page shows it.
type drainView struct {
	D       *fsm.Drain
	Running bool
	Started int           // machines the drain started a migration for
	Waiting []drainReason // machines it cannot start yet, and why
}

type drainReason struct{ Machine, Reason string }

func viewDrain(d *fsm.Drain) *drainView {
	if d == nil {
		return nil
	}
	v := &drainView{D: d, Running: d.State == fsm.DrainRunning, Started: len(d.Started)}
	for m, r := range d.Waiting {
		v.Waiting = append(v.Waiting, drainReason{m, r})
	}
	sort.Slice(v.Waiting, func(i, j int) bool { return v.Waiting[i].Machine < v.Waiting[j].Machine })
	return v
}

// currentDrain picks the running drain of the list, else the newest.
func currentDrain(ds []*fsm.Drain) *fsm.Drain {
	var cur *fsm.Drain
	for _, d := range ds {
		switch {
		case d.State == fsm.DrainRunning:
			return d
		case cur == nil || d.CreatedAt.After(cur.CreatedAt):
			cur = d
		}
	}
	return cur
}

// drainState reads the worker's drain and the migrations off it.
func (c *Console) drainState(ctx context.Context, name string) (drainLive, uint64, error) {
	l := drainLive{Worker: name}
	ds, di, err := c.client.WatchDrains(ctx, name, 0, 0)
	if err != nil {
		return l, 0, err
	}
	l.Drain = viewDrain(currentDrain(ds))
	ms, mi, err := c.client.WatchMigrations(ctx, name, 0)
	if err != nil {
		return l, 0, err
	}
	var off []*fsm.Migration
	for _, m := range ms {
		if m.Source == name {
			off = append(off, m)
		}
	}
	l.Moving = viewMigrations(off, time.Now())
	return l, max(di, mi), nil
}

// planDrain asks the servers' placement where each machine of the worker
// would go now (the same plan as `ferry drain --plan`).
func (c *Console) planDrain(ctx context.Context, name string) (drainPlan, error) {
	p := drainPlan{Worker: name}
	w, err := c.client.GetWorker(ctx, name)
	if err != nil {
		return p, err
	}
	p.Alive, p.Cordoned = w.Alive(time.Now()), w.Cordoned
	if p.Live, _, err = c.drainState(ctx, name); err != nil {
		return p, err
	}
	moving := map[string]string{}
	for _, v := range p.Live.Moving {
		if v.M.Active() {
			moving[v.M.Machine] = v.M.ID
		}
	}
	plan, err := c.client.PlanDrain(ctx, api.DrainRequest{Worker: name})
	if err != nil {
		return p, err
	}
	for _, pl := range plan.Placements {
		p.Jobs = append(p.Jobs, drainJob{Machine: pl.Machine, Target: pl.Target, Reason: pl.Reason, Migration: moving[pl.Machine]})
	}
	for _, u := range plan.Unplaced {
		p.Jobs = append(p.Jobs, drainJob{Machine: u.Machine, Reason: u.Reason, Migration: moving[u.Machine]})
	}
	sort.Slice(p.Jobs, func(i, j int) bool { return p.Jobs[i].Machine < p.Jobs[j].Machine })
	if len(plan.Unplaced) > 0 {
		p.Problems = append(p.Problems, "placement has no target for some machines now (the reason is beside each): the drain waits for room and reports them")
	}
	if d := p.Live.Drain; d != nil && d.Running {
		p.Problems = append(p.Problems, "a drain of this worker is running already ("+d.D.ID+"): the servers refuse a second one; cancel it below or wait for it to end")
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

// drainApply records a drain once the worker's name was typed; with
// cancel=1 it cancels the running one instead (migrations already running
// go on, the worker stays cordoned).
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
			"Problem": fmt.Sprintf("Nothing was sent: the confirmation %q is not the worker's name. Type %s exactly to %s it.", typed, name, drainVerb(r))})
		return
	}
	var d *fsm.Drain
	if r.PostForm.Get("cancel") != "" {
		d, err = c.client.CancelDrain(ctx, name)
	} else {
		d, err = c.client.Drain(ctx, api.DrainRequest{Worker: name})
	}
	if err != nil {
		c.apiFailure(w, "drain of "+name, err)
		return
	}
	c.log.Info().Str("worker", name).Str("drain", d.ID).Str("state", string(d.State)).Str("action", drainVerb(r)).Msg("drain recorded")
	live, _, err := c.drainState(ctx, name)
	if err != nil {
		live = drainLive{Worker: name, Drain: viewDrain(d)}
	}
	c.render(w, http.StatusOK, "drained", map[string]any{"Worker": name, "Drain": viewDrain(d), "Live": live, "Cancelled": r.PostForm.Get("cancel") != ""})
}

func drainVerb(r *http.Request) string {
	if r.PostForm.Get("cancel") != "" {
		return "cancel the drain of"
	}
	return "drain"
}

// drainEvents follows the worker's drain and the migrations off it: a
// change of either is news, so both are watched from the newest index seen
// (both are raft indexes) and the first to answer ends the wait.
func (c *Console) drainEvents(w http.ResponseWriter, r *http.Request) {
	name := r.PathValue("name")
	c.stream(w, r, func(ctx context.Context, idx uint64) ([]byte, uint64, error) {
		if idx > 0 {
			wctx, cancel := context.WithCancel(ctx)
			done := make(chan error, 2)
			go func() { _, _, err := c.client.WatchDrains(wctx, name, idx, 30*time.Second); done <- err }()
			go func() { _, _, err := c.client.WatchMigrations(wctx, name, idx); done <- err }()
			err := <-done
			cancel()
			<-done
			if err != nil {
				return nil, 0, err
			}
		}
		l, next, err := c.drainState(ctx, name)
		if err != nil {
			return nil, 0, err
		}
		html, err := c.fragment("drain-live", l)
		return html, next, err
	})
}
