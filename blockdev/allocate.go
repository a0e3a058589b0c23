package blockdev

import (
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// allocator allocates a sparse file's blocks a chunk ahead of its direct
// writes. ext4 holds a file's inode lock exclusively for the whole of a
// direct write that allocates blocks, so writes into holes run one at a
// time and direct reads (which take the lock shared) wait behind them; a
// write into blocks already allocated (unwritten extents included, which
// read as zeros as a hole does) shares the lock. So the first write into
// each chunk allocates the whole chunk first (fallocate, which changes no
// byte of the file's content: allocated-but-unwritten ranges read as
// zeros), and the chunk's later writes run side by side.
//
// The chunk bounds what a thin volume gives up: at most a chunk of space
// per scattered write. Which chunks are allocated is a hint, never needed
// for correctness: a race or a punched hole costs only an allocating write
// or a redundant fallocate.
type allocator struct {
	chunk int64
	off   atomic.Bool // set once the file refused an allocation: a block device, or a filesystem without fallocate

	mu   sync.RWMutex    // guards growing bits; the words are atomic
	bits []atomic.Uint64 // one per chunk: allocated by us since open
}

// before readies [off, off+n) of fd for a direct write: it allocates the
// chunks the range touches that were not allocated since open, each run of
// them in one call. An error is left to the write itself (a full
// filesystem refuses both).
func (a *allocator) before(fd int, off, n, size int64) {
	if n <= 0 || a.off.Load() {
		return
	}
	first, last := off/a.chunk, (off+n-1)/a.chunk
	for c := first; c <= last; {
		if a.has(c) {
			c++
			continue
		}
		run := c + 1
		for run <= last && !a.has(run) {
			run++
		}
		start := c * a.chunk
		length := min(run*a.chunk, size) - start
		if length > 0 {
			switch err := unix.Fallocate(fd, unix.FALLOC_FL_KEEP_SIZE, start, length); err {
			case nil:
				for ; c < run; c++ {
					a.word(c).Or(uint64(1) << (c % 64))
				}
			case unix.EOPNOTSUPP, unix.ENOSYS, unix.ENODEV, unix.EINVAL:
				a.off.Store(true) // a block device, or a filesystem without it
				return
			}
		}
		c = run
	}
}

// needs reports whether a direct write to [off, off+n) would find a chunk
// not allocated since open (and the file takes allocations).
func (a *allocator) needs(off, n int64) bool {
	if n <= 0 || a.off.Load() {
		return false
	}
	for c := off / a.chunk; c <= (off+n-1)/a.chunk; c++ {
		if !a.has(c) {
			return true
		}
	}
	return false
}

// has reports whether chunk c was allocated since open.
func (a *allocator) has(c int64) bool {
	return a.word(c).Load()&(uint64(1)<<(c%64)) != 0
}

// markData marks the chunks fd's file holds data in from end to end,
// from the file's start as far as it gets by the deadline: the marks are a
// hint, so a file of many small extents is left partly unmarked rather than
// holding up its open.
func (a *allocator) markData(fd int, size int64, deadline time.Time) {
	// An error leaves the marks made so far: they are a hint.
	_ = eachDataRange(fd, size, func(r Range) bool {
		if !time.Now().Before(deadline) {
			return false
		}
		end := min(r.Off+r.Len, size)
		for c := (r.Off + a.chunk - 1) / a.chunk; c*a.chunk < end && min((c+1)*a.chunk, size) <= end; c++ {
			a.word(c).Or(uint64(1) << (c % 64))
		}
		return true
	})
}

// forget drops the chunks [off, off+n) touches: a hole was punched there.
func (a *allocator) forget(off, n int64) {
	if n <= 0 {
		return
	}
	for c := off / a.chunk; c <= (off+n-1)/a.chunk; c++ {
		a.word(c).And(^(uint64(1) << (c % 64)))
	}
}

// word is the bitmap word of chunk c, growing the bitmap (a grown volume).
func (a *allocator) word(c int64) *atomic.Uint64 {
	i := int(c / 64)
	a.mu.RLock()
	if i < len(a.bits) {
		w := &a.bits[i]
		a.mu.RUnlock()
		return w
	}
	a.mu.RUnlock()
	a.mu.Lock()
	defer a.mu.Unlock()
	if i >= len(a.bits) {
		grown := make([]atomic.Uint64, max(i+1, 2*len(a.bits)))
		for j := range a.bits {
			grown[j].Store(a.bits[j].Load())
		}
		a.bits = grown
	}
	return &a.bits[i]
}
