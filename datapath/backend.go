// Package datapath is the contract between the agent and a worker's data
// path: how a volume file becomes a mounted filesystem, and how a
// migration's destination clones the source's export. Two implementations
// live under it: datapath/userspace (a `ferry volume serve` process per
// volume: LUKS2 view → FUSE file → loop → mount) and datapath/kernel
// (loop → dm-clone → dm-crypt → mount). datapath/backendtest checks that
// both keep this contract.
package datapath

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath/internal/hostfs"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/luks"
)

// Backend is a worker's data path. Every method is idempotent and finds
// what an earlier agent process left behind (processes, loop devices,
// device-mapper devices, iSCSI sessions, mounts).
type Backend interface {
	// Capabilities says what this implementation supports; callers branch
	// on it, never on the implementation's name.
	Capabilities() Capabilities
	// Create formats a new LUKS2 volume of size bytes with ext4 inside and
	// returns its layout. Re-running it on a half-made volume starts over.
	Create(ctx context.Context, vol string, size int64, passphrase []byte) (luks.Layout, error)
	// ReadLayout reads the LUKS2 layout from a local volume's header.
	ReadLayout(vol string) (luks.Layout, error)
	// MountLocal opens a local volume's plaintext view with the recorded
	// layout and mounts it at mnt; it returns the mounted block device.
	MountLocal(ctx context.Context, vol string, layout luks.Layout, passphrase []byte, mnt string) (string, error)
	// MountClone builds (or adopts) a migration's clone of the source's
	// export over the local destination, opens its plaintext view with the
	// carried layout and mounts it at mnt.
	MountClone(ctx context.Context, c CloneSpec, passphrase []byte, mnt string) (string, error)
	// Clone returns the running clone (or the dissolved destination) of vol;
	// an error wrapping ErrNoClone when none is running here.
	Clone(ctx context.Context, vol string) (CloneHandle, error)
	// Unmount syncs and unmounts mnt (if mounted), then detaches the volume.
	Unmount(ctx context.Context, vol, mnt string) error
	// Detach releases everything that serves the volume; the file stays.
	Detach(ctx context.Context, vol string) error
	// Remove detaches and deletes a volume's files.
	Remove(ctx context.Context, vol string) error
	// Abandon unmounts mnt and removes vol, whose contents are discarded
	// (the destination of a rolled-back migration). Unlike Unmount, I/O
	// that cannot finish (writeback into a clone whose source stopped
	// exporting) is failed rather than waited on: the source is
	// authoritative. Idempotent.
	Abandon(ctx context.Context, vol, mnt string) error
	// Extend grows a local volume to size bytes (the whole ciphertext file,
	// header included) and the ext4 filesystem inside it, online when the
	// volume is mounted, and returns the grown layout. Re-running it after a
	// crash at any point finishes the job. It wraps ErrNotSupported when
	// !Capabilities().Extend.
	Extend(ctx context.Context, vol string, layout luks.Layout, size int64, passphrase []byte) (luks.Layout, error)
	// Fork makes local volume dst an independent copy of local volume src
	// as it was at one instant, while src stays mounted and written: its
	// filesystem is frozen only while its ciphertext is copied aside, and
	// the copy is re-encrypted under a new LUKS2 master key opened by
	// dstPass. It returns dst's layout and what the source paid. Re-running
	// it after a crash starts the copy over. It wraps ErrNotSupported when
	// !Capabilities().Fork.
	Fork(ctx context.Context, src string, srcPass []byte, dst string, dstPass []byte) (luks.Layout, ForkStats, error)
	// CleanupAll unmounts and detaches every volume under the data dir.
	CleanupAll(ctx context.Context) error

	VolumeDir(vol string) string
	DataPath(vol string) string
	MetaPath(vol string) string
	MountPoint(machine string) string
}

// Capabilities is what a backend supports, set in full by each
// implementation.
type Capabilities struct {
	// Name names the implementation in logs and errors only.
	Name string
	// HydrationRateLimit: CloneSpec.RateLimit caps background hydration.
	HydrationRateLimit bool
	// GuaranteedShare: background hydration keeps a share of its copies
	// running while foreground I/O waits for the source, so a busy workload
	// cannot starve it.
	GuaranteedShare bool
	// ByteCounters: Progress reports fetched and skipped bytes, not only
	// hydrated regions.
	ByteCounters bool
	// Extend: Backend.Extend grows a volume and its mounted filesystem
	// under a running machine.
	Extend bool
	// Fork: Backend.Fork copies a volume while its machine runs, under a
	// master key of the copy's own.
	Fork bool
}

// ForkStats is what a fork cost the source and copied.
type ForkStats struct {
	Frozen      time.Duration // the source filesystem was frozen this long (0: it was not mounted)
	CopiedBytes int64         // ciphertext bytes copied aside (allocated ranges only)
	Reencrypted int64         // plaintext bytes re-encrypted into the fork
}

// ErrNotSupported is wrapped by a method the backend's Capabilities say it
// lacks.
var ErrNotSupported = errors.New("not supported by this data path")

// ErrOnlineResizeDenied is wrapped by Extend when the volume grew but the
// host refused to grow its mounted filesystem (the agent lacks
// CAP_SYS_RESOURCE); Extend once the volume is unmounted finishes it.
var ErrOnlineResizeDenied = hostfs.ErrOnlineResizeDenied

// CanResizeOnline reports whether this host lets the agent grow a mounted
// filesystem.
func CanResizeOnline() bool { return hostfs.CanResizeOnline() }

// GrownLayout is layout on a device of size bytes: the LUKS2 segment is
// dynamic, so the payload is what follows the header, whole sectors only.
// A size that would shrink the payload is refused.
func GrownLayout(layout luks.Layout, size int64) (luks.Layout, error) {
	sector := int64(layout.SectorSize)
	if sector <= 0 || size <= layout.DataOffset {
		return luks.Layout{}, fmt.Errorf("a %d-byte volume has no room after its %d-byte LUKS2 header", size, layout.DataOffset)
	}
	payload := size - layout.DataOffset
	payload -= payload % sector
	if payload < layout.PayloadSize {
		return luks.Layout{}, fmt.Errorf("volume would shrink from %d to %d plaintext bytes: refused", layout.PayloadSize, payload)
	}
	layout.PayloadSize = payload
	return layout, nil
}

// CloneSpec is one migration's clone on the target.
type CloneSpec struct {
	Volume string // the destination volume (its file exists, sized from Layout)
	Layout luks.Layout
	Portal string // the source's export (its TLS gate)
	IQN    string
	// Source is the source worker: the export must present its certificate
	// (when the backend has TLS; see PeerTLS).
	Source    string
	KnownZero []blockdev.Range // ciphertext ranges that read as zeros on the source
	Hydrate   bool             // background hydration on from the start (resume after cutover)
	RateLimit int64            // bytes/s, 0 none; honoured when Capabilities().HydrationRateLimit
	// NoIdleBatches keeps background copies at their normal size while the
	// machine does no I/O (the userspace engine's IdleBatchRegions off); a
	// backend without idle batches (dm-clone) ignores it.
	NoIdleBatches bool
}

// PeerTLS is how a worker's data path reaches a source's export: this
// worker's certificate folder and name (the agent's --tls-dir and --cert).
// The export admits this certificate only if it names the migration's
// target; the data path admits the export only if its certificate names
// CloneSpec.Source. A backend without PeerTLS speaks plain iSCSI (tests).
type PeerTLS struct {
	Dir  string `json:"dir"`
	Name string `json:"name"`
	// Denied reports a revoked certificate serial: the data path refuses a
	// source presenting one (nil: no deny list).
	Denied func(serial string) bool `json:"-"`
}

// CloneHandle drives a running clone.
type CloneHandle interface {
	Status(ctx context.Context) (*Status, error)
	EnableHydration(ctx context.Context) error
	// Dissolve replaces the clone by the destination alone; it needs every
	// region hydrated, and is idempotent.
	Dissolve(ctx context.Context) error
}

// Freezer is a Backend that can unmount a volume's filesystem without
// releasing the devices under it. After Freeze nothing can write to the
// volume (its filesystem is synced and unmounted), so a migration's source
// commits source_stopped at once and releases the devices (Unmount, which
// finds the filesystem gone) once the target has been sent on: the loop
// device's detach and the datapath's exit (10 to 20 ms) leave the machine's
// pause. A frozen volume is attached: Mount mounts it again, Remove and
// Unmount release it. Idempotent.
type Freezer interface {
	Freeze(ctx context.Context, vol, mnt string) error
}

// StuckIOFailer is a Backend that can fail the I/O a killed machine is
// stuck in under its volume's mount (a clone whose source is cut off only
// times out), so the machine can exit: it kills the volume's datapath,
// which fails that I/O at once; the volume is then revived as after any
// dead datapath (Reviver).
type StuckIOFailer interface {
	// FailStuckIO fails the I/O pending under mnt when no live process
	// uses the mount (only killed ones are stuck there), and reports
	// whether it did.
	FailStuckIO(ctx context.Context, mnt string) (bool, error)
}

// ErrNoClone is wrapped by Backend.Clone when no clone of the volume runs here.
// Reviver is a Backend whose per-volume datapath is a process that can die
// while its volume is mounted (the FUSE file then fails every I/O with
// ENOTCONN). The agent stops the machine, releases the dead chain and mounts
// the volume again, which starts a new datapath over the same files: every
// write the machine saw acknowledged (fsync) is in those files.
type Reviver interface {
	// DatapathDead reports whether vol's datapath died while attached.
	DatapathDead(ctx context.Context, vol string) bool
	// ReleaseDead lazily unmounts mnt, detaches the loop device and the dead
	// FUSE file, so the volume can be mounted again. Stop the machine first.
	ReleaseDead(ctx context.Context, vol, mnt string) error
}

// Prestarter is a Backend that can start a volume's datapath process ahead
// of need: the agent asks when it prepares a migration's target, and the
// clone built inside the machine's pause skips a process's start.
type Prestarter interface {
	Prestart(ctx context.Context, vol string)
	// PreConnect has the process Prestart started for c's volume log in
	// to c's export before the export is final (the source published it
	// while the target prepared); the clone adopts that session when it
	// names the same export. Best effort. The channel is closed once that
	// login ended, failed or could not start.
	PreConnect(ctx context.Context, c CloneSpec) <-chan struct{}
	// ReleasePrestarted ends the processes Prestart started and no clone
	// took (the agent stops).
	ReleasePrestarted()
}

// Retargeter is a CloneHandle whose source can follow its export to
// another portal and IQN while the clone runs (the source restarted
// elsewhere). A data path without it keeps reading the recorded portal.
type Retargeter interface {
	Retarget(ctx context.Context, portal, iqn string) error
}

var ErrNoClone = errors.New("no clone of this volume runs on this worker")

// Status is a volume's data path state.
type Status struct {
	VolumeID  string    `json:"volume_id"`
	Pid       int       `json:"pid,omitempty"` // the serving process, if the backend runs one
	Cloning   bool      `json:"cloning"`       // a clone is under the view
	Hydrating bool      `json:"hydrating"`     // background hydration enabled
	Complete  bool      `json:"complete"`      // every region hydrated
	Dissolved bool      `json:"dissolved"`     // the clone was replaced by the destination alone
	Progress  *Progress `json:"progress,omitempty"`
}

// Progress is a clone's hydration progress: the replicated progress type,
// so the agent proposes it without translation. FetchedBytes and the Skipped
// counters are zero unless Capabilities().ByteCounters.
type Progress = fsm.Progress

// Candidate is one backend a worker may run, for --backend selection.
type Candidate struct {
	Name string
	// Probe says what this host lacks to run the backend (nil: nothing).
	Probe func(ctx context.Context) error
	// AutoProbe is the stricter test of --backend auto; nil: Probe.
	AutoProbe func(ctx context.Context) error
	New       func() Backend
}

// Select returns the backend named want, after its probe passes, or for
// "auto" the first candidate whose probe passes.
func Select(ctx context.Context, want string, cands []Candidate) (Backend, error) {
	var names []string
	var why []error
	for _, c := range cands {
		names = append(names, c.Name)
		switch want {
		case c.Name:
			if err := c.Probe(ctx); err != nil {
				return nil, fmt.Errorf("backend %s: %w", c.Name, err)
			}
			return c.New(), nil
		case "auto":
			probe := c.AutoProbe
			if probe == nil {
				probe = c.Probe
			}
			err := probe(ctx)
			if err == nil {
				return c.New(), nil
			}
			why = append(why, fmt.Errorf("%s: %w", c.Name, err))
		}
	}
	if want == "auto" {
		return nil, fmt.Errorf("no data path runs on this host: %w", errors.Join(why...))
	}
	return nil, fmt.Errorf("backend %q: use auto or one of %s", want, strings.Join(names, ", "))
}
