package fsm

import "fmt"

// Refusal is a guard's "no" and the one refusal type of ferry: the store
// returns it from Apply, the server sends it as the body of every non-2xx
// reply (api.Error is this type), and the client returns it as the error.
// Kind says what class of "no" it is (the server maps it to an HTTP status),
// Code is the precise machine-readable reason, Reason is for people, and
// State is the migration's actual state when the refusal is about state.
type Refusal struct {
	Kind   RefusalKind `json:"kind"`
	Code   string      `json:"code"`
	Reason string      `json:"reason"`
	State  State       `json:"state,omitempty"`
}

func (r *Refusal) Error() string {
	if r.State != "" {
		return fmt.Sprintf("%s (%s, state %s)", r.Reason, r.Code, r.State)
	}
	return fmt.Sprintf("%s (%s)", r.Reason, r.Code)
}

// RefusalKind classifies a refusal by what the caller can do about it. It is
// a domain notion: the HTTP status for each kind is chosen by the server.
type RefusalKind string

// Refusal kinds. The store produces the first six; the server adds the
// others for requests that never reach the store.
const (
	RefuseInvalid   RefusalKind = "invalid"   // malformed or impossible request: fix it
	RefuseForbidden RefusalKind = "forbidden" // the caller's identity may not do this
	RefuseNotFound  RefusalKind = "not_found" // the named record does not exist
	RefuseConflict  RefusalKind = "conflict"  // the current state does not allow it
	RefuseGone      RefusalKind = "gone"      // the record existed and was destroyed
	RefuseBusy      RefusalKind = "busy"      // a limit is reached: retry later

	RefuseUnauthenticated RefusalKind = "unauthenticated" // no valid client certificate
	RefuseNotLeader       RefusalKind = "not_leader"      // no leader or not caught up: retry, maybe elsewhere
	RefuseInternal        RefusalKind = "internal"        // the server failed
)

// ClientSide reports whether the refusal is about the request (the caller
// must change something), as every refusal of the store is (HTTP 4xx).
func (k RefusalKind) ClientSide() bool {
	switch k {
	case RefuseInvalid, RefuseForbidden, RefuseNotFound, RefuseConflict, RefuseGone, RefuseBusy, RefuseUnauthenticated:
		return true
	}
	return false
}

// Retryable reports whether the same request may succeed later unchanged.
func (k RefusalKind) Retryable() bool { return k == RefuseNotLeader }

// Refusal codes.
const (
	CodeNotFound     = "not_found"
	CodeInvalid      = "invalid"
	CodeForbidden    = "forbidden"
	CodeWrongState   = "wrong_state"
	CodePastCutover  = "past_cutover"
	CodeConflict     = "conflict"
	CodeLocked       = "locked"
	CodeAdmission    = "admission"
	CodeAttached     = "attached"
	CodeBadCommand   = "bad_command"
	CodeRateLimited  = "rate_limited"
	CodeNotTornDown  = "target_not_torn_down"
	CodeTargetMayRun = "target_may_run" // an operator's target_torn_down before the target's lease and fence margin passed
	CodeLayoutNeeded = "layout_missing"
	CodeNoLeader     = "no_leader"
	CodeUnauth       = "unauthenticated"
	CodeInternal     = "internal"
	CodeCordoned     = "cordoned"
)

func refuse(kind RefusalKind, code, format string, args ...any) *Refusal {
	return &Refusal{Kind: kind, Code: code, Reason: fmt.Sprintf(format, args...)}
}

func notFound(what, id string) *Refusal {
	return refuse(RefuseNotFound, CodeNotFound, "%s %q not found", what, id)
}
