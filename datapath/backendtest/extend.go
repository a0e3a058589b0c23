package backendtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/luks"
)

// requireOnline reports whether this host lets a mounted filesystem grow.
// Only a host without CAP_SYS_RESOURCE may fall back to growing offline:
// the test VM's guest has every capability, so there a denied online
// resize fails the test instead of passing through the fallback.
func requireOnline(t *testing.T) bool {
	t.Helper()
	online := datapath.CanResizeOnline()
	if !online && testenv.InGuest() {
		t.Fatal("online ext4 resize is denied inside the test VM (no CAP_SYS_RESOURCE?): the guest must prove Extend grows a mounted filesystem")
	}
	return online
}

// testExtend grows a mounted volume while a writer keeps writing into it,
// then an unmounted one; the filesystem must show the new size at once
// (statfs, what df prints), every byte written must read back, and the
// LUKS2 header on disk must describe the grown segment.
func testExtend(t *testing.T, newBackend Factory) {
	ctx := ctxFor(t)
	dir := t.TempDir()
	b := fresh(t, newBackend, dir)
	data := pattern(1<<20, 3)
	layout := createWithData(t, ctx, b, data)
	if !b.Capabilities().Extend {
		if _, err := b.Extend(ctx, vol, layout, 2*volSize, pass); !errors.Is(err, datapath.ErrNotSupported) {
			t.Fatalf("Extend on a backend without the capability: %v, want ErrNotSupported", err)
		}
		return
	}
	mnt := b.MountPoint("m")
	if _, err := b.MountLocal(ctx, vol, layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	before := fsBytes(t, mnt)

	// A machine writing while the volume grows: one file per iteration.
	var (
		stop    atomic.Bool
		wg      sync.WaitGroup
		written atomic.Int64
		werr    error
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; !stop.Load(); i++ {
			p := filepath.Join(mnt, fmt.Sprintf("rec-%05d", i))
			if err := os.WriteFile(p, pattern(8192, byte(i)), 0o644); err != nil {
				werr = err
				return
			}
			written.Store(int64(i + 1))
			time.Sleep(2 * time.Millisecond)
		}
	}()
	const grown = 3 * volSize
	online := requireOnline(t)
	var next luks.Layout
	twice(t, "Extend (mounted)", func() (err error) {
		next, err = b.Extend(ctx, vol, layout, grown, pass)
		if !online && errors.Is(err, datapath.ErrOnlineResizeDenied) {
			// The volume grew under the filesystem; only its growth waits.
			next, _ = datapath.GrownLayout(layout, grown)
			return nil
		}
		return err
	})
	time.Sleep(100 * time.Millisecond)
	stop.Store(true)
	wg.Wait()
	if werr != nil {
		t.Fatalf("writer during extend: %v", werr)
	}
	if next.DeviceSize() != grown || next.PayloadSize <= layout.PayloadSize {
		t.Fatalf("grown layout %+v for %d bytes (was %+v)", next, grown, layout)
	}
	if dev, ok := mountSource(mnt); !ok || BlockBytes(t, dev) != next.PayloadSize {
		t.Fatalf("the mounted block device %s does not show the grown %d bytes", dev, next.PayloadSize)
	}
	after := fsBytes(t, mnt)
	if online {
		if after < before+(grown-volSize)*8/10 {
			t.Fatalf("filesystem is %d bytes after extending to %d (was %d): it did not grow online", after, grown, before)
		}
		// The grown space is usable: write past the old size.
		if err := os.WriteFile(filepath.Join(mnt, "big"), pattern(int(volSize), 9), 0o644); err != nil {
			t.Fatalf("writing into the grown filesystem: %v", err)
		}
	} else {
		t.Logf("this host denies online ext4 resize (no CAP_SYS_RESOURCE): the device grew under the mounted filesystem, which grows offline below")
	}
	if _, err := b.Extend(ctx, vol, next, volSize, pass); err == nil {
		t.Fatal("Extend to a smaller size succeeded")
	}
	checkData(t, mnt, data)
	if err := b.Unmount(ctx, vol, mnt); err != nil {
		t.Fatal(err)
	}
	if l, err := b.ReadLayout(vol); err != nil || l.PayloadSize != next.PayloadSize {
		t.Fatalf("header after extend: %+v %v, want payload %d", l, err, next.PayloadSize)
	}

	// Offline: the file, then the filesystem through a short-lived datapath.
	const grown2 = 4 * volSize
	next2, err := b.Extend(ctx, vol, next, grown2, pass)
	if err != nil {
		t.Fatalf("Extend (unmounted): %v", err)
	}
	b = fresh(t, newBackend, dir) // an agent restart: only the recorded layout is known
	if _, err := b.MountLocal(ctx, vol, next2, pass, mnt); err != nil {
		t.Fatalf("mount with the grown layout: %v", err)
	}
	if got := fsBytes(t, mnt); got < after+(grown2-grown)*8/10 {
		t.Fatalf("filesystem is %d bytes after the offline extend to %d (was %d)", got, grown2, after)
	}
	checkData(t, mnt, data)
	for i := range written.Load() {
		p := filepath.Join(mnt, fmt.Sprintf("rec-%05d", i))
		got, err := os.ReadFile(p)
		if err != nil || string(got) != string(pattern(8192, byte(i))) {
			t.Fatalf("record %s written during the extend: %v (%d bytes)", p, err, len(got))
		}
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "big")); online && (err != nil || string(got) != string(pattern(int(volSize), 9))) {
		t.Fatalf("file in the grown space: %v (%d bytes)", err, len(got))
	}
	big := pattern(2*volSize, 5) // more than the volume held before the extends
	if err := os.WriteFile(filepath.Join(mnt, "big2"), big, 0o644); err != nil {
		t.Fatalf("writing %d bytes into the grown filesystem: %v", len(big), err)
	}
	t.Logf("extended %d -> %d -> %d bytes with %d records written during the online step; fs %d -> %d bytes", volSize, grown, grown2, written.Load(), before, after)
	if err := b.Unmount(context.Background(), vol, mnt); err != nil {
		t.Fatal(err)
	}
}

// testExtendClone: a destination still cloning from its source is not
// extended (its clone is sized from the source), and nothing of it grows;
// once dissolved it grows under its mounted filesystem like a local volume.
func testExtendClone(t *testing.T, newBackend Factory) {
	ctx := ctxFor(t)
	b := fresh(t, newBackend, t.TempDir())
	if !b.Capabilities().Extend {
		return
	}
	src := newSource(t, ctx, newBackend)
	prepareDest(t, b, src.layout)
	mnt := b.MountPoint("m")
	if _, err := b.MountClone(ctx, src.spec(false), pass, mnt); err != nil {
		t.Fatal(err)
	}
	const grown = 2 * volSize
	for i := 0; i < 2; i++ {
		_, err := b.Extend(ctx, target, src.layout, grown, pass)
		if err == nil || errors.Is(err, datapath.ErrNotSupported) {
			t.Fatalf("Extend of a live clone (run %d): %v, want a refusal", i+1, err)
		}
		t.Logf("refused while cloning: %v", err)
	}
	if st, err := os.Stat(b.DataPath(target)); err != nil || st.Size() != src.layout.DeviceSize() {
		t.Fatalf("a refused Extend left the destination file at %v bytes (%v), want %d", st.Size(), err, src.layout.DeviceSize())
	}
	if dev, ok := mountSource(mnt); !ok || BlockBytes(t, dev) != src.layout.PayloadSize {
		t.Fatalf("a refused Extend changed the mounted device %s", dev)
	}
	checkData(t, mnt, src.data)
	h, err := b.Clone(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.EnableHydration(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "hydration complete", 2*time.Minute, func() bool { return status(t, ctx, h).Complete })
	if err := h.Dissolve(ctx); err != nil {
		t.Fatal(err)
	}
	before := fsBytes(t, mnt)
	online := requireOnline(t)
	var next luks.Layout
	twice(t, "Extend (dissolved, mounted)", func() (err error) {
		next, err = b.Extend(ctx, target, src.layout, grown, pass)
		if !online && errors.Is(err, datapath.ErrOnlineResizeDenied) {
			next, _ = datapath.GrownLayout(src.layout, grown)
			return nil
		}
		return err
	})
	if dev, ok := mountSource(mnt); !ok || BlockBytes(t, dev) != next.PayloadSize {
		t.Fatalf("the mounted block device %s does not show the grown %d bytes", dev, next.PayloadSize)
	}
	if online {
		if after := fsBytes(t, mnt); after < before+(grown-volSize)*8/10 {
			t.Fatalf("filesystem is %d bytes after extending the dissolved clone to %d (was %d)", after, grown, before)
		}
		if err := os.WriteFile(filepath.Join(mnt, "big"), pattern(int(volSize), 4), 0o644); err != nil {
			t.Fatalf("writing into the grown filesystem: %v", err)
		}
	}
	checkData(t, mnt, src.data)
	if err := b.Unmount(ctx, target, mnt); err != nil {
		t.Fatal(err)
	}
	if l, err := b.ReadLayout(target); err != nil || l.PayloadSize != next.PayloadSize {
		t.Fatalf("header after extend: %+v %v, want payload %d", l, err, next.PayloadSize)
	}
	// The grown layout is the volume's now; the offline step of a host
	// that denied the online one finishes here.
	if _, err := b.Extend(ctx, target, next, grown, pass); err != nil {
		t.Fatalf("Extend once unmounted: %v", err)
	}
	if _, err := b.MountLocal(ctx, target, next, pass, mnt); err != nil {
		t.Fatalf("mount the grown destination: %v", err)
	}
	checkData(t, mnt, src.data)
	if got := fsBytes(t, mnt); got < before+(grown-volSize)*8/10 {
		t.Fatalf("filesystem is %d bytes after extending to %d (was %d)", got, grown, before)
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "big")); online && (err != nil || string(got) != string(pattern(int(volSize), 4))) {
		t.Fatalf("file in the grown space: %v (%d bytes)", err, len(got))
	}
	if err := b.Unmount(ctx, target, mnt); err != nil {
		t.Fatal(err)
	}
}

// fsBytes is the filesystem's size as df reports it.
func fsBytes(t *testing.T, mnt string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}

// mountSource is the device mounted at mnt.
func mountSource(mnt string) (string, bool) {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		return "", false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[1] == mnt {
			return f[0], true
		}
	}
	return "", false
}

// BlockBytes is the size of a block device as the kernel sees it.
func BlockBytes(t *testing.T, dev string) int64 {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		t.Fatalf("size of %s: %v", dev, err)
	}
	return int64(n)
}
