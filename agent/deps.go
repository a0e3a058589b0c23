package agent

import (
	"context"
	"errors"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/machine"
	"github.com/ferry-dev/ferry/supervisor"
	"github.com/ferry-dev/ferry/volops"
)

// Parts are the worker's pieces an agent drives; cmd/ferry wires the
// concrete ones in.
type Parts struct {
	Control  ControlPlane
	Exports  Exporter
	Data     datapath.Backend
	Machines Machines
	Lease    Lease
	Keys     Keys
	Volumes  VolumeOps
	Marks    Marks
}

// Lease keeps this worker's lease and fences the worker (stops the
// machines not settled here, starts none) when it cannot (fence.Lease).
type Lease interface {
	// Renew calls renew (a registration or a heartbeat); on success the
	// lease runs from the time it was sent.
	Renew(ctx context.Context, renew func(context.Context) error) error
	// Run heartbeats with renew and fences or unfences until ctx ends.
	Run(ctx context.Context, renew func(context.Context) error)
	// Guard only fences or unfences (from the deadline a previous agent
	// process persisted, before this one could register); Run includes it.
	Guard(ctx context.Context)
	Fenced() bool
	// NoteMigrations and NoteAssigned give the fence the newest view of the
	// store: which machines are settled here.
	NoteMigrations(ms []*fsm.Migration)
	NoteAssigned(ms []*fsm.Machine)
}

// Keys holds this worker's volume keys (keycustody.Custodian).
type Keys interface {
	Public() fsm.PublicKey
	// SealForTarget seals the migrating volume's key to the target.
	SealForTarget(ctx context.Context, m *fsm.Migration) error
	// MigrationKey opens the incoming volume's key on the target and makes
	// the target its owner.
	MigrationKey(ctx context.Context, m *fsm.Migration) ([]byte, error)
	// CloneKey is MigrationKey for the clone's build: key hands the key
	// over before the target's own envelopes are sealed; settle waits for
	// that seal (or seals them if key was never asked) and must succeed
	// before anything relies on them.
	CloneKey(m *fsm.Migration) (key func(context.Context) ([]byte, error), settle func(context.Context) error)
}

// Machines runs this worker's machines (supervisor.Supervisor); starts
// pass the fence.
type Machines interface {
	// Spec is the machine's driver spec on this worker in netns;
	// LocalSpec in its own network namespace here.
	Spec(m *fsm.Machine, netns string) (machine.Spec, error)
	LocalSpec(m *fsm.Machine) (machine.Spec, error)
	// AttachArriving reads a machine migrating here and makes its network
	// namespace at its 6PN address with host as the host part (idempotent).
	AttachArriving(ctx context.Context, id string, host uint32) (supervisor.Arrival, error)
	// MapOld keeps an arriving machine's old address reaching it for the
	// grace period (the target, while it builds the clone or at cutover);
	// UnmapArriving undoes it when the migration rolls back. Idempotent.
	MapOld(ctx context.Context, arr supervisor.Arrival) error
	UnmapArriving(ctx context.Context, m *fsm.Machine) error
	// ForwardDeparted removes a machine's network here and routes its old
	// address towards target for the grace period (the source, after
	// cutover). Detach only removes it. Both are idempotent.
	ForwardDeparted(ctx context.Context, id, old, new, target string) error
	Detach(ctx context.Context, id string) error
	Start(ctx context.Context, spec machine.Spec) error
	// Stop stops the machine and any process of it no driver recorded.
	Stop(ctx context.Context, spec machine.Spec) error
	// StartLocal mounts the machine's volume here and runs it.
	StartLocal(ctx context.Context, m *fsm.Machine) error
	// EnsureRunning starts a machine whose volume is mounted here if the
	// store assigns it here recorded running and it does not run (in its
	// namespace, at its address); it reports whether it started it.
	EnsureRunning(ctx context.Context, id string) (bool, error)
	// Reconcile brings a machine no migration owns to its recorded state.
	Reconcile(ctx context.Context, m *fsm.Machine)
	// Revive repairs vol if its datapath died under machine's mount; the
	// caller mounts it again. It reports whether it did anything.
	Revive(ctx context.Context, vol, machine string) (bool, error)
	// Forget drops the restart policy's memory of a machine.
	Forget(machine string)
}

// VolumeOps are the operations on this worker's volumes (volops.Ops).
type VolumeOps interface {
	// Reconcile brings this worker's volumes and the forks whose copy it
	// makes to their recorded state (in the background where that takes
	// long; WaitJobs waits for it); guard runs a volume's growth.
	Reconcile(ctx context.Context, vols, forks []*fsm.Volume, guard volops.Guard)
	WaitJobs()
	// DestinationName names a migration's destination volume.
	DestinationName(m *fsm.Migration) string
	// Allocate makes a migration destination's sparse file.
	Allocate(vol string, size int64) error
	// ExportTo serves volume vol as export id to worker alone (Exports
	// serves it); it returns the portal and IQN.
	ExportTo(ctx context.Context, id, vol, worker string) (portal, iqn string, err error)
	// KnownZero lists a local volume's holes.
	KnownZero(vol string) ([]fsm.Range, error)
	// Trim discards a mounted filesystem's unused blocks.
	Trim(ctx context.Context, mnt string) (string, error)
	// FollowHydration waits for a clone's background copy, reporting to r,
	// and dissolves it.
	FollowHydration(ctx context.Context, log zerolog.Logger, p datapath.CloneHandle, vol string, export *fsm.Export,
		stallAfter time.Duration, r volops.HydrationReports) (*datapath.Progress, error)
}

// Marks records local one-shot side effects that no event records,
// durably (stepmark.Dir).
type Marks interface {
	Done(migration, what string) bool
	Mark(migration, what string) error
}

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
	ListVolumes(ctx context.Context, worker string) ([]*fsm.Volume, error)
	// ForksFrom lists the forks to other workers whose copy worker makes.
	ForksFrom(ctx context.Context, worker string) ([]*fsm.Volume, error)
	CreateVolume(ctx context.Context, v fsm.Volume) (*fsm.Volume, error)
	UpdateVolume(ctx context.Context, cmd fsm.UpdateVolumeCmd) error
	GetMachine(ctx context.Context, id string) (*fsm.Machine, error)
	ListMachines(ctx context.Context, worker string) ([]*fsm.Machine, error)
	GetWorker(ctx context.Context, name string) (*fsm.Worker, error)
	// SetWorkerKey registers this worker's key-encryption public key.
	SetWorkerKey(ctx context.Context, worker string, k fsm.PublicKey) error
}

// Exporter serves a frozen volume to one target over iSCSI.
type Exporter interface {
	// Export starts (or re-adopts) the export of path for migration id,
	// admitting only the worker target (its certificate) from its
	// registered address allow; it returns the portal and IQN.
	Export(ctx context.Context, id, path, target, allow string) (portal, iqn string, err error)
	// Unexport tears the export down without a trace; idempotent.
	Unexport(ctx context.Context, id string) error
	// Live reports whether this process serves the export of migration id.
	Live(id string) bool
}

func isNotFound(err error) bool {
	var r *fsm.Refusal
	return errors.As(err, &r) && r.Kind == fsm.RefuseNotFound
}
