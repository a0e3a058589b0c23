package server

import (
	"net/http"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
)

// The certificate deny list: operators add serials, every server checks
// each TLS handshake against it (tlsutil.WithDenyList in StartServer).

func (s *Server) handleRevoke() handler {
	return propose(s, write[api.RevokeRequest]{cmd: fsm.CmdRevokeCert, reply: empty,
		before: onlyOperators("revoke certificates"),
		build: func(r *http.Request, id fsm.Identity, req *api.RevokeRequest) (any, error) {
			serial, err := fsm.NormalizeSerial(req.Serial)
			if err != nil {
				return nil, &fsm.Refusal{Kind: fsm.RefuseInvalid, Code: fsm.CodeInvalid, Reason: err.Error()}
			}
			return &fsm.RevokeCertCmd{Header: s.header(id), Serial: serial, Reason: req.Reason}, nil
		}})
}

func (s *Server) handleListRevoked(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
	if id.Kind != fsm.KindOperator && id.Kind != fsm.KindServer {
		writeErr(w, &fsm.Refusal{Kind: fsm.RefuseForbidden, Code: fsm.CodeForbidden, Reason: id.String() + " may not list revoked certificates"})
		return
	}
	writeJSON(w, http.StatusOK, s.store.RevokedCerts())
}

// handleRevokedSerials answers every identity, workers included, with the
// revoked serials alone: a source worker's export gate refuses a revoked
// target, and a target's tunnel a revoked source, without the server in
// the path. Who revoked and why stays with operators and servers.
func (s *Server) handleRevokedSerials(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
	list := s.store.RevokedCerts()
	out := make([]string, 0, len(list))
	for _, c := range list {
		out = append(out, c.Serial)
	}
	writeJSON(w, http.StatusOK, out)
}

// denyRevoked refuses every request whose client certificate is revoked and
// closes its connection: the handshake check cannot reach a keep-alive
// connection (an agent's blocking queries) opened before the revocation.
func (s *Server) denyRevoked(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			if sn := tlsutil.SerialString(r.TLS.PeerCertificates[0].SerialNumber); s.store.Revoked(sn) {
				w.Header().Set("Connection", "close")
				writeErr(w, &fsm.Refusal{Kind: fsm.RefuseUnauthenticated, Code: fsm.CodeUnauth, Reason: "certificate " + sn + " is revoked"})
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}
