package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/luks"
)

// Backend is a worker's data path: how a volume file becomes a mounted
// filesystem, and how a migration's destination clones the source's export.
// Volumes (userspace: `ferry volume serve` → FUSE → loop → mount) and
// KernelVolumes (loop → dm-clone → dm-crypt → mount) implement it. Every
// method is idempotent and finds what an earlier agent process left behind
// (processes, loop devices, device-mapper devices, iSCSI sessions, mounts).
type Backend interface {
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
	// an error when none is running here.
	Clone(ctx context.Context, vol string) (CloneHandle, error)
	// Unmount syncs and unmounts mnt (if mounted), then detaches the volume.
	Unmount(ctx context.Context, vol, mnt string) error
	// Detach releases everything that serves the volume; the file stays.
	Detach(ctx context.Context, vol string) error
	// Remove detaches and deletes a volume's files.
	Remove(ctx context.Context, vol string) error
	// CleanupAll unmounts and detaches every volume under the data dir.
	CleanupAll(ctx context.Context) error

	VolumeDir(vol string) string
	DataPath(vol string) string
	MetaPath(vol string) string
	MountPoint(machine string) string
}

// CloneSpec is one migration's clone on the target.
type CloneSpec struct {
	Volume    string // the destination volume (its file exists, sized from Layout)
	Layout    luks.Layout
	Portal    string // the source's export
	IQN       string
	KnownZero []blockdev.Range // ciphertext ranges that read as zeros on the source
	Hydrate   bool             // background hydration on from the start (resume after cutover)
	RateLimit int64            // bytes/s, 0 none (the userspace engine only)
}

// CloneHandle drives a running clone.
type CloneHandle interface {
	Status(ctx context.Context) (*datapath.Status, error)
	EnableHydration(ctx context.Context) error
	// Dissolve replaces the clone by the destination alone; it needs every
	// region hydrated, and is idempotent.
	Dissolve(ctx context.Context) error
}

var (
	_ Backend     = (*Volumes)(nil)
	_ CloneHandle = (*datapath.Process)(nil)
)

// MountLocal serves a local volume (no clone) and mounts it.
func (v *Volumes) MountLocal(ctx context.Context, vol string, layout luks.Layout, passphrase []byte, mnt string) (string, error) {
	return v.Mount(ctx, v.DatapathConfig(vol, layout), passphrase, mnt)
}

// MountClone starts the destination's datapath with the clone engine under
// the LUKS2 view and mounts it.
func (v *Volumes) MountClone(ctx context.Context, c CloneSpec, passphrase []byte, mnt string) (string, error) {
	cfg := v.DatapathConfig(c.Volume, c.Layout)
	cfg.Clone = &datapath.Clone{MetaPath: v.MetaPath(c.Volume), Portal: c.Portal, IQN: c.IQN,
		RegionSize: 4096, KnownZero: c.KnownZero, Hydrate: c.Hydrate, RateLimit: c.RateLimit}
	return v.Mount(ctx, cfg, passphrase, mnt)
}

// Clone adopts the volume's running datapath.
func (v *Volumes) Clone(ctx context.Context, vol string) (CloneHandle, error) {
	p, err := v.Process(ctx, vol)
	if err != nil {
		return nil, err
	}
	return p, nil
}

// CleanupAll unmounts every machine mount, stops every datapath and lazily
// unmounts FUSE files whose datapath died.
//
// A filesystem whose clone reads from a source that is gone (a target torn
// down after the source already unexported) cannot be unmounted cleanly: its
// writeback waits on reads that only time out. Then the mount is detached
// lazily and the datapaths are killed, which fails the pending I/O at once;
// the data there is a discarded copy, the source is authoritative.
func (v *Volumes) CleanupAll(ctx context.Context) error {
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
		if _, ok := mountedAt(mnt); !ok {
			continue
		}
		if err := unmountOrForce(mnt, 5*time.Second, func() {
			v.Log.Warn().Str("mount", mnt).Msg("unmount blocked (a clone waiting on a dead source?); killing the datapaths")
			killDatapaths()
		}); err != nil {
			errs = append(errs, err)
		}
	}
	vols, _ := os.ReadDir(filepath.Join(v.DataDir, "fuse"))
	for _, e := range vols {
		if err := v.Detach(ctx, e.Name()); err != nil {
			errs = append(errs, err)
		}
		if err := lazyUnmountFUSE(v.FuseDir(e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killProcesses SIGKILLs every process whose command line names marker
// (a datapath's config file) and waits briefly for them to go.
func killProcesses(marker string) {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(b), marker) {
			continue
		}
		syscall.Kill(pid, syscall.SIGKILL)
		pids = append(pids, pid)
	}
	for _, pid := range pids {
		for i := 0; i < 100 && syscall.Kill(pid, 0) == nil; i++ {
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// unmountAll unmounts every mount point directly under dir.
func unmountAll(dir string) error {
	var errs []error
	mnts, _ := os.ReadDir(dir)
	for _, e := range mnts {
		mnt := filepath.Join(dir, e.Name())
		if _, ok := mountedAt(mnt); ok {
			if err := unmountRetry(mnt); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// unmountOrForce unmounts mnt. An unmount can block uninterruptibly on
// writeback that waits for a source which is gone; if it has not finished
// after patience, stuck is called (to fail that I/O, e.g. by killing the
// FUSE server), then the unmount gets 30 s more before a lazy unmount.
func unmountOrForce(mnt string, patience time.Duration, stuck func()) error {
	cmd := exec.Command("umount", mnt)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("unmount %s: %w", mnt, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(patience):
		stuck()
		select {
		case err = <-done:
		case <-time.After(30 * time.Second):
			err = fmt.Errorf("still blocked after the datapaths were killed")
		}
	}
	if _, ok := mountedAt(mnt); !ok {
		return nil
	}
	if lout, lerr := exec.Command("umount", "-l", mnt).CombinedOutput(); lerr != nil {
		return fmt.Errorf("unmount %s: %v: %s; lazy unmount: %w: %s", mnt, err, strings.TrimSpace(out.String()), lerr, strings.TrimSpace(string(lout)))
	}
	return nil
}
