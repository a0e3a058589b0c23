package agent

import (
	"context"
	"errors"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/netrewrite"
)

// ControlPlane is what the agent needs from the replicated store (the API
// client implements it). Every write carries a step ID so a retry after a
// crash or a leader change applies once.
type ControlPlane interface {
	RegisterWorker(ctx context.Context, w fsm.Worker) error
	Heartbeat(ctx context.Context, worker string) error
	// WatchMigrations blocks until the migrations naming worker change past index.
	WatchMigrations(ctx context.Context, worker string, index uint64) ([]*fsm.Migration, uint64, error)
	GetMigration(ctx context.Context, id string) (*fsm.Migration, error)
	Propose(ctx context.Context, id string, ev fsm.Event, stepID string, p fsm.EventPayload) (*fsm.Migration, error)
	GetVolume(ctx context.Context, id string) (*fsm.Volume, error)
	ListVolumes(ctx context.Context, worker string) ([]*fsm.Volume, error)
	CreateVolume(ctx context.Context, v fsm.Volume) (*fsm.Volume, error)
	UpdateVolume(ctx context.Context, cmd fsm.UpdateVolumeCmd) error
	GetMachine(ctx context.Context, id string) (*fsm.Machine, error)
	ListMachines(ctx context.Context, worker string) ([]*fsm.Machine, error)
	UpdateMachine(ctx context.Context, cmd fsm.UpdateMachineCmd) error
	GetWorker(ctx context.Context, name string) (*fsm.Worker, error)
	// Envelope returns a sealed copy of a volume's key: the owner envelope
	// of a volume this worker holds, or the migration envelope of a volume
	// it is the target of. Only this worker's private key opens it.
	Envelope(ctx context.Context, volume string, purpose fsm.Purpose) (*fsm.Envelope, error)
	// PutEnvelopes stores sealed copies of a volume's key.
	PutEnvelopes(ctx context.Context, volume string, envs []fsm.Envelope) error
	// SetWorkerKey registers this worker's key-encryption public key.
	SetWorkerKey(ctx context.Context, worker string, k fsm.PublicKey) error
	// RecoveryKey returns the cluster's recovery public key.
	RecoveryKey(ctx context.Context) (*fsm.PublicKey, error)
}

// Exporter serves a frozen volume to one target over iSCSI.
type Exporter interface {
	// Export starts (or re-adopts) the export of path for migration id,
	// reachable only from allow; it returns the portal and IQN.
	Export(ctx context.Context, id, path, allow string) (portal, iqn string, err error)
	// Unexport tears the export down without a trace; idempotent.
	Unexport(ctx context.Context, id string) error
	// Live reports whether this process serves the export of migration id.
	Live(id string) bool
}

// Network places machines on the 6PN and rewrites addresses at cutover.
type Network interface {
	// Attach creates the machine's network namespace on this worker with addr; returns the netns name.
	Attach(ctx context.Context, machine string, addr netrewrite.Addr) (string, error)
	// Namespace names the machine's network namespace on this worker.
	Namespace(machine string) string
	// Detach removes it; idempotent.
	Detach(ctx context.Context, machine string) error
	// MapOld keeps old reaching the machine (now at new on this worker) for the grace period.
	MapOld(ctx context.Context, machine string, old, new netrewrite.Addr) error
	// ForwardOld, on the source, routes old towards via (the target worker's
	// fabric address) for the grace period.
	ForwardOld(ctx context.Context, machine string, old, new netrewrite.Addr, via string) error
}

// isRefusal reports whether err is the store refusing a proposal (state
// moved on, guard failed) rather than a transport failure; the control
// plane reports refusals as *fsm.Refusal.
func isRefusal(err error) bool {
	var r *fsm.Refusal
	return errors.As(err, &r) && r.Kind.ClientSide()
}
