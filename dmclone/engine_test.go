package dmclone

import (
	"bytes"
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/blockdev/blockdevtest"
)

const testRegion = 4096

func TestConformance(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T, size int64) blockdev.Device {
		return mustOpen(t, Config{Source: randomMem(t, size, 7), Dest: blockdev.NewMem(size), MetaPath: metaPath(t)})
	}, blockdevtest.Options{DiscardZeroes: true})
}

func TestConformanceHydrating(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T, size int64) blockdev.Device {
		e := mustOpen(t, Config{Source: randomMem(t, size, 8), Dest: blockdev.NewMem(size), MetaPath: metaPath(t),
			Tunables: Tunables{BatchRegions: 3, InFlight: 2, MinShare: 0.5}})
		if err := e.EnableHydration(); err != nil {
			t.Fatal(err)
		}
		return e
	}, blockdevtest.Options{DiscardZeroes: true})
}

// fileClone is a clone over real files: a random source, a sparse destination.
type fileClone struct {
	src      *srcDev
	srcData  []byte
	srcPath  string
	dstPath  string
	metaPath string
	e        *Engine
}

func newFileClone(t *testing.T, size int64, cfg Config) *fileClone {
	t.Helper()
	dir := t.TempDir()
	fc := &fileClone{srcPath: filepath.Join(dir, "src"), dstPath: filepath.Join(dir, "dst"), metaPath: filepath.Join(dir, "meta")}
	fc.srcData = readAll(t, randomMem(t, size, 1))
	if err := os.WriteFile(fc.srcPath, fc.srcData, 0o600); err != nil {
		t.Fatal(err)
	}
	fc.open(t, cfg)
	return fc
}

func (fc *fileClone) open(t *testing.T, cfg Config) {
	t.Helper()
	s, err := blockdev.OpenFile(fc.srcPath, true)
	if err != nil {
		t.Fatal(err)
	}
	d, err := blockdev.CreateSparse(fc.dstPath, s.Size())
	if err != nil {
		t.Fatal(err)
	}
	fc.src = &srcDev{Device: s}
	cfg.Source, cfg.Dest, cfg.MetaPath = fc.src, d, fc.metaPath
	fc.e = mustOpen(t, cfg)
	t.Cleanup(func() { fc.e.Close() })
}

func (fc *fileClone) dst(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(fc.dstPath)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestReadFromSourceHydratesOnce(t *testing.T) {
	fc := newFileClone(t, 64*testRegion, Config{})
	p := make([]byte, 100)
	if _, err := fc.e.ReadAt(p, 5*testRegion+10); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, fc.srcData[5*testRegion+10:5*testRegion+110]) {
		t.Fatal("read of an unhydrated region differs from the source")
	}
	fc.e.waitWriteBehind()
	if got := fc.src.bytes.Load(); got != testRegion {
		t.Fatalf("fetched %d bytes for a 100-byte read, want one region (%d)", got, testRegion)
	}
	if !bytes.Equal(fc.dst(t)[5*testRegion:6*testRegion], fc.srcData[5*testRegion:6*testRegion]) {
		t.Fatal("the region read was not written to the destination")
	}
	if _, err := fc.e.ReadAt(p, 5*testRegion); err != nil {
		t.Fatal(err)
	}
	if got := fc.src.reads.Load(); got != 1 {
		t.Fatalf("second read of a hydrated region went to the source (%d source reads)", got)
	}
	pr := fc.e.Progress()
	if pr.HydratedRegions != 1 || pr.FetchedBytes != testRegion || pr.TotalRegions != 64 {
		t.Fatalf("progress %+v, want 1/64 hydrated, %d fetched", pr, testRegion)
	}
}

func TestPartialWriteFetchesRegionFirst(t *testing.T) {
	fc := newFileClone(t, 64*testRegion, Config{})
	w := bytes.Repeat([]byte{0xEE}, 300)
	if _, err := fc.e.WriteAt(w, 3*testRegion+1000); err != nil {
		t.Fatal(err)
	}
	if got := fc.src.bytes.Load(); got != testRegion {
		t.Fatalf("fetched %d bytes for a partial write, want %d", got, testRegion)
	}
	want := append([]byte(nil), fc.srcData[3*testRegion:4*testRegion]...)
	copy(want[1000:], w)
	if !bytes.Equal(fc.dst(t)[3*testRegion:4*testRegion], want) {
		t.Fatal("destination region is not source + write")
	}
	got := make([]byte, testRegion)
	if _, err := fc.e.ReadAt(got, 3*testRegion); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) || fc.src.reads.Load() != 1 {
		t.Fatal("read back after a partial write is wrong or went to the source")
	}
	// A write straddling two unhydrated regions fetches both edges.
	fc.src.bytes.Store(0)
	if _, err := fc.e.WriteAt(w, 10*testRegion-100); err != nil {
		t.Fatal(err)
	}
	if got := fc.src.bytes.Load(); got != 2*testRegion {
		t.Fatalf("straddling write fetched %d bytes, want %d", got, 2*testRegion)
	}
}

func TestWholeRegionWriteFetchesNothing(t *testing.T) {
	fc := newFileClone(t, 64*testRegion, Config{})
	w := bytes.Repeat([]byte{0x11}, 3*testRegion)
	if _, err := fc.e.WriteAt(w, 7*testRegion); err != nil {
		t.Fatal(err)
	}
	if fc.src.reads.Load() != 0 {
		t.Fatal("a write covering whole regions read the source")
	}
	pr := fc.e.Progress()
	if pr.HydratedRegions != 3 || pr.SkippedWriteBytes != 3*testRegion {
		t.Fatalf("progress %+v, want 3 regions hydrated by the write", pr)
	}
	if !bytes.Equal(fc.dst(t)[7*testRegion:10*testRegion], w) {
		t.Fatal("destination lacks the write")
	}
}

func TestDiscardMarksHydratedWithoutFetch(t *testing.T) {
	fc := newFileClone(t, 64*testRegion, Config{})
	// Hydrate region 20 so its partial discard is punched.
	if _, err := fc.e.ReadAt(make([]byte, 10), 20*testRegion); err != nil {
		t.Fatal(err)
	}
	fc.e.waitWriteBehind()
	fc.src.reads.Store(0)
	if err := fc.e.Discard(2*testRegion+512, 4*testRegion); err != nil { // regions 3,4,5 whole; 2 and 6 partial
		t.Fatal(err)
	}
	if err := fc.e.Discard(20*testRegion+1024, 1024); err != nil { // partial, hydrated
		t.Fatal(err)
	}
	if fc.src.reads.Load() != 0 || fc.src.discards.Load() != 0 || fc.src.writes.Load() != 0 {
		t.Fatal("a discard reached the source")
	}
	pr := fc.e.Progress()
	if pr.HydratedRegions != 4 || pr.SkippedDiscardBytes != 3*testRegion {
		t.Fatalf("progress %+v, want regions 3-5 and 20 hydrated, 3 regions skipped by discard", pr)
	}
	got := make([]byte, 5*testRegion)
	if _, err := fc.e.ReadAt(got, 2*testRegion); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:512], fc.srcData[2*testRegion:2*testRegion+512]) || !bytes.Equal(got[testRegion:4*testRegion], make([]byte, 3*testRegion)) {
		t.Fatal("whole discarded regions are not zeros, or the undiscarded head changed")
	}
	// Partial regions 2 and 6 were unhydrated: they still read the source.
	if !bytes.Equal(got[4*testRegion+512:], fc.srcData[6*testRegion+512:7*testRegion]) {
		t.Fatal("the untouched part of a partly discarded region changed")
	}
	hydr := make([]byte, testRegion)
	if _, err := fc.e.ReadAt(hydr, 20*testRegion); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(hydr[1024:2048], make([]byte, 1024)) || !bytes.Equal(hydr[:1024], fc.srcData[20*testRegion:20*testRegion+1024]) {
		t.Fatal("partial discard of a hydrated region did not zero exactly its range")
	}
	// The destination's whole regions were punched (holes, no data).
	f, err := os.Open(fc.dstPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	holes, err := blockdev.Holes(f)
	if err != nil {
		t.Fatal(err)
	}
	covered := false
	for _, h := range holes {
		if h.Off <= 3*testRegion && h.End() >= 6*testRegion {
			covered = true
		}
	}
	if !covered {
		t.Fatalf("destination range of discarded regions is not a hole: %v", holes)
	}
}

func TestKnownZeroSkipsFetch(t *testing.T) {
	dir := t.TempDir()
	srcPath := filepath.Join(dir, "src")
	s, err := blockdev.CreateSparse(srcPath, 256*testRegion)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{7}, 8*testRegion)
	if _, err := s.WriteAt(data, 100*testRegion); err != nil {
		t.Fatal(err)
	}
	s.Close()
	f, err := os.Open(srcPath)
	if err != nil {
		t.Fatal(err)
	}
	holes, err := blockdev.Holes(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	src, _ := blockdev.OpenFile(srcPath, true)
	cs := &srcDev{Device: src}
	dst, _ := blockdev.CreateSparse(filepath.Join(dir, "dst"), 256*testRegion)
	e := mustOpen(t, Config{Source: cs, Dest: dst, MetaPath: filepath.Join(dir, "meta"), KnownZero: holes})
	defer e.Close()
	pr := e.Progress()
	if pr.HydratedRegions < 200 || pr.HydratedRegions > 248 || pr.SkippedKnownZeroBytes != pr.HydratedRegions*testRegion {
		t.Fatalf("progress %+v: want the ~248 hole regions hydrated by the hint", pr)
	}
	if err := e.EnableHydration(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, e)
	if got := e.Progress().FetchedBytes; got > 64*testRegion {
		t.Fatalf("fetched %d bytes; the source has only %d bytes of data (plus filesystem rounding)", got, 8*testRegion)
	}
	want := make([]byte, 256*testRegion)
	copy(want[100*testRegion:], data)
	if !bytes.Equal(readAll(t, e), want) {
		t.Fatal("clone content differs from the sparse source")
	}
}

func waitDone(t *testing.T, e *Engine) {
	t.Helper()
	select {
	case <-e.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("not hydrated after 30 s: %+v", e.Progress())
	}
}

func TestNoHydrationUntilEnabled(t *testing.T) {
	fc := newFileClone(t, 64*testRegion, Config{})
	time.Sleep(100 * time.Millisecond)
	if fc.src.reads.Load() != 0 || fc.e.Progress().HydrationEnabled {
		t.Fatal("hydration ran before EnableHydration")
	}
}

func TestBackgroundHydrationDissolve(t *testing.T) {
	fc := newFileClone(t, 1000*testRegion+2048, Config{Tunables: Tunables{BatchRegions: 16, InFlight: 3, MinShare: 0.3}})
	w := bytes.Repeat([]byte{0x42}, 5000)
	if _, err := fc.e.WriteAt(w, 12345); err != nil {
		t.Fatal(err)
	}
	if _, err := fc.e.Dissolve(); !errors.Is(err, ErrNotHydrated) {
		t.Fatalf("dissolve before hydration: err = %v, want ErrNotHydrated", err)
	}
	if err := fc.e.EnableHydration(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, fc.e)
	pr := fc.e.Progress()
	if !pr.Complete || pr.HydratedRegions != pr.TotalRegions || pr.TotalRegions != 1001 {
		t.Fatalf("progress after Done: %+v", pr)
	}
	want := append([]byte(nil), fc.srcData...)
	copy(want[12345:], w)
	if err := fc.e.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(fc.dst(t)[:len(want)], want) {
		t.Fatal("destination after hydration is not source + writes")
	}
	d, err := fc.e.Dissolve()
	if err != nil {
		t.Fatal(err)
	}
	// The engine still serves from the destination after dissolving.
	if !bytes.Equal(readAll(t, fc.e), want) || !bytes.Equal(readAll(t, d), want) {
		t.Fatal("reads after dissolve differ")
	}
	reads := fc.src.reads.Load()
	if err := fc.e.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := d.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatalf("the dissolved destination was closed with the engine: %v", err)
	}
	if fc.src.reads.Load() != reads {
		t.Fatal("source read after dissolve")
	}
	d.Close()
}

func TestFailingSourceStallsThenRecovers(t *testing.T) {
	fc := newFileClone(t, 64*testRegion, Config{SourceRetries: 2})
	fc.src.failReads.Store(100)
	_, err := fc.e.ReadAt(make([]byte, 10), 0)
	if !errors.Is(err, errInjected) {
		t.Fatalf("read with a failing source: err = %v, want the source error", err)
	}
	if n := 100 - fc.src.failReads.Load(); n != 3 {
		t.Fatalf("source tried %d times, want 3 (1 + 2 retries)", n)
	}
	if st, why := fc.e.Stalled(); !st || why == "" || !fc.e.Progress().Stalled {
		t.Fatal("engine not reported stalled after the source failed")
	}
	if fc.e.Progress().HydratedRegions != 0 {
		t.Fatal("a region was marked hydrated although its fetch failed")
	}
	fc.src.failReads.Store(0)
	if _, err := fc.e.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatal(err)
	}
	fc.e.waitWriteBehind()
	if st, _ := fc.e.Stalled(); st {
		t.Fatal("still stalled after the source recovered")
	}
}

func TestHungSourceTimesOut(t *testing.T) {
	fc := newFileClone(t, 16*testRegion, Config{SourceRetries: -1, SourceTimeout: 100 * time.Millisecond})
	fc.src.hang.Store(true)
	start := time.Now()
	_, err := fc.e.ReadAt(make([]byte, 10), 0)
	if err == nil || time.Since(start) > 5*time.Second {
		t.Fatalf("read from a hung source: err = %v after %v, want a timeout error quickly", err, time.Since(start))
	}
	if st, _ := fc.e.Stalled(); !st {
		t.Fatal("not stalled after a hung source")
	}
}

func TestResumeFromMetadata(t *testing.T) {
	fc := newFileClone(t, 64*testRegion, Config{})
	w := bytes.Repeat([]byte{9}, 100)
	fc.e.WriteAt(w, 40*testRegion)
	fc.e.ReadAt(make([]byte, 2*testRegion), 0)
	fc.e.Discard(10*testRegion, 2*testRegion)
	fc.e.waitWriteBehind()
	before := fc.e.Progress()
	if err := fc.e.Close(); err != nil {
		t.Fatal(err)
	}
	fc.open(t, Config{})
	after := fc.e.Progress()
	if after.HydratedRegions != before.HydratedRegions || after.FetchedBytes != before.FetchedBytes ||
		after.SkippedDiscardBytes != before.SkippedDiscardBytes {
		t.Fatalf("progress after reopen %+v, before %+v", after, before)
	}
	got := make([]byte, 100)
	fc.e.ReadAt(got, 40*testRegion)
	if !bytes.Equal(got, w) || fc.src.reads.Load() != 0 {
		t.Fatal("write lost across reopen, or hydrated region fetched again")
	}
	// The metadata is locked while open, and refuses other devices.
	s, _ := blockdev.OpenFile(fc.srcPath, true)
	if _, err := Open(testLog(), Config{Source: s, Dest: blockdev.NewMem(64 * testRegion), MetaPath: fc.metaPath}); err == nil {
		t.Fatal("a second engine opened metadata in use")
	}
	fc.e.Close()
	if _, err := Open(testLog(), Config{Source: s, Dest: blockdev.NewMem(64 * testRegion), MetaPath: fc.metaPath, RegionSize: 8192}); !errors.Is(err, ErrMetadata) {
		t.Fatalf("metadata with another region size: err = %v, want ErrMetadata", err)
	}
}

func TestTornSlotFallsBack(t *testing.T) {
	fc := newFileClone(t, 64*testRegion, Config{})
	fc.e.WriteAt(make([]byte, testRegion), 0) // region 0 hydrated
	fc.e.Flush()
	fc.e.WriteAt(make([]byte, testRegion), testRegion) // region 1 hydrated in the next slot
	fc.e.Flush()
	seq := fc.e.meta.seq
	fc.e.Close()
	// Tear the newest slot's bitmap.
	f, _ := os.OpenFile(fc.metaPath, os.O_RDWR, 0)
	n := slotSize(64)
	f.WriteAt([]byte{0xFF, 0xFF}, int64(seq%2)*n+metaHeaderLen+8)
	f.Close()
	fc.open(t, Config{})
	if got := fc.e.Progress().HydratedRegions; got < 1 || got > 2 {
		t.Fatalf("after a torn newest slot: %d hydrated, want the older slot's count", got)
	}
	// Both slots damaged: refuse, never start over.
	fc.e.Close()
	f, _ = os.OpenFile(fc.metaPath, os.O_RDWR, 0)
	f.WriteAt([]byte("XXXX"), 0)
	f.WriteAt([]byte("XXXX"), n)
	f.Close()
	s, _ := blockdev.OpenFile(fc.srcPath, true)
	defer s.Close()
	if _, err := Open(testLog(), Config{Source: s, Dest: blockdev.NewMem(64 * testRegion), MetaPath: fc.metaPath}); !errors.Is(err, ErrMetadata) {
		t.Fatalf("both slots damaged: err = %v, want ErrMetadata", err)
	}
}

func TestBadConfigRefused(t *testing.T) {
	src := blockdev.NewMem(64 * testRegion)
	for name, cfg := range map[string]Config{
		"region not power of two": {Source: src, Dest: blockdev.NewMem(64 * testRegion), MetaPath: metaPath(t), RegionSize: 6000},
		"region too small":        {Source: src, Dest: blockdev.NewMem(64 * testRegion), MetaPath: metaPath(t), RegionSize: 512},
		"dest too small":          {Source: src, Dest: blockdev.NewMem(testRegion), MetaPath: metaPath(t)},
		"no meta":                 {Source: src, Dest: blockdev.NewMem(64 * testRegion)},
		"bad tunables":            {Source: src, Dest: blockdev.NewMem(64 * testRegion), MetaPath: metaPath(t), Tunables: Tunables{BatchRegions: -1, InFlight: 1}},
	} {
		if _, err := Open(testLog(), cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	e := mustOpen(t, Config{Source: src, Dest: blockdev.NewMem(64 * testRegion), MetaPath: metaPath(t)})
	defer e.Close()
	if err := e.SetTunables(Tunables{BatchRegions: 1, InFlight: -1}); err == nil {
		t.Error("SetTunables accepted negative in-flight")
	}
	if err := e.SetTunables(Tunables{RateLimitBytesPerSec: 1 << 20}); err != nil {
		t.Errorf("SetTunables with only a rate limit: %v", err)
	}
	if got := e.Progress().Tunables; got.InFlight != 4 || got.BatchRegions != 256 || got.RateLimitBytesPerSec != 1<<20 {
		t.Errorf("tunables after setting only the rate: %+v", got)
	}
}

// Concurrent foreground I/O on disjoint ranges while hydration runs.
func TestConcurrentIOWhileHydrating(t *testing.T) {
	fc := newFileClone(t, 512*testRegion, Config{Tunables: Tunables{BatchRegions: 8, InFlight: 3, MinShare: 0.3}})
	fc.e.EnableHydration()
	want := append([]byte(nil), fc.srcData...)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			base := int64(g) * 128 * testRegion
			for i := int64(0); i < 64; i++ {
				off := base + i*2*testRegion + int64(g*100)
				p := bytes.Repeat([]byte{byte(g + 1)}, 1500)
				if _, err := fc.e.WriteAt(p, off); err != nil {
					t.Error(err)
					return
				}
				got := make([]byte, 3000)
				if _, err := fc.e.ReadAt(got, off); err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(got[:1500], p) {
					t.Errorf("goroutine %d: read after write differs at %d", g, off)
					return
				}
			}
		}(g)
	}
	for g := 0; g < 4; g++ {
		base := int64(g) * 128 * testRegion
		for i := int64(0); i < 64; i++ {
			copy(want[base+i*2*testRegion+int64(g*100):], bytes.Repeat([]byte{byte(g + 1)}, 1500))
		}
	}
	wg.Wait()
	waitDone(t, fc.e)
	fc.e.Flush()
	if !bytes.Equal(fc.dst(t), want) {
		t.Fatal("destination after concurrent I/O and hydration is not source + writes")
	}
}

func TestRateLimit(t *testing.T) {
	fc := newFileClone(t, 64*testRegion, Config{Tunables: Tunables{BatchRegions: 4, InFlight: 2, RateLimitBytesPerSec: 512 << 10, MinShare: 0.5}})
	start := time.Now()
	fc.e.EnableHydration()
	waitDone(t, fc.e)
	// 256 KiB at 512 KiB/s: at least ~0.4 s (the first batch goes at once).
	if d := time.Since(start); d < 400*time.Millisecond {
		t.Fatalf("256 KiB hydrated in %v despite a 512 KiB/s limit", d)
	}
}

// TestIncrementalCommit: commits rewrite only changed bitmap pages, and
// after every commit the newest slot on disk equals the in-memory bitmap.
func TestIncrementalCommit(t *testing.T) {
	dir := t.TempDir()
	const regions = 3*32768 + 100 // four bitmap pages
	size := int64(regions) * testRegion
	s, _ := blockdev.CreateSparse(filepath.Join(dir, "src"), size)
	d, _ := blockdev.CreateSparse(filepath.Join(dir, "dst"), size)
	mp := filepath.Join(dir, "meta")
	rng := rand.New(rand.NewSource(5))
	rounds := func(e *Engine, life, n int, within int64) {
		for round := 0; round < n; round++ {
			for k := 0; k < 1+rng.Intn(4); k++ {
				r := rng.Int63n(within)
				if _, err := e.WriteAt(make([]byte, testRegion), r*testRegion); err != nil {
					t.Fatal(err)
				}
			}
			if err := e.Flush(); err != nil {
				t.Fatal(err)
			}
			// Held so the committer writes nothing meanwhile.
			e.commitMu.Lock()
			f, _ := os.Open(mp)
			st, _ := f.Stat()
			seq := e.meta.seq
			got, err := readSlot(f, int64(seq%2), regions, st.Size())
			f.Close()
			if err != nil {
				e.commitMu.Unlock()
				t.Fatalf("life %d, round %d: newest slot: %v", life, round, err)
			}
			e.mu.Lock()
			same := slices.Equal(got.bits, e.hyd)
			e.mu.Unlock()
			e.commitMu.Unlock()
			if !same || got.seq != seq {
				t.Fatalf("life %d, round %d: slot on disk differs from the bitmap in memory", life, round)
			}
		}
	}
	e := mustOpen(t, Config{Source: s, Dest: d, MetaPath: mp})
	rounds(e, 1, 12, regions)
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	// Reopened, with known-zero ranges changing pages at the open: the
	// kept encoding starts from the loaded bitmap.
	s, _ = blockdev.OpenFile(filepath.Join(dir, "src"), true)
	d, _ = blockdev.OpenFile(filepath.Join(dir, "dst"), false)
	e = mustOpen(t, Config{Source: s, Dest: d, MetaPath: mp, KnownZero: []blockdev.Range{
		{Off: 100 * testRegion, Len: 40000 * testRegion}, {Off: (regions - 10) * testRegion, Len: 10 * testRegion}}})
	defer e.Close()
	if !e.hyd.get(30000) || !e.hyd.get(regions-1) {
		t.Fatal("the known-zero ranges were not applied")
	}
	rounds(e, 2, 6, 100) // the first page only: the others keep what the open loaded
}

// TestHydrationNotStarvedByForeground: unlike dm-clone, background
// hydration keeps making progress while the workload reads the source
// non-stop.
func TestHydrationNotStarvedByForeground(t *testing.T) {
	fc := newFileClone(t, 4096*testRegion, Config{Tunables: Tunables{BatchRegions: 16, InFlight: 4, MinShare: 0.25}})
	fc.src.delay.Store(int64(2 * time.Millisecond))
	stop := make(chan struct{})
	var fgRegions atomic.Int64
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(g)))
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := fc.e.ReadAt(make([]byte, 512), rng.Int63n(4096)*testRegion); err != nil {
					t.Error(err)
					return
				}
				fgRegions.Add(1)
			}
		}(g)
	}
	time.Sleep(50 * time.Millisecond) // the workload is busy before hydration starts
	fc.e.EnableHydration()
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()
	fc.e.waitWriteBehind()
	fc.e.mu.Lock()
	bg := fc.e.bgFetched / testRegion
	fc.e.mu.Unlock()
	t.Logf("in 1 s: %d regions hydrated in the background, %d foreground reads", bg, fgRegions.Load())
	// One background worker alone could copy ~8000 regions in that second;
	// a starved one gets close to none.
	if bg < 100 {
		t.Fatalf("background hydration starved: only ~%d regions in 1 s beyond the workload's own", bg)
	}
}

// Background copies grow to IdleBatchRegions while the machine does no I/O,
// and stay at BatchRegions while it works, whatever it works on (here it
// overwrites one region, which never reads the source), and under a rate
// limit.
func TestIdleBatchOnlyWhileIdle(t *testing.T) {
	tun := Tunables{BatchRegions: 4, IdleBatchRegions: 32, InFlight: 2, MinShare: 0.5}
	hydrate := func(busy bool, rate int64) int64 {
		tun := tun
		tun.RateLimitBytesPerSec = rate
		fc := newFileClone(t, 2048*testRegion, Config{Tunables: tun})
		fc.src.delay.Store(int64(time.Millisecond))
		stop := make(chan struct{})
		var wg sync.WaitGroup
		if busy {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					select {
					case <-stop:
						return
					default:
					}
					if _, err := fc.e.WriteAt(make([]byte, testRegion), 0); err != nil {
						t.Error(err)
						return
					}
					time.Sleep(time.Millisecond)
				}
			}()
			time.Sleep(20 * time.Millisecond)
		}
		if err := fc.e.EnableHydration(); err != nil {
			t.Fatal(err)
		}
		waitDone(t, fc.e)
		close(stop)
		wg.Wait()
		return fc.src.maxRead.Load() / testRegion
	}
	if got := hydrate(true, 0); got > int64(tun.BatchRegions) {
		t.Errorf("a busy machine's hydration copied %d regions at once, want at most the batch (%d)", got, tun.BatchRegions)
	}
	if got := hydrate(false, 0); got != int64(tun.IdleBatchRegions) {
		t.Errorf("an idle machine's hydration copied at most %d regions at once, want the idle batch (%d)", got, tun.IdleBatchRegions)
	}
	// Under a rate limit the limit sets the pace: no larger copies.
	if got := hydrate(false, 64<<20); got > int64(tun.BatchRegions) {
		t.Errorf("a rate-limited hydration copied %d regions at once, want at most the batch (%d)", got, tun.BatchRegions)
	}
}

// A foreground read waits for a hung source at most ForegroundWait in all,
// even when each attempt alone could take longer, and the stall says why.
func TestForegroundReadBoundedWait(t *testing.T) {
	fc := newFileClone(t, 16*testRegion, Config{SourceRetries: 5, SourceTimeout: 30 * time.Second, ForegroundWait: 300 * time.Millisecond})
	fc.src.hang.Store(true)
	start := time.Now()
	_, err := fc.e.ReadAt(make([]byte, 10), 0)
	el := time.Since(start)
	if err == nil || el > 2*time.Second {
		t.Fatalf("foreground read from a hung source: err = %v after %v, want an error within about 300ms", err, el)
	}
	st, why := fc.e.Stalled()
	if !st || !strings.Contains(why, "did not answer") {
		t.Fatalf("stall = %v %q, want the reason (the source did not answer)", st, why)
	}
}

// flushCounter counts the flushes of a destination after armed is set.
type flushCounter struct {
	blockdev.Device
	armed   atomic.Bool
	flushes atomic.Int64
}

func (f *flushCounter) Flush() error {
	if f.armed.Load() {
		f.flushes.Add(1)
	}
	return f.Device.Flush()
}

// A dissolved destination belongs to the caller, who may close it before
// closing the engine: the periodic committer must not touch it any more (the
// VM suite saw "flush destination: device is closed" logged after its test).
func TestDissolveStopsTheCommitter(t *testing.T) {
	const size = 64 * testRegion
	dst := &flushCounter{Device: blockdev.NewMem(size)}
	e := mustOpen(t, Config{Source: randomMem(t, size, 3), Dest: dst, MetaPath: metaPath(t),
		RegionSize: testRegion, CommitInterval: time.Millisecond})
	t.Cleanup(func() { e.Close() })
	if err := e.EnableHydration(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, e)
	d, err := e.Dissolve()
	if err != nil {
		t.Fatal(err)
	}
	dst.armed.Store(true)
	time.Sleep(50 * time.Millisecond) // fifty commit intervals
	if n := dst.flushes.Load(); n != 0 {
		t.Fatalf("the committer flushed the dissolved destination %d times", n)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	if n := dst.flushes.Load(); n != 0 {
		t.Fatalf("Close flushed the dissolved destination %d times", n)
	}
	d.Close()
}

// A new clone's two metadata slots are both written in the background
// after it opens: the machine's first flush then writes only what changed,
// not the whole bitmap.
func TestOpenWritesBothSlots(t *testing.T) {
	dir := t.TempDir()
	size := int64(4*32768) * testRegion
	s, _ := blockdev.CreateSparse(filepath.Join(dir, "src"), size)
	d, _ := blockdev.CreateSparse(filepath.Join(dir, "dst"), size)
	e := mustOpen(t, Config{Source: s, Dest: d, MetaPath: filepath.Join(dir, "meta"), KnownZero: []blockdev.Range{{Off: 0, Len: size / 2}}})
	defer e.Close()
	for deadline := time.Now().Add(10 * time.Second); !e.slotsWritten(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the second metadata slot was not written after the open")
		}
	}
}

// A flush with no write or discard completed since the last commit touches
// neither the destination nor the metadata (a loop device's attach fsyncs
// its file inside a migration's pause): the regions the clone fetched
// itself are fetched again after a crash. One after a write commits.
func TestFlushCommitsOnlyAfterAChange(t *testing.T) {
	const size = 64 * testRegion
	dst := &flushCounter{Device: blockdev.NewMem(size)}
	e := mustOpen(t, Config{Source: randomMem(t, size, 4), Dest: dst, MetaPath: metaPath(t),
		RegionSize: testRegion, CommitInterval: -1}) // no commits of its own
	t.Cleanup(func() { e.Close() })
	dst.armed.Store(true)
	flush := func(what string, wantFlushes int64, wantCommit bool) {
		t.Helper()
		before, seq := dst.flushes.Load(), e.meta.seq
		if err := e.Flush(); err != nil {
			t.Fatalf("flush %s: %v", what, err)
		}
		if got, committed := dst.flushes.Load()-before, e.meta.seq != seq; got != wantFlushes || committed != wantCommit {
			t.Fatalf("flush %s: %d destination flushes, metadata committed %v; want %d, %v", what, got, committed, wantFlushes, wantCommit)
		}
	}
	buf := make([]byte, testRegion)
	flush("after the open", 0, false)
	if _, err := e.ReadAt(buf, 3*testRegion); err != nil { // the clone fetches region 3
		t.Fatal(err)
	}
	e.waitWriteBehind() // its bit is set once the region is on the destination
	flush("after a read", 0, false)
	if _, err := e.WriteAt(buf[:100], 5*testRegion); err != nil { // a partial write: region 5 fetched and merged
		t.Fatal(err)
	}
	flush("after a write", 1, true)
	flush("again", 0, false)
	if _, err := e.WriteAt(buf, 5*testRegion); err != nil { // hydrated: the bitmap does not change
		t.Fatal(err)
	}
	flush("after a write to a hydrated region", 1, false)
	if err := e.Discard(8*testRegion, 2*testRegion); err != nil {
		t.Fatal(err)
	}
	flush("after a discard", 1, true)
}
