package blockdev

import "sync"

// Mem is an in-memory Device, for unit tests of the layers above a device and
// as the reference model in randomized tests. Discard zeroes the range.
type Mem struct {
	mu     sync.RWMutex
	buf    []byte
	closed bool
}

// NewMem returns a zero-filled in-memory device of size bytes.
func NewMem(size int64) *Mem { return &Mem{buf: make([]byte, size)} }

func (m *Mem) Size() int64 { return int64(len(m.buf)) }

func (m *Mem) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return 0, ErrClosed
	}
	if err := CheckRange(off, len(p), int64(len(m.buf))); err != nil {
		return 0, err
	}
	return copy(p, m.buf[off:]), nil
}

func (m *Mem) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, ErrClosed
	}
	if err := CheckRange(off, len(p), int64(len(m.buf))); err != nil {
		return 0, err
	}
	return copy(m.buf[off:], p), nil
}

func (m *Mem) Discard(off, length int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	if err := CheckRange(off, int(length), int64(len(m.buf))); err != nil {
		return err
	}
	clear(m.buf[off : off+length])
	return nil
}

func (m *Mem) Flush() error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return ErrClosed
	}
	return nil
}

func (m *Mem) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	return nil
}
