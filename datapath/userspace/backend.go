package userspace

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/internal/hostfs"
	"github.com/ferry-dev/ferry/datapath/internal/mountns"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/childctl"
	"github.com/ferry-dev/ferry/internal/retry"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/luks"
)

// Backend manages this worker's volumes on disk: sparse ciphertext files
// under DataDir/volumes, each served by a `ferry volume serve` process,
// attached to a loop device and mounted for its machine.
type Backend struct {
	DataDir string
	Exe     string // the ferry binary that runs `volume serve`
	Log     zerolog.Logger
	Loops   loopdev.Loops
	// FastKDF formats keyslots cheap to open (demo and tests only).
	FastKDF bool
	// TLS: clones reach the source's export over mutual TLS with this
	// worker's certificate and admit only the source worker's (nil: plain
	// iSCSI, tests only).
	TLS *datapath.PeerTLS
	// Deny is this agent's copy of the revoked certificate serials (nil:
	// none): a clone starts with it, and WatchDenied sends it to running
	// clones when it changes.
	Deny *iscsi.DenyList
	// BlockExport is how volumes reach the kernel: ExportFUSE (default) or
	// ExportNBD (kernel dm-crypt over the served ciphertext; see
	// ProbeNBD).
	BlockExport string

	pre prestarts // datapaths started ahead of their clone, by volume
}

// Prestart starts vol's datapath process ahead of its clone (the agent
// asks when it prepares a migration's target), so the clone built inside
// the machine's pause skips a process's start. Best effort: a failure is
// logged and the clone starts its own process. Idempotent.
func (v *Backend) Prestart(ctx context.Context, vol string) {
	if err := checkVolumeName(vol); err != nil {
		v.Log.Warn().Err(err).Msg("prestart the datapath: skipped")
		return
	}
	if _, err := v.Process(ctx, vol); err == nil {
		return // already served
	}
	p, err := startPrestarted(v.Exe, v.runDir(), vol)
	if err != nil {
		v.Log.Warn().Err(err).Str("volume", vol).Msg("prestart the datapath: failed; the clone starts its own")
		return
	}
	if !v.pre.add(vol, p) {
		p.release()
	}
}

// ReleasePrestarted ends every prestarted datapath not yet handed its
// configuration (the agent stops).
func (v *Backend) ReleasePrestarted() {
	for _, p := range v.pre.all() {
		p.release()
	}
}

func (v *Backend) nbd() bool { return v.BlockExport == ExportNBD }

// servedOverNBD reports whether vol is served over NBD: by what the host
// shows (its dm-crypt mapping over NBD, or its FUSE file mounted), so a
// volume is handled as it was served also when the agent's block export
// changed since (--block-export auto on a host that gained NBD); by the
// agent's block export when it is not served at all.
func (v *Backend) servedOverNBD(vol string) bool {
	if _, ok := nbdOf(vol); ok {
		return true
	}
	if _, ok := hostfs.MountedAt(v.FuseDir(vol)); ok {
		return false
	}
	return v.nbd()
}

var (
	_ datapath.Backend     = (*Backend)(nil)
	_ datapath.CloneHandle = (*Process)(nil)
)

// Capabilities of the userspace engine: it honours a rate limit, keeps a
// guaranteed share of background copies under foreground load, and counts
// fetched and skipped bytes.
func (v *Backend) Capabilities() datapath.Capabilities {
	return datapath.Capabilities{Name: "userspace", HydrationRateLimit: true, GuaranteedShare: true, ByteCounters: true, Extend: true, Fork: true}
}

// Extend grows the volume to size bytes. Served (its machine runs): the
// datapath process grows the file, the LUKS2 view and the FUSE file; the
// loop device re-reads its size and resize2fs grows the mounted ext4
// online. Not served: the file grows, and the filesystem is checked and
// grown through a short-lived datapath. Each step finds its work done when
// repeated, so a crash anywhere is finished by the next call.
func (v *Backend) Extend(ctx context.Context, vol string, layout luks.Layout, size int64, passphrase []byte) (luks.Layout, error) {
	if err := checkVolumeName(vol); err != nil {
		return luks.Layout{}, err
	}
	next, err := datapath.GrownLayout(layout, size)
	if err != nil {
		return luks.Layout{}, fmt.Errorf("extend volume %s: %w", vol, err)
	}
	if p, err := v.Process(ctx, vol); err == nil {
		if v.servedOverNBD(vol) {
			return next, v.extendServedNBD(ctx, p, vol, next, passphrase)
		}
		return next, v.extendServed(ctx, p, vol, next)
	}
	st, err := os.Stat(v.DataPath(vol))
	if err != nil {
		return luks.Layout{}, fmt.Errorf("extend volume %s: %w", vol, err)
	}
	if want := next.DeviceSize(); st.Size() < want {
		if err := os.Truncate(v.DataPath(vol), want); err != nil {
			return luks.Layout{}, fmt.Errorf("extend volume %s: grow its file: %w", vol, err)
		}
	}
	dev, err := v.Attach(ctx, v.Config(vol, next), passphrase)
	if err != nil {
		return luks.Layout{}, fmt.Errorf("extend volume %s: serve it to grow its filesystem: %w", vol, err)
	}
	gerr := hostfs.GrowExt4(ctx, dev, false)
	if err := v.Detach(ctx, vol); err != nil {
		return luks.Layout{}, errors.Join(gerr, err)
	}
	if gerr != nil {
		return luks.Layout{}, fmt.Errorf("extend volume %s: %w", vol, gerr)
	}
	return next, nil
}

func (v *Backend) extendServed(ctx context.Context, p *Process, vol string, next luks.Layout) error {
	if err := p.Grow(ctx, next.PayloadSize); err != nil {
		return fmt.Errorf("extend volume %s: %w", vol, err)
	}
	file := filepath.Join(v.FuseDir(vol), DeviceFile)
	// The stat refreshes the size the kernel caches for the FUSE file, which
	// is the size the loop device reads.
	if st, err := os.Stat(file); err != nil || st.Size() != next.PayloadSize {
		return fmt.Errorf("extend volume %s: %s does not show the new size %d yet (stat: %v)", vol, file, next.PayloadSize, err)
	}
	devs, err := v.Loops.FindByBackingFile(file)
	if err != nil {
		return err
	}
	if len(devs) == 0 {
		// Served without a machine: grow the filesystem through a loop of
		// our own.
		dev, err := v.Loops.Attach(file, true)
		if err != nil {
			return fmt.Errorf("extend volume %s: %w", vol, err)
		}
		gerr := hostfs.GrowExt4(ctx, dev, false)
		if err := v.Loops.Detach(dev); err != nil {
			return errors.Join(gerr, err)
		}
		return gerr
	}
	for _, dev := range devs {
		if err := loopdev.SetCapacity(dev); err != nil {
			return fmt.Errorf("extend volume %s: %w", vol, err)
		}
		_, mounted := mountedFrom(dev)
		if err := hostfs.GrowExt4(ctx, dev, mounted); err != nil {
			return fmt.Errorf("extend volume %s: %w", vol, err)
		}
	}
	return nil
}

// mountedFrom returns where dev is mounted, if anywhere.
func mountedFrom(dev string) (string, bool) {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return "", false
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == dev {
			return f[1], true
		}
	}
	return "", false
}

// Probe says what this host lacks for the userspace path: a FUSE device
// and the tools the stack calls.
func Probe(ctx context.Context) error {
	var missing []string
	if _, err := os.Stat("/dev/fuse"); err != nil {
		missing = append(missing, "/dev/fuse (the fuse kernel module)")
	}
	for _, t := range []struct{ bin, pkg string }{{"cryptsetup", "cryptsetup-bin"},
		{"mkfs.ext4", "e2fsprogs"}, {"fstrim", "util-linux"}, {"losetup", "mount"}} {
		if _, err := exec.LookPath(t.bin); err != nil {
			missing = append(missing, fmt.Sprintf("%s (Debian package %s)", t.bin, t.pkg))
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("the userspace data path needs %s", strings.Join(missing, ", "))
	}
	return nil
}

func (v *Backend) VolumeDir(vol string) string   { return filepath.Join(v.DataDir, "volumes", vol) }
func (v *Backend) DataPath(vol string) string    { return filepath.Join(v.VolumeDir(vol), "data") }
func (v *Backend) MetaPath(vol string) string    { return filepath.Join(v.VolumeDir(vol), "clone.meta") }
func (v *Backend) FuseDir(vol string) string     { return filepath.Join(v.DataDir, "fuse", vol) }
func (v *Backend) Socket(vol string) string      { return filepath.Join(v.DataDir, "run", vol+".sock") }
func (v *Backend) MountPoint(mach string) string { return filepath.Join(v.DataDir, "mnt", mach) }
func (v *Backend) runDir() string                { return filepath.Join(v.DataDir, "run") }

// Config is the serve configuration of a local volume (no clone).
func (v *Backend) Config(vol string, layout luks.Layout) Config {
	return Config{VolumeID: vol, DataPath: v.DataPath(vol), Layout: layout,
		MountDir: v.FuseDir(vol), Socket: v.Socket(vol), BlockExport: v.BlockExport}
}

// Create makes a new LUKS2 volume of size bytes with an ext4 filesystem
// inside, and returns its layout. Re-running it on a half-made volume starts
// over (nothing references the volume until it is created).
func (v *Backend) Create(ctx context.Context, vol string, size int64, passphrase []byte) (luks.Layout, error) {
	if err := checkVolumeName(vol); err != nil {
		return luks.Layout{}, err
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
	err = hostfs.WithKeyFile(v.runDir(), passphrase, func(kf string) error {
		return luks.Format(ctx, v.DataPath(vol), kf, luks.FormatOptions{FastKDF: v.FastKDF, KeyslotsSize: hostfs.KeyslotsSize})
	})
	if err != nil {
		return luks.Layout{}, fmt.Errorf("format volume %s: %w", vol, err)
	}
	layout, err := v.ReadLayout(vol)
	if err != nil {
		return luks.Layout{}, err
	}
	if err := hostfs.SparsifyHeader(v.DataPath(vol)); err != nil {
		return luks.Layout{}, err
	}
	dev, err := v.Attach(ctx, v.Config(vol, layout), passphrase)
	if err != nil {
		return luks.Layout{}, err
	}
	if err := hostfs.MkfsExt4(ctx, dev, vol); err != nil {
		v.Detach(ctx, vol)
		return luks.Layout{}, err
	}
	return layout, v.Detach(ctx, vol)
}

// checkVolumeName refuses ids that would escape the data dir's folders.
func checkVolumeName(vol string) error {
	if vol == "" || vol == "." || vol == ".." || strings.ContainsAny(vol, " \t\n/\x00") {
		return fmt.Errorf("volume id %q cannot name a folder: use a short id without spaces or slashes", vol)
	}
	return nil
}

// ReadLayout reads the LUKS2 layout from a local volume's header.
func (v *Backend) ReadLayout(vol string) (luks.Layout, error) {
	return hostfs.ReadLayout(v.DataPath(vol), vol)
}

// Attach starts (or re-adopts) the volume's datapath and its loop device,
// returning the loop device. Idempotent.
func (v *Backend) Attach(ctx context.Context, cfg Config, passphrase []byte) (string, error) {
	return v.attach(ctx, cfg, keyOf(passphrase))
}

// keyOf is a key source handing out a copy of passphrase.
func keyOf(passphrase []byte) func(context.Context) ([]byte, error) {
	return func(context.Context) ([]byte, error) { return bytes.Clone(passphrase), nil }
}

func (v *Backend) attach(ctx context.Context, cfg Config, key func(context.Context) ([]byte, error)) (string, error) {
	t0 := time.Now()
	// The FUSE file is mounted under a shared mount point, like the
	// machine's filesystem, so a copy of the mount table made later as a
	// slave drops it too and the datapath can exit when asked.
	if err := mountns.EnsureShared(filepath.Join(v.DataDir, "fuse")); err != nil {
		return "", err
	}
	if _, err := startKeyed(ctx, v.Log, v.Exe, cfg, key, v.runDir(), v.pre.take(cfg.VolumeID)); err != nil {
		return "", err
	}
	t1 := time.Now()
	defer func() {
		v.Log.Info().Str("volume", cfg.VolumeID).Dur("datapath", t1.Sub(t0)).Dur("loop", time.Since(t1)).Msg("volume attached")
	}()
	if dev := cfg.Device(); dev != "" {
		// The process opened it before it answered.
		if _, err := os.Stat(dev); err != nil {
			return "", fmt.Errorf("volume %s: its datapath runs but %s is missing: %w", cfg.VolumeID, dev, err)
		}
		return dev, nil
	}
	devs, err := v.Loops.FindByBackingFile(cfg.DevicePath())
	if err != nil {
		return "", err
	}
	if len(devs) > 0 {
		return devs[0], nil
	}
	return v.Loops.Attach(cfg.DevicePath(), true)
}

// Mount attaches the volume and mounts its filesystem at mnt. Idempotent.
func (v *Backend) Mount(ctx context.Context, cfg Config, passphrase []byte, mnt string) (string, error) {
	return v.mount(ctx, cfg, keyOf(passphrase), mnt)
}

func (v *Backend) mount(ctx context.Context, cfg Config, key func(context.Context) ([]byte, error), mnt string) (string, error) {
	t0 := time.Now()
	dev, err := v.attach(ctx, cfg, key)
	if err != nil {
		return "", err
	}
	t1 := time.Now()
	err = hostfs.MountExt4(dev, mnt, cfg.VolumeID)
	v.Log.Info().Str("volume", cfg.VolumeID).Dur("attach", t1.Sub(t0)).Dur("mount", time.Since(t1)).Msg("volume mounted")
	if err == nil {
		v.warnSubSectorBlocks(cfg, mnt)
	}
	if err == nil && cfg.Clone != nil {
		// Off the pause's path: the clone reads the machine's recent
		// files ahead from now (a failure only leaves them to be fetched
		// on demand).
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := (&Process{cfg: cfg, client: childctl.Dial(cfg.Socket)}).Mounted(ctx); err != nil {
				v.Log.Info().Err(err).Str("volume", cfg.VolumeID).Msg("the clone was not told its filesystem is mounted; it reads no files ahead")
			}
		}()
	}
	return dev, err
}

// warnSubSectorBlocks logs a volume whose filesystem blocks are smaller
// than its encryption sector: ferry made volumes under 512 MiB that way
// before mkfs was given 4 KiB blocks, and every block written to one
// makes the view read, decrypt, merge and re-encrypt the whole sector.
func (v *Backend) warnSubSectorBlocks(cfg Config, mnt string) {
	if cfg.Raw {
		return
	}
	bs, err := hostfs.BlockSize(mnt)
	if err != nil || bs >= int64(cfg.Layout.SectorSize) {
		return
	}
	v.Log.Warn().Str("volume", cfg.VolumeID).Int64("block_size", bs).Int("sector_size", cfg.Layout.SectorSize).
		Msg("the volume's filesystem blocks are smaller than its encryption sector, so each block written rereads and re-encrypts the sector (small random writes several times slower); to avoid it, copy the data to a new volume, which ferry makes with 4 KiB blocks")
}

// MountLocal serves a local volume (no clone) and mounts it.
func (v *Backend) MountLocal(ctx context.Context, vol string, layout luks.Layout, passphrase []byte, mnt string) (string, error) {
	if err := checkVolumeName(vol); err != nil {
		return "", err
	}
	return v.Mount(ctx, v.Config(vol, layout), passphrase, mnt)
}

// MountClone starts the destination's datapath with the clone engine under
// the LUKS2 view and mounts it.
func (v *Backend) MountClone(ctx context.Context, c datapath.CloneSpec, passphrase []byte, mnt string) (string, error) {
	return v.MountCloneKeyed(ctx, c, keyOf(passphrase), mnt)
}

// MountCloneKeyed is MountClone with the key asked of key beside the
// datapath process's start (its login to the source, its engine's open),
// only if a new process starts: a migration's target fetches the key from
// the servers inside the machine's pause.
func (v *Backend) MountCloneKeyed(ctx context.Context, c datapath.CloneSpec, key func(context.Context) ([]byte, error), mnt string) (string, error) {
	cfg, err := v.cloneConfig(c)
	if err != nil {
		return "", err
	}
	dev, err := v.mount(ctx, cfg, key, mnt)
	if err != nil || v.TLS == nil {
		return dev, err
	}
	// A list that changed while the process started reached every clone
	// but this one (WatchDenied found no socket yet); an adopted process
	// may hold an older one.
	if now := v.Deny.Serials(); !slices.Equal(now, cfg.Clone.Denied) {
		p, err := v.Process(ctx, c.Volume)
		if err == nil {
			err = p.SetDenied(ctx, now)
		}
		if err != nil {
			return "", fmt.Errorf("clone of %s: send it the revoked certificates: %w", c.Volume, err)
		}
	}
	return dev, nil
}

// cloneConfig is the datapath configuration of clone c.
func (v *Backend) cloneConfig(c datapath.CloneSpec) (Config, error) {
	if err := checkVolumeName(c.Volume); err != nil {
		return Config{}, err
	}
	cfg := v.Config(c.Volume, c.Layout)
	if v.TLS != nil && c.Source == "" {
		return Config{}, fmt.Errorf("clone of %s: no source worker named, so the export's certificate cannot be checked", c.Volume)
	}
	cfg.Clone = &Clone{MetaPath: v.MetaPath(c.Volume), Portal: c.Portal, IQN: c.IQN, TLS: v.TLS, Source: c.Source,
		RegionSize: 4096, KnownZero: c.KnownZero, Hydrate: c.Hydrate, RateLimit: c.RateLimit, NoIdleBatches: c.NoIdleBatches}
	if v.TLS != nil {
		cfg.Clone.Denied = v.Deny.Serials()
	}
	return cfg, nil
}

// PreConnect has clone c's prestarted datapath, if there is one, log in to
// c's export now, before the export is final (earlylogin.go); the clone
// built later adopts that session when it names the same export. Best
// effort and idempotent: without it the clone logs in when it is built.
// The channel is closed once the login ended (or at once without one).
func (v *Backend) PreConnect(ctx context.Context, c datapath.CloneSpec) <-chan struct{} {
	cfg, err := v.cloneConfig(c)
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		v.Log.Warn().Err(err).Str("volume", c.Volume).Msg("early login: skipped")
		return closedChan
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		return closedChan
	}
	sent, loggedIn := v.pre.connect(c.Volume, b)
	if sent {
		v.Log.Info().Str("volume", c.Volume).Str("portal", c.Portal).Msg("prestarted datapath logs in to the source's export")
	}
	return loggedIn
}

// WatchDenied sends Deny to every running clone each time it changes,
// checking every period, until ctx ends; a clone that did not take it
// gets it again at the next check. A clone whose source's certificate is
// on it cuts its sessions and reads nothing more from that source.
func (v *Backend) WatchDenied(ctx context.Context, every time.Duration) {
	if v.Deny == nil || v.TLS == nil {
		return
	}
	// Nothing is sent while the list is empty: after an agent restart, the
	// clones it adopts keep the list they have until the servers' is read.
	var sent []string
	warned := map[string]bool{}
	for {
		if now := v.Deny.Serials(); !slices.Equal(now, sent) {
			if v.pushDenied(ctx, now, warned) {
				sent = now
				clear(warned)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
	}
}

// pushDenied sends serials to every running clone and reports whether all
// that answer took them. A socket nobody answers on is no running clone.
func (v *Backend) pushDenied(ctx context.Context, serials []string, warned map[string]bool) bool {
	socks, err := filepath.Glob(filepath.Join(v.runDir(), "*.sock"))
	if err != nil {
		return false
	}
	// In parallel: one hung datapath must not delay the others' list.
	var (
		mu sync.Mutex
		wg sync.WaitGroup
		ok = true
	)
	fail := func(vol string, err error, what string) {
		mu.Lock()
		defer mu.Unlock()
		ok = false
		if !warned[vol] {
			v.Log.Warn().Err(err).Str("volume", vol).Msg(what)
			warned[vol] = true
		}
	}
	for _, sock := range socks {
		wg.Add(1)
		go func(sock string) {
			defer wg.Done()
			vol := strings.TrimSuffix(filepath.Base(sock), ".sock")
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			p := &Process{cfg: Config{VolumeID: vol, Socket: sock}, client: childctl.Dial(sock)}
			st, err := p.Status(cctx)
			switch {
			case err != nil && (errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT)):
				return // no datapath listens there: nothing to tell
			case err != nil:
				// A busy or hung datapath may still be a clone reading
				// from a revoked source: try again next round.
				fail(vol, err, "datapath did not answer while the certificate deny list changed; retrying")
			case st.Cloning && !st.Dissolved:
				if err := p.SetDenied(cctx, serials); err != nil {
					fail(vol, err, "clone did not take the certificate deny list; retrying")
				}
			}
		}(sock)
	}
	wg.Wait()
	return ok
}

// Clone adopts the volume's running datapath.
func (v *Backend) Clone(ctx context.Context, vol string) (datapath.CloneHandle, error) {
	p, err := v.Process(ctx, vol)
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w (%v)", vol, datapath.ErrNoClone, err)
	}
	return p, nil
}

// Unmount syncs and unmounts mnt (if mounted), then detaches the volume.
func (v *Backend) Unmount(ctx context.Context, vol, mnt string) error {
	if err := hostfs.SyncUnmount(mnt, vol); err != nil {
		return err
	}
	return v.Detach(ctx, vol)
}

// Freeze syncs and unmounts the filesystem at mnt and leaves vol's loop
// device and datapath running (datapath.Freezer). Idempotent. Unmounted
// here is not unmounted everywhere: a copy of the mount table (another
// mount namespace) keeps the filesystem mounted, and writable, on the same
// device. A mounted filesystem claims its device exclusively, so the
// device must open with O_EXCL; where it does not, Freeze releases the
// volume as Unmount does, whose detach names the holder.
func (v *Backend) Freeze(ctx context.Context, vol, mnt string) error {
	if err := checkVolumeName(vol); err != nil {
		return err
	}
	if err := hostfs.SyncUnmount(mnt, vol); err != nil {
		return err
	}
	devs, err := v.servedDevices(vol)
	if err != nil {
		return err
	}
	for _, d := range devs {
		fd, err := unix.Open(d, unix.O_RDONLY|unix.O_EXCL|unix.O_CLOEXEC, 0)
		if err != nil {
			if derr := v.Detach(ctx, vol); derr != nil {
				return fmt.Errorf("volume %s is not frozen: %s is still in use (%v): %w", vol, d, err, derr)
			}
			return nil // released after all
		}
		unix.Close(fd)
	}
	return nil
}

// Detach detaches the loop device and stops the datapath. Idempotent.
func (v *Backend) Detach(ctx context.Context, vol string) error {
	devPath := filepath.Join(v.FuseDir(vol), DeviceFile)
	devs, err := v.Loops.FindByBackingFile(devPath)
	if err != nil {
		return err
	}
	for _, d := range devs {
		if err := v.Loops.Detach(d); err != nil {
			return fmt.Errorf("detach %s from volume %s: %w", d, vol, err)
		}
	}
	p, err := v.Process(ctx, vol)
	if err != nil {
		return nil // not running
	}
	return p.Shutdown(ctx)
}

// DatapathDead reports whether vol's datapath process is gone while its
// FUSE file is still mounted (every I/O through it fails).
func (v *Backend) DatapathDead(ctx context.Context, vol string) bool {
	if v.servedOverNBD(vol) {
		return v.nbdDead(ctx, vol)
	}
	if _, ok := hostfs.MountedAt(v.FuseDir(vol)); !ok {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := v.Process(ctx, vol); err == nil {
		return false
	}
	// Not answering: dead only if the kernel says the FUSE connection is
	// gone (a busy datapath is not restarted under its machine). With the
	// server gone the kernel answers at once, so this cannot hang.
	res := make(chan error, 1)
	go func() {
		var st unix.Stat_t
		res <- unix.Stat(filepath.Join(v.FuseDir(vol), DeviceFile), &st)
	}()
	select {
	case err := <-res:
		return errors.Is(err, unix.ENOTCONN)
	case <-ctx.Done():
		return false // hung, not dead
	}
}

// ReleaseDead releases what a dead datapath leaves: the filesystem at mnt
// (lazily: it cannot be flushed), the loop device, the FUSE file.
func (v *Backend) ReleaseDead(ctx context.Context, vol, mnt string) error {
	if _, ok := hostfs.MountedAt(mnt); ok {
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("lazy unmount of %s over the dead datapath of volume %s: %w", mnt, vol, err)
		}
	}
	if v.servedOverNBD(vol) {
		return releaseDeadNBD(ctx, vol)
	}
	devs, err := v.Loops.FindByBackingFile(filepath.Join(v.FuseDir(vol), DeviceFile))
	if err != nil {
		return err
	}
	for _, d := range devs {
		if err := v.Loops.Detach(d); err != nil {
			return fmt.Errorf("detach %s from the dead datapath of volume %s: %w", d, vol, err)
		}
	}
	return lazyUnmountFUSE(v.FuseDir(vol))
}

// Process returns the running datapath of vol, if any.
func (v *Backend) Process(ctx context.Context, vol string) (*Process, error) {
	return Adopt(ctx, Config{VolumeID: vol, Socket: v.Socket(vol)})
}

// Remove deletes a volume's files. The caller makes sure nothing uses it.
func (v *Backend) Remove(ctx context.Context, vol string) error {
	if err := checkVolumeName(vol); err != nil {
		return err
	}
	if err := fsm.LocalID("volume", vol); err != nil {
		return err
	}
	if p := v.pre.take(vol); p != nil {
		p.release()
	}
	if err := v.Detach(ctx, vol); err != nil {
		return err
	}
	if err := os.RemoveAll(v.VolumeDir(vol)); err != nil {
		return fmt.Errorf("remove volume %s: %w", vol, err)
	}
	_ = os.Remove(v.FuseDir(vol))
	return nil
}

// Abandon unmounts mnt and removes vol, discarding its contents. An
// unmount still blocked after a few seconds (a clone whose source is gone:
// each read it waits on only times out) is unblocked by killing the
// volume's datapath, which fails the pending I/O at once; what is left is
// released as after a dead datapath.
func (v *Backend) Abandon(ctx context.Context, vol, mnt string) error {
	if err := checkVolumeName(vol); err != nil {
		return err
	}
	if _, ok := hostfs.MountedAt(mnt); ok {
		// Never lazily: a busy mount means a process of the machine still
		// runs there, which the caller must learn (and stop) first.
		if err := hostfs.UnmountOrKill(mnt, abandonPatience, func() {
			v.Log.Warn().Str("volume", vol).Str("mount", mnt).Msg("unmount of an abandoned volume blocked, or held only by killed processes' reads (its clone's source is gone?); killing its datapath")
			killProcesses(filepath.Join(v.runDir(), vol+".json"))
		}); err != nil {
			return fmt.Errorf("abandon volume %s: %w", vol, err)
		}
	}
	if v.DatapathDead(ctx, vol) {
		if err := v.ReleaseDead(ctx, vol, mnt); err != nil {
			return fmt.Errorf("abandon volume %s: %w", vol, err)
		}
	}
	return v.Remove(ctx, vol)
}

// FailStuckIO kills the datapath of the volume mounted at mnt when no live
// process uses the mount, failing the I/O that killed processes are stuck
// in there (a machine that survived SIGKILL). A live user, a mount that is
// not one of this backend's volumes, or no mount: nothing is done.
func (v *Backend) FailStuckIO(ctx context.Context, mnt string) (bool, error) {
	dev, ok := hostfs.MountedAt(mnt)
	if !ok {
		return false, nil
	}
	if live := hostfs.LiveHolders(mnt); len(live) > 0 {
		return false, nil
	}
	ents, err := os.ReadDir(filepath.Join(v.DataDir, "fuse"))
	if err != nil {
		return false, nil
	}
	for _, e := range ents {
		vol := e.Name()
		if checkVolumeName(vol) != nil {
			continue
		}
		devs, err := v.servedDevices(vol)
		if err != nil || !slices.Contains(devs, dev) {
			continue
		}
		v.Log.Warn().Str("volume", vol).Str("mount", mnt).Msg("only killed processes are left under the volume's mount, stuck in its I/O (its clone's source cut off?): killing its datapath to fail that I/O; the volume is revived as after a dead datapath")
		killProcesses(filepath.Join(v.runDir(), vol+".json"))
		return true, nil
	}
	return false, nil
}

// abandonPatience is how long Abandon lets an unmount run before failing
// the I/O it waits on.
const abandonPatience = 5 * time.Second

// CleanupAll unmounts every machine mount, stops every datapath and lazily
// unmounts FUSE files whose datapath died.
//
// A filesystem whose clone reads from a source that is gone (a target torn
// down after the source already unexported) cannot be unmounted cleanly: its
// writeback waits on reads that only time out. Then the mount is detached
// lazily and the datapaths are killed, which fails the pending I/O at once;
// the data there is a discarded copy, the source is authoritative.
func (v *Backend) CleanupAll(ctx context.Context) error {
	v.ReleasePrestarted()
	var errs []error
	killDatapaths := func() {
		ents, _ := os.ReadDir(filepath.Join(v.DataDir, "fuse"))
		for _, e := range ents {
			killProcesses(filepath.Join(v.runDir(), e.Name()+".json"))
		}
	}
	mnts, _ := os.ReadDir(v.MountPoint(""))
	for _, e := range mnts {
		mnt := v.MountPoint(e.Name())
		if _, ok := hostfs.MountedAt(mnt); !ok {
			continue
		}
		if err := hostfs.UnmountOrForce(mnt, 5*time.Second, func() {
			v.Log.Warn().Str("mount", mnt).Msg("unmount blocked (a clone waiting on a dead source?); killing the datapaths")
			killDatapaths()
		}); err != nil {
			errs = append(errs, err)
		}
	}
	vols, _ := os.ReadDir(filepath.Join(v.DataDir, "fuse"))
	for _, e := range vols {
		if err := v.detachPatiently(ctx, e.Name()); err != nil {
			errs = append(errs, err)
		}
		if err := lazyUnmountFUSE(v.FuseDir(e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		errs = append(errs, hostfs.ReleaseShared(v.MountPoint("")), mountns.Release(filepath.Join(v.DataDir, "fuse")))
	}
	return errors.Join(errs...)
}

// cleanupDetachWait bounds how long a teardown retries the detach of a
// loop device that is still open. A machine killed inside its volume's
// I/O, or a filesystem's last flush through the datapath, can hold it past
// one Detach's wait on a loaded host; stopping the datapath under it then
// would fail that I/O, so the teardown waits longer instead.
const cleanupDetachWait = 30 * time.Second

// detachPatiently is Detach retried with jittered backoff until it
// succeeds, cleanupDetachWait passes or ctx ends; it returns the last error.
func (v *Backend) detachPatiently(ctx context.Context, vol string) error {
	deadline := time.Now().Add(cleanupDetachWait)
	bo := retry.New(100*time.Millisecond, 2*time.Second)
	for {
		err := v.Detach(ctx, vol)
		if err == nil || time.Now().After(deadline) {
			return err
		}
		v.Log.Warn().Err(err).Str("volume", vol).Msg("the volume's loop device is still open; detaching again")
		select {
		case <-ctx.Done():
			return errors.Join(err, ctx.Err())
		case <-time.After(bo.Next()):
		}
	}
}

// lazyUnmountFUSE releases a FUSE mount whose datapath died without unmounting.
func lazyUnmountFUSE(fuseDir string) error {
	if _, ok := hostfs.MountedAt(fuseDir); !ok {
		return nil
	}
	tctx, cancel := context.WithTimeout(context.Background(), 10*time.Second) // every external tool runs under a deadline
	defer cancel()
	if out, err := exec.CommandContext(tctx, "fusermount3", "-u", "-z", fuseDir).CombinedOutput(); err != nil {
		return fmt.Errorf("unmount FUSE %s: %w: %s", fuseDir, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// killProcesses SIGKILLs every process whose command line names marker
// (a datapath's config file) and waits briefly for them to go.
func killProcesses(marker string) {
	pids := processesNaming(marker)
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	for _, pid := range pids {
		for i := 0; i < 100 && syscall.Kill(pid, 0) == nil; i++ {
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// processesNaming lists the other processes whose command line names marker.
func processesNaming(marker string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), marker) {
			pids = append(pids, pid)
		}
	}
	return pids
}
