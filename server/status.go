package server

import (
	"net/http"

	"github.com/ferry-dev/ferry/fsm"
)

// StatusOf is the HTTP status the API sends for a refusal of kind k. The
// state machine knows kinds only; this is the one place they meet HTTP.
func StatusOf(k fsm.RefusalKind) int {
	switch k {
	case fsm.RefuseInvalid:
		return http.StatusBadRequest
	case fsm.RefuseUnauthenticated:
		return http.StatusUnauthorized
	case fsm.RefuseForbidden:
		return http.StatusForbidden
	case fsm.RefuseNotFound:
		return http.StatusNotFound
	case fsm.RefuseConflict:
		return http.StatusConflict
	case fsm.RefuseGone:
		return http.StatusGone
	case fsm.RefuseBusy:
		return http.StatusTooManyRequests
	case fsm.RefuseNotLeader:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}
