package vm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/kernel"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/iscsi"
)

// dmNames lists the device-mapper devices whose names contain sub.
func dmNames(t *testing.T, sub string) []string {
	t.Helper()
	out, err := exec.Command("dmsetup", "ls").CombinedOutput()
	if err != nil && !strings.Contains(string(out), "No devices found") {
		t.Fatalf("dmsetup ls: %v: %s", err, out)
	}
	var names []string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.Contains(f[0], sub) {
			names = append(names, f[0])
		}
	}
	return names
}

func loopsOn(t *testing.T, path string) []string {
	t.Helper()
	devs, err := loopdev.FindByBackingFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return devs
}

func kernelVolumes(dir string, log zerolog.Logger) *kernel.Backend {
	return &kernel.Backend{DataDir: dir, Log: log, Loops: loopdev.System{}, FastKDF: true,
		ISCSI: &kernel.OpenISCSI{Log: log}, PollInterval: 100 * time.Millisecond, StallAfter: 5 * time.Second}
}

// TestGuestAgentKernelBackend drives the agent's kernel backend
// (kernel.Backend) through one migration's data-path operations, with
// an agent restart on the target between trim and hydration: create (LUKS2 +
// ext4 through dm-crypt), mount, unmount, ferry's export, clone over
// open-iscsi (twice: idempotent), fstrim, adoption of the live clone by a new
// backend instance, hydration, dissolve to linear under the mount, logout,
// remount after hydration, removal leaving no kernel object behind.
func TestGuestAgentKernelBackend(t *testing.T) {
	inGuest(t)
	ctx := context.Background()
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
	dir := t.TempDir()
	pass := []byte("kernel-backend-test-passphrase")
	const vol, tv = "kb1", "kb1-0a1b2c3d"
	const size = 32 << 20

	src := kernelVolumes(filepath.Join(dir, "a"), log)
	t.Cleanup(func() { _ = src.CleanupAll(context.Background()) })
	layout, err := src.Create(ctx, vol, size, pass)
	if err != nil {
		t.Fatal(err)
	}
	if n := dmNames(t, vol); len(n) != 0 || len(loopsOn(t, src.DataPath(vol))) != 0 {
		t.Fatalf("create left devices: dm %v, loops %v", n, loopsOn(t, src.DataPath(vol)))
	}
	mntA := src.MountPoint("m")
	for i := 0; i < 2; i++ { // idempotent
		if _, err := src.MountLocal(ctx, vol, layout, pass, mntA); err != nil {
			t.Fatalf("mount %d: %v", i, err)
		}
	}
	if n := dmNames(t, vol); len(n) != 1 || n[0] != kernel.CryptName(vol) {
		t.Fatalf("source devices %v, want only %s", n, kernel.CryptName(vol))
	}
	appendRecords(t, filepath.Join(mntA, "records"), 0, 50)
	if err := os.WriteFile(filepath.Join(mntA, "gone"), make([]byte, 6<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	guestRun(t, "sync")
	if err := os.Remove(filepath.Join(mntA, "gone")); err != nil {
		t.Fatal(err)
	}
	if err := src.Unmount(ctx, vol, mntA); err != nil {
		t.Fatal(err)
	}
	if n := dmNames(t, vol); len(n) != 0 || len(loopsOn(t, src.DataPath(vol))) != 0 {
		t.Fatalf("unmount left devices: dm %v, loops %v", n, loopsOn(t, src.DataPath(vol)))
	}

	e, err := iscsi.StartExport(ctx, log, iscsi.ExportConfig{
		Path: src.DataPath(vol), Listen: "127.0.0.1:0", Allow: []string{"127.0.0.1/32"},
		IQN:      iscsi.MigrationIQN("dev.ferry.vm", "kb", time.Now()),
		StateDir: filepath.Join(dir, "export"), LogLevel: "warn",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Stop() })
	f, err := os.Open(src.DataPath(vol))
	if err != nil {
		t.Fatal(err)
	}
	holes, err := blockdev.Holes(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}

	// Target: destination sized from the carried layout, clone, mount.
	// Silent: this instance stands for an agent that dies below, but its
	// clone poller lives on in this process and would log the dissolve.
	dst := kernelVolumes(filepath.Join(dir, "b"), zerolog.Nop())
	t.Cleanup(func() { _ = dst.CleanupAll(context.Background()) })
	if err := os.MkdirAll(dst.VolumeDir(tv), 0o700); err != nil {
		t.Fatal(err)
	}
	df, err := blockdev.CreateSparse(dst.DataPath(tv), layout.DeviceSize())
	if err != nil {
		t.Fatal(err)
	}
	df.Close()
	spec := datapath.CloneSpec{Volume: tv, Layout: layout, Portal: e.Portal(), IQN: e.IQN(), KnownZero: holes}
	mntB := dst.MountPoint("m")
	var plain string
	for i := 0; i < 2; i++ {
		p, err := dst.MountClone(ctx, spec, pass, mntB)
		if err != nil {
			t.Fatalf("clone %d: %v", i, err)
		}
		if plain != "" && p != plain {
			t.Fatalf("second MountClone gave %s, first %s", p, plain)
		}
		plain = p
	}
	h, err := dst.Clone(ctx, tv)
	if err != nil {
		t.Fatal(err)
	}
	before := status(t, h)
	if before.Hydrating || before.Complete {
		t.Fatalf("clone hydrates before cutover: %+v", before)
	}
	out, err := fstrim(ctx, mntB)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the clone's status after fstrim", func() bool {
		return status(t, h).Progress.HydratedRegions > before.Progress.HydratedRegions
	})
	trimmed := status(t, h).Progress
	t.Logf("%s: %d of %d regions hydrated without a fetch (known-zero %d ranges + fstrim)",
		out, trimmed.HydratedRegions, trimmed.TotalRegions, len(holes))
	if before.Progress.HydratedRegions == 0 {
		t.Fatalf("known-zero ranges marked no region hydrated")
	}
	checkRecords(t, filepath.Join(mntB, "records"), 50)
	appendRecords(t, filepath.Join(mntB, "records"), 50, 50)

	// An agent restart: a new backend instance adopts the live clone by name.
	dst2 := kernelVolumes(dst.DataDir, log)
	h2, err := dst2.Clone(ctx, tv)
	if err != nil {
		t.Fatalf("adopting the clone after a restart: %v", err)
	}
	if _, err := dst2.MountClone(ctx, datapath.CloneSpec{Volume: tv, Layout: layout, Portal: e.Portal(), IQN: e.IQN(), Hydrate: true}, pass, mntB); err != nil {
		t.Fatalf("re-running the clone step after a restart: %v", err)
	}
	waitUntil(t, "hydration enabled", func() bool { return status(t, h2).Hydrating })
	start := time.Now()
	deadline := time.Now().Add(2 * time.Minute)
	for !status(t, h2).Complete {
		if time.Now().After(deadline) {
			t.Fatalf("not hydrated after 2m: %+v", status(t, h2).Progress)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("hydrated in %s", time.Since(start).Round(time.Millisecond))
	for i := 0; i < 2; i++ {
		if err := h2.Dissolve(ctx); err != nil {
			t.Fatalf("dissolve %d: %v", i, err)
		}
	}
	if tbl := guestRun(t, "dmsetup", "table", kernel.CloneName(tv)); !strings.Contains(tbl, " linear ") {
		t.Fatalf("after dissolve the table is %q, want linear", tbl)
	}
	if d, err := dst2.ISCSI.Disk(e.IQN()); err == nil {
		t.Fatalf("still logged in after dissolve (%s)", d)
	}
	if l := loopsOn(t, dst2.MetaPath(tv)); len(l) != 0 {
		t.Fatalf("metadata loop %v still attached after dissolve", l)
	}
	if h3, err := dst2.Clone(ctx, tv); err != nil || !status(t, h3).Dissolved {
		t.Fatalf("a dissolved clone after a restart: %v", err)
	}
	appendRecords(t, filepath.Join(mntB, "records"), 100, 20)
	_ = e.Stop()

	// The machine restarts later: the volume mounts from the linear mapping
	// (or from its file after a reboot), records intact.
	if err := dst2.Unmount(ctx, tv, mntB); err != nil {
		t.Fatal(err)
	}
	if n := dmNames(t, tv); len(n) != 0 {
		t.Fatalf("unmount left %v", n)
	}
	if _, err := dst2.MountLocal(ctx, tv, layout, pass, mntB); err != nil {
		t.Fatal(err)
	}
	checkRecords(t, filepath.Join(mntB, "records"), 120)
	if err := dst2.Unmount(ctx, tv, mntB); err != nil {
		t.Fatal(err)
	}
	for _, b := range []*kernel.Backend{src, dst2} {
		if err := b.CleanupAll(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := src.Remove(ctx, vol); err != nil {
		t.Fatal(err)
	}
	if err := dst2.Remove(ctx, tv); err != nil {
		t.Fatal(err)
	}
	if n := dmNames(t, "kb1"); len(n) != 0 {
		t.Fatalf("left device-mapper devices %v", n)
	}
}

func status(t *testing.T, h datapath.CloneHandle) datapath.Status {
	t.Helper()
	st, err := h.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.Progress == nil && !st.Dissolved {
		t.Fatalf("clone status without progress: %+v", st)
	}
	return *st
}

// fstrim discards the filesystem's unused blocks at mnt.
func fstrim(ctx context.Context, mnt string) (string, error) {
	out, err := exec.CommandContext(ctx, "fstrim", "-v", mnt).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("fstrim %s: %w: %s", mnt, err, strings.TrimSpace(string(out)))
	}
	return strings.TrimSpace(string(out)), nil
}
