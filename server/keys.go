package server

import (
	"context"
	"net/http"
	"strconv"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

// Sealed volume keys: the servers store envelopes and public keys, check
// who may write and read them, and can open none (they hold no private
// key). Reads are served from the local store, never through the log.

func (s *Server) handleSetWorkerKey() handler {
	return propose(s, write[fsm.PublicKey]{cmd: fsm.CmdSetWorkerKey, reply: workerOf,
		build: func(r *http.Request, id fsm.Identity, k *fsm.PublicKey) (any, error) {
			// The store binds the key to the caller's certificate name too;
			// refusing here keeps a forged request out of the log.
			if id.Kind != fsm.KindWorker || id.Name != r.PathValue("name") {
				return nil, &fsm.Refusal{Kind: fsm.RefuseForbidden, Code: fsm.CodeForbidden, Reason: id.String() + " may not register the key of worker " + r.PathValue("name")}
			}
			return &fsm.SetWorkerKeyCmd{Header: s.header(id), Name: r.PathValue("name"), Key: *k}, nil
		}})
}

func (s *Server) handleGetRecoveryKey(w http.ResponseWriter, r *http.Request, _ fsm.Identity) {
	k, ok := s.store.RecoveryKey()
	if !ok {
		writeErr(w, noRecoveryKey())
		return
	}
	writeJSON(w, http.StatusOK, k)
}

func (s *Server) handleSetRecoveryKey() handler {
	return propose(s, write[fsm.PublicKey]{cmd: fsm.CmdSetRecoveryKey, reply: empty,
		build: func(r *http.Request, id fsm.Identity, k *fsm.PublicKey) (any, error) {
			if id.Kind != fsm.KindOperator {
				return nil, &fsm.Refusal{Kind: fsm.RefuseForbidden, Code: fsm.CodeForbidden, Reason: "only operators may set the recovery key"}
			}
			return &fsm.SetRecoveryKeyCmd{Header: s.header(id), Key: *k}, nil
		},
		applied: func(id fsm.Identity, k *fsm.PublicKey) {
			s.log.Info().Str("actor", id.String()).Str("fingerprint", k.Fingerprint).Msg("recovery key set")
		}})
}

func noRecoveryKey() *fsm.Refusal {
	return &fsm.Refusal{Kind: fsm.RefuseConflict, Code: fsm.CodeNoRecoveryKey,
		Reason: "the cluster has no recovery key, so no volume key could be recovered if its worker's key were lost: run `ferry keys recovery-init --out FILE` once, keep FILE offline, then retry"}
}

// needRecoveryKey refuses a new volume before a recovery key exists: its
// key could never be committed (an owner envelope needs a recovery one).
func (s *Server) needRecoveryKey() *fsm.Refusal {
	if _, ok := s.store.RecoveryKey(); !ok {
		return noRecoveryKey()
	}
	return nil
}

func (s *Server) handlePutEnvelopes() handler {
	return propose(s, write[api.EnvelopesRequest]{cmd: fsm.CmdPutEnvelopes, reply: volumeOf,
		build: func(r *http.Request, id fsm.Identity, req *api.EnvelopesRequest) (any, error) {
			return &fsm.PutEnvelopesCmd{Header: s.header(id), Volume: r.PathValue("id"), Envelopes: req.Envelopes}, nil
		},
		applied: func(id fsm.Identity, req *api.EnvelopesRequest) {
			for _, e := range req.Envelopes {
				s.log.Info().Str("actor", id.String()).Str("volume", e.Volume).Str("purpose", string(e.Purpose)).
					Str("recipient", e.Recipient).Str("fingerprint", e.Fingerprint).Str("migration", e.Migration).Msg("key envelope stored")
			}
		}})
}

func (s *Server) handleListEnvelopes(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
	vid := r.PathValue("id")
	if _, ok := s.store.Volume(vid); !ok || !s.store.ScopeOf(id).CanReadVolume(vid) {
		writeErr(w, notFound("volume", vid))
		return
	}
	writeJSON(w, http.StatusOK, s.store.EnvelopeSummaries(vid))
}

// handleGetEnvelope serves an envelope from this server's store once it is
// known to be current: on the leader after confirming leadership with a
// quorum and applying everything committed (no log entry per read); on a
// follower only for a read that names an index this replica has applied.
// Every read, granted or refused, leaves an audit line in the log output.
func (s *Server) handleGetEnvelope(w http.ResponseWriter, r *http.Request, id fsm.Identity) {
	vol, purpose := r.PathValue("id"), fsm.Purpose(r.PathValue("purpose"))
	audit := s.log.Info().Str("audit", "envelope_read").Str("actor", id.String()).Str("volume", vol).Str("purpose", string(purpose))
	if err := s.readCurrent(r); err != nil {
		audit.Str("outcome", "retry").Msg("key envelope read")
		writeErr(w, err)
		return
	}
	e, ref := s.store.EnvelopeAccess(id, vol, purpose)
	if ref != nil {
		audit.Str("outcome", "refused").Str("reason", ref.Reason).Msg("key envelope read")
		writeErr(w, ref)
		return
	}
	audit.Str("outcome", "granted").Str("recipient", e.Recipient).Str("fingerprint", e.Fingerprint).Str("migration", e.Migration).
		Uint64("epoch", e.Epoch).Msg("key envelope read")
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, e)
}

func (s *Server) readCurrent(r *http.Request) *fsm.Refusal {
	if q := r.URL.Query().Get("index"); q != "" && !s.node.IsLeader() {
		idx, err := strconv.ParseUint(q, 10, 64)
		if err != nil {
			return &fsm.Refusal{Kind: fsm.RefuseInvalid, Code: fsm.CodeInvalid, Reason: "index must be a number"}
		}
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		s.waitApplied(ctx, idx, 2*time.Second)
		if s.store.Index() >= idx {
			return nil
		}
		return &fsm.Refusal{Kind: fsm.RefuseNotLeader, Code: fsm.CodeNoLeader, Reason: "this replica has not applied index " + q + " yet; retry"}
	}
	if !s.node.IsLeader() {
		return &fsm.Refusal{Kind: fsm.RefuseNotLeader, Code: fsm.CodeNoLeader, Reason: "key envelopes are read from the leader (or with ?index=N from a follower that applied N); retry"}
	}
	if err := s.node.Raft.VerifyLeader().Error(); err != nil {
		return &fsm.Refusal{Kind: fsm.RefuseNotLeader, Code: fsm.CodeNoLeader, Reason: "leadership could not be confirmed: " + err.Error() + "; retry"}
	}
	// AppliedIndex counts every entry (no-ops and configuration too), so it
	// is compared with the commit index rather than the store's index.
	commit := s.node.Raft.CommitIndex()
	for deadline := time.Now().Add(2 * time.Second); s.node.Raft.AppliedIndex() < commit; {
		if time.Now().After(deadline) || r.Context().Err() != nil {
			return &fsm.Refusal{Kind: fsm.RefuseNotLeader, Code: fsm.CodeNoLeader, Reason: "the leader is still applying committed entries; retry"}
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}
