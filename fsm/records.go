package fsm

import (
	"encoding/json"
	"slices"
	"time"
)

// Defaults the store applies when a command leaves them out.
const (
	DefaultMigrationsPerWorker = 2                  // concurrent outbound and inbound migrations per worker
	DefaultLeaseTTL            = 15 * time.Second   // worker lease without heartbeat
	DefaultMigratedRetention   = 7 * 24 * time.Hour // a migrated source volume is kept a week (Fly)
	DefaultDestroyRetention    = 24 * time.Hour     // a destroyed volume is kept a day
	ProgressInterval           = 5 * time.Second    // at most one non-milestone progress entry per migration per interval
	maxStepIDs                 = 128                // step IDs remembered per migration
)

// DefaultMaxDowntime is a migration's downtime budget when its plan names
// none: generous next to the usual sub-second cutover, so only a step that
// hangs (a tool, a lost source) spends it.
const DefaultMaxDowntime = 60 * time.Second

// Budget returns the migration's downtime budget.
func (m *Migration) Budget() time.Duration {
	if m.MaxDowntime > 0 {
		return m.MaxDowntime
	}
	return DefaultMaxDowntime
}

// FenceMargin is how long past a worker's lease expiry the store still
// assumes the worker may run machines: an agent that cannot renew stops
// its machines before its lease ends (by its own margin), and this covers
// clock drift between worker and servers and a machine's stop time. An
// operator's word that a silent target is gone counts only after it.
const FenceMargin = 5 * time.Second

// Migration is the replicated record of one migration.
type Migration struct {
	ID      string `json:"id"`
	Volume  string `json:"volume"`
	Machine string `json:"machine"`
	Source  string `json:"source"`
	Target  string `json:"target"`
	Network uint32 `json:"network"` // private network (org) of the machine: one migration per network at a time

	State       State               `json:"state"`
	EnteredAt   map[State]time.Time `json:"entered_at"` // when each state was committed (proposer's clock via the leader)
	CreatedAt   time.Time           `json:"created_at"`
	UpdatedAt   time.Time           `json:"updated_at"`
	ModifyIndex uint64              `json:"modify_index"` // raft index of the last change (blocking queries)
	Attempts    int                 `json:"attempts"`
	LastError   string              `json:"last_error,omitempty"`
	Stalled     bool                `json:"stalled"`
	StallCause  string              `json:"stalled_reason,omitempty"`
	Rollback    *RollbackInfo       `json:"rollback,omitempty"`
	Layout      *LUKSLayout         `json:"layout,omitempty"`
	KnownZero   []Range             `json:"known_zero,omitempty"`
	Export      *Export             `json:"export,omitempty"`
	Progress    *Progress           `json:"progress,omitempty"`
	TargetVol   string              `json:"target_volume,omitempty"`
	Old6PN      string              `json:"old_6pn,omitempty"`
	New6PN      string              `json:"new_6pn,omitempty"`
	// MaxDowntime is the downtime budget: the steps from source_stopped to
	// cutover must finish within it, or the migration rolls back (0:
	// DefaultMaxDowntime).
	MaxDowntime time.Duration  `json:"max_downtime,omitempty"`
	KeyAccess   []KeyAccess    `json:"key_access,omitempty"`
	Steps       []StepResult   `json:"steps,omitempty"` // last maxStepIDs applied step IDs, oldest first
	stepIndex   map[string]int // StepID -> index in Steps; rebuilt on restore
}

// RollbackInfo records why and how a migration rolled back.
type RollbackInfo struct {
	Reason         string `json:"reason"`
	By             string `json:"by"`   // proposer name
	From           State  `json:"from"` // state when the rollback began
	SourceStopped  bool   `json:"source_stopped"`
	TargetTornDown bool   `json:"target_torn_down"`
	SourceRestored bool   `json:"source_restored"`
}

// Export is where the source serves the frozen volume.
type Export struct {
	Portal string `json:"portal"` // host:port of the iSCSI target
	IQN    string `json:"iqn"`
}

// Progress is a clone's hydration progress: the one progress type of ferry.
// A data-path backend reports it in full; the target proposes its
// replicated part (Replicated), which the migration record keeps as last
// reported.
type Progress struct {
	HydratedBytes int64     `json:"hydrated_bytes"`
	TotalBytes    int64     `json:"total_bytes"`
	FetchedBytes  int64     `json:"fetched_bytes"`
	SkippedBytes  int64     `json:"skipped_bytes"` // marked hydrated by discard or known zero, never fetched
	RateBPS       int64     `json:"rate_bps"`
	ETASeconds    int64     `json:"eta_seconds"`
	UpdatedAt     time.Time `json:"updated_at"`

	// Data-path detail, never replicated: the region geometry, the split of
	// SkippedBytes, and the backend's own stall verdict (the migration's
	// replicated stall flag is set by a report event).
	RegionSize            int64  `json:"region_size,omitempty"`
	TotalRegions          int64  `json:"total_regions,omitempty"`
	HydratedRegions       int64  `json:"hydrated_regions,omitempty"`
	SkippedDiscardBytes   int64  `json:"skipped_discard_bytes,omitempty"`
	SkippedKnownZeroBytes int64  `json:"skipped_known_zero_bytes,omitempty"`
	Stalled               bool   `json:"stalled,omitempty"`
	StalledReason         string `json:"stalled_reason,omitempty"`
}

// Replicated returns the part of p that goes into a command (nil for nil):
// the data-path detail is cleared so the log format does not depend on it.
func (p *Progress) Replicated() *Progress {
	if p == nil {
		return nil
	}
	return &Progress{HydratedBytes: p.HydratedBytes, TotalBytes: p.TotalBytes, FetchedBytes: p.FetchedBytes,
		SkippedBytes: p.SkippedBytes, RateBPS: p.RateBPS, ETASeconds: p.ETASeconds, UpdatedAt: p.UpdatedAt}
}

// Percent is the hydrated share, 0..100.
func (p *Progress) Percent() float64 {
	if p == nil || p.TotalBytes <= 0 {
		return 0
	}
	return 100 * float64(p.HydratedBytes) / float64(p.TotalBytes)
}

// KeyAccess records which worker was handed the volume key and when (kept
// for records written before keys were sealed; envelope reads are logged,
// not replicated).
type KeyAccess struct {
	Worker string    `json:"worker"`
	At     time.Time `json:"at"`
}

// StepResult is what a step ID produced the first time it was applied.
type StepResult struct {
	StepID string `json:"step_id"`
	Event  Event  `json:"event"`
	State  State  `json:"state"`           // state after applying
	Error  string `json:"error,omitempty"` // refusal reason, when it was refused
	Code   string `json:"code,omitempty"`  // refusal code
	Index  uint64 `json:"index"`           // raft index it was applied at
}

// Downtime is source_stopped -> cutover, when both are committed.
func (m *Migration) Downtime() (time.Duration, bool) {
	a, ok1 := m.EnteredAt[SourceStopped]
	b, ok2 := m.EnteredAt[Cutover]
	if !ok1 || !ok2 {
		return 0, false
	}
	return b.Sub(a), true
}

// Active reports whether the migration still holds its locks.
func (m *Migration) Active() bool { return !m.State.Terminal() }

// Clone returns a deep copy, safe to hand out of the store. It copies
// field by field: every read of a worker's migrations and every drainer
// pass clones, and a JSON round trip per record made them the leader's
// largest cost. TestMigrationCloneIsDeep fails when a field that holds a
// reference is added without being copied here.
func (m *Migration) Clone() *Migration {
	if m == nil {
		return nil
	}
	c := *m
	if m.EnteredAt != nil {
		c.EnteredAt = make(map[State]time.Time, len(m.EnteredAt))
		for k, v := range m.EnteredAt {
			c.EnteredAt[k] = v
		}
	}
	c.Rollback = clonePtr(m.Rollback)
	c.Layout = clonePtr(m.Layout)
	c.Export = clonePtr(m.Export)
	c.Progress = clonePtr(m.Progress)
	c.KnownZero = slices.Clone(m.KnownZero)
	c.KeyAccess = slices.Clone(m.KeyAccess)
	c.Steps = slices.Clone(m.Steps)
	c.stepIndex = nil // step scans the copy's own Steps
	return &c
}

func clonePtr[T any](p *T) *T {
	if p == nil {
		return nil
	}
	c := *p
	return &c
}

func (m *Migration) reindex() {
	m.stepIndex = make(map[string]int, len(m.Steps))
	for i, s := range m.Steps {
		m.stepIndex[s.StepID] = i
	}
}

func (m *Migration) step(id string) (StepResult, bool) {
	if id == "" {
		return StepResult{}, false
	}
	if m.stepIndex == nil {
		// No index (a clone, or a record that never remembered a step):
		// scan, never build one here, as readers under the store's read
		// lock (Authorize, Clone) may share this record.
		for i := len(m.Steps) - 1; i >= 0; i-- {
			if m.Steps[i].StepID == id {
				return m.Steps[i], true
			}
		}
		return StepResult{}, false
	}
	i, ok := m.stepIndex[id]
	if !ok {
		return StepResult{}, false
	}
	return m.Steps[i], true
}

func (m *Migration) rememberStep(r StepResult) {
	if r.StepID == "" {
		return
	}
	m.Steps = append(m.Steps, r)
	if len(m.Steps) > maxStepIDs {
		m.Steps = append([]StepResult(nil), m.Steps[len(m.Steps)-maxStepIDs:]...)
	}
	m.reindex()
}

// Worker is a registered worker and its lease.
type Worker struct {
	Name        string     `json:"name"`
	HostID      uint32     `json:"host_id"`  // the 32-bit host part of 6PN addresses
	Address     string     `json:"address"`  // where peers reach its exports
	Capacity    int        `json:"capacity"` // concurrent migrations in and out; 0 = default
	LeaseExpiry time.Time  `json:"lease_expiry"`
	Registered  time.Time  `json:"registered"`
	KEK         *PublicKey `json:"kek,omitempty"` // key-encryption public key; its private half never leaves the worker

	// Cordoned workers receive no new placements (drains cordon their
	// worker); migrations already running are not affected.
	Cordoned     bool          `json:"cordoned,omitempty"`
	CordonReason string        `json:"cordon_reason,omitempty"`
	Report       *WorkerReport `json:"report,omitempty"` // what the agent last reported that changed placement
}

// WorkerReport is what an agent reports about its capacity in its
// heartbeats. Zero fields mean "not reported": placement then assumes no
// constraint for that field (older agents report nothing).
type WorkerReport struct {
	FreeBytes  int64 `json:"free_bytes"`            // free bytes of the volume store
	TotalBytes int64 `json:"total_bytes"`           // size of the volume store
	SlotsIn    int   `json:"slots_in,omitempty"`    // concurrent inbound migrations it accepts
	SlotsOut   int   `json:"slots_out,omitempty"`   // concurrent outbound migrations it serves
	HydrateBPS int64 `json:"hydrate_bps,omitempty"` // hydration rate of one clone (the data path's cap)
	LinkBPS    int64 `json:"link_bps,omitempty"`    // what its exports may use of its link, all together
}

// Differs reports whether r moved far enough from o that placement would
// decide differently, so a heartbeat carrying it is worth a raft write:
// slots or rates changed, or free space moved by more than 1 GiB and 2% of
// the store.
func (r *WorkerReport) Differs(o *WorkerReport) bool {
	if r == nil || o == nil {
		return r != o
	}
	if r.SlotsIn != o.SlotsIn || r.SlotsOut != o.SlotsOut || r.HydrateBPS != o.HydrateBPS || r.LinkBPS != o.LinkBPS || r.TotalBytes != o.TotalBytes {
		return true
	}
	d := r.FreeBytes - o.FreeBytes
	if d < 0 {
		d = -d
	}
	return d > 1<<30 && d > r.TotalBytes/50
}

// LimitIn is the number of concurrent inbound migrations w accepts.
func (w *Worker) LimitIn() int {
	if w.Report != nil && w.Report.SlotsIn > 0 {
		return w.Report.SlotsIn
	}
	return limit(w)
}

// LimitOut is the number of concurrent outbound migrations w serves.
func (w *Worker) LimitOut() int {
	if w.Report != nil && w.Report.SlotsOut > 0 {
		return w.Report.SlotsOut
	}
	return limit(w)
}

// Alive reports whether the lease is valid at now.
func (w *Worker) Alive(now time.Time) bool { return now.Before(w.LeaseExpiry) }

// VolumeState follows Fly's volume lifecycle.
type VolumeState string

const (
	VolCreating      VolumeState = "creating"
	VolCreated       VolumeState = "created"
	VolRemoteExport  VolumeState = "enabling_remote_export"
	VolHydrating     VolumeState = "hydrating"
	VolPendingDelete VolumeState = "pending_destroy"
	VolDestroyed     VolumeState = "destroyed"
)

// volumeMoves are the allowed volume state changes (by update_volume).
var volumeMoves = map[VolumeState][]VolumeState{
	VolCreating:      {VolCreated, VolHydrating, VolPendingDelete},
	VolCreated:       {VolRemoteExport, VolPendingDelete},
	VolRemoteExport:  {VolCreated, VolPendingDelete},
	VolHydrating:     {VolCreated, VolPendingDelete},
	VolPendingDelete: {VolDestroyed, VolCreated},
	VolDestroyed:     {},
}

// Volume is a volume on one worker.
type Volume struct {
	ID              string      `json:"id"`
	Worker          string      `json:"worker"`
	Size            int64       `json:"size"`
	State           VolumeState `json:"state"`
	AttachedMachine string      `json:"attached_machine,omitempty"`
	Layout          *LUKSLayout `json:"layout,omitempty"`
	DestroyAfter    time.Time   `json:"destroy_after,omitzero"` // retention deadline while pending_destroy
	CreatedAt       time.Time   `json:"created_at"`
	HasKey          bool        `json:"has_key"` // an owner envelope of its key is stored
	// WantSize is the size an operator asked for with extend_volume while the
	// owning worker has not grown the volume yet; 0 when nothing is pending.
	WantSize int64 `json:"want_size,omitempty"`
	// ForkOf names the volume this one is a point-in-time copy of.
	ForkOf string `json:"fork_of,omitempty"`
	// ForkFrom is set on a fork to another worker: ForkOf's worker when
	// the fork was asked for, which makes the copy and serves it at
	// ForkExport (holes ForkKnownZero) until Worker has hydrated it, then
	// releases it (ForkExport back to nil). A local fork leaves it empty.
	ForkFrom      string  `json:"fork_from,omitempty"`
	ForkExport    *Export `json:"fork_export,omitempty"`
	ForkKnownZero []Range `json:"fork_known_zero,omitempty"`
	// ForkReleased: ForkFrom deleted its copy (fork_serve released).
	ForkReleased bool `json:"fork_released,omitempty"`
}

// RemoteFork reports whether v is a fork whose copy is made on another
// worker than the one it lives on.
func (v *Volume) RemoteFork() bool {
	return v.ForkOf != "" && v.ForkFrom != "" && v.ForkFrom != v.Worker
}

// ForkServed reports whether ForkFrom may still hold a remote fork's copy:
// from the fork's request until ForkFrom released it, whatever became of
// the fork meanwhile (a fork destroyed before its copy was published still
// leaves a copy to delete).
func (v *Volume) ForkServed() bool { return v.RemoteFork() && !v.ForkReleased }

// Forking reports whether the copy of ForkOf is still being made.
func (v *Volume) Forking() bool { return v.ForkOf != "" && v.State == VolCreating }

// Extending reports whether a requested growth is still pending.
func (v *Volume) Extending() bool { return v.WantSize > v.Size }

// MachineState is whether the workload runs.
type MachineState string

const (
	MachineRunning MachineState = "running"
	MachineStopped MachineState = "stopped"
	// MachineFailed: it crashed too often in a window; its worker no longer
	// restarts it until an operator starts it again.
	MachineFailed MachineState = "failed"
)

// Machine is a workload using one volume.
type Machine struct {
	ID        string          `json:"id"`
	Worker    string          `json:"worker"`
	Volume    string          `json:"volume"`
	Network   uint32          `json:"network"`    // org private network id (6PN ORG bits)
	MachineNo uint32          `json:"machine_no"` // 6PN MACHINE bits
	Addr6PN   string          `json:"addr_6pn,omitempty"`
	State     MachineState    `json:"state"`
	Spec      json.RawMessage `json:"spec,omitempty"` // driver command spec, opaque to the store
	Migrated  bool            `json:"migrated"`
	// Crashes counts the machine's crashes in its worker's restart window
	// (reset when an operator starts or stops it).
	Crashes int `json:"crashes,omitempty"`
	// Group is an optional label: placement keeps machines of one group off
	// one target (replicas of one service must not share a worker).
	Group string `json:"group,omitempty"`
}

// ServerMember is a raft voter and where its API listens, so followers can
// send writers to the leader.
type ServerMember struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	APIAddr  string `json:"api_addr"`
}
