// Package api is the Go client of ferry's HTTP/JSON interface (/v1, mTLS)
// and its wire types; agents and the CLI use it. It imports nothing of the
// server (package server): a test keeps it that way. Reads of collections
// support blocking queries: `?index=N&wait=30s` returns when something newer
// than N exists, with the new index in the X-Ferry-Index header.
package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// IndexHeader carries the index a blocking query returns.
const IndexHeader = "X-Ferry-Index"

// LeaderHeader carries the leader's API address (host:port) on a follower's
// not_leader refusal of a write: the client sends the write there itself.
const LeaderHeader = "X-Ferry-Leader"

// Error is a refusal or failure as the API reports it. It is the state
// machine's refusal type itself (an alias, not a copy): the body of every
// non-2xx reply is {"error": {"kind", "code", "reason", "state"}}, and the
// HTTP status is the server's mapping of the kind.
type Error = fsm.Refusal

// ErrorCode returns the code of an *Error in err's chain, or "".
func ErrorCode(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return ""
}

// ErrorBody is the JSON of every non-2xx reply.
type ErrorBody struct {
	Error *Error `json:"error"`
}

// StatusReply describes the server answering and the cluster as it sees it.
type StatusReply struct {
	ID        string             `json:"id"`
	RaftState string             `json:"raft_state"`
	Leader    string             `json:"leader"`
	LeaderAPI string             `json:"leader_api,omitempty"`
	Index     uint64             `json:"index"`
	Ready     bool               `json:"ready"` // caught up since start; reads are refused (503) until then
	Servers   []fsm.ServerMember `json:"servers"`
	Voters    []string           `json:"voters"`
}

// RegisterWorkerRequest registers (or refreshes) a worker.
type RegisterWorkerRequest struct {
	Worker   fsm.Worker `json:"worker"`
	LeaseTTL Duration   `json:"lease_ttl,omitempty"`
}

// HeartbeatRequest extends a worker's lease and reports its capacity. The
// server writes it to the log only when the lease needs extending or the
// report changed meaningfully, so beats are cheap.
type HeartbeatRequest struct {
	LeaseTTL Duration          `json:"lease_ttl,omitempty"`
	Report   *fsm.WorkerReport `json:"report,omitempty"`
}

// VolumeExtend asks for a volume to grow to Size bytes (the whole
// encrypted volume, header included).
type VolumeExtend struct {
	Size int64 `json:"size"`
}

// VolumeFork asks for an independent copy of a volume, named ID, on Worker.
type VolumeFork struct {
	ID     string `json:"id"`
	Worker string `json:"worker"`
}

// ForkServe is what the worker making a fork to another worker reports:
// the copy's layout, where it serves it and its holes; or, with Released
// alone, that the copy is gone (fsm.ForkServeCmd).
type ForkServe struct {
	Layout    *fsm.LUKSLayout `json:"layout,omitempty"`
	Export    *fsm.Export     `json:"export,omitempty"`
	KnownZero []fsm.Range     `json:"known_zero,omitempty"`
	Released  bool            `json:"released,omitempty"`
}

// VolumeUpdate changes the given fields of a volume.
type VolumeUpdate struct {
	State           *fsm.VolumeState `json:"state,omitempty"`
	AttachedMachine *string          `json:"attached_machine,omitempty"`
	Layout          *fsm.LUKSLayout  `json:"layout,omitempty"`
	Size            *int64           `json:"size,omitempty"`
}

// MachineUpdate changes the given fields of a machine.
type MachineUpdate struct {
	State   *fsm.MachineState `json:"state,omitempty"`
	Volume  *string           `json:"volume,omitempty"`
	Addr6PN *string           `json:"addr_6pn,omitempty"`
	Spec    *json.RawMessage  `json:"spec,omitempty"`
}

// PlanRequest asks for a migration of a machine (and its volume) to a target worker.
type PlanRequest struct {
	ID      string `json:"id,omitempty"` // chosen by the server when empty
	Machine string `json:"machine"`
	Target  string `json:"target"`
	StepID  string `json:"step_id,omitempty"`
	// MaxDowntime is the downtime budget (empty: the default, 60s).
	MaxDowntime Duration `json:"max_downtime,omitempty"`
}

// ProposeRequest proposes an event on a migration.
type ProposeRequest struct {
	Event   fsm.Event        `json:"event"`
	StepID  string           `json:"step_id"`
	Payload fsm.EventPayload `json:"payload"`
}

// ProposeReply is the migration after the proposal.
type ProposeReply struct {
	Migration *fsm.Migration `json:"migration"`
	Duplicate bool           `json:"duplicate,omitempty"`
	Ignored   bool           `json:"ignored,omitempty"`
}

// AbortRequest asks to roll a migration back (only before cutover).
type AbortRequest struct {
	Reason string `json:"reason"`
	StepID string `json:"step_id,omitempty"`
}

// JoinRequest asks the leader to add a server as a voter.
type JoinRequest struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	APIAddr  string `json:"api_addr"`
}

// EnvelopesRequest stores sealed copies of a volume's key
// (POST /v1/volumes/{id}/envelopes).
type EnvelopesRequest struct {
	Envelopes []fsm.Envelope `json:"envelopes"`
}

// Duration is a time.Duration that reads and writes as "30s" in JSON.
type Duration time.Duration

func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		var n int64
		if err2 := json.Unmarshal(b, &n); err2 != nil {
			return fmt.Errorf("duration: use a string like \"15s\"")
		}
		*d = Duration(n)
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("duration %q: %w", s, err)
	}
	*d = Duration(v)
	return nil
}
