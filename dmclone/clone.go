// Package dmclone is ferry's clone device: a destination that reads through
// to a source until each region is copied ("hydrated"), with dm-clone's
// semantics. Two implementations sit behind the Clone interface: the kernel's
// dm-clone target (driven with dmsetup, on hosts that have it) and the
// userspace Engine in this package, which is itself a blockdev.Device and is
// exported to the kernel through fuseexport and loopdev.
package dmclone

import (
	"errors"
	"fmt"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
)

// Clone is what the agent drives, whichever implementation backs it.
type Clone interface {
	// EnableHydration starts the background copy (dm-clone's enable_hydration).
	EnableHydration() error
	// DisableHydration stops it; on-demand hydration by I/O continues.
	DisableHydration() error
	// SetTunables changes batch size, parallelism and rate limit at runtime.
	SetTunables(Tunables) error
	// Progress is a snapshot of the hydration state.
	Progress() Progress
	// Stalled reports whether hydration cannot progress, and why.
	Stalled() (bool, string)
	// Done is closed once every region is hydrated.
	Done() <-chan struct{}
	// Dissolve, once Done, returns the destination alone (dm-clone: suspend,
	// load linear, resume). The caller owns the returned device.
	Dissolve() (blockdev.Device, error)
	// Close commits the metadata and releases the devices.
	Close() error
}

// Tunables shape the background hydration.
type Tunables struct {
	// BatchRegions is how many contiguous regions one background copy moves.
	BatchRegions int `json:"batch_regions"`
	// IdleBatchRegions is how many it moves while the machine has done no
	// I/O for IdleAfter: larger copies hydrate faster, but a machine's read
	// queued behind them waits longer and its other I/O shares the disks
	// and cores with them, so they are used only while it is idle, and
	// never under a rate limit. 0 or anything under BatchRegions means
	// BatchRegions.
	IdleBatchRegions int `json:"idle_batch_regions,omitempty"`
	// InFlight is how many background copies run at once.
	InFlight int `json:"in_flight"`
	// RateLimitBytesPerSec caps background bytes fetched from the source; 0 = none.
	RateLimitBytesPerSec int64 `json:"rate_limit_bytes_per_sec"`
	// MinShare is the fraction of InFlight background copies that keep running
	// while foreground I/O waits for the source (at least one), so a busy
	// workload never starves hydration the way it starves dm-clone.
	MinShare float64 `json:"min_share"`
}

// DefaultTunables saturate a local or iSCSI source: 1 MiB copies of 4 KiB
// regions, four at a time, and 4 MiB copies while the machine is idle
// (docs/profiles.md: against 1 MiB copies, 4 MiB ones hydrated 10–23 %
// faster and made an idle machine's first cold read wait about three times
// longer; 8 MiB ones gained a few percent more at twice that wait).
func DefaultTunables(regionSize int64) Tunables {
	return Tunables{BatchRegions: regionsIn(1<<20, regionSize), IdleBatchRegions: regionsIn(4<<20, regionSize),
		InFlight: 4, MinShare: 0.25}
}

// IdleAfter is how long the machine must have done no I/O before background
// copies grow to IdleBatchRegions: longer than the gaps between a working
// machine's requests, so copies grow only when it is idle.
const IdleAfter = 200 * time.Millisecond

func regionsIn(n, regionSize int64) int {
	return int(max(1, n/regionSize))
}

// withDefaults fills zero batch size and parallelism from DefaultTunables,
// so a caller can set only the rate limit.
func (t Tunables) withDefaults(regionSize int64) Tunables {
	d := DefaultTunables(regionSize)
	if t.BatchRegions == 0 {
		t.BatchRegions = d.BatchRegions
		if t.IdleBatchRegions == 0 {
			t.IdleBatchRegions = d.IdleBatchRegions
		}
	}
	if t.InFlight == 0 {
		t.InFlight = d.InFlight
	}
	return t
}

func (t Tunables) validate() error {
	if t.BatchRegions < 1 || t.BatchRegions > 1<<20 {
		return fmt.Errorf("batch regions %d: must be 1..1048576", t.BatchRegions)
	}
	if t.IdleBatchRegions < 0 || t.IdleBatchRegions > 1<<20 {
		return fmt.Errorf("idle batch regions %d: must be 0 (the batch size) or 1..1048576", t.IdleBatchRegions)
	}
	if t.InFlight < 1 || t.InFlight > 256 {
		return fmt.Errorf("in-flight %d: must be 1..256", t.InFlight)
	}
	if t.RateLimitBytesPerSec < 0 {
		return fmt.Errorf("rate limit %d: must be 0 (none) or positive", t.RateLimitBytesPerSec)
	}
	if t.MinShare < 0 || t.MinShare > 1 {
		return fmt.Errorf("min share %v: must be between 0 and 1", t.MinShare)
	}
	return nil
}

// Progress is the engine's hydration state, with engine-only detail
// (in-flight regions, tunables). JSON field names are what `ferry clone
// status --json` prints; shared fields use the names of fsm.Progress, the
// progress type a data-path backend reports and the control plane
// replicates (this package stays below fsm and does not import it).
type Progress struct {
	RegionSize            int64         `json:"region_size"`
	TotalRegions          int64         `json:"total_regions"`
	HydratedRegions       int64         `json:"hydrated_regions"`
	HydratingRegions      int64         `json:"hydrating_regions"`
	FetchedBytes          int64         `json:"fetched_bytes"`
	SkippedDiscardBytes   int64         `json:"skipped_discard_bytes"`
	SkippedKnownZeroBytes int64         `json:"skipped_known_zero_bytes"`
	SkippedWriteBytes     int64         `json:"skipped_write_bytes"`
	HydrationEnabled      bool          `json:"hydration_enabled"`
	RateBPS               float64       `json:"rate_bps"`
	ETA                   time.Duration `json:"eta_ns"`
	Complete              bool          `json:"complete"`
	Stalled               bool          `json:"stalled"`
	StalledReason         string        `json:"stalled_reason,omitempty"`
	Tunables              Tunables      `json:"tunables"`
}

// Config describes one userspace clone.
type Config struct {
	// Source is read only; it may be a slow or failing remote LUN.
	Source blockdev.Device
	// Dest receives the copy; at least as large as Source. Regions marked
	// hydrated without a copy (discard, known-zero) are discarded on Dest and
	// must then read as zeros (true for sparse files).
	Dest blockdev.Device
	// MetaPath is the bitmap file; reopening the same three devices resumes.
	MetaPath string
	// RegionSize is a power of two from 4 KiB to 1 GiB; 0 means 4 KiB.
	RegionSize int64
	// KnownZero lists source ranges that read as zeros (the source file's
	// holes); fully covered regions are hydrated without a fetch.
	KnownZero []blockdev.Range
	// Tunables for background hydration; zero BatchRegions and InFlight
	// take DefaultTunables' values (the zero value is the defaults).
	Tunables Tunables
	// SourceRetries is how many times a failed source read is retried before
	// the error reaches the caller (default 3). SourceTimeout bounds each
	// attempt (default 30 s).
	SourceRetries int
	SourceTimeout time.Duration
	// ForegroundWait bounds how long a read or write of an unhydrated
	// region waits for the source in all, retries included, before it fails
	// with the stall's reason (default 60 s): the machine above sees an I/O
	// error in bounded time instead of hanging on a lost source. Not
	// shorter: an I/O error turns the machine's ext4 read-only for good, so
	// a link outage the fabric recovers from in tens of seconds must not
	// become one (the stall is reported within seconds meanwhile).
	ForegroundWait time.Duration
	// NoDirectCopy keeps background hydration in userspace even when both
	// devices are files (copy_file_range is used otherwise).
	NoDirectCopy bool
	// CommitInterval is how often a changed bitmap is committed without a
	// flush (default 1 s, like dm-clone). Negative: only Flush and Close
	// commit (deterministic crash tests).
	CommitInterval time.Duration
	// Prealloc, when of this clone's shape and not used before, is the
	// memory Open uses instead of allocating (Preallocate).
	Prealloc *Prealloc
	// DestZeroed says Dest reads as zeros everywhere (a sparse file created
	// just now): known-zero ranges are marked hydrated without discarding
	// them on it, which changes nothing there and costs a system call each.
	DestZeroed bool
}

const (
	minRegionSize = 4 << 10
	maxRegionSize = 1 << 30
	maxRegions    = 1 << 31
)

var (
	// ErrNotHydrated is returned by Dissolve before every region is hydrated.
	ErrNotHydrated = errors.New("clone is not fully hydrated")
	// ErrDissolved is returned by calls that need the source after Dissolve.
	ErrDissolved = errors.New("clone was dissolved into its destination")
)

// ValidateRegionSize checks a region size: a power of two, 4 KiB to 1 GiB.
func ValidateRegionSize(rs int64) error { return validRegionSize(rs) }

func validRegionSize(rs int64) error {
	if rs < minRegionSize || rs > maxRegionSize || rs&(rs-1) != 0 {
		return fmt.Errorf("region size %d: must be a power of two from 4 KiB to 1 GiB", rs)
	}
	return nil
}
