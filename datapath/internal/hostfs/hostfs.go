// Package hostfs holds the mount and key-file chores both backends share.
package hostfs

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath/internal/mountns"
	"github.com/ferry-dev/ferry/internal/atomicfile"
	"github.com/ferry-dev/ferry/internal/retry"
	"github.com/ferry-dev/ferry/luks"
)

// WithKeyFile hands fn a path that reads as the passphrase (for
// cryptsetup --key-file). It is a memfd of this process, reached through
// /proc: the passphrase never touches a disk, and nothing is left behind
// if the agent dies while cryptsetup runs. Where memfd is missing it falls
// back to a 0600 file in a fresh 0700 folder under runDir, removed after fn.
func WithKeyFile(runDir string, passphrase []byte, fn func(path string) error) error {
	if fd, err := unix.MemfdCreate("ferry-key", unix.MFD_CLOEXEC); err == nil {
		f := os.NewFile(uintptr(fd), "ferry-key")
		defer f.Close()
		if _, err := f.Write(passphrase); err != nil {
			return fmt.Errorf("key memfd: %w", err)
		}
		return fn(fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), fd))
	}
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

// MountedAt returns the source of the mount at path, if path is a mount point.
func MountedAt(path string) (string, bool) {
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

// SyncUnmount syncs and unmounts mnt if it is a mount point.
func SyncUnmount(mnt, vol string) error {
	if _, ok := MountedAt(mnt); !ok {
		return nil
	}
	if fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0); err == nil {
		_ = unix.Syncfs(fd)
		unix.Close(fd)
	}
	if err := unmountBusyRetry(mnt); err != nil {
		return fmt.Errorf("unmount %s (volume %s): %w: is something still using it?", mnt, vol, err)
	}
	return nil
}

// unmountBusyRetry retries EBUSY for a few seconds: a file closed a moment
// ago can still be held by a process between fork and exec, or by a
// finishing fsync.
func unmountBusyRetry(mnt string) error {
	var err error
	bo := retry.New(50*time.Millisecond, 500*time.Millisecond)
	for deadline := time.Now().Add(3 * time.Second); ; {
		if err = unix.Unmount(mnt, 0); err != unix.EBUSY || time.Now().After(deadline) {
			return err
		}
		time.Sleep(bo.Next())
	}
}

// MountExt4 mounts ext4 dev at mnt unless it already is. Idempotent.
func MountExt4(dev, mnt, vol string) error {
	if src, ok := MountedAt(mnt); ok {
		if sameDevice(src, dev) {
			return nil
		}
		return fmt.Errorf("%s is already mounted from %s, not %s: unmount it first", mnt, src, dev)
	}
	// Under a shared mount point, so copies of the mount table made later
	// as slaves (ip netns exec, services, containers) drop this mount when
	// it is unmounted here instead of pinning the volume.
	if err := mountns.EnsureShared(filepath.Dir(mnt)); err != nil {
		return err
	}
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(dev, mnt, "ext4", 0, ""); err != nil {
		return fmt.Errorf("mount %s (volume %s) at %s: %w", dev, vol, mnt, err)
	}
	return nil
}

// sameDevice compares two device nodes by number: /dev/dm-3 and
// /dev/mapper/ferry-v are the same device.
func sameDevice(a, b string) bool {
	if a == b {
		return true
	}
	var sa, sb unix.Stat_t
	if unix.Stat(a, &sa) != nil || unix.Stat(b, &sb) != nil {
		return false
	}
	return sa.Mode&unix.S_IFMT == unix.S_IFBLK && sa.Rdev == sb.Rdev
}

// ReleaseShared undoes the shared bind mount MountExt4 makes of a mount
// point's parent, once nothing is mounted under it.
func ReleaseShared(dir string) error { return mountns.Release(dir) }

// UnmountAll unmounts every mount point directly under dir, then dir's
// shared bind.
func UnmountAll(dir string) error {
	var errs []error
	mnts, _ := os.ReadDir(dir)
	for _, e := range mnts {
		mnt := filepath.Join(dir, e.Name())
		if _, ok := MountedAt(mnt); ok {
			if err := unmountRetry(mnt); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(errs) == 0 {
		// The shared bind MountExt4 made of dir, now empty.
		errs = append(errs, mountns.Release(dir))
	}
	return errors.Join(errs...)
}

// unmountRetry tries for about five seconds; each attempt is bounded, since
// an unmount whose writeback waits on a dead source would otherwise hang.
func unmountRetry(mnt string) error {
	var err error
	deadline := time.Now().Add(5 * time.Second)
	bo := retry.New(50*time.Millisecond, 500*time.Millisecond)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		out, e := exec.CommandContext(ctx, "umount", mnt).CombinedOutput()
		cancel()
		if e == nil {
			return nil
		}
		if _, ok := MountedAt(mnt); !ok {
			return nil
		}
		err = fmt.Errorf("unmount %s: %w: %s", mnt, e, strings.TrimSpace(string(out)))
		time.Sleep(bo.Next())
	}
	return err
}

// UnmountOrForce unmounts mnt. An unmount can block uninterruptibly on
// writeback that waits for a source which is gone; if it has not finished
// after patience, stuck is called (to fail that I/O, e.g. by killing the
// FUSE server), then the unmount gets 30 s more before a lazy unmount.
func UnmountOrForce(mnt string, patience time.Duration, stuck func()) error {
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
	if _, ok := MountedAt(mnt); !ok {
		return nil
	}
	if lout, lerr := exec.Command("umount", "-l", mnt).CombinedOutput(); lerr != nil {
		return fmt.Errorf("unmount %s: %v: %s; lazy unmount: %w: %s", mnt, err, strings.TrimSpace(out.String()), lerr, strings.TrimSpace(string(lout)))
	}
	return nil
}

// WriteFileAtomic writes b to path durably (see atomicfile), making its folder.
func WriteFileAtomic(path string, b []byte) error {
	return atomicfile.WriteFile(path, b, 0o600)
}

// ReadLayout reads the LUKS2 layout from a volume file's header.
func ReadLayout(path, vol string) (luks.Layout, error) {
	f, err := blockdev.OpenFile(path, true)
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
