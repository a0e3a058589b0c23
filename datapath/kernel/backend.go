package kernel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
	"unsafe"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/internal/hostfs"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/dmclone"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/luks"
)

// Backend is the kernel data path, for hosts whose kernel has
// device-mapper with the dm-clone target, dm-crypt and open-iscsi:
//
//	local volume:  volume file → loop → dm-crypt (ferry-<vol>) → ext4 mount
//	destination:   open-iscsi LUN + loop(destination) + loop(metadata) → dm-clone
//	               (ferry-<vol>-clone) → dm-crypt (ferry-<vol>) → ext4 mount
//
// After hydration the clone is dissolved into a linear mapping of the
// destination under the same name, so the mount never moves. Every kernel
// object is named after the volume (device-mapper names) or found by its
// backing file (loops) or IQN (sessions), so a restarted agent adopts them
// and two workers on one host never collide.
type Backend struct {
	DataDir string
	Log     zerolog.Logger
	Loops   loopdev.Loops
	ISCSI   *OpenISCSI
	// FastKDF formats keyslots cheap to open.
	FastKDF bool
	// Tunables of dm-clone's hydration (zero: ferry's defaults, never
	// dm-clone's own batch of 1 region).
	Tunables dmclone.Tunables
	// PollInterval of the clone's status (default 500 ms) and StallAfter:
	// no region hydrated for this long is reported stalled (default 30 s).
	PollInterval, StallAfter time.Duration
	// Dmsetup is the dmsetup binary (default on PATH).
	Dmsetup string
	// TLS: open-iscsi speaks no TLS, so a clone reaches the source's export
	// through a loopback tunnel that speaks mutual TLS with this worker's
	// certificate and admits only the source worker's (nil: open-iscsi
	// logs into the export directly, tests only).
	TLS *datapath.PeerTLS

	mu      sync.Mutex
	clones  map[string]*dmclone.KernelClone // volume -> its polled clone
	tunnels map[string]*iscsi.Tunnel        // volume -> its tunnel to the source
}

var _ datapath.Backend = (*Backend)(nil)

// Capabilities of dm-clone: no rate limit, no guaranteed share (foreground
// I/O can starve hydration), and only region counters. Extend grows the
// loop, dm-crypt and a mounted ext4 online (see Extend).
func (v *Backend) Capabilities() datapath.Capabilities {
	return datapath.Capabilities{Name: "kernel", Extend: true}
}

// Fork is not supported on the kernel path yet: it would freeze the
// filesystem, take a dm-snapshot of the loop device and re-encrypt from it
// into a new LUKS2 volume, which only the VM suite can test.
func (v *Backend) Fork(ctx context.Context, src string, srcPass []byte, dst string, dstPass []byte) (luks.Layout, datapath.ForkStats, error) {
	return luks.Layout{}, datapath.ForkStats{}, fmt.Errorf("fork volume %s: %w (kernel); run the worker with --backend userspace to fork", src, datapath.ErrNotSupported)
}

// kernelRegionSize is the clone's region: 4 KiB, like the userspace engine,
// so fstrim of any free filesystem block skips its fetch.
const kernelRegionSize = 4096

func (v *Backend) VolumeDir(vol string) string { return filepath.Join(v.DataDir, "volumes", vol) }
func (v *Backend) DataPath(vol string) string  { return filepath.Join(v.VolumeDir(vol), "data") }
func (v *Backend) MetaPath(vol string) string {
	return filepath.Join(v.VolumeDir(vol), "clone.meta")
}
func (v *Backend) MountPoint(mach string) string { return filepath.Join(v.DataDir, "mnt", mach) }
func (v *Backend) runDir() string                { return filepath.Join(v.DataDir, "run") }
func (v *Backend) recordPath(vol string) string {
	return filepath.Join(v.VolumeDir(vol), "kernel-clone.json")
}

// CryptName is the device-mapper name of vol's plaintext view.
func CryptName(vol string) string { return "ferry-" + vol }

// CloneName is the device-mapper name of vol's clone (a linear mapping of
// the destination once dissolved).
func CloneName(vol string) string { return "ferry-" + vol + "-clone" }

func checkVolumeName(vol string) error {
	if vol == "" || strings.ContainsAny(vol, " \t\n/") || len(CloneName(vol)) > 127 {
		return fmt.Errorf("volume id %q cannot name a device-mapper device: use a short id without spaces or slashes", vol)
	}
	return nil
}

func (v *Backend) dmsetup() string {
	if v.Dmsetup == "" {
		return "dmsetup"
	}
	return v.Dmsetup
}

// dmTable returns the live table of a device-mapper device.
func (v *Backend) dmTable(ctx context.Context, name string) (string, error) {
	out, err := exec.CommandContext(ctx, v.dmsetup(), "table", name).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("dmsetup table %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}

// loopOf returns the loop device over path, attaching one if none is.
// Buffered I/O: the kernel path has no FUSE layer to double-cache.
func (v *Backend) loopOf(path string) (string, error) {
	devs, err := v.Loops.FindByBackingFile(path)
	if err != nil {
		return "", err
	}
	if len(devs) > 0 {
		return devs[0], nil
	}
	return v.Loops.Attach(path, false)
}

func (v *Backend) detachLoops(path string) error {
	devs, err := v.Loops.FindByBackingFile(path)
	if err != nil {
		return err
	}
	for _, d := range devs {
		if err := v.Loops.Detach(d); err != nil {
			return fmt.Errorf("detach %s from %s: %w", d, path, err)
		}
	}
	return nil
}

// Create formats a LUKS2 volume file, opens it with dm-crypt and makes ext4 inside.
func (v *Backend) Create(ctx context.Context, vol string, size int64, passphrase []byte) (luks.Layout, error) {
	if err := checkVolumeName(vol); err != nil {
		return luks.Layout{}, err
	}
	if err := v.Detach(ctx, vol); err != nil {
		return luks.Layout{}, fmt.Errorf("release the half-made volume %s: %w", vol, err)
	}
	if err := os.MkdirAll(v.VolumeDir(vol), 0o700); err != nil {
		return luks.Layout{}, fmt.Errorf("volume dir: %w", err)
	}
	_ = os.Remove(v.DataPath(vol))
	f, err := blockdev.CreateSparse(v.DataPath(vol), size)
	if err != nil {
		return luks.Layout{}, err
	}
	f.Close()
	var layout luks.Layout
	err = hostfs.WithKeyFile(v.runDir(), passphrase, func(kf string) error {
		if err := luks.Format(ctx, v.DataPath(vol), kf, luks.FormatOptions{FastKDF: v.FastKDF, KeyslotsSize: hostfs.KeyslotsSize}); err != nil {
			return fmt.Errorf("format volume %s: %w", vol, err)
		}
		var err error
		if layout, err = v.ReadLayout(vol); err != nil {
			return err
		}
		if err := hostfs.SparsifyHeader(v.DataPath(vol)); err != nil {
			return err
		}
		loop, err := v.loopOf(v.DataPath(vol))
		if err != nil {
			return err
		}
		plain, err := luks.OpenKernel(ctx, loop, CryptName(vol), layout, kf)
		if err != nil {
			return err
		}
		return hostfs.MkfsExt4(ctx, plain, vol)
	})
	if derr := v.Detach(ctx, vol); err == nil {
		err = derr
	}
	return layout, err
}

// ReadLayout reads the LUKS2 layout from a local volume's header.
func (v *Backend) ReadLayout(vol string) (luks.Layout, error) {
	return hostfs.ReadLayout(v.DataPath(vol), vol)
}

// MountLocal opens vol with dm-crypt over its loop device (or over its
// dissolved clone, which still maps the same file) and mounts it.
func (v *Backend) MountLocal(ctx context.Context, vol string, layout luks.Layout, passphrase []byte, mnt string) (string, error) {
	if err := checkVolumeName(vol); err != nil {
		return "", err
	}
	dev := "/dev/mapper/" + CloneName(vol)
	if _, err := v.dmTable(ctx, CloneName(vol)); err != nil {
		if dev, err = v.loopOf(v.DataPath(vol)); err != nil {
			return "", err
		}
	}
	return v.openAndMount(ctx, vol, dev, layout, passphrase, mnt)
}

func (v *Backend) openAndMount(ctx context.Context, vol, dev string, layout luks.Layout, passphrase []byte, mnt string) (string, error) {
	var plain string
	err := hostfs.WithKeyFile(v.runDir(), passphrase, func(kf string) error {
		var err error
		plain, err = luks.OpenKernel(ctx, dev, CryptName(vol), layout, kf)
		return err
	})
	if err != nil {
		return "", err
	}
	return plain, hostfs.MountExt4(plain, mnt, vol)
}

// kernelCloneRecord is what the destination needs to find its session
// again (logout after dissolve, teardown) and its tunnel (a restarted
// agent re-listens on the recorded loopback portal, which open-iscsi
// reconnects to), kept next to the volume.
type kernelCloneRecord struct {
	Portal string `json:"portal"` // what open-iscsi logs into: the tunnel, or the export itself without TLS
	IQN    string `json:"iqn"`
	// SourcePortal and Source (the source worker) are set when Portal is a
	// tunnel to SourcePortal.
	SourcePortal string `json:"source_portal,omitempty"`
	Source       string `json:"source,omitempty"`
}

// ensureTunnel starts (or, after an agent restart, re-listens on the
// recorded portal of) the tunnel of r; nothing to do without one.
func (v *Backend) ensureTunnel(vol string, r *kernelCloneRecord) error {
	if r.SourcePortal == "" {
		return nil
	}
	if v.TLS == nil {
		return fmt.Errorf("clone of %s goes through a TLS tunnel to %s but this data path has no certificate (TLS)", vol, r.SourcePortal)
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if t, ok := v.tunnels[vol]; ok {
		r.Portal = t.Addr()
		return nil
	}
	cfg, err := tlsutil.PeerClientConfig(v.TLS.Dir, v.TLS.Name, tlsutil.Identity{Name: r.Source, Kind: tlsutil.KindWorker})
	if err != nil {
		return fmt.Errorf("TLS to the source's export of %s: %w", vol, err)
	}
	listen := r.Portal
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	t, err := iscsi.StartTunnel(v.Log.With().Str("volume", vol).Logger(), listen, r.SourcePortal, cfg, v.TLS.Denied)
	if err != nil {
		return err
	}
	if v.tunnels == nil {
		v.tunnels = map[string]*iscsi.Tunnel{}
	}
	v.tunnels[vol] = t
	r.Portal = t.Addr()
	return nil
}

// stopTunnel closes vol's tunnel, if one runs here.
func (v *Backend) stopTunnel(vol string) {
	v.mu.Lock()
	t := v.tunnels[vol]
	delete(v.tunnels, vol)
	v.mu.Unlock()
	if t != nil {
		t.Close()
	}
}

// loginSource records c's source, starts its tunnel (with TLS) and logs
// open-iscsi into it; it returns the session's disk.
func (v *Backend) loginSource(ctx context.Context, c datapath.CloneSpec) (string, error) {
	r, err := v.cloneRecord(c)
	if err != nil {
		return "", err
	}
	if err := v.ensureTunnel(c.Volume, &r); err != nil {
		return "", err
	}
	rec, _ := json.Marshal(r)
	if err := hostfs.WriteFileAtomic(v.recordPath(c.Volume), rec); err != nil {
		v.stopTunnel(c.Volume)
		return "", err
	}
	return v.ISCSI.Login(ctx, r.Portal, r.IQN)
}

// adoptTunnel brings back the recorded tunnel of vol's clone after an
// agent restart, on the loopback portal its session reconnects to.
func (v *Backend) adoptTunnel(vol string) error {
	r, ok := v.readRecord(vol)
	if !ok {
		return nil
	}
	return v.ensureTunnel(vol, &r)
}

// cloneRecord is the record of a clone of c: the one on disk when it is
// the same source (an agent restart), else a new one.
func (v *Backend) cloneRecord(c datapath.CloneSpec) (kernelCloneRecord, error) {
	want := kernelCloneRecord{Portal: c.Portal, IQN: c.IQN}
	if v.TLS != nil {
		if c.Source == "" {
			return want, fmt.Errorf("clone of %s: no source worker named, so the export's certificate cannot be checked", c.Volume)
		}
		want = kernelCloneRecord{IQN: c.IQN, SourcePortal: c.Portal, Source: c.Source}
	}
	if r, ok := v.readRecord(c.Volume); ok && r.IQN == want.IQN && r.SourcePortal == want.SourcePortal && r.Source == want.Source {
		return r, nil
	}
	return want, nil
}

func (v *Backend) readRecord(vol string) (kernelCloneRecord, bool) {
	var r kernelCloneRecord
	b, err := os.ReadFile(v.recordPath(vol))
	if err != nil || json.Unmarshal(b, &r) != nil || r.IQN == "" {
		return r, false
	}
	return r, true
}

// MountClone logs into the source's export, builds dm-clone over it and
// the destination (hydration off, known-zero ranges discarded once), opens
// dm-crypt over the clone with the carried layout and mounts it.
func (v *Backend) MountClone(ctx context.Context, c datapath.CloneSpec, passphrase []byte, mnt string) (string, error) {
	if err := checkVolumeName(c.Volume); err != nil {
		return "", err
	}
	if err := c.Layout.Validate(); err != nil {
		return "", err
	}
	vol := c.Volume
	if table, err := v.dmTable(ctx, CloneName(vol)); err == nil && tableTarget(table) == "linear" {
		// Dissolved already (an agent restart after hydration): no source needed.
		return v.openAndMount(ctx, vol, "/dev/mapper/"+CloneName(vol), c.Layout, passphrase, mnt)
	}
	disk, err := v.loginSource(ctx, c)
	if err != nil {
		return "", err
	}
	dest, err := v.loopOf(v.DataPath(vol))
	if err != nil {
		return "", err
	}
	size := c.Layout.DeviceSize()
	_, statErr := os.Stat(v.MetaPath(vol))
	fresh := os.IsNotExist(statErr)
	if fresh {
		// Zeros: dm-clone formats new metadata on first use.
		f, err := blockdev.CreateSparse(v.MetaPath(vol), dmclone.KernelMetadataSize(size, kernelRegionSize))
		if err != nil {
			return "", err
		}
		f.Close()
	}
	meta, err := v.loopOf(v.MetaPath(vol))
	if err != nil {
		return "", err
	}
	k, err := v.adopt(ctx, vol, dmclone.KernelConfig{Name: CloneName(vol), Source: disk, Dest: dest, Meta: meta,
		Size: size, RegionSize: kernelRegionSize})
	if err != nil {
		return "", err
	}
	if fresh {
		// The source's holes read as zeros: discarding them on the clone marks
		// their regions hydrated without a fetch (once: after the machine
		// writes there, a discard would destroy data; a missed one costs fetches).
		v.discardKnownZero(k.Path(), c.KnownZero)
	}
	plain, err := v.openAndMount(ctx, vol, k.Path(), c.Layout, passphrase, mnt)
	if err != nil {
		return "", err
	}
	if c.Hydrate && !k.Progress().HydrationEnabled {
		if err := k.EnableHydration(); err != nil {
			return "", err
		}
	}
	return plain, nil
}

func (v *Backend) discardKnownZero(dev string, ranges []blockdev.Range) {
	if len(ranges) == 0 {
		return
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		v.Log.Warn().Err(err).Msg("cannot open the clone to discard known-zero ranges; they will be fetched")
		return
	}
	defer f.Close()
	size, err := unix.IoctlGetInt(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		v.Log.Warn().Err(err).Msg("cannot size the clone; known-zero ranges will be fetched")
		return
	}
	var n int64
	for _, r := range ranges {
		off := (r.Off + kernelRegionSize - 1) / kernelRegionSize * kernelRegionSize
		end := min(r.End(), int64(size)) / kernelRegionSize * kernelRegionSize
		if end <= off {
			continue
		}
		if err := blkDiscard(f, off, end-off); err != nil {
			v.Log.Warn().Err(err).Msg("discarding known-zero ranges on the clone; the rest will be fetched")
			return
		}
		n += end - off
	}
	v.Log.Info().Int64("bytes", n).Int("ranges", len(ranges)).Msg("known-zero ranges marked hydrated")
}

// blkDiscard issues BLKDISCARD on a block device (fallocate does not reach
// device-mapper targets).
func blkDiscard(f *os.File, off, n int64) error {
	r := [2]uint64{uint64(off), uint64(n)}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKDISCARD, uintptr(unsafe.Pointer(&r[0]))); e != 0 {
		return fmt.Errorf("BLKDISCARD %s at %d+%d: %w", f.Name(), off, n, e)
	}
	return nil
}

// adopt creates the clone, or adopts the live one of that name, and keeps
// it polled.
func (v *Backend) adopt(ctx context.Context, vol string, cfg dmclone.KernelConfig) (*dmclone.KernelClone, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if k, ok := v.clones[vol]; ok {
		return k, nil
	}
	cfg.Tunables = v.Tunables
	cfg.PollInterval = v.PollInterval
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 500 * time.Millisecond
	}
	cfg.StallAfter = v.StallAfter
	cfg.Dmsetup = v.Dmsetup
	k, err := dmclone.CreateKernel(ctx, v.Log, cfg)
	if err != nil {
		return nil, err
	}
	if v.clones == nil {
		v.clones = map[string]*dmclone.KernelClone{}
	}
	v.clones[vol] = k
	return k, nil
}

// tableTarget is the target type of a one-line device-mapper table.
func tableTarget(table string) string {
	f := strings.Fields(table)
	if len(f) < 3 {
		return ""
	}
	return f[2]
}

// parseCloneTable reads size, meta, dest and source of a live clone table:
// "0 <sectors> clone <meta> <dest> <source> <region sectors> ...".
func parseCloneTable(table string) (dmclone.KernelConfig, error) {
	f := strings.Fields(table)
	if len(f) < 7 || f[2] != "clone" {
		return dmclone.KernelConfig{}, fmt.Errorf("not a dm-clone table: %q", table)
	}
	sectors, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil || sectors <= 0 || sectors > 1<<53 {
		return dmclone.KernelConfig{}, fmt.Errorf("dm-clone table %q: bad length", table)
	}
	region, err := strconv.ParseInt(f[6], 10, 64)
	if err != nil || region <= 0 || region > 1<<21 {
		return dmclone.KernelConfig{}, fmt.Errorf("dm-clone table %q: bad region size", table)
	}
	return dmclone.KernelConfig{Size: sectors * 512, Meta: f[3], Dest: f[4], Source: f[5], RegionSize: region * 512}, nil
}

// Clone returns the polled clone of vol, adopting a live device left by an
// earlier agent process; a dissolved (linear) one reports complete.
func (v *Backend) Clone(ctx context.Context, vol string) (datapath.CloneHandle, error) {
	v.mu.Lock()
	k, ok := v.clones[vol]
	v.mu.Unlock()
	if ok {
		return &kernelHandle{v: v, vol: vol, k: k}, nil
	}
	table, err := v.dmTable(ctx, CloneName(vol))
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w (%v)", vol, datapath.ErrNoClone, err)
	}
	switch tableTarget(table) {
	case "linear":
		return &kernelHandle{v: v, vol: vol}, nil
	case "clone":
		// The session reads the source through the tunnel: bring it back
		// first after an agent restart.
		if err := v.adoptTunnel(vol); err != nil {
			return nil, err
		}
		cfg, err := parseCloneTable(table)
		if err != nil {
			return nil, err
		}
		cfg.Name = CloneName(vol)
		k, err := v.adopt(ctx, vol, cfg)
		if err != nil {
			return nil, err
		}
		return &kernelHandle{v: v, vol: vol, k: k}, nil
	}
	return nil, fmt.Errorf("device-mapper device %s is neither a clone nor linear: %q", CloneName(vol), table)
}

// kernelHandle adapts a KernelClone to the agent's CloneHandle; k is nil
// once dissolved.
type kernelHandle struct {
	v   *Backend
	vol string
	k   *dmclone.KernelClone
}

func (h *kernelHandle) Status(ctx context.Context) (*datapath.Status, error) {
	if h.k == nil {
		return &datapath.Status{VolumeID: h.vol, Complete: true, Dissolved: true}, nil
	}
	p := h.k.Progress()
	return &datapath.Status{VolumeID: h.vol, Cloning: true, Hydrating: p.HydrationEnabled, Complete: p.Complete,
		Progress: kernelProgress(p)}, nil
}

// kernelProgress is dm-clone's progress as the datapath reports it; the
// kernel keeps no fetched/skipped byte counters.
func kernelProgress(p dmclone.Progress) *datapath.Progress {
	return &datapath.Progress{RegionSize: p.RegionSize, TotalRegions: p.TotalRegions, HydratedRegions: p.HydratedRegions,
		TotalBytes: p.TotalRegions * p.RegionSize, HydratedBytes: p.HydratedRegions * p.RegionSize,
		RateBPS: int64(p.RateBPS), ETASeconds: int64(p.ETA.Seconds()), Stalled: p.Stalled, StalledReason: p.StalledReason}
}

func (h *kernelHandle) EnableHydration(ctx context.Context) error {
	if h.k == nil || h.k.Progress().HydrationEnabled {
		return nil
	}
	return h.k.EnableHydration()
}

// Dissolve swaps the clone for a linear mapping of the destination under
// the mounted filesystem, then logs out of the source and frees the
// metadata loop.
func (h *kernelHandle) Dissolve(ctx context.Context) error {
	if h.k != nil {
		d, err := h.k.Dissolve()
		if err != nil {
			return err
		}
		d.Close()
		h.k.Close()
		h.v.mu.Lock()
		delete(h.v.clones, h.vol)
		h.v.mu.Unlock()
		h.k = nil
	}
	return h.v.releaseSource(ctx, h.vol)
}

// releaseSource logs out of the source's export and detaches the metadata
// loop: after dissolving nothing reads them.
func (v *Backend) releaseSource(ctx context.Context, vol string) error {
	if r, ok := v.readRecord(vol); ok {
		if err := v.ISCSI.Logout(ctx, r.Portal, r.IQN); err != nil {
			return err
		}
	}
	v.stopTunnel(vol)
	return v.detachLoops(v.MetaPath(vol))
}

// Unmount syncs and unmounts mnt, then detaches the volume.
func (v *Backend) Unmount(ctx context.Context, vol, mnt string) error {
	if err := hostfs.SyncUnmount(mnt, vol); err != nil {
		return err
	}
	return v.Detach(ctx, vol)
}

// Detach closes dm-crypt, removes the clone (or its linear remains), logs
// out of the source and detaches the loops. The mount must be gone.
func (v *Backend) Detach(ctx context.Context, vol string) error {
	if err := luks.CloseKernel(ctx, CryptName(vol)); err != nil {
		return err
	}
	v.mu.Lock()
	k := v.clones[vol]
	delete(v.clones, vol)
	v.mu.Unlock()
	if k != nil {
		if err := k.Close(); err != nil {
			return err
		}
	}
	if err := dmclone.RemoveKernel(ctx, v.Dmsetup, CloneName(vol)); err != nil {
		return err
	}
	if err := v.releaseSource(ctx, vol); err != nil {
		return err
	}
	return v.detachLoops(v.DataPath(vol))
}

// Abandon unmounts mnt and removes vol. The kernel path waits for the
// unmount like Unmount does: dm-clone fails a read whose source is gone
// only after open-iscsi's replacement timeout.
func (v *Backend) Abandon(ctx context.Context, vol, mnt string) error {
	if err := v.Unmount(ctx, vol, mnt); err != nil {
		return err
	}
	return v.Remove(ctx, vol)
}

// Remove detaches and deletes a volume's files.
func (v *Backend) Remove(ctx context.Context, vol string) error {
	if err := fsm.LocalID("volume", vol); err != nil {
		return err
	}
	if err := v.Detach(ctx, vol); err != nil {
		return err
	}
	if err := os.RemoveAll(v.VolumeDir(vol)); err != nil {
		return fmt.Errorf("remove volume %s: %w", vol, err)
	}
	return nil
}

// CleanupAll unmounts every machine mount and detaches every volume.
func (v *Backend) CleanupAll(ctx context.Context) error {
	errs := []error{hostfs.UnmountAll(v.MountPoint(""))}
	vols, _ := os.ReadDir(filepath.Join(v.DataDir, "volumes"))
	for _, e := range vols {
		if err := v.Detach(ctx, e.Name()); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Probe reports what this host lacks for the kernel data path:
// dmsetup with the clone target (modprobe dm-clone is tried), cryptsetup,
// iscsiadm and a running iscsid's tools, mkfs.ext4, resize2fs and fstrim.
func Probe(ctx context.Context) error {
	var missing []string
	for _, t := range []struct{ bin, pkg string }{{"dmsetup", "dmsetup"}, {"cryptsetup", "cryptsetup-bin"},
		{"iscsiadm", "open-iscsi"}, {"mkfs.ext4", "e2fsprogs"}, {"resize2fs", "e2fsprogs"}, {"e2fsck", "e2fsprogs"},
		{"fstrim", "util-linux"}, {"losetup", "mount"}} {
		if _, err := exec.LookPath(t.bin); err != nil {
			missing = append(missing, fmt.Sprintf("%s (Debian package %s)", t.bin, t.pkg))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("the kernel data path needs %s", strings.Join(missing, ", "))
	}
	if !hasCloneTarget(ctx) {
		_ = exec.CommandContext(ctx, "modprobe", "dm-clone").Run()
		if !hasCloneTarget(ctx) {
			return errors.New("the kernel data path needs device-mapper's clone target: `dmsetup targets` does not list clone and `modprobe dm-clone` did not load it (CONFIG_DM_CLONE)")
		}
	}
	return nil
}

// ProbeAuto is --backend auto's test: the clone target is loaded,
// iscsiadm exists, and this process shares the network namespace of PID 1,
// where iscsid connects from (the kernel's iSCSI netlink is not
// namespace-aware): an agent in a worker namespace (the demo, the test beds)
// could not reach its sources through open-iscsi, so auto keeps it on the
// userspace path.
func ProbeAuto(ctx context.Context) error {
	if _, err := exec.LookPath("iscsiadm"); err != nil {
		return errors.New("iscsiadm is not installed (Debian package open-iscsi)")
	}
	if !inInitialNetNS() {
		return errors.New("this process is not in PID 1's network namespace, where iscsid connects from")
	}
	if !hasCloneTarget(ctx) {
		return errors.New("`dmsetup targets` does not list clone")
	}
	return nil
}

func inInitialNetNS() bool {
	self, err1 := os.Readlink("/proc/self/ns/net")
	pid1, err2 := os.Readlink("/proc/1/ns/net")
	return err1 == nil && err2 == nil && self == pid1
}

func hasCloneTarget(ctx context.Context) bool {
	out, err := exec.CommandContext(ctx, "dmsetup", "targets").Output()
	if err != nil {
		return false
	}
	return targetsListClone(string(out))
}

// targetsListClone parses `dmsetup targets` ("clone            v1.0.0").
func targetsListClone(out string) bool {
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 0 && f[0] == "clone" {
			return true
		}
	}
	return false
}
