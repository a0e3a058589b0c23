// Package volops does the operations on a worker's volumes outside a
// migration's data path: create, extend and fork the volumes an operator
// asked for (forks to another worker too: remotefork.go), allocate a
// migration's destination file, export a volume to one worker, list a
// volume's holes, trim a mounted volume, and follow a clone's hydration
// to its end.
package volops

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/machine"
)

// Store is what volume operations need from the replicated store.
type Store interface {
	GetVolume(ctx context.Context, id string) (*fsm.Volume, error)
	UpdateVolume(ctx context.Context, cmd fsm.UpdateVolumeCmd) error
	GetMachine(ctx context.Context, id string) (*fsm.Machine, error)
	GetWorker(ctx context.Context, name string) (*fsm.Worker, error)
	// ServeFork publishes (or releases) the copy of a fork to another
	// worker that this worker makes.
	ServeFork(ctx context.Context, cmd fsm.ForkServeCmd) error
}

// Keys opens and makes volume keys.
type Keys interface {
	OwnerKey(ctx context.Context, vol string) ([]byte, error)
	NewVolumeKey(ctx context.Context, vol string) ([]byte, error)
	// NewForkKey makes a fork's key sealed to the fork's (other) worker.
	NewForkKey(ctx context.Context, fork *fsm.Volume) ([]byte, error)
}

// Machines says whether a machine runs here.
type Machines interface {
	LocalSpec(m *fsm.Machine) (machine.Spec, error)
	Running(ctx context.Context, spec machine.Spec) bool
}

// Ops does volume operations on one worker.
type Ops struct {
	worker  string
	log     zerolog.Logger
	store   Store
	keys    Keys
	vols    datapath.Backend
	mach    Machines
	exports Exporter

	// jobs holds the volumes with a background job (a fork's copy or
	// hydration) running (volume id -> struct{}): it would hold
	// Reconcile up.
	jobs  sync.Map
	jobWG sync.WaitGroup
}

// New makes the volume operations of worker; exports serves the copies of
// forks to other workers.
func New(log zerolog.Logger, worker string, store Store, keys Keys, vols datapath.Backend, mach Machines, exports Exporter) *Ops {
	return &Ops{worker: worker, log: log, store: store, keys: keys, vols: vols, mach: mach, exports: exports}
}

// Create formats a volume an operator created and records its layout.
func (o *Ops) Create(ctx context.Context, v *fsm.Volume) {
	log := o.log.With().Str("volume", v.ID).Logger()
	key, err := o.keys.NewVolumeKey(ctx, v.ID)
	if err != nil {
		log.Warn().Err(err).Msg("cannot make or open the volume's key")
		return
	}
	defer clear(key)
	layout, err := o.vols.Create(ctx, v.ID, v.Size, key)
	if err != nil {
		log.Error().Err(err).Msg("create volume")
		return
	}
	created := fsm.VolCreated
	if err := o.store.UpdateVolume(ctx, fsm.UpdateVolumeCmd{ID: v.ID, State: &created, Layout: datapath.StoredLayout(layout)}); err != nil {
		log.Error().Err(err).Msg("record created volume")
		return
	}
	log.Info().Int64("size", v.Size).Int64("data_offset", layout.DataOffset).Msg("volume created")
}

// Extend grows a volume an operator extended, under its running machine if
// it runs here, and reports the new size and layout, which ends the
// request. A failure is retried on the next pass: every step of the data
// path's Extend finds its work done when repeated. The caller makes sure no
// migration stops the machine (and exports the volume) meanwhile.
func (o *Ops) Extend(ctx context.Context, v *fsm.Volume) {
	log := o.log.With().Str("volume", v.ID).Int64("size", v.Size).Int64("want_size", v.WantSize).Logger()
	if !o.vols.Capabilities().Extend {
		log.Warn().Str("backend", o.vols.Capabilities().Name).Msg("extend requested but this data path cannot extend volumes; run the worker with the userspace backend")
		return
	}
	key, err := o.keys.OwnerKey(ctx, v.ID)
	if err != nil {
		log.Warn().Err(err).Msg("extend: volume key")
		return
	}
	defer clear(key)
	layout, err := o.vols.Extend(ctx, v.ID, datapath.LayoutOf(*v.Layout), v.WantSize, key)
	if errors.Is(err, datapath.ErrOnlineResizeDenied) {
		// The volume grew; the mounted filesystem grows once the machine
		// stopped: then its mount goes and this same step runs offline.
		if !o.unmountStopped(ctx, v) {
			log.Warn().Err(err).Msg("extend: the filesystem grows once the machine stops")
			return
		}
		layout, err = o.vols.Extend(ctx, v.ID, datapath.LayoutOf(*v.Layout), v.WantSize, key)
	}
	if err != nil {
		log.Error().Err(err).Msg("extend volume")
		return
	}
	size := v.WantSize
	if err := o.store.UpdateVolume(ctx, fsm.UpdateVolumeCmd{ID: v.ID, Size: &size, Layout: datapath.StoredLayout(layout)}); err != nil {
		log.Error().Err(err).Msg("record extended volume")
		return
	}
	log.Info().Int64("payload_size", layout.PayloadSize).Msg("volume extended")
}

// unmountStopped unmounts v if the machine it is attached to is recorded
// stopped and does not run here; it reports whether it did.
func (o *Ops) unmountStopped(ctx context.Context, v *fsm.Volume) bool {
	if v.AttachedMachine == "" {
		return false
	}
	m, err := o.store.GetMachine(ctx, v.AttachedMachine)
	if err != nil || m.Worker != o.worker || m.State != fsm.MachineStopped {
		return false
	}
	spec, err := o.mach.LocalSpec(m)
	if err != nil {
		return false
	}
	if o.mach.Running(ctx, spec) {
		return false
	}
	if err := o.vols.Unmount(ctx, v.ID, o.vols.MountPoint(m.ID)); err != nil {
		o.log.Warn().Err(err).Str("volume", v.ID).Msg("extend: unmount the stopped machine's volume")
		return false
	}
	return true
}

// Fork makes the copy an operator's fork asked for, from the source volume
// on this worker while its machine keeps running, and marks the fork
// created. The fork's key is its own: a fresh passphrase this worker seals
// to itself and the recovery key. It takes no machine lock: the store
// refuses to migrate or extend the source while the fork is being made.
func (o *Ops) Fork(ctx context.Context, v *fsm.Volume) {
	log := o.log.With().Str("volume", v.ID).Str("fork_of", v.ForkOf).Logger()
	if !o.vols.Capabilities().Fork {
		log.Warn().Str("backend", o.vols.Capabilities().Name).Msg("fork requested but this data path cannot fork volumes; run the worker with the userspace backend")
		return
	}
	src, err := o.store.GetVolume(ctx, v.ForkOf)
	if err != nil {
		log.Warn().Err(err).Msg("fork: source volume")
		return
	}
	if src.Worker != o.worker {
		log.Warn().Str("source_worker", src.Worker).Msg("fork: the source is on another worker; forks across workers are not supported")
		return
	}
	dstKey, err := o.keys.NewVolumeKey(ctx, v.ID)
	if err != nil {
		log.Warn().Err(err).Msg("fork: seal the fork's new key")
		return
	}
	defer clear(dstKey)
	srcKey, err := o.keys.OwnerKey(ctx, src.ID)
	if err != nil {
		log.Warn().Err(err).Msg("fork: source volume key")
		return
	}
	defer clear(srcKey)
	layout, st, err := o.vols.Fork(ctx, src.ID, srcKey, v.ID, dstKey)
	if err != nil {
		log.Error().Err(err).Msg("fork volume")
		return
	}
	created := fsm.VolCreated
	if err := o.store.UpdateVolume(ctx, fsm.UpdateVolumeCmd{ID: v.ID, State: &created, Layout: datapath.StoredLayout(layout)}); err != nil {
		log.Error().Err(err).Msg("record forked volume")
		return
	}
	log.Info().Dur("source_frozen", st.Frozen).Int64("copied_bytes", st.CopiedBytes).Int64("reencrypted_bytes", st.Reencrypted).Msg("volume forked")
}

// DestinationName names the destination volume of a migration: the
// volume's name without an earlier migration's suffix (so names do not grow
// as a machine moves back and forth, until the datapath's socket path no
// longer fits a sockaddr_un), then this migration's short ID.
func (o *Ops) DestinationName(m *fsm.Migration) string {
	base := m.Volume
	if i := strings.LastIndex(base, "-"); i > 0 && isShortID(base[i+1:]) {
		base = base[:i]
	}
	return base + "-" + shortID(m.ID)
}

func isShortID(s string) bool {
	if len(s) != 8 {
		return false
	}
	for _, c := range s {
		if !strings.ContainsRune("0123456789abcdef", c) {
			return false
		}
	}
	return true
}

func shortID(id string) string {
	id = strings.TrimPrefix(strings.TrimPrefix(id, "mig_"), "mig-")
	if len(id) > 8 {
		id = id[:8]
	}
	return id
}

// Allocate makes the sparse file of a migration's destination volume.
func (o *Ops) Allocate(vol string, size int64) error {
	if err := os.MkdirAll(o.vols.VolumeDir(vol), 0o700); err != nil {
		return err
	}
	f, err := blockdev.CreateSparse(o.vols.DataPath(vol), size)
	if err != nil {
		return err
	}
	return f.Close()
}

// KnownZero lists the holes of a local volume's file, as the store keeps them.
func (o *Ops) KnownZero(vol string) ([]fsm.Range, error) {
	zs, err := knownZero(o.vols.DataPath(vol))
	if err != nil {
		return nil, err
	}
	return datapath.StoredRanges(zs), nil
}

// knownZero lists the volume file's holes, coalesced to at most 4096 ranges
// (dropping the smallest: a missed hint only costs a fetch).
func knownZero(path string) ([]blockdev.Range, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	holes, err := blockdev.Holes(f)
	if err != nil {
		return nil, err
	}
	const max = 4096
	if len(holes) > max {
		// Keep the largest ranges.
		sorted := append([]blockdev.Range(nil), holes...)
		for i := 1; i < len(sorted); i++ {
			for j := i; j > 0 && sorted[j].Len > sorted[j-1].Len; j-- {
				sorted[j], sorted[j-1] = sorted[j-1], sorted[j]
			}
		}
		min := sorted[max-1].Len
		out := holes[:0:0]
		for _, h := range holes {
			if h.Len >= min && len(out) < max {
				out = append(out, h)
			}
		}
		holes = out
	}
	return holes, nil
}

// Trim discards the filesystem's unused blocks at mnt; through the LUKS
// view they reach the clone, which marks them hydrated without a fetch.
func (o *Ops) Trim(ctx context.Context, mnt string) (string, error) {
	cmd := exec.CommandContext(ctx, "fstrim", "-v", mnt)
	// A killed tool's children may hold its output open: stop waiting for
	// them shortly after the deadline.
	cmd.WaitDelay = 2 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("fstrim %s: %w: %s", mnt, err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}
