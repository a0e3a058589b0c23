package dmclone

import "math/bits"

// bitmap is a fixed-size set of region numbers, one bit per region.
type bitmap []uint64

func newBitmap(n int64) bitmap { return make(bitmap, (n+63)/64) }

func (b bitmap) get(i int64) bool { return b[i>>6]&(1<<(uint(i)&63)) != 0 }
func (b bitmap) set(i int64)      { b[i>>6] |= 1 << (uint(i) & 63) }

// count returns the number of set bits below n.
func (b bitmap) count(n int64) int64 {
	var c int64
	full := n >> 6
	for i := int64(0); i < full; i++ {
		c += int64(bits.OnesCount64(b[i]))
	}
	if rem := uint(n & 63); rem != 0 {
		c += int64(bits.OnesCount64(b[full] & (1<<rem - 1)))
	}
	return c
}

// nextClear returns the first clear bit in [from, n), or n.
func (b bitmap) nextClear(from, n int64) int64 {
	for i := from; i < n; {
		w := b[i>>6] >> (uint(i) & 63)
		if uint(i)&63 == 0 && b[i>>6] == ^uint64(0) {
			i += 64
			continue
		}
		if w&1 == 0 {
			return i
		}
		i++
	}
	return n
}

// nextSet returns the first set bit in [from, n), or n. It looks at a
// word at a time: opening a clone runs it over millions of regions.
func (b bitmap) nextSet(from, n int64) int64 {
	if from >= n {
		return n
	}
	w := from >> 6
	cur := b[w] >> (uint(from) & 63)
	if cur != 0 {
		return min(from+int64(bits.TrailingZeros64(cur)), n)
	}
	for w++; w<<6 < n; w++ {
		if b[w] != 0 {
			return min(w<<6+int64(bits.TrailingZeros64(b[w])), n)
		}
	}
	return n
}

// setRange sets [from, to) and returns how many bits changed.
func (b bitmap) setRange(from, to int64) int64 {
	var changed int64
	for i := from; i < to; {
		if uint(i)&63 == 0 && to-i >= 64 {
			changed += int64(64 - bits.OnesCount64(b[i>>6]))
			b[i>>6] = ^uint64(0)
			i += 64
			continue
		}
		if !b.get(i) {
			b.set(i)
			changed++
		}
		i++
	}
	return changed
}
