package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"

	"github.com/ferry-dev/ferry/fsm"
)

// ErrUnavailable wraps transport failures (no connection, broken reply):
// the request may be retried against another server.
var ErrUnavailable = errors.New("server unavailable")

// DecodeReply reads a JSON reply into out, or turns a non-2xx one into an
// *Error. The server uses it too for its own requests to other servers (join).
func DecodeReply(resp *http.Response, out any) error {
	body, err := io.ReadAll(io.LimitReader(resp.Body, 32<<20))
	if err != nil {
		return fmt.Errorf("%w: reading reply: %v", ErrUnavailable, err)
	}
	if resp.StatusCode/100 != 2 {
		var eb ErrorBody
		if json.Unmarshal(body, &eb) == nil && eb.Error != nil {
			if eb.Error.Kind == "" { // a server that predates kinds
				eb.Error.Kind = KindForStatus(resp.StatusCode)
			}
			return eb.Error
		}
		// Not ours (a proxy, a crash page): classify by status.
		return &Error{Kind: KindForStatus(resp.StatusCode), Code: "http_" + strconv.Itoa(resp.StatusCode), Reason: string(bytes.TrimSpace(body))}
	}
	if out == nil {
		return nil
	}
	if len(body) == 0 {
		// A server's answers always carry a body (JSON, even "null"). An
		// empty one is a handler that gave up, e.g. on a request whose
		// client had just timed out: a reply from nobody, to retry
		// elsewhere, not a zero value to act on.
		return fmt.Errorf("%w: a %d reply without a body", ErrUnavailable, resp.StatusCode)
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("decoding reply: %w", err)
	}
	return nil
}

// KindForStatus classifies a non-2xx status that came without a ferry error
// body. Gateways' 502 and 504 mean the server was not reached: retry.
func KindForStatus(status int) fsm.RefusalKind {
	switch status {
	case http.StatusBadRequest, http.StatusRequestEntityTooLarge, http.StatusMethodNotAllowed:
		return fsm.RefuseInvalid
	case http.StatusUnauthorized:
		return fsm.RefuseUnauthenticated
	case http.StatusForbidden:
		return fsm.RefuseForbidden
	case http.StatusNotFound:
		return fsm.RefuseNotFound
	case http.StatusConflict:
		return fsm.RefuseConflict
	case http.StatusGone:
		return fsm.RefuseGone
	case http.StatusTooManyRequests:
		return fsm.RefuseBusy
	case http.StatusServiceUnavailable, http.StatusBadGateway, http.StatusGatewayTimeout:
		return fsm.RefuseNotLeader
	}
	return fsm.RefuseInternal
}

// StatusOf is the HTTP status the API sends for a refusal of kind k; with
// KindForStatus, the one place refusal kinds meet HTTP.
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
