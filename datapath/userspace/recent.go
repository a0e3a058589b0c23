package userspace

import (
	"slices"
	"sync/atomic"

	"github.com/ferry-dev/ferry/blockdev"
)

// recentIO remembers which parts of a volume its machine read and wrote
// last, as ciphertext chunks, without a lock on the I/O path. A migration's
// source sends them to the target (hot ranges), which reads them ahead
// while the clone starts: a restarted machine reads much of what it touched
// last (a database's log, a records file it scans for its last entry), and
// each such read was otherwise a round trip to the source inside its pause.
type recentIO struct {
	n    atomic.Uint64
	ents [recentSlots]atomic.Uint64 // chunk index + 1; 0 is empty
}

const (
	// recentChunk is the unit remembered and read ahead.
	recentChunk = 64 << 10
	// recentSlots bounds the memory: the last 4096 chunk touches.
	recentSlots = 4096
	// maxHot bounds what the source reports (and the target reads ahead).
	maxHot = 4 << 20
)

// note records an I/O of n bytes at off.
func (r *recentIO) note(off int64, n int) {
	if n <= 0 || off < 0 {
		return
	}
	for c := off / recentChunk; c <= (off+int64(n)-1)/recentChunk; c++ {
		i := r.n.Add(1)
		r.ents[i%recentSlots].Store(uint64(c) + 1)
	}
}

// hot is the most recently touched chunks, newest first until max bytes,
// as sorted, merged ranges clipped to size.
func (r *recentIO) hot(max, size int64) []blockdev.Range {
	seen := map[uint64]bool{}
	var chunks []int64
	last := r.n.Load()
	for k := uint64(0); k < recentSlots && k < last && int64(len(chunks))*recentChunk < max; k++ {
		e := r.ents[(last-k)%recentSlots].Load()
		if e == 0 || seen[e] {
			continue
		}
		seen[e] = true
		chunks = append(chunks, int64(e-1))
	}
	slices.Sort(chunks)
	var out []blockdev.Range
	for _, c := range chunks {
		off := c * recentChunk
		if off >= size {
			continue
		}
		n := min(int64(recentChunk), size-off)
		if k := len(out) - 1; k >= 0 && out[k].Off+out[k].Len == off {
			out[k].Len += n
			continue
		}
		out = append(out, blockdev.Range{Off: off, Len: n})
	}
	return out
}
