package iscsi

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"sync/atomic"
	"time"

	"github.com/gostor/gotgt/pkg/api"
	"github.com/gostor/gotgt/pkg/scsi"
	"golang.org/x/sys/unix"
)

// errReadOnlyExport is what the store answers any write or unmap with; gotgt
// turns it into a check condition.
var errReadOnlyExport = errors.New("ferry export is read-only")

// roStore is ferry's gotgt backing store: reads of a file or block device
// opened read-only, exact size, every modification refused.
//
// gotgt copies what Read returns into its own buffer and drops it, so the
// store hands out slices of a read-only shared mapping of the volume: no
// allocation, no zeroing and no syscall per command (the export child is
// bound by its allocator and garbage collector, not by the disk). Where the
// volume cannot be mapped it falls back to positioned reads.
type roStore struct {
	scsi.BaseBackingStore
	f   *os.File
	mem atomic.Pointer[[]byte] // the volume's mapping; nil: read with pread
}

func (s *roStore) Open(_ *api.SCSILu, path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return fmt.Errorf("opening the exported volume: %w", err)
	}
	size, err := f.Seek(0, io.SeekEnd) // works for files and block devices alike
	if err != nil {
		f.Close()
		return fmt.Errorf("sizing the exported volume: %w", err)
	}
	s.f, s.DataSize = f, uint64(size)
	if size > 0 && int64(int(size)) == size {
		if mem, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED); err == nil {
			s.mem.Store(&mem)
			// The migration reads the volume once, front to back: ask for
			// aggressive read-ahead (and it costs nothing if page-cached).
			_ = unix.Madvise(mem, unix.MADV_SEQUENTIAL)
			_ = unix.Fadvise(int(f.Fd()), 0, size, unix.FADV_SEQUENTIAL)
		}
	}
	return nil
}

func (s *roStore) Close(*api.SCSILu) error {
	if p := s.mem.Swap(nil); p != nil {
		mem := *p
		// gotgt may still be copying a slice a command got from Read just
		// before the LU closed; unmapping under it would crash the export.
		// The copy takes microseconds: the mapping goes after a grace
		// period (or with the process, for the one-export child).
		time.AfterFunc(unmapGrace, func() { _ = unix.Munmap(mem) })
	}
	return s.f.Close()
}

// unmapGrace is how long a closed store's mapping outlives it.
const unmapGrace = 30 * time.Second

func (s *roStore) Init(*api.SCSILu, string) error { return nil }
func (s *roStore) Exit(*api.SCSILu) error         { return nil }
func (s *roStore) Size(*api.SCSILu) uint64        { return s.DataSize }

func (s *roStore) Read(off, n int64) ([]byte, error) {
	if off < 0 || n < 0 || uint64(off)+uint64(n) > s.DataSize {
		return nil, fmt.Errorf("read of %d bytes at %d outside the %d-byte volume", n, off, s.DataSize)
	}
	// A small read is the machine's own, random: read it with pread. A
	// fault in the mapping would read ahead of it (MADV_SEQUENTIAL: the
	// disk's read_ahead_kb, 8 MiB here) and make the machine wait for
	// that; pread reads a lone random block as it is.
	if p := s.mem.Load(); p != nil && n >= prefetchMin {
		return mapped(*p, off, n)
	}
	b := make([]byte, n)
	if _, err := s.f.ReadAt(b, off); err != nil {
		return nil, err
	}
	return b, nil
}

// mapped returns the volume's bytes [off, off+n) from the mapping, touched
// here so that an I/O error (or a file truncated under the export, which
// the source must not be) surfaces as a read error of this command instead
// of a SIGBUS that kills the export when gotgt copies the slice.
func mapped(mem []byte, off, n int64) (b []byte, err error) {
	b = mem[off : off+n : off+n]
	if n >= prefetchMin {
		// A large read is the migration's sequential sweep, spread over
		// several sessions: start reading the next stretch from the disk now
		// (asynchronously), so the faults below and the next commands find
		// it in the page cache. Small reads are the machine's own, random.
		ahead := min(off+n+prefetchAhead, int64(len(mem)))
		start := (off + n) &^ (pageSize - 1)
		if start < ahead {
			_ = unix.Madvise(mem[start:ahead], unix.MADV_WILLNEED)
		}
	}
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if r := recover(); r != nil {
			b, err = nil, fmt.Errorf("reading %d bytes at %d of the exported volume: %v", n, off, r)
		}
	}()
	var sink byte
	for i := int64(0); i < n; i += 4096 {
		sink |= b[i]
	}
	if n > 0 {
		sink |= b[n-1]
	}
	touchSink.Store(uint32(sink))
	return b, nil
}

const (
	pageSize      = 4096
	prefetchMin   = 256 << 10
	prefetchAhead = 8 << 20
)

// touchSink keeps the page touches in mapped from being optimised away.
var touchSink atomic.Uint32

func (s *roStore) Write([]byte, int64) error              { return errReadOnlyExport }
func (s *roStore) DataSync(int64, int64) error            { return nil }
func (s *roStore) DataAdvise(int64, int64, uint32) error  { return nil }
func (s *roStore) Unmap([]api.UnmapBlockDescriptor) error { return errReadOnlyExport }
