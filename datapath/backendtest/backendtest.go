// Package backendtest is the conformance suite of datapath.Backend: every
// implementation runs it from its own tests. Each behaviour is a subtest
// with a fresh data dir; the suite branches on Capabilities, never on an
// implementation's name.
//
// A clone needs a source export: the suite serves one with ferry's iSCSI
// target on loopback, so the test binary must double as the export child
// (call ServeChildren first thing in TestMain).
package backendtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/internal/ext4hot"
	"github.com/ferry-dev/ferry/datapath/internal/hostfs"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/luks"
)

// Factory returns a backend over dataDir. Called twice with one dir, the
// second backend stands for the agent after a restart. It should format
// with a fast KDF.
type Factory func(t *testing.T, dataDir string) datapath.Backend

// ServeChildren runs this process as the iSCSI export child when it was
// started as one (it never returns then); call it first in TestMain.
func ServeChildren() {
	if iscsi.IsExportChild() {
		iscsi.ServeChild()
	}
}

const (
	volSize = 32 << 20
	vol     = "bt1"
	target  = "bt1-0a1b2c3d"
)

var pass = []byte("backendtest-passphrase")

// Run runs the suite against the backends newBackend makes.
func Run(t *testing.T, newBackend Factory) {
	t.Run("CreateMountLocal", func(t *testing.T) { testCreateMount(t, newBackend) })
	t.Run("AdoptLocal", func(t *testing.T) { testAdoptLocal(t, newBackend) })
	t.Run("CloneHydrateDissolve", func(t *testing.T) { testClone(t, newBackend) })
	t.Run("AdoptClone", func(t *testing.T) { testAdoptClone(t, newBackend) })
	t.Run("RateLimit", func(t *testing.T) { testRateLimit(t, newBackend) })
	t.Run("Errors", func(t *testing.T) { testErrors(t, newBackend) })
	t.Run("Extend", func(t *testing.T) { testExtend(t, newBackend) })
	t.Run("ExtendClone", func(t *testing.T) { testExtendClone(t, newBackend) })
	t.Run("Fork", func(t *testing.T) { testFork(t, newBackend) })
	t.Run("Abandon", func(t *testing.T) { testAbandon(t, newBackend, false) })
	if _, ok := newBackend(t, t.TempDir()).(datapath.Freezer); ok {
		t.Run("Freeze", func(t *testing.T) { testFreeze(t, newBackend) })
	}
}

// testFreeze: after Freeze the filesystem is gone and every write made
// through it is in the volume file (a copy of the file mounted by another
// backend holds it); the frozen volume mounts again, and Unmount and
// Remove release it.
func testFreeze(t *testing.T, newBackend Factory) {
	ctx := ctxFor(t)
	b := fresh(t, newBackend, t.TempDir())
	fz := b.(datapath.Freezer)
	layout := createWithData(t, ctx, b, pattern(64<<10, 1))
	mnt := b.MountPoint("m")
	if _, err := b.MountLocal(ctx, vol, layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	data := pattern(1<<20, 5)
	writeData(t, mnt, data)
	twice(t, "Freeze", func() error { return fz.Freeze(ctx, vol, mnt) })
	if mounted(mnt) {
		t.Fatalf("%s still mounted after Freeze", mnt)
	}
	raw, err := os.ReadFile(b.DataPath(vol))
	if err != nil {
		t.Fatal(err)
	}
	// Under another name: some backends name host-wide devices after the
	// volume (dm-crypt mappings), and the frozen volume still holds its own.
	const copyVol = vol + "copy"
	other := fresh(t, newBackend, t.TempDir())
	if err := os.MkdirAll(filepath.Dir(other.DataPath(copyVol)), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(other.DataPath(copyVol), raw, 0o600); err != nil {
		t.Fatal(err)
	}
	omnt := other.MountPoint("copy")
	if _, err := other.MountLocal(ctx, copyVol, layout, pass, omnt); err != nil {
		t.Fatalf("mounting a copy of the frozen volume's file: %v", err)
	}
	checkData(t, omnt, data)
	if err := other.Unmount(ctx, copyVol, omnt); err != nil {
		t.Fatal(err)
	}
	// Frozen, the volume is still attached: it mounts again as it is.
	if _, err := b.MountLocal(ctx, vol, layout, pass, mnt); err != nil {
		t.Fatalf("MountLocal of a frozen volume: %v", err)
	}
	checkData(t, mnt, data)
	if err := fz.Freeze(ctx, vol, mnt); err != nil {
		t.Fatal(err)
	}
	twice(t, "Unmount of a frozen volume", func() error { return b.Unmount(ctx, vol, mnt) })
	if err := b.Remove(ctx, vol); err != nil {
		t.Fatalf("Remove after a frozen volume was released: %v", err)
	}
	if _, err := os.Stat(b.DataPath(vol)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("volume file still there after Remove: %v", err)
	}
}

// RunAbandonSourceGone checks that Abandon releases a clone whose source
// stopped exporting while the filesystem above still had writes to flush,
// for a backend that fails such I/O instead of waiting out the source.
func RunAbandonSourceGone(t *testing.T, newBackend Factory) {
	testAbandon(t, newBackend, true)
}

// RunFailStuckIO checks a datapath.StuckIOFailer: with a live process
// using the mount it does nothing; with only a killed machine stuck there
// in a read from a source that is gone, it fails that read (the machine
// exits) and the volume is left to revive or abandon as after a dead
// datapath.
func RunFailStuckIO(t *testing.T, newBackend Factory) {
	ctx := ctxFor(t)
	src := newSource(t, ctx, newBackend, func(mnt string) { writeFragmented(t, filepath.Join(mnt, fragmented)) })
	b := fresh(t, newBackend, t.TempDir())
	sf, ok := b.(datapath.StuckIOFailer)
	if !ok {
		t.Fatalf("%T is not a datapath.StuckIOFailer", b)
	}
	prepareDest(t, b, src.layout)
	mnt := b.MountPoint("m")
	if _, err := b.MountClone(ctx, src.spec(false), pass, mnt); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := b.Abandon(ctx, target, mnt); err != nil {
			t.Errorf("Abandon after FailStuckIO: %v", err)
		}
	}()
	if done, err := sf.FailStuckIO(ctx, t.TempDir()); done || err != nil {
		t.Fatalf("FailStuckIO on a directory that is no mount: %v, %v", done, err)
	}
	// A live process using the mount: it is not stuck, nothing is failed.
	f, err := os.Open(filepath.Join(mnt, fragmented))
	if err != nil {
		t.Fatal(err)
	}
	done, err := sf.FailStuckIO(ctx, mnt)
	f.Close()
	if done || err != nil {
		t.Fatalf("FailStuckIO with a live process using the mount: %v, %v (want nothing done)", done, err)
	}
	if rv, ok := b.(datapath.Reviver); ok && rv.DatapathDead(ctx, target) {
		t.Fatal("FailStuckIO killed the datapath of a mount a live process uses")
	}
	if err := src.export.Stop(); err != nil {
		t.Fatal(err)
	}
	reader := killedReader(t, filepath.Join(mnt, fragmented))
	if done, err := sf.FailStuckIO(ctx, mnt); !done || err != nil {
		t.Fatalf("FailStuckIO with only a killed reader stuck under the mount: %v, %v (want its I/O failed)", done, err)
	}
	select {
	case <-reader:
	case <-time.After(10 * time.Second):
		t.Fatal("the killed reader still waits after FailStuckIO")
	}
	if rv, ok := b.(datapath.Reviver); ok && !rv.DatapathDead(ctx, target) {
		t.Error("after FailStuckIO the volume's datapath is not reported dead, so nothing would revive it")
	}
}

func fresh(t *testing.T, newBackend Factory, dir string) datapath.Backend {
	b := newBackend(t, dir)
	t.Cleanup(func() {
		if err := b.CleanupAll(context.Background()); err != nil {
			t.Errorf("CleanupAll: %v", err)
		}
	})
	return b
}

func ctxFor(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// twice runs step twice: every step is idempotent.
func twice(t *testing.T, what string, step func() error) {
	t.Helper()
	t.Logf("%s twice", what)
	for i := 0; i < 2; i++ {
		if err := step(); err != nil {
			t.Fatalf("%s (run %d): %v", what, i+1, err)
		}
	}
}

func mounted(mnt string) bool { _, ok := hostfs.MountedAt(mnt); return ok }

func writeData(t *testing.T, mnt string, data []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(mnt, "data"), data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func checkData(t *testing.T, mnt string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(filepath.Join(mnt, "data"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes at %s differing from the %d written", len(got), mnt, len(want))
	}
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// createWithData creates vol, writes data into its filesystem and unmounts.
func createWithData(t *testing.T, ctx context.Context, b datapath.Backend, data []byte, extra ...func(mnt string)) luks.Layout {
	t.Helper()
	layout, err := b.Create(ctx, vol, volSize, pass)
	if err != nil {
		t.Fatal(err)
	}
	mnt := b.MountPoint("m")
	if _, err := b.MountLocal(ctx, vol, layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	writeData(t, mnt, data)
	for _, f := range extra {
		f(mnt)
	}
	if err := b.Unmount(ctx, vol, mnt); err != nil {
		t.Fatal(err)
	}
	return layout
}

func testCreateMount(t *testing.T, newBackend Factory) {
	ctx := ctxFor(t)
	b := fresh(t, newBackend, t.TempDir())
	var layout luks.Layout
	twice(t, "Create", func() (err error) { layout, err = b.Create(ctx, vol, volSize, pass); return err })
	if err := layout.Validate(); err != nil {
		t.Fatalf("Create returned an invalid layout: %v", err)
	}
	if got, err := b.ReadLayout(vol); err != nil || got != layout {
		t.Fatalf("ReadLayout = %+v, %v; Create returned %+v", got, err, layout)
	}
	mnt := b.MountPoint("m")
	var dev string
	twice(t, "MountLocal", func() error {
		d, err := b.MountLocal(ctx, vol, layout, pass, mnt)
		if dev != "" && d != dev {
			t.Fatalf("second MountLocal gave %s, first %s", d, dev)
		}
		dev = d
		return err
	})
	if !mounted(mnt) {
		t.Fatalf("MountLocal returned but %s is not a mount point", mnt)
	}
	data := pattern(1<<20, 3)
	writeData(t, mnt, data)
	twice(t, "Unmount", func() error { return b.Unmount(ctx, vol, mnt) })
	if mounted(mnt) {
		t.Fatalf("%s still mounted after Unmount", mnt)
	}
	twice(t, "Detach", func() error { return b.Detach(ctx, vol) })
	if _, err := b.MountLocal(ctx, vol, layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	checkData(t, mnt, data)
	if err := b.Unmount(ctx, vol, mnt); err != nil {
		t.Fatal(err)
	}
	twice(t, "Remove", func() error { return b.Remove(ctx, vol) })
	if _, err := os.Stat(b.DataPath(vol)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("volume file still there after Remove: %v", err)
	}
}

func testAdoptLocal(t *testing.T, newBackend Factory) {
	ctx := ctxFor(t)
	dir := t.TempDir()
	b1 := newBackend(t, dir)
	data := pattern(256<<10, 9)
	layout := createWithData(t, ctx, b1, data)
	mnt := b1.MountPoint("m")
	dev, err := b1.MountLocal(ctx, vol, layout, pass, mnt)
	if err != nil {
		t.Fatal(err)
	}
	// A restarted agent finds the mounted volume and serves it as it is.
	b2 := fresh(t, newBackend, dir)
	dev2, err := b2.MountLocal(ctx, vol, layout, pass, mnt)
	if err != nil {
		t.Fatalf("MountLocal after a restart: %v", err)
	}
	if dev2 != dev {
		t.Fatalf("after a restart MountLocal gave %s, before %s", dev2, dev)
	}
	checkData(t, mnt, data)
	if err := b2.Unmount(ctx, vol, mnt); err != nil {
		t.Fatalf("Unmount by the restarted backend: %v", err)
	}
	if mounted(mnt) {
		t.Fatalf("%s still mounted", mnt)
	}
	if err := b2.Remove(ctx, vol); err != nil {
		t.Fatal(err)
	}
}

// source is a volume on its own backend, exported over iSCSI on loopback.
type source struct {
	layout luks.Layout
	holes  []blockdev.Range
	export *iscsi.Export
	data   []byte
}

func newSource(t *testing.T, ctx context.Context, newBackend Factory, extra ...func(mnt string)) *source {
	t.Helper()
	b := fresh(t, newBackend, t.TempDir())
	s := &source{data: pattern(4<<20, 5)}
	s.layout = createWithData(t, ctx, b, s.data, extra...)
	f, err := os.Open(b.DataPath(vol))
	if err != nil {
		t.Fatal(err)
	}
	s.holes, err = blockdev.Holes(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
	s.export, err = iscsi.StartExport(ctx, log, iscsi.ExportConfig{
		Path: b.DataPath(vol), Listen: "127.0.0.1:0", Allow: []string{"127.0.0.1/32"},
		IQN:      iscsi.MigrationIQN("dev.ferry.test", "bt", time.Now()),
		StateDir: filepath.Join(t.TempDir(), "export"), LogLevel: "warn",
	})
	if err != nil {
		t.Fatalf("export the source volume: %v", err)
	}
	t.Cleanup(func() { _ = s.export.Stop() })
	return s
}

func (s *source) spec(hydrate bool) datapath.CloneSpec {
	return datapath.CloneSpec{Volume: target, Layout: s.layout, Portal: s.export.Portal(), IQN: s.export.IQN(),
		KnownZero: s.holes, Hydrate: hydrate}
}

// prepareDest makes the destination file sized from the carried layout, as
// the agent's prepare step does.
func prepareDest(t *testing.T, b datapath.Backend, layout luks.Layout) {
	t.Helper()
	if err := os.MkdirAll(b.VolumeDir(target), 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := blockdev.CreateSparse(b.DataPath(target), layout.DeviceSize())
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
}

func status(t *testing.T, ctx context.Context, h datapath.CloneHandle) *datapath.Status {
	t.Helper()
	st, err := h.Status(ctx)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	return st
}

func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %v", what, d)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func testClone(t *testing.T, newBackend Factory) {
	ctx := ctxFor(t)
	src := newSource(t, ctx, newBackend)
	b := fresh(t, newBackend, t.TempDir())
	caps := b.Capabilities()
	prepareDest(t, b, src.layout)
	mnt := b.MountPoint("m")
	twice(t, "MountClone", func() error { _, err := b.MountClone(ctx, src.spec(false), pass, mnt); return err })
	checkData(t, mnt, src.data)
	h, err := b.Clone(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	before := status(t, ctx, h)
	if !before.Cloning || before.Hydrating || before.Complete || before.Dissolved || before.Progress == nil {
		t.Fatalf("a fresh clone without hydration reports %+v", before)
	}
	p0 := *before.Progress
	if p0.TotalRegions == 0 || p0.TotalBytes != p0.TotalRegions*p0.RegionSize || p0.HydratedRegions >= p0.TotalRegions {
		t.Fatalf("fresh clone progress %+v", p0)
	}
	twice(t, "EnableHydration", func() error { return h.EnableHydration(ctx) })
	waitFor(t, "hydration reported", 30*time.Second, func() bool { return status(t, ctx, h).Hydrating })
	waitFor(t, "hydration complete", 2*time.Minute, func() bool { return status(t, ctx, h).Complete })
	done := status(t, ctx, h).Progress
	if done == nil || done.HydratedRegions != done.TotalRegions || done.HydratedRegions <= p0.HydratedRegions ||
		done.HydratedBytes != done.TotalBytes {
		t.Fatalf("complete clone's progress %+v (started at %+v)", done, p0)
	}
	if caps.ByteCounters {
		if done.FetchedBytes <= p0.FetchedBytes || done.FetchedBytes > done.TotalBytes {
			t.Fatalf("byte counters: fetched %d bytes of %d (was %d)", done.FetchedBytes, done.TotalBytes, p0.FetchedBytes)
		}
		if len(src.holes) > 0 && done.SkippedKnownZeroBytes == 0 {
			t.Fatalf("the source has %d holes but no known-zero bytes were skipped", len(src.holes))
		}
	}
	twice(t, "Dissolve", func() error { return h.Dissolve(ctx) })
	if st := status(t, ctx, h); !st.Dissolved || !st.Complete || st.Cloning {
		t.Fatalf("after Dissolve: %+v", st)
	}
	// The destination alone now serves the data; the source may go.
	if err := src.export.Stop(); err != nil {
		t.Fatal(err)
	}
	checkData(t, mnt, src.data)
	more := pattern(64<<10, 77)
	if err := os.WriteFile(filepath.Join(mnt, "more"), more, 0o644); err != nil {
		t.Fatal(err)
	}
	twice(t, "Unmount", func() error { return b.Unmount(ctx, target, mnt) })
	if _, err := b.MountLocal(ctx, target, src.layout, pass, mnt); err != nil {
		t.Fatalf("the hydrated destination does not mount on its own: %v", err)
	}
	checkData(t, mnt, src.data)
	if got, err := os.ReadFile(filepath.Join(mnt, "more")); err != nil || !bytes.Equal(got, more) {
		t.Fatalf("data written after dissolve: %v", err)
	}
	if err := b.Unmount(ctx, target, mnt); err != nil {
		t.Fatal(err)
	}
	twice(t, "Remove", func() error { return b.Remove(ctx, target) })
}

func testAdoptClone(t *testing.T, newBackend Factory) {
	ctx := ctxFor(t)
	src := newSource(t, ctx, newBackend)
	dir := t.TempDir()
	b1 := newBackend(t, dir)
	prepareDest(t, b1, src.layout)
	mnt := b1.MountPoint("m")
	if _, err := b1.MountClone(ctx, src.spec(false), pass, mnt); err != nil {
		t.Fatal(err)
	}
	// A restarted agent adopts the live clone, and re-running the clone
	// step (with hydration on, as after cutover) keeps it.
	b2 := fresh(t, newBackend, dir)
	h, err := b2.Clone(ctx, target)
	if err != nil {
		t.Fatalf("adopting the clone after a restart: %v", err)
	}
	if st := status(t, ctx, h); !st.Cloning || st.Dissolved {
		t.Fatalf("adopted clone reports %+v", st)
	}
	if _, err := b2.MountClone(ctx, src.spec(true), pass, mnt); err != nil {
		t.Fatalf("re-running the clone step after a restart: %v", err)
	}
	checkData(t, mnt, src.data)
	if err := h.EnableHydration(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "hydration complete", 2*time.Minute, func() bool { return status(t, ctx, h).Complete })
	if err := h.Dissolve(ctx); err != nil {
		t.Fatal(err)
	}
	// A dissolved destination is still found after one more restart.
	b3 := newBackend(t, dir)
	h3, err := b3.Clone(ctx, target)
	if err != nil {
		t.Fatalf("finding the dissolved destination after a restart: %v", err)
	}
	if st := status(t, ctx, h3); !st.Dissolved || !st.Complete {
		t.Fatalf("dissolved destination after a restart reports %+v", st)
	}
	if err := b3.Unmount(ctx, target, mnt); err != nil {
		t.Fatal(err)
	}
	if mounted(mnt) {
		t.Fatalf("%s still mounted", mnt)
	}
}

func testRateLimit(t *testing.T, newBackend Factory) {
	ctx := ctxFor(t)
	b := fresh(t, newBackend, t.TempDir())
	if !b.Capabilities().HydrationRateLimit {
		// Nothing to hold the backend to; the agent warns instead.
		return
	}
	src := newSource(t, ctx, newBackend)
	prepareDest(t, b, src.layout)
	spec := src.spec(true)
	spec.KnownZero = nil // every region is fetched
	const rate = 1 << 20
	spec.RateLimit = rate
	mnt := b.MountPoint("m")
	if _, err := b.MountClone(ctx, spec, pass, mnt); err != nil {
		t.Fatal(err)
	}
	h, err := b.Clone(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	p0 := status(t, ctx, h).Progress
	time.Sleep(2 * time.Second)
	p1 := status(t, ctx, h).Progress
	elapsed := time.Since(start).Seconds()
	// A generous bound (one burst of slack): unlimited, loopback hydrates
	// all 32 MiB in well under this time.
	limit := int64(rate*elapsed) + 4<<20
	if got := p1.FetchedBytes - p0.FetchedBytes; got > limit {
		t.Fatalf("fetched %d bytes in %.1fs with a limit of %d bytes/s", got, elapsed, rate)
	}
	if p1.HydratedRegions <= p0.HydratedRegions {
		t.Fatalf("no progress under a rate limit: %+v then %+v", p0, p1)
	}
	if err := b.Unmount(ctx, target, mnt); err != nil {
		t.Fatal(err)
	}
}

func testErrors(t *testing.T, newBackend Factory) {
	ctx := ctxFor(t)
	dir := t.TempDir()
	b := fresh(t, newBackend, dir)
	if _, err := b.Clone(ctx, "nothing"); !errors.Is(err, datapath.ErrNoClone) {
		t.Fatalf("Clone of a volume with no clone: %v, want ErrNoClone", err)
	}
	mnt := b.MountPoint("m")
	if _, err := b.ReadLayout("nothing"); err == nil {
		t.Fatal("ReadLayout of a missing volume succeeded")
	}
	for _, bad := range []string{"", "../escape", "a/b", "with space"} {
		if _, err := b.Create(ctx, bad, volSize, pass); err == nil {
			t.Fatalf("Create(%q) succeeded", bad)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "escape")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused volume id left %s/escape: %v", dir, err)
	}
	layout := createWithData(t, ctx, b, pattern(4096, 1))
	if _, err := b.MountLocal(ctx, vol, layout, []byte("wrong passphrase"), mnt); err == nil {
		t.Fatal("MountLocal with a wrong passphrase succeeded")
	}
	if mounted(mnt) {
		t.Fatal("a refused MountLocal left a mount")
	}
	if _, err := b.MountLocal(ctx, "nothing", layout, pass, mnt); err == nil || mounted(mnt) {
		t.Fatalf("MountLocal of a missing volume: %v (mounted: %v)", err, mounted(mnt))
	}
	// A clone of a source nobody serves fails and leaves no clone.
	prepareDest(t, b, layout)
	// Bounded: an initiator may retry a dead portal for minutes (open-iscsi
	// does); the contract is only that it fails and leaves nothing.
	spec := datapath.CloneSpec{Volume: target, Layout: layout, Portal: "127.0.0.1:1", IQN: "iqn.2026-01.test:none"}
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	_, err := b.MountClone(dctx, spec, pass, b.MountPoint("c"))
	cancel()
	if err == nil {
		t.Fatal("MountClone from a dead portal succeeded")
	}
	if mounted(b.MountPoint("c")) {
		t.Fatal("a failed MountClone left a mount")
	}
	if _, err := b.Clone(ctx, target); !errors.Is(err, datapath.ErrNoClone) {
		t.Fatalf("after a failed MountClone, Clone: %v, want ErrNoClone", err)
	}
	// The good volume is untouched by all of this.
	if _, err := b.MountLocal(ctx, vol, layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	checkData(t, mnt, pattern(4096, 1))
	if err := b.Unmount(ctx, vol, mnt); err != nil {
		t.Fatal(err)
	}
}

// fragmented is a source file with more extents than its inode holds, so
// reading it on a clone first reads an extent tree block: ext4 waits for
// that read uninterruptibly, as it does for every metadata block.
const fragmented = "fragmented"

// writeFragmented writes every other 4 KiB block of 2 MiB at path: 256
// extents, an extent tree of depth 1. Its modification time is a day old
// and a newer file beside it is larger than the clone reads ahead of a
// volume's recent files (ext4hot.RecentLimits): neither its extent tree
// nor its data is read before the test reads them.
func writeFragmented(t *testing.T, path string) {
	t.Helper()
	writeFragmentedFile(t, path)
	old := time.Now().Add(-24 * time.Hour)
	if err := os.Chtimes(path, old, old); err != nil {
		t.Fatal(err)
	}
	newer := filepath.Join(filepath.Dir(path), "newer")
	if err := os.WriteFile(newer, pattern(int(ext4hot.RecentLimits.MaxBytes)+1<<20, 9), 0o644); err != nil {
		t.Fatal(err)
	}
	syncFile(t, newer)
}

func syncFile(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func writeFragmentedFile(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	block := pattern(4096, 7)
	for off := int64(0); off < 2<<20; off += 8192 {
		if _, err := f.WriteAt(block, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// killedReader starts a read of path (a file whose extent tree and data are
// only on the clone's source), kills the reader once it waits in the
// kernel, and checks that it is still there, dying: a metadata read does
// not end at a kill. The returned channel closes when it has exited.
func killedReader(t *testing.T, path string) <-chan struct{} {
	t.Helper()
	cmd := exec.Command("dd", "if="+path, "of=/dev/null", "bs=4k", "skip=300", "count=1")
	if err := cmd.Start(); err != nil {
		t.Fatalf("dd: %v", err)
	}
	state := func() byte {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", cmd.Process.Pid))
		if i := bytes.LastIndexByte(b, ')'); err == nil && i+2 < len(b) {
			return b[i+2]
		}
		return 0
	}
	// In a metadata read (the inode or the extent tree), not in a killable
	// wait for a data page, which /proc also shows as D.
	inMetadataRead := func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stack", cmd.Process.Pid))
		return err == nil && bytes.Contains(b, []byte("ext4_read_bh"))
	}
	for deadline := time.Now().Add(10 * time.Second); !inMetadataRead(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			t.Fatalf("the read of %s never waited on the source in a metadata read (state %q)", path, state())
		}
	}
	_ = cmd.Process.Kill()
	time.Sleep(200 * time.Millisecond)
	if st := state(); st != 'D' {
		t.Fatalf("the killed reader did not stay in its read (state %q): nothing would hold the mount", st)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	return done
}

// testAbandon: a rolled-back migration's destination, mounted and written,
// is released in full and nothing of it stays behind.
func testAbandon(t *testing.T, newBackend Factory, sourceGone bool) {
	ctx := ctxFor(t)
	var extra []func(string)
	if sourceGone {
		extra = append(extra, func(mnt string) { writeFragmented(t, filepath.Join(mnt, fragmented)) })
	}
	src := newSource(t, ctx, newBackend, extra...)
	b := fresh(t, newBackend, t.TempDir())
	prepareDest(t, b, src.layout)
	mnt := b.MountPoint("m")
	if _, err := b.MountClone(ctx, src.spec(false), pass, mnt); err != nil {
		t.Fatal(err)
	}
	// Dirty pages over regions never fetched: flushing them needs the
	// source.
	if err := os.WriteFile(filepath.Join(mnt, "scratch"), pattern(8<<20, 9), 0o644); err != nil {
		t.Fatal(err)
	}
	if sourceGone {
		if err := src.export.Stop(); err != nil {
			t.Fatal(err)
		}
		// The machine, killed by its stop while it read a region never
		// fetched: its read waits uninterruptibly on the gone source and
		// keeps the mount busy after the kill, and only failing that I/O
		// lets it go.
		reader := killedReader(t, filepath.Join(mnt, fragmented))
		defer func() {
			select {
			case <-reader:
			case <-time.After(10 * time.Second):
				t.Errorf("the killed reader still waits after Abandon")
			}
		}()
	} else {
		// A process still using the mount (a machine that survived its
		// stop) makes Abandon fail and keep everything: releasing the
		// volume under it would hide a machine still running here.
		f, err := os.Open(filepath.Join(mnt, "scratch"))
		if err != nil {
			t.Fatal(err)
		}
		err = b.Abandon(ctx, target, mnt)
		f.Close()
		if err == nil {
			t.Fatal("Abandon released a mount a process still uses")
		}
		if !mounted(mnt) {
			t.Fatalf("Abandon failed (%v) but %s is no longer mounted", err, mnt)
		}
	}
	twice(t, "Abandon", func() error { return b.Abandon(ctx, target, mnt) })
	if mounted(mnt) {
		t.Fatalf("%s still mounted after Abandon", mnt)
	}
	if _, err := os.Stat(b.VolumeDir(target)); !os.IsNotExist(err) {
		t.Fatalf("volume %s's files after Abandon: %v", target, err)
	}
	if _, err := b.Clone(ctx, target); !errors.Is(err, datapath.ErrNoClone) {
		t.Fatalf("Clone after Abandon: %v, want ErrNoClone", err)
	}
}
