package blockdev

import (
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// File is a Device backed by a regular file or a block device node.
// Discard punches a hole (regular files) or issues BLKDISCARD semantics via
// fallocate; a filesystem without hole punching reports the error.
type File struct {
	f *os.File
	// size is atomic because Size is read without the lock (by callers that
	// bound their I/O) while Grow changes it under the write lock.
	size     atomic.Int64
	readOnly bool
	mu       sync.RWMutex
	closed   bool
}

// OpenFile opens path as a device. Size is the file size, or the block
// device size for device nodes.
func OpenFile(path string, readOnly bool) (*File, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("open device %s: %w", path, err)
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("size of device %s: %w", path, err)
	}
	d := &File{f: f, readOnly: readOnly}
	d.size.Store(size)
	return d, nil
}

// CreateSparse creates (or truncates to size, growing only) a sparse file of
// size bytes and opens it read-write.
func CreateSparse(path string, size int64) (*File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", path, err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Size() != size {
		if st.Size() > size {
			f.Close()
			return nil, fmt.Errorf("%s is %d bytes, larger than the requested %d: refusing to shrink it", path, st.Size(), size)
		}
		if err := f.Truncate(size); err != nil {
			f.Close()
			return nil, fmt.Errorf("grow %s to %d bytes: %w", path, size, err)
		}
	}
	f.Close()
	return OpenFile(path, false)
}

func (d *File) Size() int64 { return d.size.Load() }

// Fd exposes the descriptor for callers that need SEEK_DATA or ioctls.
func (d *File) Fd() uintptr { return d.f.Fd() }

// Name is the path the device was opened with.
func (d *File) Name() string { return d.f.Name() }

func (d *File) ReadAt(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.closed {
		return 0, ErrClosed
	}
	if err := CheckRange(off, len(p), d.size.Load()); err != nil {
		return 0, err
	}
	return d.f.ReadAt(p, off)
}

func (d *File) WriteAt(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.closed {
		return 0, ErrClosed
	}
	if d.readOnly {
		return 0, ErrReadOnly
	}
	if err := CheckRange(off, len(p), d.size.Load()); err != nil {
		return 0, err
	}
	return d.f.WriteAt(p, off)
}

func (d *File) Discard(off, length int64) error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.closed {
		return ErrClosed
	}
	if d.readOnly {
		return ErrReadOnly
	}
	if length == 0 {
		return nil
	}
	if size := d.size.Load(); off < 0 || length < 0 || off+length > size {
		return fmt.Errorf("%w: discard offset %d length %d size %d", ErrOutOfRange, off, length, size)
	}
	if err := unix.Fallocate(int(d.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length); err != nil {
		return fmt.Errorf("punch hole in %s at %d+%d: %w", d.f.Name(), off, length, err)
	}
	return nil
}

func (d *File) Flush() error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.closed {
		return ErrClosed
	}
	if d.readOnly {
		return nil
	}
	if err := unix.Fdatasync(int(d.f.Fd())); err != nil {
		return fmt.Errorf("flush %s: %w", d.f.Name(), err)
	}
	return nil
}

// Grow makes the file size bytes long (a sparse tail) and the device that
// large; in-flight I/O finishes first. A block device node or a smaller size
// is refused: devices never shrink under their users.
func (d *File) Grow(size int64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case d.closed:
		return ErrClosed
	case d.readOnly:
		return ErrReadOnly
	case size < d.size.Load():
		return fmt.Errorf("grow %s to %d bytes: it is %d already; devices only grow", d.f.Name(), size, d.size.Load())
	case size == d.size.Load():
		return nil
	}
	st, err := d.f.Stat()
	if err != nil {
		return fmt.Errorf("stat %s: %w", d.f.Name(), err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("grow %s: only a regular file can grow here (resize the block device instead)", d.f.Name())
	}
	if err := d.f.Truncate(size); err != nil {
		return fmt.Errorf("grow %s to %d bytes: %w", d.f.Name(), size, err)
	}
	d.size.Store(size)
	return nil
}

func (d *File) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	return d.f.Close()
}

// DataRanges lists the allocated (data) ranges of a regular file with
// SEEK_DATA/SEEK_HOLE; everything else reads as zeros. The source uses the
// complement (see Holes) as the known-zero hint carried with a migration.
func DataRanges(f *os.File) ([]Range, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", f.Name(), err)
	}
	var out []Range
	err = eachDataRange(int(f.Fd()), st.Size(), func(r Range) bool {
		out = append(out, r)
		return true
	})
	if err != nil {
		return nil, fmt.Errorf("%w in %s", err, f.Name())
	}
	return out, nil
}

// AllZero reports whether d holds no data at all, so that every byte
// reads as zeros (a sparse file nothing was written to): one SEEK_DATA.
// False when it cannot tell, or for a device SEEK_DATA does not describe.
func (d *File) AllZero() bool {
	st, err := d.f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		return false
	}
	found := false
	err = eachDataRange(int(d.f.Fd()), d.Size(), func(Range) bool {
		found = true
		return false
	})
	return err == nil && !found
}

// eachDataRange calls yield with each data range of fd's file below size,
// in order, until yield returns false (SEEK_DATA/SEEK_HOLE; the seeks move
// fd's file offset).
func eachDataRange(fd int, size int64, yield func(Range) bool) error {
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err == unix.ENXIO {
			return nil // no data after off
		}
		if err != nil {
			return fmt.Errorf("SEEK_DATA: %w", err)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("SEEK_HOLE: %w", err)
		}
		if hole <= data {
			return fmt.Errorf("SEEK_HOLE at %d returned %d: no progress", data, hole)
		}
		if !yield(Range{Off: data, Len: hole - data}) {
			return nil
		}
		off = hole
	}
	return nil
}

// Holes returns the complement of DataRanges within [0, size): the ranges that
// read as zeros.
func Holes(f *os.File) ([]Range, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat %s: %w", f.Name(), err)
	}
	data, err := DataRanges(f)
	if err != nil {
		return nil, err
	}
	var out []Range
	prev := int64(0)
	for _, r := range data {
		if r.Off > prev {
			out = append(out, Range{Off: prev, Len: r.Off - prev})
		}
		prev = r.End()
	}
	if prev < st.Size() {
		out = append(out, Range{Off: prev, Len: st.Size() - prev})
	}
	return out, nil
}
