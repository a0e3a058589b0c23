package server

import (
	"net/http"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

// The certificate deny list: operators add serials, every server checks
// each TLS handshake against it (tlsutil.WithDenyList in StartServer).

func (s *Server) handleRevoke(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
	if id.Kind != fsm.KindOperator {
		writeErr(w, &fsm.Refusal{Kind: fsm.RefuseForbidden, Code: fsm.CodeForbidden, Reason: id.String() + " may not revoke certificates (operators only)"})
		return
	}
	var req api.RevokeRequest
	if !readBody(w, r, &req) {
		return
	}
	serial, err := fsm.NormalizeSerial(req.Serial)
	if err != nil {
		writeErr(w, &fsm.Refusal{Kind: fsm.RefuseInvalid, Code: fsm.CodeInvalid, Reason: err.Error()})
		return
	}
	if res := s.run(w, r.Context(), fsm.CmdRevokeCert, &fsm.RevokeCertCmd{Header: s.header(id), Serial: serial, Reason: req.Reason}); res != nil {
		writeJSON(w, http.StatusOK, struct{}{})
	}
}

func (s *Server) handleListRevoked(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
	if id.Kind != fsm.KindOperator && id.Kind != fsm.KindServer {
		writeErr(w, &fsm.Refusal{Kind: fsm.RefuseForbidden, Code: fsm.CodeForbidden, Reason: id.String() + " may not list revoked certificates"})
		return
	}
	writeJSON(w, http.StatusOK, s.store.RevokedCerts())
}
