package userspace

import (
	"context"
	"os"
	"os/exec"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/backendtest"
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
