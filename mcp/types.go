package mcp

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// The tools' outputs are ferry's own shapes, not the wire records: they are
// picked field by field so nothing secret (keys, a machine's driver spec,
// which may carry its environment) reaches an agent by accident when a
// record grows.

// Volume is a volume as the tools show it.
type Volume struct {
	ID              string     `json:"id"`
	Worker          string     `json:"worker"`
	SizeBytes       int64      `json:"size_bytes"`
	Size            string     `json:"size" jsonschema:"the size for people, binary units"`
	State           string     `json:"state" jsonschema:"creating, created, enabling_remote_export, hydrating, pending_destroy or destroyed"`
	AttachedMachine string     `json:"attached_machine,omitempty"`
	HasKey          bool       `json:"has_key" jsonschema:"its key is sealed to its worker and the recovery key (the servers cannot open it)"`
	CreatedAt       time.Time  `json:"created_at"`
	DestroyAfter    *time.Time `json:"destroy_after,omitempty" jsonschema:"while pending_destroy: when the data may really be deleted"`
	Cipher          string     `json:"cipher,omitempty"`
	DataOffset      int64      `json:"data_offset,omitempty" jsonschema:"bytes of LUKS2 header before the ciphertext"`
	GrowingTo       int64      `json:"growing_to,omitempty" jsonschema:"bytes an extend asked for that its worker has not reported yet"`
	ForkOf          string     `json:"fork_of,omitempty" jsonschema:"the volume this one is a point-in-time copy of"`
	ForkFrom        string     `json:"fork_from,omitempty" jsonschema:"for a fork onto another worker: the worker that made the copy and serves it until this one hydrated it"`
}

func volumeOut(v *fsm.Volume) Volume {
	o := Volume{ID: v.ID, Worker: v.Worker, SizeBytes: v.Size, Size: humanBytes(v.Size), State: string(v.State),
		AttachedMachine: v.AttachedMachine, HasKey: v.HasKey, CreatedAt: v.CreatedAt}
	if v.Extending() {
		o.GrowingTo = v.WantSize
	}
	o.ForkOf, o.ForkFrom = v.ForkOf, v.ForkFrom
	if !v.DestroyAfter.IsZero() {
		t := v.DestroyAfter
		o.DestroyAfter = &t
	}
	if v.Layout != nil {
		o.Cipher, o.DataOffset = v.Layout.Cipher, v.Layout.DataOffset
	}
	return o
}

// Machine is a machine as the tools show it.
type Machine struct {
	ID       string `json:"id"`
	Worker   string `json:"worker"`
	Volume   string `json:"volume,omitempty"`
	State    string `json:"state" jsonschema:"running or stopped"`
	Network  uint32 `json:"network" jsonschema:"private network (org) id"`
	Addr6PN  string `json:"addr_6pn,omitempty"`
	Migrated bool   `json:"migrated"`
}

func machineOut(m *fsm.Machine) Machine {
	return Machine{ID: m.ID, Worker: m.Worker, Volume: m.Volume, State: string(m.State), Network: m.Network, Addr6PN: m.Addr6PN, Migrated: m.Migrated}
}

// Worker is a worker and its lease.
type Worker struct {
	Name        string    `json:"name"`
	Address     string    `json:"address"`
	HostID      uint32    `json:"host_id"`
	Capacity    int       `json:"capacity" jsonschema:"concurrent migrations in and out (0: the default)"`
	Alive       bool      `json:"alive" jsonschema:"its lease is valid now (its agent heartbeats)"`
	LeaseExpiry time.Time `json:"lease_expiry"`
}

func workerOut(w *fsm.Worker, now time.Time) Worker {
	return Worker{Name: w.Name, Address: w.Address, HostID: w.HostID, Capacity: w.Capacity, Alive: w.Alive(now), LeaseExpiry: w.LeaseExpiry}
}

// Migration is a migration as the tools show it.
type Migration struct {
	ID         string     `json:"id"`
	Machine    string     `json:"machine"`
	Volume     string     `json:"volume"`
	Source     string     `json:"source"`
	Target     string     `json:"target"`
	State      string     `json:"state"`
	Terminal   bool       `json:"terminal" jsonschema:"completed or rolled_back: nothing more happens"`
	CanAbort   bool       `json:"can_abort" jsonschema:"before cutover: an abort restarts the machine on the source"`
	CreatedAt  time.Time  `json:"created_at"`
	UpdatedAt  time.Time  `json:"updated_at"`
	Attempts   int        `json:"attempts"`
	LastError  string     `json:"last_error,omitempty"`
	Stalled    string     `json:"stalled,omitempty" jsonschema:"why it is stuck, when it is"`
	Rollback   string     `json:"rollback,omitempty" jsonschema:"why it rolls back, when it does"`
	Progress   *Progress  `json:"progress,omitempty"`
	Downtime   string     `json:"downtime,omitempty" jsonschema:"source stopped to cutover, once both happened"`
	Old6PN     string     `json:"old_6pn,omitempty"`
	New6PN     string     `json:"new_6pn,omitempty"`
	CutoverAt  *time.Time `json:"cutover_at,omitempty"`
	FinishedAt *time.Time `json:"finished_at,omitempty"`
}

// Progress is the clone's hydration as the target last reported it.
type Progress struct {
	Percent       float64 `json:"percent"`
	HydratedBytes int64   `json:"hydrated_bytes"`
	TotalBytes    int64   `json:"total_bytes"`
	FetchedBytes  int64   `json:"fetched_bytes"`
	SkippedBytes  int64   `json:"skipped_bytes" jsonschema:"known zero (holes, trimmed): never fetched"`
	RateBPS       int64   `json:"rate_bps"`
	ETASeconds    int64   `json:"eta_seconds"`
}

func migrationOut(m *fsm.Migration) Migration {
	o := Migration{ID: m.ID, Machine: m.Machine, Volume: m.Volume, Source: m.Source, Target: m.Target, State: string(m.State),
		Terminal: m.State.Terminal(), CanAbort: m.State.BeforeCutover(), CreatedAt: m.CreatedAt, UpdatedAt: m.UpdatedAt,
		Attempts: m.Attempts, LastError: m.LastError, Old6PN: m.Old6PN, New6PN: m.New6PN}
	if m.Stalled {
		o.Stalled = m.StallCause
		if o.Stalled == "" {
			o.Stalled = "stalled"
		}
	}
	if m.Rollback != nil {
		o.Rollback = fmt.Sprintf("%s (by %s, from %s)", m.Rollback.Reason, m.Rollback.By, m.Rollback.From)
	}
	if p := m.Progress; p != nil {
		o.Progress = &Progress{Percent: p.Percent(), HydratedBytes: p.HydratedBytes, TotalBytes: p.TotalBytes, FetchedBytes: p.FetchedBytes,
			SkippedBytes: p.SkippedBytes, RateBPS: p.RateBPS, ETASeconds: p.ETASeconds}
	}
	if d, ok := m.Downtime(); ok {
		o.Downtime = d.Round(time.Millisecond).String()
	}
	if t, ok := m.EnteredAt[fsm.Cutover]; ok {
		o.CutoverAt = &t
	}
	for _, s := range []fsm.State{fsm.Completed, fsm.RolledBack} {
		if t, ok := m.EnteredAt[s]; ok && m.State == s {
			o.FinishedAt = &t
		}
	}
	return o
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// parseSize reads 512, 64M, 1G, 2T, 10GiB (binary units).
func parseSize(s string) (int64, error) {
	in := s
	s = strings.ToUpper(strings.TrimSpace(s))
	s = strings.TrimSuffix(strings.TrimSuffix(s, "B"), "I")
	shift := 0
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'K':
			shift = 10
		case 'M':
			shift = 20
		case 'G':
			shift = 30
		case 'T':
			shift = 40
		}
		if shift > 0 {
			s = s[:n-1]
		}
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v <= 0 || v > (1<<62)>>shift {
		return 0, fmt.Errorf("size %q: use a positive number with an optional K, M, G or T suffix (binary units)", in)
	}
	return v << shift, nil
}
