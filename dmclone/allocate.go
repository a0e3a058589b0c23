package dmclone

import (
	"sync"
	"sync/atomic"
)

// rangeAllocator is a destination that can reserve the blocks of a range
// before it is written (blockdev.Direct on a sparse file).
type rangeAllocator interface {
	Allocate(off, n int64)
}

// AllocWindow is how far ahead background hydration reserves the
// destination's blocks, in ascending order. Left to allocate on their own,
// copies in flight side by side reach the destination in whatever order
// their reads finish, and a filesystem places each where the blocks next to
// it happen to be free: a 512 MiB volume hydrated four copies at a time
// came out in about 400 extents (against 9 in the source), and the machine's
// 1 MiB writes that span extents then run one at a time on ext4
// (docs/profiles.md). Reserved a window at a time from the front, the same
// volume keeps about twenty; and each reservation, which ext4 makes with the
// file locked and its direct I/O drained, comes once per window rather
// than once per copy.
const AllocWindow = 16 << 20

// allocFront is how far ahead background hydration has reserved the
// destination's blocks.
type allocFront struct {
	mu  sync.Mutex   // held while reserving: windows go in order
	end atomic.Int64 // offset up to which the unhydrated regions are reserved
}

// allocateAhead reserves the destination's blocks for the unhydrated
// regions of [off, end) and of the rest of the window end falls in, unless
// an earlier window covered them. Only unhydrated regions (the destination
// rounds them out to its allocation chunks): a range the source does not
// hold, or one trimmed, is not reserved. A copy behind the
// front (the cursor wrapped) allocates as it writes.
func (e *Engine) allocateAhead(off, end int64) {
	ra, ok := e.dst.(rangeAllocator)
	if !ok {
		return
	}
	if end <= e.front.end.Load() {
		return // the common case: a window reserved by an earlier copy
	}
	e.front.mu.Lock()
	defer e.front.mu.Unlock()
	// Jump over what lies before this copy (hydrated already, or left to
	// allocate as it is written): allocating it now would place it first.
	from := max(e.front.end.Load(), off-off%AllocWindow)
	for from < end {
		to := min(from+AllocWindow-from%AllocWindow, e.size)
		for _, r := range e.unhydratedRuns(from, to) {
			ra.Allocate(r[0], r[1]-r[0])
		}
		from = to
	}
	e.front.end.Store(max(e.front.end.Load(), from))
}

// unhydratedRuns returns the byte ranges of the unhydrated regions of
// [from, to), in order.
func (e *Engine) unhydratedRuns(from, to int64) [][2]int64 {
	a, b := from/e.rs, min((to+e.rs-1)/e.rs, e.regions)
	var runs [][2]int64
	e.mu.Lock()
	defer e.mu.Unlock()
	for i := e.hyd.nextClear(a, b); i < b; {
		j := min(e.hyd.nextSet(i, b), b)
		runs = append(runs, [2]int64{e.regionOff(i), e.regionOff(j)})
		i = e.hyd.nextClear(j, b)
	}
	return runs
}
