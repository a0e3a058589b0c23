package chaos

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/dmclone"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/iscsi"
)

// faultyDev fails reads that touch [off, off+len) while failing is set: a
// source disk with a bad range, between ferry's initiator and the clone engine.
type faultyDev struct {
	blockdev.Device
	off, len int64
	failing  atomic.Bool
	failed   atomic.Int64
}

var errMedium = errors.New("medium error: unrecovered read error (injected)")

func (f *faultyDev) ReadAt(p []byte, off int64) (int, error) {
	if f.failing.Load() && off < f.off+f.len && f.off < off+int64(len(p)) {
		f.failed.Add(1)
		return 0, fmt.Errorf("read %d bytes at %d: %w", len(p), off, errMedium)
	}
	return f.Device.ReadAt(p, off)
}

// Read errors from the source for a range, over real iSCSI: hydration
// stalls with a clear reason naming the error, copies everything else,
// never marks the bad range hydrated; once the range reads again it
// resumes, and the destination equals the source byte for byte.
func TestSourceReadErrors(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	testenv.Root(t, "the export's private network namespace")
	dir := t.TempDir()
	const size = 8 << 20
	src := filepath.Join(dir, "source")
	data := make([]byte, size)
	rand.Read(data)
	if err := os.WriteFile(src, data, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	exp, err := iscsi.StartExport(ctx, zerolog.Nop(), iscsi.ExportConfig{Path: src, Listen: "127.0.0.1:0",
		Allow: []string{"127.0.0.1"}, IQN: "iqn.2026-11.dev.ferry:chaos-" + RandSuffix(), StateDir: filepath.Join(dir, "export")})
	if err != nil {
		t.Fatalf("export: %v", err)
	}
	t.Cleanup(func() { exp.Stop() })
	lun, err := iscsi.Dial(ctx, zerolog.Nop(), iscsi.InitiatorConfig{Portal: exp.Portal(), IQN: exp.IQN(), Timeout: 5 * time.Second})
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	bad := &faultyDev{Device: lun, off: 3 << 20, len: 256 << 10}
	bad.failing.Store(true)
	dst, err := blockdev.CreateSparse(filepath.Join(dir, "dest"), size)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	eng, err := dmclone.Open(zerolog.Nop(), dmclone.Config{Source: bad, Dest: dst, MetaPath: filepath.Join(dir, "meta"),
		RegionSize: 64 << 10, SourceRetries: 2, SourceTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer eng.Close()
	if err := eng.EnableHydration(); err != nil {
		t.Fatal(err)
	}

	// The stall becomes visible with a reason naming the failure.
	var reason string
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if st, r := eng.Stalled(); st {
			reason = r
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if reason == "" {
		t.Fatalf("no stall reported while reads of %d..%d fail (failed reads: %d, progress %+v)", bad.off, bad.off+bad.len, bad.failed.Load(), eng.Progress())
	}
	if !strings.Contains(reason, "medium error") {
		t.Fatalf("stall reason %q does not name the source's error", reason)
	}
	// Everything but the bad range is copied, the bad range is not.
	time.Sleep(2 * time.Second)
	p := eng.Progress()
	badRegions := bad.len / p.RegionSize
	if p.Complete || p.HydratedRegions > p.TotalRegions-badRegions {
		t.Fatalf("hydration claims %d/%d regions with %d unreadable", p.HydratedRegions, p.TotalRegions, badRegions)
	}
	t.Logf("stalled: %q; %d/%d regions hydrated, %d failed reads", reason, p.HydratedRegions, p.TotalRegions, bad.failed.Load())
	// A machine read of the bad range fails instead of returning garbage.
	buf := make([]byte, 4096)
	if _, err := eng.ReadAt(buf, bad.off); err == nil {
		t.Fatal("a read of the unreadable range returned data")
	}

	// The disk recovers: hydration resumes, the stall clears, and the copy is exact.
	bad.failing.Store(false)
	select {
	case <-eng.Done():
	case <-time.After(time.Minute):
		t.Fatalf("hydration did not finish after the range became readable: %+v", eng.Progress())
	}
	if st, r := eng.Stalled(); st {
		t.Fatalf("still stalled after completing: %s", r)
	}
	if _, err := eng.Dissolve(); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(dir, "dest"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("destination differs from the source after recovery: corruption")
	}
	report("storage faults", fmt.Sprintf("| source read errors (256 KiB range, iSCSI, clone engine) | stalled: %q | resumed after the range read again; destination == source | no corruption |", reason))
}

// RandSuffix is a short random name part.
func RandSuffix() string {
	b := make([]byte, 3)
	rand.Read(b)
	return fmt.Sprintf("%x", b)
}
