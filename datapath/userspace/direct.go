package userspace

import (
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
)

// directAlign is the alignment O_DIRECT needs of offsets, lengths and
// buffer addresses on the filesystems ferry runs on (4 KiB logical blocks
// at most).
const directAlign = 4096

// directFile gives the LUKS view the volume file the way the host file a
// plain disk would be: page-aligned reads and writes go through a second
// handle opened with O_DIRECT, so they neither fill the host's page cache
// (the machine caches in its own) nor pay a copy and page allocation for
// it. Anything else (the header's small reads) takes the buffered handle;
// Linux keeps the two coherent (a direct read first writes back cached
// dirty pages of its range, a direct write drops them). Flush, Discard and
// Size go to the buffered *blockdev.File, which stays the caller's.
type directFile struct {
	*blockdev.File
	direct   *os.File
	readOnly bool
	closed   atomic.Bool
}

// openDirect opens f's file a second time with O_DIRECT. It fails where the
// filesystem refuses O_DIRECT (tmpfs); callers then keep the buffered file.
func openDirect(f *blockdev.File, readOnly bool) (*directFile, error) {
	flags := os.O_RDWR
	if readOnly {
		flags = os.O_RDONLY
	}
	d, err := os.OpenFile(f.Name(), flags|unix.O_DIRECT, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s with O_DIRECT: %w", f.Name(), err)
	}
	return &directFile{File: f, direct: d, readOnly: readOnly}, nil
}

func directOK(p []byte, off int64) bool {
	return len(p)%directAlign == 0 && off%directAlign == 0 &&
		uintptr(unsafe.Pointer(unsafe.SliceData(p)))%directAlign == 0
}

func (d *directFile) ReadAt(p []byte, off int64) (int, error) {
	if d.closed.Load() {
		return 0, blockdev.ErrClosed
	}
	if len(p) == 0 || !directOK(p, off) {
		return d.File.ReadAt(p, off)
	}
	if err := blockdev.CheckRange(off, len(p), d.Size()); err != nil {
		return 0, err
	}
	n, err := d.direct.ReadAt(p, off)
	if err != nil {
		return n, fmt.Errorf("direct read %d bytes at %d of %s: %w", len(p), off, d.Name(), err)
	}
	return n, nil
}

func (d *directFile) WriteAt(p []byte, off int64) (int, error) {
	if d.closed.Load() {
		return 0, blockdev.ErrClosed
	}
	if d.readOnly || len(p) == 0 || !directOK(p, off) {
		return d.File.WriteAt(p, off)
	}
	if err := blockdev.CheckRange(off, len(p), d.Size()); err != nil {
		return 0, err
	}
	n, err := d.direct.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("direct write %d bytes at %d of %s: %w", len(p), off, d.Name(), err)
	}
	return n, nil
}

func (d *directFile) Discard(off, length int64) error {
	if d.closed.Load() {
		return blockdev.ErrClosed
	}
	return d.File.Discard(off, length)
}

func (d *directFile) Flush() error {
	if d.closed.Load() {
		return blockdev.ErrClosed
	}
	return d.File.Flush()
}

// Close closes the O_DIRECT handle only: the buffered file is the server's.
func (d *directFile) Close() error {
	if d.closed.Swap(true) {
		return nil
	}
	return d.direct.Close()
}
