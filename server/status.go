package server

import (
	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

// StatusOf is the HTTP status the API sends for a refusal of kind k; the
// mapping is part of the wire protocol, so it lives with the client's.
func StatusOf(k fsm.RefusalKind) int { return api.StatusOf(k) }
