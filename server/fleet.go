package server

import (
	"context"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/server/drainer"
	"github.com/ferry-dev/ferry/server/placement"
)

// fleetRoutes serves drains, cordons and the cheap heartbeat.
func (s *Server) fleetRoutes(h func(string, handler)) {
	h("POST /v1/workers/{name}/heartbeat", s.handleHeartbeat())
	h("POST /v1/workers/{name}/cordon", s.handleCordon())
	h("POST /v1/drains", s.handleDrain())
	h("POST /v1/drains/plan", s.handlePlanDrain)
	h("DELETE /v1/drains/{worker}", s.handleCancelDrain())
	h("GET /v1/drains", func(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
		worker := r.URL.Query().Get("worker")
		if idx, ok := s.block(w, r, s.store.DrainsIndex, s.store.Changed); ok {
			writeIndexed(w, idx, s.store.ScopeOf(id).Drains(s.store.Drains(worker)))
		}
	})
}

// Apply implements drainer.RaftApplier: the command is submitted (applied
// here when leading) and the store's result returned.
func (s *Server) Apply(ctx context.Context, typ fsm.CommandType, payload any) (*fsm.Result, error) {
	return s.submit(ctx, typ, payload)
}

// heartbeatWrite decides whether a beat must reach the log: when the lease
// has less than a whole TTL left, or the capacity report changed enough to
// change placement. Otherwise the leader answers from its state, so 1000
// workers beating every few seconds cost about one write per worker per
// lease period. A whole TTL, not less: an agent that sent a beat at t and
// got an answer fences itself at t + TTL (less drift and its margin), so
// the lease recorded must last at least that long whether the beat was
// written or answered from the state. Followers answer beats like any
// write, with the leader's address: their state may lag, and writes are the
// leader's alone.
func heartbeatWrite(w fsm.Worker, rep *fsm.WorkerReport, ttl time.Duration, now time.Time) bool {
	if w.LeaseExpiry.Sub(now) < ttl {
		return true
	}
	return rep != nil && rep.Differs(w.Report)
}

// writtenLease is the lease a written beat or a registration grants for a
// requested TTL: two TTLs, so the next write comes about one TTL later.
func writtenLease(ttl time.Duration) time.Duration {
	return fsm.ClampLeaseTTL(2 * fsm.ClampLeaseTTL(ttl))
}

func (s *Server) handleHeartbeat() handler {
	return propose(s, write[api.HeartbeatRequest]{cmd: fsm.CmdHeartbeat, reply: workerOf,
		build: func(r *http.Request, id fsm.Identity, req *api.HeartbeatRequest) (any, error) {
			name := r.PathValue("name")
			ttl := fsm.ClampLeaseTTL(time.Duration(req.LeaseTTL))
			if err := req.Report.Validate(); err != nil {
				// A bad report must not cost the worker its lease (a lapsed lease
				// rolls its migrations back): the beat counts, the report does not.
				s.log.Warn().Err(err).Str("worker", name).Msg("ignoring an invalid capacity report")
				req.Report = nil
			}
			// The same rule as the log's: only that worker (or an operator) beats
			// for it, so an answer from the replica reveals nothing to others.
			allowed := id.Kind == fsm.KindOperator || (id.Kind == fsm.KindWorker && id.Name == name)
			if wk, ok := s.store.Worker(name); ok && allowed && s.node.IsLeader() && !heartbeatWrite(wk, req.Report, ttl, s.cfg.Now()) {
				s.met.beatsAbsorbed.Inc()
				return answered{wk}, nil
			}
			// The lease written covers a TTL beyond the next write, which comes
			// when less than a TTL is left: a worker that stops beating loses its
			// lease between one and two TTLs after its last beat.
			return &fsm.HeartbeatCmd{Header: s.header(id), Name: name, LeaseTTL: writtenLease(ttl), Report: req.Report}, nil
		}})
}

func (s *Server) handleCordon() handler {
	return propose(s, write[api.CordonRequest]{cmd: fsm.CmdCordon, reply: workerOf,
		build: func(r *http.Request, id fsm.Identity, req *api.CordonRequest) (any, error) {
			return &fsm.CordonCmd{Header: s.header(id), Worker: r.PathValue("name"), Cordoned: req.Cordoned, Reason: req.Reason}, nil
		}})
}

func (s *Server) handleDrain() handler {
	return propose(s, write[api.DrainRequest]{cmd: fsm.CmdDrain, status: http.StatusCreated, reply: drainOf,
		build: func(r *http.Request, id fsm.Identity, req *api.DrainRequest) (any, error) {
			if req.ID == "" {
				req.ID = api.NewStepID("drain-")
			}
			return &fsm.DrainCmd{Header: s.header(id), ID: req.ID, Worker: req.Worker, Deadline: time.Duration(req.Deadline),
				Parallel: req.Parallel, Targets: req.Targets, BandwidthBPS: req.BandwidthBPS}, nil
		}})
}

func (s *Server) handleCancelDrain() handler {
	return propose(s, write[noBody]{cmd: fsm.CmdDrainUpdate, reply: drainOf,
		// Refused before the drains are looked at, so the answer tells no one
		// else whether a worker is being drained.
		before: onlyOperators("cancel a drain"),
		build: func(r *http.Request, id fsm.Identity, _ *noBody) (any, error) {
			worker := r.PathValue("worker")
			var running *fsm.Drain
			for _, d := range s.store.Drains(worker) {
				if d.State == fsm.DrainRunning {
					running = d
				}
			}
			if running == nil {
				return nil, &fsm.Refusal{Kind: fsm.RefuseNotFound, Code: fsm.CodeNotFound, Reason: "worker " + worker + " has no running drain"}
			}
			return &fsm.DrainUpdateCmd{Header: s.header(id), ID: running.ID, Finish: fsm.DrainCancelled, Left: leftOf(s.store, running)}, nil
		}})
}

func operatorsOnly(id fsm.Identity, what string) *fsm.Refusal {
	return &fsm.Refusal{Kind: fsm.RefuseForbidden, Code: fsm.CodeForbidden, Reason: id.String() + " may not " + what + " (operators only)"}
}

// leftOf lists what a drain leaves on its worker when it is cancelled.
func leftOf(st *fsm.Store, d *fsm.Drain) []fsm.DrainLeft {
	var out []fsm.DrainLeft
	for _, m := range st.Machines(d.Worker) {
		l := fsm.DrainLeft{Machine: m.ID, Reason: "drain cancelled before it started"}
		if id, ok := d.Started[m.ID]; ok {
			if mig, ok := st.Migration(id); ok && mig.Active() {
				l.Migration, l.Reason = id, "migration "+string(mig.State)+" when cancelled: it goes on"
			}
		}
		out = append(out, l)
	}
	on := map[string]bool{}
	for _, m := range st.Machines(d.Worker) {
		on[m.ID] = true
	}
	for machine, id := range d.Started {
		if mig, ok := st.Migration(id); ok && mig.Active() && !on[machine] {
			out = append(out, fsm.DrainLeft{Machine: machine, Migration: id,
				Reason: "migration " + string(mig.State) + " when cancelled: the machine runs on " + mig.Target + ", the source still serves its hydration"})
		}
	}
	return out
}

// handlePlanDrain answers what a drain would place now, all at once
// (ignoring the limits that only delay starts), without changing anything.
func (s *Server) handlePlanDrain(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
	var req api.DrainRequest
	if !readBody(w, r, &req) {
		return
	}
	// A plan shows every worker's room and every machine of the source.
	if id.Kind != fsm.KindOperator {
		writeErr(w, operatorsOnly(id, "plan a drain"))
		return
	}
	if ref := fsm.Validate(&fsm.DrainCmd{ID: "plan", Worker: req.Worker, Parallel: req.Parallel, Targets: req.Targets, BandwidthBPS: req.BandwidthBPS, Deadline: time.Duration(req.Deadline)}); ref != nil {
		writeErr(w, ref)
		return
	}
	start := time.Now()
	src, ok := s.store.Worker(req.Worker)
	if !ok {
		writeErr(w, notFound("worker", req.Worker))
		return
	}
	in := PlacementInput(s.store, src, s.store.Machines(req.Worker), s.cfg.Now())
	placed, waiting := placement.Plan(in, placement.Options{Targets: req.Targets, Parallel: req.Parallel, BandwidthBPS: req.BandwidthBPS, Whole: true})
	rep := api.DrainPlan{Worker: req.Worker, Placements: []api.Placement{}}
	for _, p := range placed {
		rep.Placements = append(rep.Placements, api.Placement(p))
	}
	for _, u := range waiting {
		rep.Unplaced = append(rep.Unplaced, api.Unplaced(u))
	}
	rep.Elapsed = api.Duration(time.Since(start))
	writeJSON(w, http.StatusOK, rep)
}

// PlacementInput gathers what placement reads for machines of src.
func PlacementInput(st *fsm.Store, src fsm.Worker, machines []fsm.Machine, now time.Time) placement.Input {
	active := st.ActiveMigrations()
	in := placement.Input{Now: now, Source: src, Workers: st.Workers(), Machines: machines, Volumes: map[string]fsm.Volume{}, Active: active}
	grouped := false
	for _, m := range machines {
		if v, ok := st.Volume(m.Volume); ok {
			in.Volumes[v.ID] = v
		}
		grouped = grouped || m.Group != ""
	}
	for _, m := range active {
		if v, ok := st.Volume(m.Volume); ok {
			in.Volumes[v.ID] = v
		}
	}
	if grouped {
		in.Groups = drainer.Groups(st.Machines(""))
	}
	return in
}

type fleetMetrics struct {
	beatsAbsorbed prometheus.Counter
}

func newFleetMetrics(reg *prometheus.Registry) fleetMetrics {
	m := fleetMetrics{
		beatsAbsorbed: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_heartbeats_absorbed_total",
			Help: "Heartbeats answered without a raft write (lease still long, report unchanged)."}),
	}
	reg.MustRegister(m.beatsAbsorbed)
	return m
}
