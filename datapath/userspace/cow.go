package userspace

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
)

// snapRegion is the unit the point-in-time copy preserves and copies: a
// machine's first write into a region after the instant costs one read and
// one write of this size.
const snapRegion = 64 << 10

// snapLocks stripes the per-region locks: enough that unrelated regions
// rarely share one.
const snapLocks = 256

// cowDev is the ciphertext device under the plaintext view, through which
// every write of the machine passes. Most of the time it only forwards.
// While a point-in-time copy runs it keeps that instant's content: before a
// region is first changed (written or discarded) its old content goes to
// the copy; a background copier fills the rest of the copy from the device.
// The copy is complete when every region that held data at the instant is
// in it, and then equals the device as it was at the instant, whatever the
// machine wrote since.
type cowDev struct {
	blockdev.Device
	// gate: writes and discards hold it shared while they check for a
	// snapshot and change the device; starting or ending one takes it
	// exclusively, so no change straddles the instant.
	gate sync.RWMutex
	snap atomic.Pointer[snapshot]
	log  zerolog.Logger

	mu   sync.Mutex
	last *snapshot // the running or last finished snapshot, for status
}

func newCow(log zerolog.Logger, d blockdev.Device) *cowDev { return &cowDev{Device: d, log: log} }

// snapshot is one point-in-time copy in progress.
type snapshot struct {
	path    string
	out     *os.File
	size    int64
	saved   []atomic.Uint64 // bit per region: already in out (or nothing to copy)
	locks   [snapLocks]sync.Mutex
	started time.Time

	preserved atomic.Int64 // bytes saved ahead of a machine's write
	copied    atomic.Int64 // bytes copied by the background copier
	done      chan struct{}
	err       error // set before done is closed
	took      time.Duration
}

// SnapshotStatus is what the control socket reports of the last snapshot.
type SnapshotStatus struct {
	Path           string `json:"path"`
	Done           bool   `json:"done"`
	Error          string `json:"error,omitempty"`
	CopiedBytes    int64  `json:"copied_bytes"`
	PreservedBytes int64  `json:"preserved_bytes"` // saved before the machine overwrote them
	TookMillis     int64  `json:"took_ms,omitempty"`
}

func (s *snapshot) status() *SnapshotStatus {
	st := &SnapshotStatus{Path: s.path, CopiedBytes: s.copied.Load(), PreservedBytes: s.preserved.Load()}
	select {
	case <-s.done:
		st.Done = true
		st.TookMillis = s.took.Milliseconds()
		if s.err != nil {
			st.Error = s.err.Error()
		}
	default:
	}
	return st
}

func (s *snapshot) isSaved(r int64) bool {
	return s.saved[r/64].Load()&(1<<(uint(r)%64)) != 0
}

func (s *snapshot) markSaved(r int64) {
	w := &s.saved[r/64]
	for {
		old := w.Load()
		if w.CompareAndSwap(old, old|1<<(uint(r)%64)) {
			return
		}
	}
}

// save copies region r of dev into the snapshot unless it is there.
// Regions reading as zeros stay holes in the (sparse) copy.
func (s *snapshot) save(dev blockdev.Device, r int64, buf []byte) (int64, error) {
	l := &s.locks[r%snapLocks]
	l.Lock()
	defer l.Unlock()
	if s.isSaved(r) {
		return 0, nil
	}
	off := r * snapRegion
	n := min(int64(snapRegion), s.size-off)
	b := buf[:n]
	if _, err := dev.ReadAt(b, off); err != nil {
		return 0, fmt.Errorf("read region at %d for the point-in-time copy: %w", off, err)
	}
	if !allZero(b) {
		if _, err := s.out.WriteAt(b, off); err != nil {
			return 0, fmt.Errorf("write the point-in-time copy at %d: %w", off, err)
		}
	}
	s.markSaved(r)
	return n, nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// preserve saves the regions [off, off+n) touches before they change.
func (c *cowDev) preserve(s *snapshot, off, n int64) error {
	if off >= s.size || n <= 0 {
		return nil // past the instant's end (the volume grew since)
	}
	end := min(off+n, s.size)
	var buf []byte
	for r := off / snapRegion; r*snapRegion < end; r++ {
		if s.isSaved(r) {
			continue
		}
		if buf == nil {
			buf = alignedBuf(snapRegion)
		}
		k, err := s.save(c.Device, r, buf)
		if err != nil {
			return err
		}
		s.preserved.Add(k)
	}
	return nil
}

func (c *cowDev) WriteAt(p []byte, off int64) (int, error) {
	c.gate.RLock()
	defer c.gate.RUnlock()
	if s := c.snap.Load(); s != nil {
		if err := c.preserve(s, off, int64(len(p))); err != nil {
			// The instant cannot be kept: fail the copy, not the machine.
			c.abort(s, err)
		}
	}
	return c.Device.WriteAt(p, off)
}

func (c *cowDev) Discard(off, n int64) error {
	c.gate.RLock()
	defer c.gate.RUnlock()
	if s := c.snap.Load(); s != nil {
		if err := c.preserve(s, off, n); err != nil {
			c.abort(s, err)
		}
	}
	return c.Device.Discard(off, n)
}

// abort ends snapshot s with err; the machine's I/O goes on unaffected.
// Called with the gate held shared: it must not take it exclusively.
func (c *cowDev) abort(s *snapshot, err error) {
	if c.snap.CompareAndSwap(s, nil) {
		c.log.Error().Err(err).Str("path", s.path).Msg("point-in-time copy failed; the fork retries it")
		s.err = err
		s.took = time.Since(s.started)
		s.out.Close()
		close(s.done)
	}
}

// Snapshot starts a point-in-time copy of the device into path (created
// sparse, of the device's size) and returns at the instant; the copy
// completes in the background (SnapshotStatus). Asking again for the same
// path while it runs, or once it is done, answers the same snapshot. The
// caller makes the instant consistent (freezes the filesystem above).
func (c *cowDev) Snapshot(path string, dataRanges func() ([]blockdev.Range, error)) (*SnapshotStatus, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if l := c.last; l != nil {
		select {
		case <-l.done:
		default:
			if l.path == path {
				return l.status(), nil
			}
			return nil, fmt.Errorf("a point-in-time copy into %s is running: wait for it to end", l.path)
		}
		if l.path == path && l.err == nil {
			return l.status(), nil
		}
	}
	out, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("point-in-time copy: %w", err)
	}
	// No change straddles the instant: in-flight writes finish first.
	c.gate.Lock()
	size := c.Device.Size()
	ranges, err := dataRanges()
	if err == nil {
		err = out.Truncate(size)
	}
	if err != nil {
		c.gate.Unlock()
		out.Close()
		os.Remove(path)
		return nil, fmt.Errorf("point-in-time copy: %w", err)
	}
	regions := (size + snapRegion - 1) / snapRegion
	s := &snapshot{path: path, out: out, size: size, saved: make([]atomic.Uint64, (regions+63)/64), started: time.Now(), done: make(chan struct{})}
	c.snap.Store(s)
	c.last = s
	c.gate.Unlock()
	go c.copyRest(s, ranges)
	return s.status(), nil
}

// copyRest copies every region that held data at the instant and is not
// saved yet, then makes the copy durable and ends the snapshot.
func (c *cowDev) copyRest(s *snapshot, ranges []blockdev.Range) {
	buf := alignedBuf(snapRegion)
	var err error
	for _, rg := range ranges {
		for r := rg.Off / snapRegion; r*snapRegion < min(rg.End(), s.size) && err == nil; r++ {
			if c.snap.Load() != s {
				return // aborted by a write that could not preserve
			}
			var n int64
			n, err = s.save(c.Device, r, buf)
			s.copied.Add(n)
		}
	}
	if err == nil {
		err = s.out.Sync()
	}
	c.gate.Lock()
	defer c.gate.Unlock()
	if !c.snap.CompareAndSwap(s, nil) {
		return
	}
	s.err = err
	s.took = time.Since(s.started)
	if cerr := s.out.Close(); s.err == nil {
		s.err = cerr
	}
	close(s.done)
	if s.err != nil {
		c.log.Error().Err(s.err).Str("path", s.path).Msg("point-in-time copy failed")
		return
	}
	c.log.Info().Str("path", s.path).Int64("copied", s.copied.Load()).Int64("preserved", s.preserved.Load()).
		Dur("took", s.took).Msg("point-in-time copy complete")
}

// SnapshotStatus reports the running or last snapshot, or nil.
func (c *cowDev) SnapshotStatus() *SnapshotStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.last == nil {
		return nil
	}
	return c.last.status()
}

// alignedBuf returns n bytes aligned for O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+blockdev.DirectAlign)
	off := blockdev.DirectAlign - int(uintptr(unsafe.Pointer(unsafe.SliceData(b)))%blockdev.DirectAlign)
	if off == blockdev.DirectAlign {
		off = 0
	}
	return b[off : off+n : off+n]
}
