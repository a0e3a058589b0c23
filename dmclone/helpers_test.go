package dmclone

import (
	"errors"
	"math/rand"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
)

// srcDev counts what reaches the source and can be told to fail or hang.
type srcDev struct {
	blockdev.Device
	reads     atomic.Int64
	bytes     atomic.Int64
	discards  atomic.Int64
	writes    atomic.Int64
	failReads atomic.Int64 // fail this many more reads
	hang      atomic.Bool
	delay     atomic.Int64 // nanoseconds per read, like a remote LUN
	maxRead   atomic.Int64 // the longest read's length
}

var errInjected = errors.New("injected source failure")

func (s *srcDev) ReadAt(p []byte, off int64) (int, error) {
	if s.hang.Load() {
		time.Sleep(time.Hour)
	}
	if d := s.delay.Load(); d > 0 {
		time.Sleep(time.Duration(d))
	}
	if s.failReads.Load() > 0 {
		s.failReads.Add(-1)
		return 0, errInjected
	}
	s.reads.Add(1)
	s.bytes.Add(int64(len(p)))
	for n := int64(len(p)); ; {
		m := s.maxRead.Load()
		if n <= m || s.maxRead.CompareAndSwap(m, n) {
			break
		}
	}
	return s.Device.ReadAt(p, off)
}

func (s *srcDev) WriteAt(p []byte, off int64) (int, error) {
	s.writes.Add(1)
	return 0, blockdev.ErrReadOnly
}

func (s *srcDev) Discard(off, n int64) error {
	s.discards.Add(1)
	return blockdev.ErrReadOnly
}

// volatileDev is a destination with a volatile write cache: cur is what
// reads see, durable what survives a crash (updated by Flush).
type volatileDev struct {
	mu      sync.Mutex
	cur     []byte
	durable []byte
}

func newVolatile(size int64) *volatileDev {
	return &volatileDev{cur: make([]byte, size), durable: make([]byte, size)}
}

func (v *volatileDev) Size() int64 { return int64(len(v.cur)) }
func (v *volatileDev) ReadAt(p []byte, off int64) (int, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := blockdev.CheckRange(off, len(p), int64(len(v.cur))); err != nil {
		return 0, err
	}
	return copy(p, v.cur[off:]), nil
}
func (v *volatileDev) WriteAt(p []byte, off int64) (int, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := blockdev.CheckRange(off, len(p), int64(len(v.cur))); err != nil {
		return 0, err
	}
	return copy(v.cur[off:], p), nil
}
func (v *volatileDev) Discard(off, n int64) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := blockdev.CheckRange(off, int(n), int64(len(v.cur))); err != nil {
		return err
	}
	clear(v.cur[off : off+n])
	return nil
}
func (v *volatileDev) Flush() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	copy(v.durable, v.cur)
	return nil
}
func (v *volatileDev) Close() error { return nil }

// crash loses everything not flushed.
func (v *volatileDev) crash() {
	v.mu.Lock()
	defer v.mu.Unlock()
	copy(v.cur, v.durable)
}

// abandon simulates the engine's process dying: nothing is committed, the
// metadata file is released as the kernel would on exit.
func (e *Engine) abandon() {
	e.opMu.Lock()
	e.closed = true
	e.opMu.Unlock()
	e.stopBackground()
	e.waitWriteBehind()
	e.stopCommitter()
	e.meta.close()
}

func randomMem(t testing.TB, size int64, seed int64) *blockdev.Mem {
	m := blockdev.NewMem(size)
	p := make([]byte, size)
	rand.New(rand.NewSource(seed)).Read(p)
	if _, err := m.WriteAt(p, 0); err != nil {
		t.Fatal(err)
	}
	return m
}

func testLog() zerolog.Logger { return zerolog.Nop() }

func metaPath(t testing.TB) string { return filepath.Join(t.TempDir(), "meta") }

func mustOpen(t testing.TB, cfg Config) *Engine {
	t.Helper()
	if cfg.CommitInterval == 0 {
		cfg.CommitInterval = time.Hour // tests commit explicitly unless they say otherwise
	}
	e, err := Open(testLog(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func readAll(t testing.TB, d blockdev.Device) []byte {
	t.Helper()
	p := make([]byte, d.Size())
	if _, err := d.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	return p
}
