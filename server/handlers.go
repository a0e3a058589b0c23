package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
)

const (
	defaultWait = 30 * time.Second
	maxWait     = 5 * time.Minute
	maxBody     = 256 << 10 // the largest real body (4096 known-zero ranges) is ~150 KiB
)

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	h := func(pattern string, fn handler) {
		mux.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			id, err := identity(r)
			if err != nil {
				writeErr(w, &fsm.Refusal{Kind: fsm.RefuseUnauthenticated, Code: fsm.CodeUnauth, Reason: err.Error()})
				return
			}
			if r.Method == http.MethodGet && !s.Ready() {
				writeErr(w, &fsm.Refusal{Kind: fsm.RefuseNotLeader, Code: fsm.CodeNoLeader, Reason: "this server is catching up with the cluster; retry or ask another server"})
				return
			}
			if r.Method != http.MethodGet {
				if ref := s.limits.allow(id); ref != nil {
					writeErr(w, ref)
					return
				}
				r.Body = http.MaxBytesReader(w, r.Body, maxBody)
			}
			fn(w, r, id)
		})
	}
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		if _, err := identity(r); err != nil {
			writeErr(w, &fsm.Refusal{Kind: fsm.RefuseUnauthenticated, Code: fsm.CodeUnauth, Reason: err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, s.status()) // answers while catching up: it says so
	})

	h("GET /v1/workers", func(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
		writeJSON(w, http.StatusOK, s.store.ScopeOf(id).Workers(s.store.Workers()))
	})
	h("GET /v1/workers/{name}", func(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
		name := r.PathValue("name")
		v, ok := s.store.Worker(name)
		if !ok || !s.store.ScopeOf(id).CanReadWorker(name) {
			writeErr(w, notFound("worker", name))
			return
		}
		writeJSON(w, http.StatusOK, v)
	})
	h("POST /v1/workers", s.handleRegisterWorker())
	// The remote forks whose copy a worker makes or serves (its agent's
	// duty list besides its own volumes).
	h("GET /v1/workers/{name}/forks", func(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
		writeJSON(w, http.StatusOK, s.store.ScopeOf(id).Volumes(s.store.ForksFrom(r.PathValue("name"))))
	})

	h("GET /v1/volumes", s.listByWorker(func(sc *fsm.Scope, worker string) any { return sc.Volumes(s.store.Volumes(worker)) }))
	h("POST /v1/volumes", s.handleCreateVolume())
	h("GET /v1/volumes/{id}", func(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
		vid := r.PathValue("id")
		v, ok := s.store.Volume(vid)
		if !ok || !s.store.ScopeOf(id).CanReadVolume(vid) {
			writeErr(w, notFound("volume", vid))
			return
		}
		writeJSON(w, http.StatusOK, v)
	})
	h("PATCH /v1/volumes/{id}", s.handleUpdateVolume())
	h("DELETE /v1/volumes/{id}", s.handleDestroyVolume())
	h("POST /v1/volumes/{id}/envelopes", s.handlePutEnvelopes())
	h("GET /v1/volumes/{id}/envelopes", s.handleListEnvelopes)
	h("GET /v1/volumes/{id}/envelopes/{purpose}", s.handleGetEnvelope)
	h("PUT /v1/workers/{name}/key", s.handleSetWorkerKey())
	h("GET /v1/keys/recovery", s.handleGetRecoveryKey)
	h("PUT /v1/keys/recovery", s.handleSetRecoveryKey())
	h("POST /v1/volumes/{id}/extend", s.handleExtendVolume())
	h("POST /v1/volumes/{id}/fork", s.handleForkVolume())
	h("POST /v1/volumes/{id}/fork-serve", s.handleForkServe())

	h("GET /v1/machines", s.listByWorker(func(sc *fsm.Scope, worker string) any { return sc.Machines(s.store.Machines(worker)) }))
	h("POST /v1/machines", s.handleCreateMachine())
	h("GET /v1/machines/{id}", func(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
		mid := r.PathValue("id")
		m, ok := s.store.Machine(mid)
		sc := s.store.ScopeOf(id)
		if !ok || !sc.CanReadMachine(mid) {
			writeErr(w, notFound("machine", mid))
			return
		}
		writeJSON(w, http.StatusOK, sc.Machine(m))
	})
	h("PATCH /v1/machines/{id}", s.handleUpdateMachine())

	h("GET /v1/migrations", func(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
		worker := r.URL.Query().Get("worker")
		if sc := s.store.ScopeOf(id); !sc.All() {
			// A worker watches its own migrations: the index of another
			// worker's would tell it when they change.
			worker = sc.Worker()
		}
		idx, ok := s.block(w, r, func() uint64 { return s.store.MigrationsIndex(worker) }, func() <-chan struct{} { return s.store.MigrationsChanged(worker) })
		if ok {
			writeIndexed(w, idx, s.store.ScopeOf(id).Migrations(s.store.Migrations(worker)))
		}
	})
	h("POST /v1/migrations", s.handlePlan())
	h("GET /v1/migrations/{id}", func(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
		mid := r.PathValue("id")
		if _, found := s.store.Migration(mid); found && !s.store.ScopeOf(id).CanReadMigration(mid) {
			writeErr(w, notFound("migration", mid))
			return
		}
		idx, ok := s.block(w, r, func() uint64 { return s.store.MigrationIndex(mid) }, s.store.Changed)
		if !ok {
			return
		}
		m, found := s.store.Migration(mid)
		if !found || !s.store.ScopeOf(id).CanReadMigration(mid) {
			writeErr(w, notFound("migration", mid))
			return
		}
		writeIndexed(w, idx, m)
	})
	h("POST /v1/migrations/{id}/events", s.handlePropose())
	h("POST /v1/migrations/{id}/abort", s.handleAbort())
	h("GET /v1/locks", func(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
		sc := s.store.ScopeOf(id)
		locks := s.store.Locks()
		for name, holder := range locks {
			if !sc.CanReadLock(holder) {
				delete(locks, name)
			}
		}
		writeJSON(w, http.StatusOK, locks)
	})

	h("POST /v1/internal/join", s.handleJoin())
	h("DELETE /v1/servers/{id}", s.handleRemoveServer())
	h("GET /v1/certs/revoked", s.handleListRevoked)
	h("GET /v1/certs/revoked/serials", s.handleRevokedSerials)
	h("POST /v1/certs/revoked", s.handleRevoke())
	s.fleetRoutes(h)
	metrics := s.metricsHandler()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		if _, err := identity(r); err != nil {
			writeErr(w, &fsm.Refusal{Kind: fsm.RefuseUnauthenticated, Code: fsm.CodeUnauth, Reason: err.Error()})
			return
		}
		metrics.ServeHTTP(w, r)
	})
	return mux
}

// identity reads the caller from its verified client certificate.
func identity(r *http.Request) (fsm.Identity, error) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return fsm.Identity{}, errors.New("a client certificate is required")
	}
	id, err := tlsutil.IdentityOf(r.TLS.PeerCertificates[0])
	if err != nil {
		return fsm.Identity{}, err
	}
	return fsm.Identity{Name: id.Name, Kind: fsm.Kind(id.Kind)}, nil
}

func notFound(what, id string) *fsm.Refusal {
	return &fsm.Refusal{Kind: fsm.RefuseNotFound, Code: fsm.CodeNotFound, Reason: fmt.Sprintf("%s %q not found", what, id)}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	_ = enc.Encode(v)
}

func writeIndexed(w http.ResponseWriter, idx uint64, v any) {
	w.Header().Set(api.IndexHeader, strconv.FormatUint(idx, 10))
	writeJSON(w, http.StatusOK, v)
}

// writeErr sends err as the JSON error body with the status of its kind;
// an error that is not a refusal is an internal failure.
func writeErr(w http.ResponseWriter, err error) {
	var nl *notLeaderError
	if errors.As(err, &nl) && nl.leaderAPI != "" {
		w.Header().Set(api.LeaderHeader, nl.leaderAPI)
	}
	var ref *fsm.Refusal
	if !errors.As(err, &ref) {
		ref = &fsm.Refusal{Kind: fsm.RefuseInternal, Code: fsm.CodeInternal, Reason: err.Error()}
	}
	writeJSON(w, StatusOf(ref.Kind), api.ErrorBody{Error: ref})
}

// readBody decodes a request body strictly: one JSON value of known
// fields, nothing after it, at most maxBody bytes. An empty body is the
// zero value.
func readBody(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	err := dec.Decode(v)
	if errors.Is(err, io.EOF) {
		return true
	}
	if err == nil {
		if _, terr := dec.Token(); !errors.Is(terr, io.EOF) {
			err = errors.New("trailing data after the JSON value")
		}
	}
	if err != nil {
		ref := &fsm.Refusal{Kind: fsm.RefuseInvalid, Code: fsm.CodeInvalid, Reason: "request body: " + err.Error()}
		if _, tooBig := errors.AsType[*http.MaxBytesError](err); tooBig {
			ref.Reason = fmt.Sprintf("request body exceeds %d bytes", maxBody)
		}
		writeErr(w, ref)
		return false
	}
	return true
}

// block implements ?index=N&wait=D: it returns once current() > N, the
// wait passes or the client goes away (ok=false: nothing to write). changed
// returns the channel closed when current may move: the narrower it is, the
// fewer wake-ups (per worker for migrations).
func (s *Server) block(w http.ResponseWriter, r *http.Request, current func() uint64, changed func() <-chan struct{}) (uint64, bool) {
	q := r.URL.Query()
	if q.Get("index") == "" {
		return current(), true
	}
	min, err := strconv.ParseUint(q.Get("index"), 10, 64)
	if err != nil {
		writeErr(w, &fsm.Refusal{Kind: fsm.RefuseInvalid, Code: fsm.CodeInvalid, Reason: "index must be a number"})
		return 0, false
	}
	wait := defaultWait
	if ws := q.Get("wait"); ws != "" {
		if wait, err = time.ParseDuration(ws); err != nil || wait < 0 {
			writeErr(w, &fsm.Refusal{Kind: fsm.RefuseInvalid, Code: fsm.CodeInvalid, Reason: "wait must be a duration like 30s"})
			return 0, false
		}
	}
	wait = min2(wait, maxWait)
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		ch := changed()
		if idx := current(); idx > min {
			return idx, true
		}
		select {
		case <-ch:
		case <-timer.C:
			return current(), true
		case <-r.Context().Done():
			return 0, false
		case <-s.ctx.Done():
			return current(), true
		}
	}
}

func min2(a, b time.Duration) time.Duration {
	if a < b {
		return a
	}
	return b
}

// run submits a command and writes the refusal, if any; it returns the
// result only when the command was applied.
func (s *Server) run(w http.ResponseWriter, ctx context.Context, typ fsm.CommandType, payload any) *fsm.Result {
	res, err := s.submit(ctx, typ, payload)
	if err != nil {
		writeErr(w, err)
		return nil
	}
	if res.Refusal != nil {
		writeErr(w, res.Refusal)
		return nil
	}
	return res
}

func (s *Server) handleRegisterWorker() handler {
	return propose(s, write[api.RegisterWorkerRequest]{cmd: fsm.CmdRegisterWorker, reply: workerOf,
		build: func(r *http.Request, id fsm.Identity, req *api.RegisterWorkerRequest) (any, error) {
			return &fsm.RegisterWorkerCmd{Header: s.header(id), Worker: req.Worker, LeaseTTL: writtenLease(time.Duration(req.LeaseTTL))}, nil
		}})
}

func (s *Server) handleCreateVolume() handler {
	return propose(s, write[fsm.Volume]{cmd: fsm.CmdCreateVolume, reply: volumeOf,
		build: func(r *http.Request, id fsm.Identity, v *fsm.Volume) (any, error) {
			if ref := s.needRecoveryKey(); ref != nil {
				return nil, ref
			}
			return &fsm.CreateVolumeCmd{Header: s.header(id), Volume: *v}, nil
		}})
}

func (s *Server) handleUpdateVolume() handler {
	return propose(s, write[api.VolumeUpdate]{cmd: fsm.CmdUpdateVolume, reply: volumeOf,
		build: func(r *http.Request, id fsm.Identity, u *api.VolumeUpdate) (any, error) {
			return &fsm.UpdateVolumeCmd{Header: s.header(id), ID: r.PathValue("id"), State: u.State, AttachedMachine: u.AttachedMachine, Layout: u.Layout, Size: u.Size}, nil
		}})
}

func (s *Server) handleDestroyVolume() handler {
	return propose(s, write[noBody]{cmd: fsm.CmdDestroyVolume, reply: volumeOf,
		build: func(r *http.Request, id fsm.Identity, _ *noBody) (any, error) {
			var ret time.Duration
			if rs := r.URL.Query().Get("retention"); rs != "" {
				var err error
				if ret, err = time.ParseDuration(rs); err != nil {
					return nil, &fsm.Refusal{Kind: fsm.RefuseInvalid, Code: fsm.CodeInvalid, Reason: "retention must be a duration like 24h"}
				}
			}
			return &fsm.DestroyVolumeCmd{Header: s.header(id), ID: r.PathValue("id"), Retention: ret}, nil
		}})
}

func (s *Server) handleExtendVolume() handler {
	return propose(s, write[api.VolumeExtend]{cmd: fsm.CmdExtendVolume, reply: volumeOf,
		build: func(r *http.Request, id fsm.Identity, e *api.VolumeExtend) (any, error) {
			return &fsm.ExtendVolumeCmd{Header: s.header(id), ID: r.PathValue("id"), Size: e.Size}, nil
		}})
}

func (s *Server) handleForkVolume() handler {
	return propose(s, write[api.VolumeFork]{cmd: fsm.CmdForkVolume, reply: volumeOf,
		build: func(r *http.Request, id fsm.Identity, f *api.VolumeFork) (any, error) {
			return &fsm.ForkVolumeCmd{Header: s.header(id), ID: f.ID, Source: r.PathValue("id"), Worker: f.Worker}, nil
		}})
}

func (s *Server) handleForkServe() handler {
	return propose(s, write[api.ForkServe]{cmd: fsm.CmdForkServe, reply: volumeOf,
		build: func(r *http.Request, id fsm.Identity, f *api.ForkServe) (any, error) {
			return &fsm.ForkServeCmd{Header: s.header(id), ID: r.PathValue("id"), Layout: f.Layout, Export: f.Export, KnownZero: f.KnownZero, Released: f.Released}, nil
		}})
}

func (s *Server) handleCreateMachine() handler {
	return propose(s, write[fsm.Machine]{cmd: fsm.CmdCreateMachine, reply: machineOf,
		build: func(r *http.Request, id fsm.Identity, m *fsm.Machine) (any, error) {
			return &fsm.CreateMachineCmd{Header: s.header(id), Machine: *m}, nil
		}})
}

func (s *Server) handleUpdateMachine() handler {
	return propose(s, write[api.MachineUpdate]{cmd: fsm.CmdUpdateMachine, reply: machineOf,
		build: func(r *http.Request, id fsm.Identity, u *api.MachineUpdate) (any, error) {
			return &fsm.UpdateMachineCmd{Header: s.header(id), ID: r.PathValue("id"), State: u.State, Volume: u.Volume, Addr6PN: u.Addr6PN, Spec: u.Spec}, nil
		}})
}

func (s *Server) handlePlan() handler {
	return propose(s, write[api.PlanRequest]{cmd: fsm.CmdPlan, status: http.StatusCreated,
		reply: func(res *fsm.Result) any { return res.Migration },
		build: func(r *http.Request, id fsm.Identity, p *api.PlanRequest) (any, error) {
			if p.ID == "" {
				p.ID = api.NewStepID("mig-")
			}
			return &fsm.PlanCmd{Header: s.header(id), ID: p.ID, Machine: p.Machine, Target: p.Target, StepID: p.StepID, MaxDowntime: time.Duration(p.MaxDowntime)}, nil
		}})
}

func (s *Server) handlePropose() handler {
	return propose(s, write[api.ProposeRequest]{cmd: fsm.CmdPropose,
		reply: func(res *fsm.Result) any {
			return api.ProposeReply{Migration: res.Migration, Duplicate: res.Duplicate, Ignored: res.Ignored}
		},
		build: func(r *http.Request, id fsm.Identity, p *api.ProposeRequest) (any, error) {
			mid := r.PathValue("id")
			// Only the replicated part of a progress report enters the log: a
			// backend's detail must not become part of the log format.
			p.Payload.Progress = p.Payload.Progress.Replicated()
			// A progress update that Apply would drop never reaches the log; the
			// leader decides (followers redirect every write).
			if p.Event == fsm.EvProgress && s.node.IsLeader() {
				if m, ok := s.store.Migration(mid); ok && m.State != "" && len(fsm.RolesOf(id, m)) > 0 &&
					p.Payload.Progress != nil && !fsm.ProgressDue(m, p.Payload.Progress, s.cfg.Now()) {
					return answered{api.ProposeReply{Migration: m, Ignored: true}}, nil
				}
			}
			return &fsm.ProposeCmd{Header: s.header(id), ID: mid, Event: p.Event, StepID: p.StepID, Payload: p.Payload}, nil
		}})
}

func (s *Server) handleAbort() handler {
	return propose(s, write[api.AbortRequest]{cmd: fsm.CmdPropose,
		reply: func(res *fsm.Result) any { return api.ProposeReply{Migration: res.Migration, Duplicate: res.Duplicate} },
		build: func(r *http.Request, id fsm.Identity, a *api.AbortRequest) (any, error) {
			return &fsm.ProposeCmd{Header: s.header(id), ID: r.PathValue("id"), Event: fsm.EvAbort, StepID: a.StepID, Payload: fsm.EventPayload{Reason: a.Reason}}, nil
		}})
}

// handleJoin adds the calling server as a voter, then records its API
// address in the log as this leader.
func (s *Server) handleJoin() handler {
	return propose(s, write[api.JoinRequest]{cmd: fsm.CmdRegisterServer, reply: empty,
		before: only(fsm.KindServer, "only servers may join"),
		build: func(r *http.Request, id fsm.Identity, j *api.JoinRequest) (any, error) {
			if j.ID != id.Name {
				return nil, &fsm.Refusal{Kind: fsm.RefuseForbidden, Code: fsm.CodeForbidden, Reason: fmt.Sprintf("certificate %s may not join as %s", id.Name, j.ID)}
			}
			member := fsm.ServerMember{ID: j.ID, RaftAddr: j.RaftAddr, APIAddr: j.APIAddr}
			if ref := fsm.Validate(&fsm.RegisterServerCmd{Member: member}); ref != nil {
				return nil, ref
			}
			if !s.node.IsLeader() {
				return nil, s.notLeader()
			}
			if err := s.node.AddVoter(j.ID, j.RaftAddr, 10*time.Second); err != nil {
				return nil, &fsm.Refusal{Kind: fsm.RefuseNotLeader, Code: fsm.CodeNoLeader, Reason: err.Error()}
			}
			return &fsm.RegisterServerCmd{Header: s.header(s.self()), Member: member}, nil
		}})
}

// handleRemoveServer removes a voter (a dead server being replaced).
// Operators may call it; a follower redirects them to the leader.
func (s *Server) handleRemoveServer() handler {
	return propose(s, write[noBody]{cmd: fsm.CmdRegisterServer, reply: empty,
		before: only(fsm.KindOperator, "only operators may remove servers"),
		build: func(r *http.Request, id fsm.Identity, _ *noBody) (any, error) {
			target := r.PathValue("id")
			if ref := fsm.CheckID("server", target); ref != nil {
				return nil, ref
			}
			if !s.node.IsLeader() {
				return nil, s.notLeader()
			}
			if target == s.cfg.ID {
				return nil, &fsm.Refusal{Kind: fsm.RefuseConflict, Code: fsm.CodeConflict, Reason: "the leader cannot remove itself: stop it first, then remove it through another server"}
			}
			if err := s.node.RemoveServer(target, 10*time.Second); err != nil {
				return nil, &fsm.Refusal{Kind: fsm.RefuseNotLeader, Code: fsm.CodeNoLeader, Reason: err.Error()}
			}
			return &fsm.RegisterServerCmd{Header: s.header(s.self()), Member: fsm.ServerMember{ID: target}, Remove: true}, nil
		}})
}

// self is this server's identity, for the commands it proposes itself.
func (s *Server) self() fsm.Identity { return fsm.Identity{Name: s.cfg.ID, Kind: fsm.KindServer} }

// listByWorker serves a registry collection (?worker= filters) as a
// blocking query on the store's index, cut to what the caller may read.
func (s *Server) listByWorker(list func(sc *fsm.Scope, worker string) any) handler {
	return func(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
		worker := r.URL.Query().Get("worker")
		if idx, ok := s.block(w, r, s.store.Index, s.store.Changed); ok {
			writeIndexed(w, idx, list(s.store.ScopeOf(id), worker))
		}
	}
}
