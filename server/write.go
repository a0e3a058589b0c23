package server

import (
	"net/http"

	"github.com/ferry-dev/ferry/fsm"
)

// handler serves one route for a caller whose certificate was verified
// (routes wraps it with the identity, readiness, rate and size checks).
type handler = func(http.ResponseWriter, *http.Request, fsm.Identity)

// write describes a route that proposes one command: every write handler
// has the same order of steps, so a refusal, a status code or a limit cannot
// differ between them by accident.
//
//  1. before, on the caller's identity and the URL alone: nothing is read
//     when it refuses;
//  2. the body, strictly decoded into Req (readBody), unless Req is noBody;
//  3. build, which makes the command payload from the request, or refuses
//     with any error writeErr maps, or answers from the state (answered);
//  4. the command is submitted; a refusal is written with its kind's status;
//  5. applied (audit logs), then reply's value with status (200 when 0).
type write[Req any] struct {
	cmd    fsm.CommandType
	status int
	before func(r *http.Request, id fsm.Identity) error
	build  func(r *http.Request, id fsm.Identity, req *Req) (any, error)
	reply  func(res *fsm.Result) any
	// applied runs once the command was applied, before the reply.
	applied func(id fsm.Identity, req *Req)
}

// noBody is the Req of a write whose request carries nothing: its body is
// not read, whatever it holds (a stray body is not a reason to refuse).
type noBody struct{}

// answered is what a build returns to answer from the state without
// proposing: a write the log does not need (a beat while the lease is long,
// a progress update Apply would drop). It is written with 200 OK.
type answered struct{ v any }

// propose turns a write into its handler.
func propose[Req any](s *Server, wr write[Req]) handler {
	status := wr.status
	if status == 0 {
		status = http.StatusOK
	}
	return func(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
		if wr.before != nil {
			if err := wr.before(r, id); err != nil {
				writeErr(w, err)
				return
			}
		}
		var req Req
		if _, none := any(&req).(*noBody); !none && !readBody(w, r, &req) {
			return
		}
		c, err := wr.build(r, id, &req)
		if err != nil {
			writeErr(w, err)
			return
		}
		if a, ok := c.(answered); ok {
			writeJSON(w, http.StatusOK, a.v)
			return
		}
		res := s.run(w, r.Context(), wr.cmd, c)
		if res == nil {
			return
		}
		if wr.applied != nil {
			wr.applied(id, &req)
		}
		writeJSON(w, status, wr.reply(res))
	}
}

// only refuses, before anything is read, every caller but kind.
func only(kind fsm.Kind, reason string) func(*http.Request, fsm.Identity) error {
	return func(_ *http.Request, id fsm.Identity) error {
		if id.Kind != kind {
			return &fsm.Refusal{Kind: fsm.RefuseForbidden, Code: fsm.CodeForbidden, Reason: reason}
		}
		return nil
	}
}

// onlyOperators refuses, before anything is read, every caller but operators.
func onlyOperators(what string) func(*http.Request, fsm.Identity) error {
	return func(_ *http.Request, id fsm.Identity) error {
		if id.Kind != fsm.KindOperator {
			return operatorsOnly(id, what)
		}
		return nil
	}
}

// The replies of the write routes: the record the command changed.
func workerOf(res *fsm.Result) any  { return res.Worker }
func volumeOf(res *fsm.Result) any  { return res.Volume }
func machineOf(res *fsm.Result) any { return res.Machine }
func drainOf(res *fsm.Result) any   { return res.Drain }
func empty(*fsm.Result) any         { return struct{}{} }
