package blockdev

import (
	"fmt"
	"os"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DirectAlign is the alignment O_DIRECT needs of offsets, lengths and
// buffer addresses on the filesystems ferry runs on (4 KiB logical blocks
// at most).
const DirectAlign = 4096

// markDataBudget bounds how long AllocateAhead looks for the chunks a file
// already holds data in (two seeks per extent).
const markDataBudget = 20 * time.Millisecond

// Direct is a File the way a plain disk is, not cached by the host:
// page-aligned reads and writes go through a second handle opened with
// O_DIRECT, so they neither fill the host's page cache (a machine caches in
// its own; a migration's copy would push the host's other data out) nor pay
// a copy and a page allocation for it. Anything else (a LUKS2 header's
// small reads) takes the buffered handle; Linux keeps the two coherent (a
// direct read first writes back cached dirty pages of its range, a direct
// write drops them). Flush, Discard and Size go to the buffered *File,
// which stays the caller's.
type Direct struct {
	*File
	direct   *os.File
	readOnly bool
	closed   atomic.Bool
	alloc    *allocator // nil: writes allocate as they go
}

// OpenDirect opens f's file a second time with O_DIRECT. It fails where the
// filesystem refuses O_DIRECT (tmpfs); callers then keep the buffered file.
func OpenDirect(f *File, readOnly bool) (*Direct, error) {
	flags := os.O_RDWR
	if readOnly {
		flags = os.O_RDONLY
	}
	d, err := os.OpenFile(f.Name(), flags|unix.O_DIRECT, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s with O_DIRECT: %w", f.Name(), err)
	}
	return &Direct{File: f, direct: d, readOnly: readOnly}, nil
}

// AllocateAhead makes the first direct write into each chunk of the file
// allocate the whole chunk first, so later writes there do not allocate
// (see allocator: ext4 runs allocating direct writes one at a time). Call
// it before the first write; chunk is a positive multiple of DirectAlign.
func (d *Direct) AllocateAhead(chunk int64) error {
	if chunk <= 0 || chunk%DirectAlign != 0 {
		return fmt.Errorf("allocation chunk %d: must be a positive multiple of %d", chunk, DirectAlign)
	}
	a := &allocator{chunk: chunk}
	// Chunks the file holds data in from end to end need no allocation:
	// marking them spares each its first write's fallocate, which ext4 runs
	// with the inode locked exclusively after waiting out every direct I/O
	// in flight (a reopened, written volume drained its queue once per
	// chunk). Through the handle's own reference, as in WriteAt; the
	// handle's file offset the seeks move is unused (it reads and writes at
	// offsets).
	if rc, err := d.direct.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) { a.markData(int(fd), d.Size(), time.Now().Add(markDataBudget)) })
	}
	d.alloc = a
	return nil
}

// Allocate allocates the chunks of [off, off+n) not allocated since open,
// as the first writes into them would, each run of them in one call. A
// writer that knows where it writes next (hydration) calls it ahead of its
// writes, in ascending order, so the file's extents follow its offsets
// rather than the order its writes happen to land in. Without
// AllocateAhead it does nothing; like the writes' own allocation it is a
// hint, and a failure is left to the writes.
func (d *Direct) Allocate(off, n int64) {
	if d.alloc == nil || d.readOnly || d.closed.Load() || off < 0 || n <= 0 {
		return
	}
	size := d.Size()
	n = min(n, size-off)
	if n <= 0 {
		return
	}
	if rc, err := d.direct.SyscallConn(); err == nil {
		_ = rc.Control(func(fd uintptr) { d.alloc.before(int(fd), off, n, size) })
	}
}

func directOK(p []byte, off int64) bool {
	return len(p)%DirectAlign == 0 && off%DirectAlign == 0 &&
		uintptr(unsafe.Pointer(unsafe.SliceData(p)))%DirectAlign == 0
}

func (d *Direct) ReadAt(p []byte, off int64) (int, error) {
	if d.closed.Load() {
		return 0, ErrClosed
	}
	if len(p) == 0 || !directOK(p, off) {
		return d.File.ReadAt(p, off)
	}
	if err := CheckRange(off, len(p), d.Size()); err != nil {
		return 0, err
	}
	n, err := d.direct.ReadAt(p, off)
	if err != nil {
		return n, fmt.Errorf("direct read %d bytes at %d of %s: %w", len(p), off, d.Name(), err)
	}
	return n, nil
}

func (d *Direct) WriteAt(p []byte, off int64) (int, error) {
	if d.closed.Load() {
		return 0, ErrClosed
	}
	if d.readOnly || len(p) == 0 || !directOK(p, off) {
		return d.File.WriteAt(p, off)
	}
	if err := CheckRange(off, len(p), d.Size()); err != nil {
		return 0, err
	}
	if n := int64(len(p)); d.alloc != nil && d.alloc.needs(off, n) {
		// Through the handle's own reference, so a Close racing this write
		// cannot leave the call a descriptor number reused by another file.
		if rc, err := d.direct.SyscallConn(); err == nil {
			_ = rc.Control(func(fd uintptr) { d.alloc.before(int(fd), off, n, d.Size()) })
		}
	}
	n, err := d.direct.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("direct write %d bytes at %d of %s: %w", len(p), off, d.Name(), err)
	}
	return n, nil
}

func (d *Direct) Discard(off, length int64) error {
	if d.closed.Load() {
		return ErrClosed
	}
	if err := d.File.Discard(off, length); err != nil {
		return err
	}
	if d.alloc != nil {
		d.alloc.forget(off, length)
	}
	return nil
}

func (d *Direct) Flush() error {
	if d.closed.Load() {
		return ErrClosed
	}
	return d.File.Flush()
}

// Close closes the O_DIRECT handle only: the buffered file is the caller's.
func (d *Direct) Close() error {
	if d.closed.Swap(true) {
		return nil
	}
	return d.direct.Close()
}
