package userspace

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/backendtest"
	"github.com/ferry-dev/ferry/datapath/internal/hostfs"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// TestMain lets the test binary double as the two children the suite
// starts: ferry's iSCSI export and `ferry volume serve`.
func TestMain(m *testing.M) {
	backendtest.ServeChildren()
	ServeChildIfAsked()
	os.Exit(m.Run())
}

// TestConformance runs the backend suite on the host. It needs root, FUSE,
// loop devices, cryptsetup and mkfs.ext4; without them it skips naming what
// is missing, unless in strict mode (internal/testenv), where that fails.
func TestConformance(t *testing.T) {
	requireHost(t)
	backendtest.Run(t, func(t *testing.T, dir string) datapath.Backend { return hostBackend(t, dir) })
}

// TestAbandonSourceGone: the userspace backend fails the writeback a
// clone can no longer serve instead of waiting out the source's timeouts.
func TestAbandonSourceGone(t *testing.T) {
	requireHost(t)
	backendtest.RunAbandonSourceGone(t, func(t *testing.T, dir string) datapath.Backend { return hostBackend(t, dir) })
}

// TestFailStuckIO: a machine killed in a read from a cut-off source exits
// once its datapath is killed; a live user of the mount keeps it.
func TestFailStuckIO(t *testing.T) {
	requireHost(t)
	backendtest.RunFailStuckIO(t, func(t *testing.T, dir string) datapath.Backend { return hostBackend(t, dir) })
}

// requireHost fails or skips (internal/testenv) unless this host runs the
// userspace data path, and returns the test binary, which doubles as
// `ferry volume serve` (TestMain).
func requireHost(tb testing.TB) string {
	tb.Helper()
	err := hostReady()
	testenv.Require(tb, "host ready: "+errString(err), err == nil)
	exe, err := os.Executable()
	if err != nil {
		tb.Fatal(err)
	}
	return exe
}

// hostBackend is a userspace Backend over dir on this host (requireHost).
func hostBackend(tb testing.TB, dir string) *Backend {
	exe := requireHost(tb)
	return &Backend{DataDir: dir, Exe: exe, Log: zerolog.New(zerolog.NewTestWriter(tb)).Level(zerolog.WarnLevel),
		Loops: loopdev.System{}, FastKDF: true}
}

func hostReady() error {
	if os.Geteuid() != 0 {
		return errNeeds("root (loop devices and mounts)")
	}
	if err := Probe(context.Background()); err != nil {
		return err
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		return errNeeds("/dev/loop-control")
	}
	if _, err := exec.LookPath("fusermount3"); err != nil {
		return errNeeds("fusermount3 (Debian package fuse3)")
	}
	return nil
}

type errNeeds string

func (e errNeeds) Error() string { return "the userspace backend suite needs " + string(e) }

// TestFreezeKeepsTheDevices: Freeze only unmounts — the datapath still
// answers and the loop device stays attached until Unmount, which is the
// point (their release leaves the machine's pause) — and a filesystem the
// Freeze leaves nowhere else mounted opens with O_EXCL.
func TestFreezeKeepsTheDevices(t *testing.T) {
	ctx := context.Background()
	b := hostBackend(t, t.TempDir())
	t.Cleanup(func() { b.CleanupAll(context.Background()) })
	pass := []byte("freeze-test")
	layout, err := b.Create(ctx, "fz", 32<<20, pass)
	if err != nil {
		t.Fatal(err)
	}
	mnt := b.MountPoint("m")
	dev, err := b.MountLocal(ctx, "fz", layout, pass, mnt)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Freeze(ctx, "fz", mnt); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Process(ctx, "fz"); err != nil {
		t.Fatalf("the datapath is gone after Freeze (it fell back to a full release?): %v", err)
	}
	if devs, err := b.servedDevices("fz"); err != nil || len(devs) != 1 || devs[0] != dev {
		t.Fatalf("after Freeze the volume is served by %v (%v), want %s still attached", devs, err, dev)
	}
	if err := b.Unmount(ctx, "fz", mnt); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Process(ctx, "fz"); err == nil {
		t.Fatal("the datapath still answers after Unmount")
	}
}

// A volume made before mkfs took 4 KiB blocks (1 KiB blocks under a
// 4 KiB LUKS2 sector) mounts, and the agent's log says why it is slow.
func TestMountWarnsOfBlocksSmallerThanTheSector(t *testing.T) {
	ctx := context.Background()
	b := hostBackend(t, t.TempDir())
	var log syncBuffer
	b.Log = zerolog.New(&log).Level(zerolog.WarnLevel)
	t.Cleanup(func() { b.CleanupAll(context.Background()) })
	pass := []byte("small-blocks")
	layout, err := b.Create(ctx, "sb", 32<<20, pass)
	if err != nil {
		t.Fatal(err)
	}
	if layout.SectorSize != 4096 {
		t.Fatalf("layout sector size %d, want 4096", layout.SectorSize)
	}
	mnt := b.MountPoint("m")
	if _, err := b.MountLocal(ctx, "sb", layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(log.String(), "smaller than its encryption sector") {
		t.Fatalf("a new volume (4 KiB blocks) was warned about:\n%s", log.String())
	}
	// Remake its filesystem as mke2fs chose for small devices before.
	dev, err := b.MountLocal(ctx, "sb", layout, pass, mnt)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-b", "1024", dev).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4 -b 1024: %v: %s", err, out)
	}
	if _, err := b.MountLocal(ctx, "sb", layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	if bs, err := hostfs.BlockSize(mnt); err != nil || bs != 1024 {
		t.Fatalf("block size %d (%v), want 1024", bs, err)
	}
	got := log.String()
	if !strings.Contains(got, "smaller than its encryption sector") || !strings.Contains(got, `"block_size":1024`) || !strings.Contains(got, `"volume":"sb"`) {
		t.Fatalf("no warning naming the volume and its 1 KiB blocks:\n%s", got)
	}
	if err := b.Unmount(ctx, "sb", mnt); err != nil {
		t.Fatal(err)
	}
}

// syncBuffer is a log sink safe for the backend's goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}
