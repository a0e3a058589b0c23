package dmclone

import "sync/atomic"

// Prealloc is the memory Open allocates for a clone's bitmaps and their
// encoded image, made ahead of it. A prestarted datapath makes it before
// the machine's pause: at 20 GiB in 4 KiB regions it is about 2 MiB, whose
// allocation and first touch took 4–30 ms of the pause on a loaded 2-core
// host (docs/profiles.md). One Open uses it; any other allocates its own.
type Prealloc struct {
	size, rs  int64
	hyd, busy bitmap
	pageVer   []uint64
	img       []byte // all zero until an Open takes it
	taken     atomic.Bool
}

// Preallocate makes the memory Open needs for a clone of a size-byte
// source in regions of regionSize bytes (0: 4 KiB) and touches each of its
// pages. Nil for a shape Open would refuse.
func Preallocate(size, regionSize int64) *Prealloc {
	rs := regionSize
	if rs == 0 {
		rs = minRegionSize
	}
	if validRegionSize(rs) != nil || size <= 0 {
		return nil
	}
	regions := (size + rs - 1) / rs
	if regions > maxRegions {
		return nil
	}
	p := &Prealloc{size: size, rs: rs, hyd: newBitmap(regions), busy: newBitmap(regions),
		img: make([]byte, slotSize(regions)-metaHeaderLen)}
	p.pageVer = make([]uint64, (int64(len(p.hyd))+wordsPerPage-1)/wordsPerPage)
	// The kernel backs a page at its first write: make that now, not when
	// the clone first sets a bit or encodes a page.
	for _, b := range []bitmap{p.hyd, p.busy} {
		for i := 0; i < len(b); i += wordsPerPage {
			b[i] = 0
		}
	}
	for i := 0; i < len(p.img); i += 4096 {
		p.img[i] = 0
	}
	return p
}

// take returns p for a clone of size bytes in regions of rs, once; nil
// when p is nil, of another shape, or taken before.
func (p *Prealloc) take(size, rs int64) *Prealloc {
	if p == nil || p.size != size || p.rs != rs || !p.taken.CompareAndSwap(false, true) {
		return nil
	}
	return p
}
