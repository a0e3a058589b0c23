// Package drainer is the leader's drain scheduler: for every running drain
// recorded in the replicated state it starts the migrations placement allows
// within the drain's limits, reports what waits and why, ends the drain when
// its worker is empty and, at the deadline, records what was left. It keeps
// no state of its own: a new leader's drainer continues from the records,
// and the marks written with each plan (one raft entry) keep it from
// starting a machine twice. It needs only a RaftApplier and a State view, so
// it is tested without raft.
package drainer

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/server/placement"
)

// RaftApplier replicates one command and returns what the store did.
type RaftApplier interface {
	Apply(ctx context.Context, typ fsm.CommandType, payload any) (*fsm.Result, error)
}

// State is the part of the replicated state the drainer reads.
type State interface {
	Drains(worker string) []*fsm.Drain
	Workers() []fsm.Worker
	Worker(name string) (fsm.Worker, bool)
	Machines(worker string) []fsm.Machine
	Volume(id string) (fsm.Volume, bool)
	Migration(id string) (*fsm.Migration, bool)
	ActiveMigrations() []*fsm.Migration
	Changed() <-chan struct{}
}

// Config configures a Drainer.
type Config struct {
	Self   string        // server name: the actor of its commands
	Batch  time.Duration // least time between passes: changes in between are handled together (default 100ms)
	Now    func() time.Time
	Logger zerolog.Logger
}

// Drainer runs drains; Run it only while this server leads.
type Drainer struct {
	cfg   Config
	raft  RaftApplier
	state State
	log   zerolog.Logger
}

// New returns a drainer.
func New(cfg Config, raft RaftApplier, state State) *Drainer {
	if cfg.Batch <= 0 {
		// Short: a freed slot waits at most this long for its next
		// migration, while a pass costs a few milliseconds.
		cfg.Batch = 100 * time.Millisecond
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Drainer{cfg: cfg, raft: raft, state: state, log: cfg.Logger.With().Str("loop", "drainer").Logger()}
}

// Run works on the drains until ctx ends: a pass after every change of the
// state (at most one per Batch) and at least every second, for deadlines.
func (d *Drainer) Run(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		changed := d.state.Changed()
		d.Pass(ctx)
		select {
		case <-ctx.Done():
			return
		case <-time.After(d.cfg.Batch):
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-tick.C:
		}
	}
}

// Pass looks at every running drain once. The decisions are made in
// order, oldest drain first (it gets the slots first), each seeing what the
// previous ones placed; the resulting entries are then proposed together,
// so raft commits them in a few batches instead of one round trip each.
func (d *Drainer) Pass(ctx context.Context) {
	var running []*fsm.Drain
	for _, dr := range d.state.Drains("") {
		if dr.State == fsm.DrainRunning {
			running = append(running, dr)
		}
	}
	if len(running) == 0 {
		return
	}
	active := d.state.ActiveMigrations()
	workers := d.state.Workers()
	var cmds []*fsm.DrainUpdateCmd
	for i := len(running) - 1; i >= 0; i-- {
		dr := running[i]
		c, placed := d.step(dr, workers, active)
		if c == nil {
			continue
		}
		cmds = append(cmds, c)
		active = append(active, placed...) // what this drain places loads the targets for the next one
	}
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	for _, c := range cmds {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			res, err := d.raft.Apply(ctx, fsm.CmdDrainUpdate, c)
			if err == nil {
				err = res.Err()
			}
			if err != nil {
				d.log.Warn().Err(err).Str("drain", c.ID).Msg("drain step failed; retrying at the next pass")
				return
			}
			if c.Finish != "" {
				d.log.Info().Str("drain", c.ID).Str("state", string(c.Finish)).Int("left", len(c.Left)).Msg("drain ended")
			}
		}()
	}
	wg.Wait()
}

func (d *Drainer) header() fsm.Header {
	return fsm.Header{Actor: fsm.Identity{Name: d.cfg.Self, Kind: fsm.KindServer}, Now: d.cfg.Now().UTC()}
}

// step decides the next entry of one drain: nil when nothing changed.
// The migrations it would start come back too, as planned records.
func (d *Drainer) step(dr *fsm.Drain, workers []fsm.Worker, active []*fsm.Migration) (*fsm.DrainUpdateCmd, []*fsm.Migration) {
	now := d.cfg.Now()
	src, ok := d.state.Worker(dr.Worker)
	if !ok {
		return d.finish(dr, fsm.DrainComplete, nil), nil // the worker is gone: nothing left to move
	}
	onWorker := d.state.Machines(dr.Worker)
	byMachine := map[string]*fsm.Migration{}
	busyNet := map[uint32]string{} // one migration per private network at a time
	for _, m := range active {
		if m.Source == dr.Worker {
			byMachine[m.Machine] = m
		}
		if m.Network != 0 {
			busyNet[m.Network] = m.ID
		}
	}
	// In flight: migrations this drain started whose source still has work
	// (once the source released its export, only the servers' completion
	// remains: the worker is free to go).
	inFlight := 0
	var leads []time.Duration
	for _, id := range dr.Started {
		m, ok := d.state.Migration(id)
		if ok && m.Active() && m.State != fsm.SourceReleased {
			inFlight++
		}
		if ok {
			p, ok1 := m.EnteredAt[fsm.Planned]
			h, ok2 := m.EnteredAt[fsm.Hydrating]
			if ok1 && ok2 && h.After(p) {
				leads = append(leads, h.Sub(p))
			}
		}
	}
	if len(onWorker) == 0 && inFlight == 0 {
		return d.finish(dr, fsm.DrainComplete, nil), nil
	}

	// What may start, and why the others wait.
	waiting := map[string]string{}
	var todo []fsm.Machine
	for _, m := range onWorker {
		if mig := byMachine[m.ID]; mig != nil {
			continue // running (this drain's or an operator's): it goes on
		}
		if id, marked := dr.Started[m.ID]; marked {
			mig, ok := d.state.Migration(id)
			switch {
			case ok && mig.State == fsm.RolledBack && dr.Attempts[m.ID] >= fsm.MaxDrainAttempts:
				waiting[m.ID] = fmt.Sprintf("rolled back %d times (last: %s): left for the operator", dr.Attempts[m.ID], rollbackReason(mig))
				continue
			case ok && mig.State != fsm.RolledBack:
				continue
			}
		}
		if id, busy := busyNet[m.Network]; busy && m.Network != 0 {
			waiting[m.ID] = fmt.Sprintf("private network %d is busy with migration %s", m.Network, id)
			continue
		}
		todo = append(todo, m)
		if m.Network != 0 {
			busyNet[m.Network] = "(placed in this pass)"
		}
	}

	if !dr.Deadline.IsZero() && !now.Before(dr.Deadline) {
		var left []fsm.DrainLeft
		for _, m := range onWorker {
			l := fsm.DrainLeft{Machine: m.ID}
			switch mig := byMachine[m.ID]; {
			case mig != nil:
				l.Migration, l.Reason = mig.ID, "migration "+string(mig.State)+" at the deadline: it goes on, the machine moves at cutover"
			case waiting[m.ID] != "":
				l.Reason = waiting[m.ID]
			case dr.Waiting[m.ID] != "":
				l.Reason = "not started before the deadline: " + dr.Waiting[m.ID]
			default:
				l.Reason = "not started before the deadline"
			}
			left = append(left, l)
		}
		// Migrations past cutover: the machine left, but the source still
		// serves its hydration, so the worker cannot go yet.
		on := onWorkerSet(onWorker)
		for machine, mig := range byMachine {
			if !on[machine] {
				left = append(left, fsm.DrainLeft{Machine: machine, Migration: mig.ID,
					Reason: "migration " + string(mig.State) + " at the deadline: it goes on; the machine runs on " + mig.Target + " and the source still serves its hydration"})
			}
		}
		return d.finish(dr, fsm.DrainDeadline, left), nil
	}

	var starts []fsm.DrainStart
	var planned []*fsm.Migration
	if len(todo) > 0 {
		in := placement.Input{Now: now, Source: src, Workers: workers, Machines: todo, Volumes: map[string]fsm.Volume{}, Active: active}
		grouped := false
		for _, m := range todo {
			if v, ok := d.state.Volume(m.Volume); ok {
				in.Volumes[v.ID] = v
			}
			grouped = grouped || m.Group != ""
		}
		for _, m := range active {
			if _, ok := in.Volumes[m.Volume]; !ok {
				if v, ok := d.state.Volume(m.Volume); ok {
					in.Volumes[v.ID] = v
				}
			}
		}
		if grouped {
			in.Groups = Groups(d.state.Machines(""))
		}
		placed, wait := placement.Plan(in, placement.Options{Targets: dr.Targets, Parallel: dr.Parallel, BandwidthBPS: dr.BandwidthBPS, Lead: Lead(leads)})
		for _, w := range wait {
			waiting[w.Machine] = w.Reason
		}
		for _, p := range placed {
			if len(starts) == 512 {
				break
			}
			st := fsm.DrainStart{Machine: p.Machine, Target: p.Target, Migration: MigrationID(dr.ID, p.Machine, dr.Attempts[p.Machine]+1)}
			starts = append(starts, st)
			planned = append(planned, &fsm.Migration{ID: st.Migration, Machine: p.Machine, Volume: p.Volume, Source: dr.Worker, Target: p.Target, State: fsm.Planned})
			d.log.Info().Str("drain", dr.ID).Str("machine", p.Machine).Str("target", p.Target).Str("reason", p.Reason).Msg("placing")
		}
	}
	if len(starts) == 0 && maps.Equal(waiting, dr.Waiting) {
		return nil, nil // nothing new: no write
	}
	return &fsm.DrainUpdateCmd{Header: d.header(), ID: dr.ID, Start: starts, Waiting: waiting}, planned
}

func (d *Drainer) finish(dr *fsm.Drain, st fsm.DrainState, left []fsm.DrainLeft) *fsm.DrainUpdateCmd {
	return &fsm.DrainUpdateCmd{Header: d.header(), ID: dr.ID, Finish: st, Left: left}
}

func rollbackReason(m *fsm.Migration) string {
	if m.Rollback != nil {
		return m.Rollback.Reason
	}
	return m.LastError
}

// Lead is how long this drain's migrations took from plan to hydrating
// (the median, at most a minute; 0 before any got there): placement starts
// the next migration that long before a hydration ends, so the link does
// not idle while the next one does its steps before cutover.
func Lead(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	return min(ds[len(ds)/2], time.Minute)
}

// MigrationID names the attempt-th migration a drain starts for a machine:
// the same on every leader, so a re-proposed start is recognised.
func MigrationID(drain, machine string, attempt int) string {
	id := fmt.Sprintf("%s-%d-%s", drain, attempt, machine)
	if len(id) <= 128 {
		return id
	}
	h := sha256.Sum256([]byte(machine))
	return fmt.Sprintf("%s-%d-%s", drain, attempt, hex.EncodeToString(h[:8]))
}

// Groups counts the machines of each group on each worker.
func Groups(ms []fsm.Machine) map[string]map[string]int {
	out := map[string]map[string]int{}
	for _, m := range ms {
		if m.Group == "" {
			continue
		}
		if out[m.Worker] == nil {
			out[m.Worker] = map[string]int{}
		}
		out[m.Worker][m.Group]++
	}
	return out
}

func onWorkerSet(ms []fsm.Machine) map[string]bool {
	out := make(map[string]bool, len(ms))
	for _, m := range ms {
		out[m.ID] = true
	}
	return out
}
