package server

import (
	"context"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/server/drainer"
)

// Proposer replicates one command; a refusal comes back as the error.
type Proposer interface {
	Propose(ctx context.Context, typ fsm.CommandType, payload any) error
}

// StoreView is the part of the replicated state housekeeping reads.
type StoreView interface {
	Servers() []fsm.ServerMember
	Worker(name string) (fsm.Worker, bool)
	ActiveMigrations() []*fsm.Migration
	Volumes(worker string) []fsm.Volume
	Collectable(now time.Time, retention time.Duration) bool
}

// DefaultGCRetention is how long a terminal migration or a destroyed volume
// stays readable (status, audits) before housekeeping deletes it.
const DefaultGCRetention = 7 * 24 * time.Hour

// housekeeper is the leader's periodic work: it registers this server's API
// address, completes released migrations, aborts or flags migrations whose
// workers lost their lease, destroys volumes whose retention passed and
// deletes records that ended more than the GC retention ago.
// It needs only a proposer and a store view, so it is tested without raft.
type housekeeper struct {
	self     fsm.ServerMember // this server as it must appear in the store
	propose  Proposer
	store    StoreView
	now      func() time.Time
	interval time.Duration
	gc       time.Duration // retention of ended records (0: never collected)
	log      zerolog.Logger
	// pause: failpoints, see Config.PauseBefore
	pause map[fsm.Event]time.Duration
	// changes, when set, returns a channel closed at the next change of any
	// migration: a released migration is completed at once, not at the next
	// tick (a tick of 1 s added half a second to every migration on average).
	changes func() <-chan struct{}

	since time.Time // when this server became leader
}

// leaseGrace is how long a new leader waits before it acts on an expired
// lease: during the election no heartbeat could be written (a follower
// only names the leader, and there was none), so a lease that ran out meanwhile says
// nothing about the worker. Nomad's new leaders likewise reset heartbeat
// timers.
const leaseGrace = 5 * time.Second

// run reconciles every interval until ctx ends; the server runs it only
// while this node leads.
func (h *housekeeper) run(ctx context.Context) {
	h.since = h.now()
	t := time.NewTicker(h.interval)
	defer t.Stop()
	for {
		var changed <-chan struct{} // nil (never ready) without changes
		if h.changes != nil {
			// Taken before the look below, so no change is missed between them.
			changed = h.changes()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			h.reconcile(ctx)
		case <-changed:
			h.complete(ctx, h.now())
		}
	}
}

// complete proposes completed for every migration whose source released
// its volume: the one step that is the server's own on the forward path.
func (h *housekeeper) complete(ctx context.Context, now time.Time) {
	for _, m := range h.store.ActiveMigrations() {
		if m.State == fsm.SourceReleased && !h.held(m, fsm.EvCompleted, now) {
			h.event(ctx, m.ID, fsm.EvCompleted, "server-completed", fsm.EventPayload{})
		}
	}
}

func (h *housekeeper) header() fsm.Header {
	return fsm.Header{Actor: fsm.Identity{Name: h.self.ID, Kind: fsm.KindServer}, Now: h.now().UTC()}
}

func (h *housekeeper) reconcile(ctx context.Context) {
	registered := false
	for _, m := range h.store.Servers() {
		if m == h.self {
			registered = true
		}
	}
	if !registered {
		h.apply(ctx, fsm.CmdRegisterServer, &fsm.RegisterServerCmd{Header: h.header(), Member: h.self})
	}
	now := h.now()
	grace := now.Sub(h.since) < leaseGrace
	dead := func(name string) bool {
		w, ok := h.store.Worker(name)
		return !ok || !w.Alive(now) && !grace
	}
	for _, m := range h.store.ActiveMigrations() {
		switch {
		case m.State == fsm.SourceReleased:
			if !h.held(m, fsm.EvCompleted, now) {
				h.event(ctx, m.ID, fsm.EvCompleted, "server-completed", fsm.EventPayload{})
			}
		case m.State.BeforeCutover() && (dead(m.Source) || dead(m.Target)):
			who := m.Source
			if !dead(who) {
				who = m.Target
			}
			h.event(ctx, m.ID, fsm.EvAbort, "server-abort-lease-"+who,
				fsm.EventPayload{Reason: "lease of worker " + who + " expired: rolling back"})
		case (m.State.AfterCutover() || m.State == fsm.RollingBack) && !m.State.Terminal() && !m.Stalled:
			for _, w := range []string{m.Source, m.Target} {
				if dead(w) {
					t := true
					reason := "worker " + w + " lost its lease; the migration waits for it"
					if m.State == fsm.RollingBack && w == m.Target && (m.Rollback == nil || !m.Rollback.TargetTornDown) {
						reason += " (if it is gone for good, an operator may propose target_torn_down)"
					}
					h.event(ctx, m.ID, fsm.EvReport, "", fsm.EventPayload{Stalled: &t, Reason: reason})
					break
				}
			}
		}
	}
	for _, v := range h.store.Volumes("") {
		if v.State == fsm.VolPendingDelete && !now.Before(v.DestroyAfter) {
			h.apply(ctx, fsm.CmdDestroyVolume, &fsm.DestroyVolumeCmd{Header: h.header(), ID: v.ID})
		}
	}
	// The store picks what is old enough from the command's time, so every
	// replica deletes the same records; proposed only when there is some.
	if h.gc > 0 && h.store.Collectable(now, h.gc) {
		h.apply(ctx, fsm.CmdGC, &fsm.GCCmd{Header: h.header(), Retention: h.gc})
	}
}

// held reports whether a failpoint still holds m in its state before ev.
func (h *housekeeper) held(m *fsm.Migration, ev fsm.Event, now time.Time) bool {
	d := h.pause[ev]
	if d <= 0 {
		return false
	}
	at, ok := m.EnteredAt[m.State]
	if !ok {
		return false
	}
	if now.Sub(at) < d {
		h.log.Info().Str("migration", m.ID).Str("event", string(ev)).Dur("left", d-now.Sub(at)).Msg("failpoint: holding before the event")
		return true
	}
	return false
}

func (h *housekeeper) event(ctx context.Context, id string, ev fsm.Event, step string, p fsm.EventPayload) {
	h.apply(ctx, fsm.CmdPropose, &fsm.ProposeCmd{Header: h.header(), ID: id, Event: ev, StepID: step, Payload: p})
}

func (h *housekeeper) apply(ctx context.Context, typ fsm.CommandType, payload any) {
	if err := h.propose.Propose(ctx, typ, payload); err != nil {
		h.log.Warn().Err(err).Str("command", string(typ)).Msg("housekeeping command refused")
	}
}

// Propose implements Proposer for the housekeeper: the command is submitted
// (applied here when leading) and a refusal is returned as the error.
func (s *Server) Propose(ctx context.Context, typ fsm.CommandType, payload any) error {
	res, err := s.submit(ctx, typ, payload)
	if err != nil {
		return err
	}
	return res.Err()
}

// leaderLoop runs the housekeeper while this node is the raft leader and
// stops it when leadership is lost, so a deposed leader proposes nothing.
func (s *Server) leaderLoop(ctx context.Context) {
	h := &housekeeper{
		self:    fsm.ServerMember{ID: s.cfg.ID, RaftAddr: s.node.RaftAddr(), APIAddr: s.apiURL},
		propose: s, store: s.store, now: s.cfg.Now, interval: s.cfg.ReconcileInterval, gc: s.cfg.GCRetention,
		log: s.log.With().Str("loop", "housekeeping").Logger(), pause: s.cfg.PauseBefore,
		changes: func() <-chan struct{} { return s.store.MigrationsChanged("") },
	}
	dr := drainer.New(drainer.Config{Self: s.cfg.ID, Batch: s.cfg.DrainBatch, Now: s.cfg.Now, Logger: s.log}, s, s.store)
	leading := func(ctx context.Context) {
		// A barrier first: the new leader's state holds every entry the old
		// one committed, so the drainer sees all marks before it places.
		if err := s.node.Raft.Barrier(10 * time.Second).Error(); err != nil {
			s.log.Warn().Err(err).Msg("leader barrier failed; the leader loops start anyway")
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			dr.Run(ctx)
		}()
		h.run(ctx)
		<-done
	}
	var stop func() // set while the housekeeper runs
	halt := func() {
		if stop != nil {
			stop()
			stop = nil
		}
	}
	defer halt()
	for {
		select {
		case <-ctx.Done():
			return
		case leader := <-s.node.Raft.LeaderCh():
			if !leader {
				halt()
			} else if stop == nil {
				stop = startLoop(ctx, leading)
			}
		}
	}
}

// startLoop runs fn in a goroutine; the returned func cancels it and waits.
func startLoop(ctx context.Context, fn func(context.Context)) func() {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(ctx)
	}()
	return func() {
		cancel()
		<-done
	}
}
