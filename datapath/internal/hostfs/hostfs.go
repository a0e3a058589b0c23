// Package hostfs holds the mount and key-file chores both backends share.
package hostfs

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
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
	// O_CLOEXEC: a process the agent starts meanwhile (an export, a tool)
	// would otherwise inherit the descriptor and keep the mount busy.
	if fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err == nil {
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

// BlockSize is the block size of the filesystem mounted at mnt, as the
// kernel reports it (statfs).
func BlockSize(mnt string) (int64, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", mnt, err)
	}
	return st.Bsize, nil
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
	return unmountBounded(mnt, patience, stuck, true)
}

// UnmountOrKill is UnmountOrForce without the lazy unmount: an unmount the
// kernel refuses while a live process uses the mount is returned as the
// error, naming the processes, so a caller releasing a machine's volume
// learns that something of the machine still runs there instead of hiding
// it. A mount kept busy only by processes already killed is stuck I/O too:
// their reads in flight wait uninterruptibly (a metadata read through a
// clone whose source is gone only times out, and read-ahead asks again, for
// minutes), so stuck is called and the unmount retried for up to patience.
func UnmountOrKill(mnt string, patience time.Duration, stuck func()) error {
	err := unmountBounded(mnt, patience, stuck, false)
	if _, ok := MountedAt(mnt); err == nil || !ok {
		return nil
	}
	if pids := LiveHolders(mnt); len(pids) > 0 {
		return fmt.Errorf("%w (processes %v use it: stop them first)", err, pids)
	}
	stuck()
	deadline := time.Now().Add(patience)
	bo := retry.New(20*time.Millisecond, 500*time.Millisecond)
	for {
		err = unmountBounded(mnt, patience, func() {}, false)
		if _, ok := MountedAt(mnt); err == nil || !ok {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(bo.Next())
	}
}

func unmountBounded(mnt string, patience time.Duration, stuck func(), lazy bool) error {
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
	if !lazy {
		return fmt.Errorf("unmount %s: %v: %s", mnt, err, strings.TrimSpace(out.String()))
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

// GrowExt4 grows the ext4 filesystem on dev to fill it: online (through
// the kernel) when it is mounted, else after the forced check resize2fs
// requires offline. Run again on a grown filesystem it changes nothing.
func GrowExt4(ctx context.Context, dev string, mounted bool) error {
	if !mounted {
		// e2fsck exits 1 when it fixed something and 0 when clean; both
		// leave a filesystem resize2fs accepts.
		out, err := exec.CommandContext(ctx, "e2fsck", "-f", "-p", dev).CombinedOutput()
		var ee *exec.ExitError
		if err != nil && !(errors.As(err, &ee) && ee.ExitCode() == 1) {
			return fmt.Errorf("e2fsck %s before growing it: %w: %s", dev, err, strings.TrimSpace(string(out)))
		}
	}
	out, err := exec.CommandContext(ctx, "resize2fs", dev).CombinedOutput()
	if err != nil {
		if mounted && !CanResizeOnline() {
			return fmt.Errorf("resize2fs %s: %w: the kernel refuses online resize to a process without CAP_SYS_RESOURCE; "+
				"give the agent that capability, or stop the machine and let the agent finish the extend offline", dev, ErrOnlineResizeDenied)
		}
		return fmt.Errorf("resize2fs %s: %w: %s", dev, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// mkfsOptions keep a new filesystem sparse: the volume's file is a hole
// until written, and every block mkfs or the kernel writes is a block a
// migration must fetch. nodiscard: the file is already a hole, discarding
// it again only costs time. lazy_journal_init: the journal (up to 1 GiB)
// is not zeroed; jbd2 stops replay at the first block without its magic and
// the expected sequence, which the decrypted hole never holds.
// assume_storage_prezeroed marks the inode tables initialized so the
// kernel's ext4lazyinit thread never zeroes them after mount (1.6 GiB on
// 100 GiB, written through the cipher as real data); ext4 zeroes each inode
// when it allocates it and skips unused ones by each group's itable_unused,
// so what a hole decrypts to is never read as an inode.
// No resize_inode: its reserved group-descriptor blocks (4 MiB on 100 GiB)
// are written at mkfs for an offline grow ferry never does; the kernel
// still grows such a filesystem online through meta_bg.
const mkfsOptions = "nodiscard,lazy_itable_init=1,lazy_journal_init=1,assume_storage_prezeroed=1"

// mkfsBlockSize is every volume's filesystem block size, whatever its size.
// mke2fs would pick 1 KiB blocks below 512 MiB on a device with 512-byte
// sectors (the loop device over the userspace view is one), and a 1 KiB
// block is then a part of a 4 KiB LUKS2 sector: every write of one becomes
// a read, decrypt, merge and encrypt of the whole sector (fio: 4 k random
// writes at a tenth of a 4 KiB-block volume's rate), and a crash inside it
// tears blocks the filesystem did not write. 4 KiB is a whole number of
// sectors for every LUKS2 sector size.
const mkfsBlockSize = "4096"

// MkfsExt4 makes an ext4 filesystem labelled vol on dev, writing only its
// metadata (about 5 MiB on a 100 GiB volume).
func MkfsExt4(ctx context.Context, dev, vol string) error {
	out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-b", mkfsBlockSize, "-O", "^resize_inode", "-E", mkfsOptions, "-L", vol, dev).CombinedOutput()
	if err != nil {
		return fmt.Errorf("mkfs.ext4 on volume %s (needs e2fsprogs 1.47 or later for assume_storage_prezeroed): %w: %s",
			vol, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// ErrOnlineResizeDenied: the host does not let this process grow a mounted
// ext4 filesystem (no CAP_SYS_RESOURCE, as in some containers).
var ErrOnlineResizeDenied = errors.New("online filesystem resize denied")

// CanResizeOnline reports whether this process holds CAP_SYS_RESOURCE, which
// ext4's online resize ioctl requires.
func CanResizeOnline() bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if hex, ok := strings.CutPrefix(line, "CapEff:"); ok {
			v, err := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
			return err == nil && v&(1<<unix.CAP_SYS_RESOURCE) != 0
		}
	}
	return false
}

// KeyslotsSize is the LUKS2 keyslots area of a new volume: four keyslots of
// a 512-bit key (256 KiB each) where cryptsetup's default reserves 16 MiB
// for 32. A migration fetches the whole header from the source, so the
// default costs 16 MiB on every move, more than a sparse volume's data;
// ferry keeps one keyslot per volume.
const KeyslotsSize = 1 << 20

// SparsifyHeader makes the LUKS2 header of a newly formatted volume file
// mostly holes, so a migration fetches a few hundred KiB of it instead of
// 16 MiB: cryptsetup fills the whole keyslots area with random bytes, of
// which only the keyslots' own areas hold key material. The filler hides
// nothing the plaintext JSON metadata does not already say (where each
// keyslot is), so the rest of the area becomes a hole, and so does every
// zero block of the metadata copies.
func SparsifyHeader(path string) error {
	f, err := blockdev.OpenFile(path, true)
	if err != nil {
		return err
	}
	h, err := luks.ReadHeader(f, f.Size())
	f.Close()
	if err != nil {
		return fmt.Errorf("sparsify the header of %s: %w", path, err)
	}
	const page = 4096
	start := 2 * h.MetadataSize
	end := start + h.Meta.Config.KeyslotsSize
	// The keyslots' areas, page-aligned outwards, in order.
	type span struct{ from, to int64 }
	var keep []span
	for _, ks := range h.Meta.Keyslots {
		keep = append(keep, span{ks.Area.Offset / page * page, (ks.Area.Offset + ks.Area.Size + page - 1) / page * page})
	}
	sort.Slice(keep, func(i, j int) bool { return keep[i].from < keep[j].from })
	var holes []span
	at := (start + page - 1) / page * page
	for _, k := range keep {
		if k.from > at {
			holes = append(holes, span{at, k.from})
		}
		at = max(at, k.to)
	}
	if end/page*page > at {
		holes = append(holes, span{at, end / page * page})
	}
	w, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("sparsify the header of %s: %w", path, err)
	}
	defer w.Close()
	for _, hl := range holes {
		if err := unix.Fallocate(int(w.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, hl.from, hl.to-hl.from); err != nil {
			return fmt.Errorf("punch the unused keyslots area of %s at %d+%d: %w", path, hl.from, hl.to-hl.from, err)
		}
	}
	return DigHoles(path, 0, end)
}

// DigHoles punches a hole in every 4 KiB block of [off, off+length) of the
// file at path that holds only zeros, so a migration's known-zero map skips
// it. The content reads back the same.
func DigHoles(path string, off, length int64) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("dig holes in %s: %w", path, err)
	}
	defer f.Close()
	const block = 4096
	buf := make([]byte, 1<<20)
	punch := func(at, n int64) error {
		if n == 0 {
			return nil
		}
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, at, n); err != nil {
			return fmt.Errorf("punch a hole in %s at %d+%d: %w", path, at, n, err)
		}
		return nil
	}
	runAt, runLen := off, int64(0) // the zero run not yet punched
	for pos := off; pos < off+length; {
		n, err := f.ReadAt(buf[:min(int64(len(buf)), off+length-pos)], pos)
		if n == 0 && err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return fmt.Errorf("dig holes in %s: %w", path, err)
		}
		for b := 0; b < n; b += block {
			blk := buf[b:min(b+block, n)]
			if len(blk) == block && allZero(blk) {
				if runLen == 0 {
					runAt = pos + int64(b)
				}
				runLen += block
				continue
			}
			if err := punch(runAt, runLen); err != nil {
				return err
			}
			runLen = 0
		}
		pos += int64(n)
	}
	return punch(runAt, runLen)
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
