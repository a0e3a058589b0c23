package dmclone

import (
	"bytes"
	"fmt"
	"math/rand"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
)

// keepOpen hides Close so the same source survives engine restarts.
type keepOpen struct{ blockdev.Device }

func (keepOpen) Close() error { return nil }

// model is the expected content: bytes, plus bytes whose content is
// unspecified because they were discarded and not rewritten since.
type model struct {
	data []byte
	dc   []bool
}

func (m model) clone() model {
	return model{append([]byte(nil), m.data...), append([]bool(nil), m.dc...)}
}

func (m model) check(t *testing.T, got []byte, off int64, what string) {
	t.Helper()
	for i := range got {
		j := off + int64(i)
		if !m.dc[j] && got[i] != m.data[j] {
			t.Fatalf("%s: byte %d is %#x, model says %#x", what, j, got[i], m.data[j])
		}
	}
}

// TestModel drives random reads, writes, discards, flushes, clean restarts
// and crashes (losing everything the destination did not flush) against the
// engine and a plain in-memory model; they must agree after every step and
// every restart. The seed is logged so a failure can be replayed.
func TestModel(t *testing.T) {
	seeds := []int64{1, 2, 3, time.Now().UnixNano()}
	for _, seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { runModel(t, seed) })
	}
}

func runModel(t *testing.T, seed int64) {
	rng := rand.New(rand.NewSource(seed))
	rsz := int64(4096) << rng.Intn(2)
	regions := int64(32 + rng.Intn(64))
	size := regions*rsz - 512*int64(rng.Intn(4)) // sometimes a short last region
	srcMem := randomMem(t, size, seed)
	src := keepOpen{srcMem}
	dst := newVolatile(size)
	meta := metaPath(t)
	m := model{data: readAll(t, srcMem), dc: make([]bool, size)}
	flushed := m.clone()
	cfg := func() Config {
		return Config{Source: src, Dest: dst, MetaPath: meta, RegionSize: rsz, CommitInterval: -1,
			Tunables: Tunables{BatchRegions: 1 + rng.Intn(8), InFlight: 1 + rng.Intn(3), MinShare: 0.5}}
	}
	e := mustOpen(t, cfg())
	defer func() { e.Close() }()
	randRange := func(maxLen int64) (int64, int64) {
		off := rng.Int63n(size)
		n := 1 + rng.Int63n(min(maxLen, size-off))
		if rng.Intn(3) == 0 { // region-aligned, to hit whole-region paths
			off = off / rsz * rsz
			n = min(size-off, (1+rng.Int63n(3))*rsz)
		}
		return off, n
	}
	fullCheck := func(what string) {
		t.Helper()
		m.check(t, readAll(t, e), 0, what)
	}
	steps := 400
	for step := 0; step < steps; step++ {
		switch op := rng.Intn(100); {
		case op < 30:
			off, n := randRange(3 * rsz)
			got := make([]byte, n)
			if _, err := e.ReadAt(got, off); err != nil {
				t.Fatalf("step %d read: %v", step, err)
			}
			m.check(t, got, off, fmt.Sprintf("step %d read %d+%d", step, off, n))
		case op < 60:
			off, n := randRange(3 * rsz)
			p := make([]byte, n)
			rng.Read(p)
			if _, err := e.WriteAt(p, off); err != nil {
				t.Fatalf("step %d write: %v", step, err)
			}
			copy(m.data[off:], p)
			clear(m.dc[off : off+n])
		case op < 70:
			off, n := randRange(4 * rsz)
			if err := e.Discard(off, n); err != nil {
				t.Fatalf("step %d discard: %v", step, err)
			}
			for i := off; i < off+n; i++ {
				m.dc[i] = true
			}
		case op < 80:
			if err := e.Flush(); err != nil {
				t.Fatalf("step %d flush: %v", step, err)
			}
			flushed = m.clone()
		case op < 85:
			if rng.Intn(2) == 0 {
				e.EnableHydration()
			} else {
				e.DisableHydration()
			}
		case op < 92: // crash: the process dies, the destination loses its cache
			e.abandon()
			dst.crash()
			m = flushed.clone()
			e = mustOpen(t, cfg())
			fullCheck(fmt.Sprintf("step %d after crash", step))
		case op < 95: // clean restart
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
			flushed = m.clone()
			e = mustOpen(t, cfg())
			fullCheck(fmt.Sprintf("step %d after restart", step))
		default:
			time.Sleep(time.Millisecond)
		}
		// The persisted and in-memory counts never disagree with the bitmap.
		if p := e.Progress(); p.HydratedRegions > p.TotalRegions || p.HydratingRegions < 0 {
			t.Fatalf("step %d: impossible progress %+v", step, p)
		}
	}
	fullCheck("end")
	// Hydrate everything: the destination alone must then hold the model.
	e.EnableHydration()
	waitDone(t, e)
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	dst.ReadAt(got, 0)
	m.check(t, got, 0, "destination after full hydration")
	if !bytes.Equal(got, readAll(t, e)) {
		t.Fatal("engine and destination differ after full hydration")
	}
}
