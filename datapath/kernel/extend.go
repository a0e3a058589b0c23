package kernel

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/internal/hostfs"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/luks"
)

// Extend grows vol to size bytes, bottom up so no layer ever maps past the
// one below it: the volume file, every loop device over it (losetup -c),
// the linear mapping a dissolved clone became (suspend, load, resume),
// dm-crypt (`cryptsetup resize`, the LUKS2 segment is dynamic so the header
// does not change) and the ext4 filesystem, online when it is mounted. A
// volume nobody has open is opened for the filesystem check and growth
// resize2fs needs offline, and closed again. Each step compares the size it
// finds with the one wanted and does nothing when they match, so a re-run
// after a crash anywhere finishes the job. A live clone is refused: the
// clone target is sized from the source.
func (v *Backend) Extend(ctx context.Context, vol string, layout luks.Layout, size int64, passphrase []byte) (luks.Layout, error) {
	if err := checkVolumeName(vol); err != nil {
		return luks.Layout{}, err
	}
	next, err := datapath.GrownLayout(layout, size)
	if err != nil {
		return luks.Layout{}, fmt.Errorf("extend volume %s: %w", vol, err)
	}
	fail := func(err error) (luks.Layout, error) {
		return luks.Layout{}, fmt.Errorf("extend volume %s: %w", vol, err)
	}
	cloneTable, cloneErr := v.dmTable(ctx, CloneName(vol))
	if cloneErr == nil && tableTarget(cloneTable) != "linear" {
		return fail(fmt.Errorf("it is still cloning from a migration's source (device-mapper %s is %q, sized from the source): extend it once hydration completed and the clone dissolved",
			CloneName(vol), tableTarget(cloneTable)))
	}
	want := next.DeviceSize()
	if err := v.growFile(vol, want); err != nil {
		return fail(err)
	}
	loops, err := v.Loops.FindByBackingFile(v.DataPath(vol))
	if err != nil {
		return fail(err)
	}
	for _, l := range loops {
		if err := growLoop(l, want); err != nil {
			return fail(err)
		}
	}
	if cloneErr == nil {
		if err := v.growLinear(ctx, CloneName(vol), cloneTable, want); err != nil {
			return fail(err)
		}
	}
	if _, err := v.dmTable(ctx, CryptName(vol)); err != nil {
		// Nobody has it open: grow the filesystem offline through a
		// mapping of our own.
		if err := v.extendOffline(ctx, vol, next, passphrase); err != nil {
			return fail(err)
		}
		return next, nil
	}
	if err := v.growCrypt(ctx, vol, next, passphrase); err != nil {
		return fail(err)
	}
	plain := "/dev/mapper/" + CryptName(vol)
	mounted := devMounted(plain)
	if err := hostfs.GrowExt4(ctx, plain, mounted); err != nil {
		// Wraps ErrOnlineResizeDenied where the host refuses: the volume
		// grew, and the next Extend once it is unmounted finishes it.
		return next, fmt.Errorf("extend volume %s: %w", vol, err)
	}
	v.Log.Info().Str("volume", vol).Int64("device_size", want).Int64("payload_size", next.PayloadSize).
		Bool("online", mounted).Msg("volume extended")
	return next, nil
}

// growFile makes the volume file want bytes long unless it already is or
// is longer (an earlier run got that far).
func (v *Backend) growFile(vol string, want int64) error {
	st, err := os.Stat(v.DataPath(vol))
	if err != nil {
		return fmt.Errorf("the volume file: %w", err)
	}
	if st.Size() >= want {
		return nil
	}
	if err := os.Truncate(v.DataPath(vol), want); err != nil {
		return fmt.Errorf("grow its file to %d bytes: %w", want, err)
	}
	return nil
}

// growLoop makes loop device dev re-read its backing file's size when it
// shows less than want.
func growLoop(dev string, want int64) error {
	n, err := blockSize(dev)
	if err != nil {
		return err
	}
	if n >= want {
		return nil
	}
	if err := loopdev.SetCapacity(dev); err != nil {
		return err
	}
	if n, err = blockSize(dev); err != nil {
		return err
	}
	if n < want {
		return fmt.Errorf("%s shows %d bytes after re-reading its file, want %d", dev, n, want)
	}
	return nil
}

// growLinear reloads the one-target linear mapping name (a dissolved
// clone: "0 <sectors> linear <dev> 0") with want bytes. A run interrupted
// between suspend and resume left the old table live, so the same steps
// finish it.
func (v *Backend) growLinear(ctx context.Context, name, table string, want int64) error {
	f := strings.Fields(table)
	if strings.Contains(table, "\n") || len(f) != 5 || f[0] != "0" || f[2] != "linear" || f[4] != "0" {
		return fmt.Errorf("device-mapper %s is not the single linear mapping a dissolved clone becomes: %q", name, table)
	}
	if want%512 != 0 {
		return fmt.Errorf("%d bytes is not a whole number of 512-byte sectors", want)
	}
	if f[1] == fmt.Sprint(want/512) {
		return v.resumeIfSuspended(ctx, name)
	}
	grown := fmt.Sprintf("0 %d linear %s 0", want/512, f[3])
	if out, err := exec.CommandContext(ctx, v.dmsetup(), "suspend", name).CombinedOutput(); err != nil {
		return fmt.Errorf("dmsetup suspend %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	if out, err := exec.CommandContext(ctx, v.dmsetup(), "load", name, "--table", grown).CombinedOutput(); err != nil {
		// The device must not stay suspended under a mounted filesystem.
		rerr := v.resume(ctx, name)
		return fmt.Errorf("dmsetup load %s %q: %w: %s (resumed the old table: %v)", name, grown, err, strings.TrimSpace(string(out)), rerr)
	}
	if err := v.resume(ctx, name); err != nil {
		return fmt.Errorf("%w (the device stays suspended until `dmsetup resume %s` or the next extend)", err, name)
	}
	v.Log.Info().Str("name", name).Str("table", grown).Msg("linear mapping grown")
	return nil
}

func (v *Backend) resume(ctx context.Context, name string) error {
	if out, err := exec.CommandContext(ctx, v.dmsetup(), "resume", name).CombinedOutput(); err != nil {
		return fmt.Errorf("dmsetup resume %s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// resumeIfSuspended resumes name when a crashed run left it suspended with
// its grown table already live.
func (v *Backend) resumeIfSuspended(ctx context.Context, name string) error {
	out, err := exec.CommandContext(ctx, v.dmsetup(), "info", "-c", "--noheadings", "-o", "suspended", name).Output()
	if err != nil || strings.TrimSpace(string(out)) != "Suspended" {
		return nil
	}
	return v.resume(ctx, name)
}

// growCrypt grows the open dm-crypt mapping of vol to next's payload
// (luks.ResizeKernel). The passphrase goes in a key file, as when opening.
func (v *Backend) growCrypt(ctx context.Context, vol string, next luks.Layout, passphrase []byte) error {
	return hostfs.WithKeyFile(v.runDir(), passphrase, func(kf string) error {
		return luks.ResizeKernel(ctx, CryptName(vol), next, kf)
	})
}

// extendOffline grows the filesystem of a volume nobody has open: opened
// with the grown layout (the header is checked against it), checked and
// grown by resize2fs, closed again.
func (v *Backend) extendOffline(ctx context.Context, vol string, next luks.Layout, passphrase []byte) error {
	dev := "/dev/mapper/" + CloneName(vol)
	if _, err := v.dmTable(ctx, CloneName(vol)); err != nil {
		if dev, err = v.loopOf(v.DataPath(vol)); err != nil {
			return err
		}
		if err := growLoop(dev, next.DeviceSize()); err != nil {
			return errors.Join(err, v.Detach(ctx, vol))
		}
	}
	err := hostfs.WithKeyFile(v.runDir(), passphrase, func(kf string) error {
		plain, err := luks.OpenKernel(ctx, dev, CryptName(vol), next, kf)
		if err != nil {
			return err
		}
		return hostfs.GrowExt4(ctx, plain, false)
	})
	return errors.Join(err, v.Detach(ctx, vol))
}

// blockSize is the size of a block device in bytes.
func blockSize(dev string) (int64, error) {
	f, err := os.Open(dev)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", dev, err)
	}
	return int64(n), nil
}

// devMounted reports whether block device dev holds a mounted filesystem
// in this mount namespace, by device number (the mount table may name it
// /dev/dm-N or /dev/mapper/...).
func devMounted(dev string) bool {
	var st unix.Stat_t
	if unix.Stat(dev, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return false
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	defer f.Close()
	return mountinfoHas(bufio.NewScanner(f), unix.Major(st.Rdev), unix.Minor(st.Rdev))
}

// mountinfoHas reports whether a mountinfo line ("id parent major:minor
// root mountpoint ...") names device major:minor.
func mountinfoHas(s *bufio.Scanner, major, minor uint32) bool {
	want := fmt.Sprintf("%d:%d", major, minor)
	for s.Scan() {
		if f := strings.Fields(s.Text()); len(f) > 2 && f[2] == want {
			return true
		}
	}
	return false
}
