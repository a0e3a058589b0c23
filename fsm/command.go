package fsm

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

// FormatVersion numbers the replicated format: the command types, their
// payloads and the snapshot. fsm/testdata/golden/v<N> pins each version;
// raise it when any of them changes (see docs/operations.md, upgrades).
const FormatVersion = 1

// CommandVersion is the only envelope version this build applies. It changes
// only if the envelope itself does; new command types and fields raise
// FormatVersion instead.
const CommandVersion = 1

// maxCommandBytes bounds a command; real ones are a few KiB.
const maxCommandBytes = 1 << 20

// CommandType names a command in the replicated log.
type CommandType string

// Command types are only ever appended, never renumbered or reused: an old
// entry in the log keeps its meaning. Append new ones to CommandTypes too,
// and give each a row in commands: its payload, authorization and apply.
const (
	CmdRegisterServer CommandType = "register_server"
	CmdRegisterWorker CommandType = "register_worker"
	CmdHeartbeat      CommandType = "heartbeat"
	CmdCreateVolume   CommandType = "create_volume"
	CmdUpdateVolume   CommandType = "update_volume"
	CmdDestroyVolume  CommandType = "destroy_volume"
	CmdSetVolumeKey   CommandType = "set_volume_key"
	CmdKeyAccess      CommandType = "key_access"
	CmdCreateMachine  CommandType = "create_machine"
	CmdUpdateMachine  CommandType = "update_machine"
	CmdPlan           CommandType = "plan"
	CmdPropose        CommandType = "propose"
	CmdRevokeCert     CommandType = "revoke_cert"
	CmdGC             CommandType = "gc"
	CmdSetWorkerKey   CommandType = "set_worker_key"
	CmdSetRecoveryKey CommandType = "set_recovery_key"
	CmdPutEnvelopes   CommandType = "put_envelopes"
	CmdExtendVolume   CommandType = "extend_volume"
	CmdForkVolume     CommandType = "fork_volume"
	CmdCordon         CommandType = "cordon"
	CmdDrain          CommandType = "drain"
	CmdDrainUpdate    CommandType = "drain_update"
	CmdForkServe      CommandType = "fork_serve"
)

// CommandTypes lists every command type this build applies, oldest first.
var CommandTypes = []CommandType{CmdRegisterServer, CmdRegisterWorker, CmdHeartbeat, CmdCreateVolume, CmdUpdateVolume,
	CmdDestroyVolume, CmdSetVolumeKey, CmdKeyAccess, CmdCreateMachine, CmdUpdateMachine, CmdPlan, CmdPropose, CmdRevokeCert, CmdGC,
	CmdSetWorkerKey, CmdSetRecoveryKey, CmdPutEnvelopes,
	CmdExtendVolume, CmdForkVolume, CmdCordon, CmdDrain, CmdDrainUpdate, CmdForkServe}

// Command is the versioned envelope every log entry holds.
type Command struct {
	Version int             `json:"v"`
	Type    CommandType     `json:"type"`
	Payload json.RawMessage `json:"payload"`
}

// Kind is what a certificate says its holder is.
type Kind string

const (
	KindServer   Kind = "server"
	KindWorker   Kind = "worker"
	KindOperator Kind = "operator"
)

// Identity is who proposes a command, taken from the client certificate.
type Identity struct {
	Name string `json:"name"`
	Kind Kind   `json:"kind"`
}

func (id Identity) String() string { return string(id.Kind) + " " + id.Name }

// privileged reports whether id may act on anything (operators, servers).
func (id Identity) privileged() bool { return id.Kind == KindOperator || id.Kind == KindServer }

// Header is carried by every payload: who and when. Time comes from the
// proposing server, so Apply never reads a clock.
type Header struct {
	Actor Identity  `json:"actor"`
	Now   time.Time `json:"now"`
}

// RegisterServerCmd records a raft voter's API address (or forgets a removed one).
type RegisterServerCmd struct {
	Header
	Member ServerMember `json:"member"`
	Remove bool         `json:"remove,omitempty"`
}

// RegisterWorkerCmd adds or refreshes a worker.
type RegisterWorkerCmd struct {
	Header
	Worker   Worker        `json:"worker"`
	LeaseTTL time.Duration `json:"lease_ttl"`
}

// HeartbeatCmd extends a worker's lease and records its capacity report.
// Servers propose it only when the lease needs extending or the report
// changed meaningfully (WorkerReport.Differs), not on every beat.
type HeartbeatCmd struct {
	Header
	Name     string        `json:"name"`
	LeaseTTL time.Duration `json:"lease_ttl"`
	Report   *WorkerReport `json:"report,omitempty"`
}

// CordonCmd stops (or resumes) new placements on a worker.
type CordonCmd struct {
	Header
	Worker   string `json:"worker"`
	Cordoned bool   `json:"cordoned"`
	Reason   string `json:"reason,omitempty"`
}

// DrainCmd records a drain of a worker and cordons it. The leader's drainer
// then starts its migrations with DrainUpdateCmd.
type DrainCmd struct {
	Header
	ID           string        `json:"id"`
	Worker       string        `json:"worker"`
	Deadline     time.Duration `json:"deadline,omitempty"` // 0: none
	Parallel     int           `json:"parallel,omitempty"` // 0: DefaultDrainParallel
	Targets      []string      `json:"targets,omitempty"`  // empty: any worker placement allows
	BandwidthBPS int64         `json:"bandwidth_bps,omitempty"`
}

// DrainUpdateCmd is one step of a drain, applied at once: the migrations it
// starts are planned and marked in the drain record in the same entry, so a
// new leader never starts one twice. Finish ends the drain (the drainer:
// complete or deadline; an operator: cancelled) with what was left.
type DrainUpdateCmd struct {
	Header
	ID      string            `json:"id"`
	Start   []DrainStart      `json:"start,omitempty"`
	Waiting map[string]string `json:"waiting,omitempty"` // machine -> why it was not placed this round
	Finish  DrainState        `json:"finish,omitempty"`
	Left    []DrainLeft       `json:"left,omitempty"`
}

// CreateVolumeCmd registers a volume.
type CreateVolumeCmd struct {
	Header
	Volume Volume `json:"volume"`
}

// UpdateVolumeCmd changes fields of a volume; nil fields are left alone.
type UpdateVolumeCmd struct {
	Header
	ID              string       `json:"id"`
	State           *VolumeState `json:"state,omitempty"`
	AttachedMachine *string      `json:"attached_machine,omitempty"`
	Layout          *LUKSLayout  `json:"layout,omitempty"`
	Size            *int64       `json:"size,omitempty"`
}

// DestroyVolumeCmd moves a volume to pending_destroy (or destroyed once its retention passed).
type DestroyVolumeCmd struct {
	Header
	ID        string        `json:"id"`
	Retention time.Duration `json:"retention"`
}

// SetVolumeKeyCmd is retired: it carried a plaintext volume key. Entries
// still in old logs decode and apply as a no-op (the key is dropped);
// nothing proposes it any more (keys are sealed envelopes, PutEnvelopesCmd).
type SetVolumeKeyCmd struct {
	Header
	ID  string `json:"id"`
	Key []byte `json:"key"`
}

// KeyAccessCmd is retired: reading a key was a raft write. Old entries
// apply as a no-op; envelopes are read from the store (Store.EnvelopeAccess).
type KeyAccessCmd struct {
	Header
	ID string `json:"id"`
}

// CreateMachineCmd registers a machine.
type CreateMachineCmd struct {
	Header
	Machine Machine `json:"machine"`
}

// UpdateMachineCmd changes fields of a machine; nil fields are left alone.
type UpdateMachineCmd struct {
	Header
	ID      string           `json:"id"`
	State   *MachineState    `json:"state,omitempty"`
	Volume  *string          `json:"volume,omitempty"`
	Addr6PN *string          `json:"addr_6pn,omitempty"`
	Spec    *json.RawMessage `json:"spec,omitempty"`
	// Crashes, from the machine's worker, records its crash count. A state
	// change without it (an operator's start or stop) resets the count.
	Crashes *int `json:"crashes,omitempty"`
}

// PlanCmd creates a migration after admission checks.
type PlanCmd struct {
	Header
	ID      string `json:"id"`
	Machine string `json:"machine"`
	Target  string `json:"target"`
	StepID  string `json:"step_id,omitempty"`
	// MaxDowntime is the downtime budget (0: DefaultMaxDowntime).
	MaxDowntime time.Duration `json:"max_downtime,omitempty"`
}

// ProposeCmd proposes an event on a migration.
type ProposeCmd struct {
	Header
	ID      string       `json:"id"`
	Event   Event        `json:"event"`
	StepID  string       `json:"step_id"`
	Payload EventPayload `json:"payload"`
}

// RevokeCertCmd puts a certificate serial on the replicated deny list that
// every server checks on every TLS connection.
type RevokeCertCmd struct {
	Header
	Serial string `json:"serial"` // lowercase hex, as NormalizeSerial returns it
	Reason string `json:"reason,omitempty"`
}

// GCCmd deletes terminal migrations and destroyed volumes that ended at
// least Retention before Now. The leader's housekeeping proposes it; the
// store decides what is old enough, so every replica deletes the same.
type GCCmd struct {
	Header
	Retention time.Duration `json:"retention"`
}

// ExtendVolumeCmd asks for a volume to grow to Size bytes (the whole
// ciphertext file, header included). Operators propose it; the store records
// the wish in Volume.WantSize and the owning worker grows the volume online
// and reports the new size and layout with update_volume.
type ExtendVolumeCmd struct {
	Header
	ID   string `json:"id"`
	Size int64  `json:"size"`
}

// ForkVolumeCmd registers volume ID as an independent copy of Source, taken
// at one instant while Source's machine keeps running. The record appears at
// once (creating, ForkOf set); Source's worker makes the copy, under a key
// of the fork's own, and marks it created.
type ForkVolumeCmd struct {
	Header
	ID     string `json:"id"`
	Source string `json:"source"`
	Worker string `json:"worker"`
}

// ForkServeCmd is the source side of a fork to another worker, proposed by
// the fork's ForkFrom worker only. With Export set it publishes the
// re-encrypted point-in-time copy it made (its layout, where it serves it
// and its holes) so the fork's worker can clone and hydrate it; with
// Released it says the copy and its export are gone from ForkFrom, which
// it may say only once the fork no longer needs them (created or destroyed).
type ForkServeCmd struct {
	Header
	ID        string      `json:"id"`
	Layout    *LUKSLayout `json:"layout,omitempty"`
	Export    *Export     `json:"export,omitempty"`
	KnownZero []Range     `json:"known_zero,omitempty"`
	Released  bool        `json:"released,omitempty"`
}

// EventPayload carries what an event reports; each event reads its own fields.
type EventPayload struct {
	Reason       string      `json:"reason,omitempty"`        // abort, failed, report
	Error        string      `json:"error,omitempty"`         // report, failed
	Stalled      *bool       `json:"stalled,omitempty"`       // report
	Layout       *LUKSLayout `json:"layout,omitempty"`        // target_prepared, source_stopped
	Export       *Export     `json:"export,omitempty"`        // exported
	KnownZero    []Range     `json:"known_zero,omitempty"`    // trimmed
	Progress     *Progress   `json:"progress,omitempty"`      // progress, hydrated
	TargetVolume string      `json:"target_volume,omitempty"` // target_prepared
	New6PN       string      `json:"new_6pn,omitempty"`       // cutover
}

// Encode wraps a payload in a versioned envelope.
func Encode(t CommandType, payload any) ([]byte, error) {
	p, err := json.Marshal(payload)
	if err != nil {
		return nil, fmt.Errorf("encoding %s payload: %w", t, err)
	}
	return json.Marshal(Command{Version: CommandVersion, Type: t, Payload: p})
}

// ErrBadCommand is wrapped by every decoding failure.
var ErrBadCommand = errors.New("bad command")

// Decode parses an envelope strictly: unknown version, type or field is an
// error, never a panic.
func Decode(data []byte) (CommandType, any, error) {
	if len(data) > maxCommandBytes {
		return "", nil, fmt.Errorf("%w: %d bytes exceeds %d", ErrBadCommand, len(data), maxCommandBytes)
	}
	var c Command
	if err := strictUnmarshal(data, &c); err != nil {
		return "", nil, fmt.Errorf("%w: envelope: %v", ErrBadCommand, err)
	}
	if c.Version != CommandVersion {
		return c.Type, nil, fmt.Errorf("%w: version %d, this server applies version %d: upgrade the server", ErrBadCommand, c.Version, CommandVersion)
	}
	cmd, ok := commands[c.Type]
	if !ok {
		return c.Type, nil, fmt.Errorf("%w: unknown type %q (this server applies format %d): a newer server proposed it before every voter ran its version; upgrade this server", ErrBadCommand, c.Type, FormatVersion)
	}
	if len(c.Payload) == 0 {
		return c.Type, nil, fmt.Errorf("%w: %s without payload", ErrBadCommand, c.Type)
	}
	p := cmd.payload()
	if err := strictUnmarshal(c.Payload, p); err != nil {
		return c.Type, nil, fmt.Errorf("%w: %s payload (this server applies format %d; an unknown field means a newer server wrote it: upgrade this server): %v", ErrBadCommand, c.Type, FormatVersion, err)
	}
	return c.Type, p, nil
}

func strictUnmarshal(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("trailing data after the JSON value")
	}
	return nil
}
