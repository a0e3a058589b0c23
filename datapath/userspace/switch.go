package userspace

import (
	"sync"

	"github.com/ferry-dev/ferry/blockdev"
)

// switchDev forwards to a lower device that can be replaced while I/O runs:
// Swap waits for in-flight requests, so the layer above (the LUKS view, and
// the kernel above FUSE) never sees the change from clone to destination.
type switchDev struct {
	mu  sync.RWMutex
	dev blockdev.Device
}

func newSwitch(d blockdev.Device) *switchDev { return &switchDev{dev: d} }

func (s *switchDev) Swap(d blockdev.Device) blockdev.Device {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.dev
	s.dev = d
	return old
}

func (s *switchDev) ReadAt(p []byte, off int64) (int, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.dev.ReadAt(p, off)
}

func (s *switchDev) WriteAt(p []byte, off int64) (int, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.dev.WriteAt(p, off)
}

func (s *switchDev) Size() int64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.dev.Size()
}

func (s *switchDev) Discard(off, n int64) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.dev.Discard(off, n)
}

func (s *switchDev) Flush() error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.dev.Flush()
}

func (s *switchDev) Close() error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.dev.Close()
}
