package agent

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/luks"
)

// Loops attaches files to loop devices (loopdev in production).
type Loops interface {
	Attach(path string, directIO bool) (string, error)
	Detach(dev string) error
	FindByBackingFile(path string) ([]string, error)
}

// Volumes manages this worker's volumes on disk: sparse ciphertext files
// under DataDir/volumes, each served by a `ferry volume serve` process,
// attached to a loop device and mounted for its machine.
type Volumes struct {
	DataDir string
	Exe     string
	Log     zerolog.Logger
	Loops   Loops
	// FastKDF formats keyslots cheap to open (demo and tests only).
	FastKDF bool
}

func (v *Volumes) VolumeDir(vol string) string   { return filepath.Join(v.DataDir, "volumes", vol) }
func (v *Volumes) DataPath(vol string) string    { return filepath.Join(v.VolumeDir(vol), "data") }
func (v *Volumes) MetaPath(vol string) string    { return filepath.Join(v.VolumeDir(vol), "clone.meta") }
func (v *Volumes) FuseDir(vol string) string     { return filepath.Join(v.DataDir, "fuse", vol) }
func (v *Volumes) Socket(vol string) string      { return filepath.Join(v.DataDir, "run", vol+".sock") }
func (v *Volumes) MountPoint(mach string) string { return filepath.Join(v.DataDir, "mnt", mach) }
func (v *Volumes) runDir() string                { return filepath.Join(v.DataDir, "run") }

// DatapathConfig is the serve configuration of a local volume (no clone).
func (v *Volumes) DatapathConfig(vol string, layout luks.Layout) datapath.Config {
	return datapath.Config{VolumeID: vol, DataPath: v.DataPath(vol), Layout: layout,
		MountDir: v.FuseDir(vol), Socket: v.Socket(vol)}
}

// withKeyFile writes the passphrase to a 0600 file that lives only for fn.
func (v *Volumes) withKeyFile(passphrase []byte, fn func(path string) error) error {
	return withKeyFile(v.runDir(), passphrase, fn)
}

// withKeyFile writes the passphrase to a 0600 file in a fresh 0700 folder
// under runDir that lives only for fn.
func withKeyFile(runDir string, passphrase []byte, fn func(path string) error) error {
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return err
	}
	dir, err := os.MkdirTemp(runDir, "key-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	p := filepath.Join(dir, "key")
	if err := os.WriteFile(p, passphrase, 0o600); err != nil {
		return err
	}
	return fn(p)
}

// Create makes a new LUKS2 volume of size bytes with an ext4 filesystem
// inside, and returns its layout. Re-running it on a half-made volume starts
// over (nothing references the volume until it is created).
func (v *Volumes) Create(ctx context.Context, vol string, size int64, passphrase []byte) (luks.Layout, error) {
	if err := os.MkdirAll(v.VolumeDir(vol), 0o700); err != nil {
		return luks.Layout{}, fmt.Errorf("volume dir: %w", err)
	}
	_ = os.Remove(v.DataPath(vol))
	f, err := blockdev.CreateSparse(v.DataPath(vol), size)
	if err != nil {
		return luks.Layout{}, err
	}
	f.Close()
	err = v.withKeyFile(passphrase, func(kf string) error {
		return luks.Format(ctx, v.DataPath(vol), kf, luks.FormatOptions{FastKDF: v.FastKDF})
	})
	if err != nil {
		return luks.Layout{}, fmt.Errorf("format volume %s: %w", vol, err)
	}
	layout, err := v.ReadLayout(vol)
	if err != nil {
		return luks.Layout{}, err
	}
	dev, err := v.Attach(ctx, v.DatapathConfig(vol, layout), passphrase)
	if err != nil {
		return luks.Layout{}, err
	}
	out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-L", vol, dev).CombinedOutput()
	if err != nil {
		v.Detach(ctx, vol)
		return luks.Layout{}, fmt.Errorf("mkfs.ext4 on volume %s: %w: %s", vol, err, strings.TrimSpace(string(out)))
	}
	return layout, v.Detach(ctx, vol)
}

// ReadLayout reads the LUKS2 layout from a local volume's header.
func (v *Volumes) ReadLayout(vol string) (luks.Layout, error) {
	f, err := blockdev.OpenFile(v.DataPath(vol), true)
	if err != nil {
		return luks.Layout{}, err
	}
	defer f.Close()
	h, err := luks.ReadHeader(f, f.Size())
	if err != nil {
		return luks.Layout{}, fmt.Errorf("volume %s: %w", vol, err)
	}
	return h.Layout(f.Size())
}

// Attach starts (or re-adopts) the volume's datapath and its loop device,
// returning the loop device. Idempotent.
func (v *Volumes) Attach(ctx context.Context, cfg datapath.Config, passphrase []byte) (string, error) {
	if _, err := datapath.Start(ctx, v.Log, v.Exe, cfg, passphrase, v.runDir()); err != nil {
		return "", err
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
func (v *Volumes) Mount(ctx context.Context, cfg datapath.Config, passphrase []byte, mnt string) (string, error) {
	dev, err := v.Attach(ctx, cfg, passphrase)
	if err != nil {
		return "", err
	}
	if src, ok := mountedAt(mnt); ok {
		if src == dev {
			return dev, nil
		}
		return "", fmt.Errorf("%s is already mounted from %s, not %s: unmount it first", mnt, src, dev)
	}
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return "", err
	}
	if err := unix.Mount(dev, mnt, "ext4", 0, ""); err != nil {
		return "", fmt.Errorf("mount %s (volume %s) at %s: %w", dev, cfg.VolumeID, mnt, err)
	}
	return dev, nil
}

// Unmount syncs and unmounts mnt (if mounted), then detaches the volume.
func (v *Volumes) Unmount(ctx context.Context, vol, mnt string) error {
	if _, ok := mountedAt(mnt); ok {
		if fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0); err == nil {
			_ = unix.Syncfs(fd)
			unix.Close(fd)
		}
		if err := unmountBusyRetry(mnt); err != nil {
			return fmt.Errorf("unmount %s (volume %s): %w: is something still using it?", mnt, vol, err)
		}
	}
	return v.Detach(ctx, vol)
}

// Detach detaches the loop device and stops the datapath. Idempotent.
func (v *Volumes) Detach(ctx context.Context, vol string) error {
	devPath := filepath.Join(v.FuseDir(vol), datapath.DeviceFile)
	devs, err := v.Loops.FindByBackingFile(devPath)
	if err != nil {
		return err
	}
	for _, d := range devs {
		if err := v.Loops.Detach(d); err != nil {
			return fmt.Errorf("detach %s from volume %s: %w", d, vol, err)
		}
	}
	p, err := datapath.Adopt(ctx, datapath.Config{VolumeID: vol, Socket: v.Socket(vol)})
	if err != nil {
		return nil // not running
	}
	return p.Shutdown(ctx)
}

// Process returns the running datapath of vol, if any.
func (v *Volumes) Process(ctx context.Context, vol string) (*datapath.Process, error) {
	return datapath.Adopt(ctx, datapath.Config{VolumeID: vol, Socket: v.Socket(vol)})
}

// Remove deletes a volume's files. The caller makes sure nothing uses it.
func (v *Volumes) Remove(ctx context.Context, vol string) error {
	if err := localID("volume", vol); err != nil {
		return err
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

// mountedAt returns the source of the mount at path, if path is a mount point.
func mountedAt(path string) (string, bool) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", false
	}
	defer f.Close()
	clean := filepath.Clean(path)
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		// id parent major:minor root mountpoint opts ... - fstype source superopts
		if len(fields) < 10 || unescapeMount(fields[4]) != clean {
			continue
		}
		for i, fl := range fields {
			if fl == "-" && i+2 < len(fields) {
				return fields[i+2], true
			}
		}
	}
	return "", false
}

func unescapeMount(s string) string {
	return strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`).Replace(s)
}

// Fstrim discards the filesystem's unused blocks at mnt; through the LUKS
// view they reach the clone, which marks them hydrated without a fetch.
func Fstrim(ctx context.Context, mnt string) (string, error) {
	out, err := exec.CommandContext(ctx, "fstrim", "-v", mnt).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("fstrim %s: %w: %s", mnt, err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}
