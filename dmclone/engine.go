package dmclone

import (
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/internal/logging"
)

// Engine is the userspace clone device. It implements blockdev.Device (the
// clone as the machine sees it) and Clone (the control surface).
//
// Concurrency: every region is in one of three states, kept in two bitmaps
// under mu: hydrated, busy (an operation owns it while copying, punching or
// overwriting it; never hydrated), or neither. An operation on [a,b) waits
// until no region in [a,b) is busy, then marks every unhydrated region there
// busy; from then on the busy bits inside [a,b) are its own until release.
// A region's bit turns hydrated only in release, after its bytes are written
// to the destination; a commit snapshots the bits and then flushes the
// destination before writing them, so a persisted bit never names bytes
// that are not durable.
type Engine struct {
	log     zerolog.Logger
	src     blockdev.Device
	dst     blockdev.Device
	meta    *metaFile
	rs      int64
	size    int64
	regions int64
	retries int
	timeout time.Duration
	fgWait  time.Duration // a foreground source read's whole budget
	zeroed  bool          // Config.DestZeroed: known-zero ranges need no discard

	opMu sync.RWMutex // held shared by every I/O, exclusively by Close

	mu        sync.Mutex
	cond      *sync.Cond
	hyd       bitmap
	busy      bitmap
	pageVer   []uint64 // per 4 KiB page of the bitmap: version of its last change
	nHyd      int64
	nBusy     int64
	cnt       counters
	bgFetched int64  // bytes the background copy fetched since Open
	version   uint64 // bumped on every change that a commit must carry
	closed    bool
	dissolved bool
	tun       Tunables
	enabled   bool
	stall     string
	cursor    int64 // where background hydration looks next
	front     allocFront
	done      chan struct{}
	doneOnce  sync.Once

	commitMu  sync.Mutex
	committed uint64 // version of the last commit

	// userDone counts the writes and discards completed through the
	// engine (under mu); userCommitted is userDone as of the start of the
	// last successful commit. A Flush with nothing completed since has
	// nothing to make durable: the regions the clone fetched itself since
	// are fetched again after a crash. The loop device's attach fsyncs its
	// file inside a migration's pause, with nothing written yet.
	userDone      uint64
	userCommitted atomic.Uint64

	gate    *gate
	limiter *limiter
	direct  atomic.Bool   // background copies may use copy_file_range
	bgStop  chan struct{} // closed to stop the current background workers
	bgWG    sync.WaitGroup

	rate      rateMeter
	stop      chan struct{} // stops the committer
	stopOnce  sync.Once
	commitNow chan struct{}
	loopWG    sync.WaitGroup

	writeBehind int // destination writes of regions fetched by reads, pending (under mu)

	fg FetchStats // source reads a request waited on (under mu)
}

// FetchStats counts the source reads requests waited on (on-demand
// fetches): how many, their bytes and the time spent waiting for them.
type FetchStats struct {
	Count int64
	Bytes int64
	Wait  time.Duration
}

// Foreground reports the on-demand fetches since Open.
func (e *Engine) Foreground() FetchStats {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.fg
}

var _ blockdev.Device = (*Engine)(nil)
var _ Clone = (*Engine)(nil)

// Open creates a clone, or resumes the one whose bitmap is at cfg.MetaPath.
// Hydration starts disabled (dm-clone's no_hydration). The engine owns the
// three devices from here on: Close closes them.
func Open(log zerolog.Logger, cfg Config) (*Engine, error) {
	if cfg.Source == nil || cfg.Dest == nil || cfg.MetaPath == "" {
		return nil, errors.New("clone needs a source, a destination and a metadata path")
	}
	rs := cfg.RegionSize
	if rs == 0 {
		rs = minRegionSize
	}
	if err := validRegionSize(rs); err != nil {
		return nil, err
	}
	size := cfg.Source.Size()
	if size <= 0 {
		return nil, fmt.Errorf("source is %d bytes: nothing to clone", size)
	}
	if cfg.Dest.Size() < size {
		return nil, fmt.Errorf("destination is %d bytes, smaller than the %d-byte source: grow it first", cfg.Dest.Size(), size)
	}
	regions := (size + rs - 1) / rs
	if regions > maxRegions {
		return nil, fmt.Errorf("%d regions of %d bytes: more than dm-clone's 2^31, use a larger region size", regions, rs)
	}
	tun := cfg.Tunables
	if tun == (Tunables{}) {
		tun = DefaultTunables(rs)
	}
	tun = tun.withDefaults(rs)
	if err := tun.validate(); err != nil {
		return nil, err
	}
	retries := cfg.SourceRetries
	if retries == 0 {
		retries = 3
	}
	if retries < 0 {
		retries = 0
	}
	timeout := cfg.SourceTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	fgWait := cfg.ForegroundWait
	if fgWait <= 0 {
		fgWait = 60 * time.Second
	}
	interval := cfg.CommitInterval
	if interval == 0 {
		interval = time.Second
	}
	mf, st, err := openMeta(cfg.MetaPath, regions)
	if err != nil {
		return nil, err
	}
	e := &Engine{
		log:       logging.For(log, "dmclone").With().Str("meta", cfg.MetaPath).Logger(),
		src:       cfg.Source,
		dst:       cfg.Dest,
		meta:      mf,
		rs:        rs,
		size:      size,
		regions:   regions,
		retries:   retries,
		timeout:   timeout,
		fgWait:    fgWait,
		tun:       tun,
		done:      make(chan struct{}),
		gate:      newGate(),
		limiter:   &limiter{},
		stop:      make(chan struct{}),
		commitNow: make(chan struct{}, 1),
	}
	e.cond = sync.NewCond(&e.mu)
	_, srcFd := cfg.Source.(fder)
	_, dstFd := cfg.Dest.(fder)
	e.direct.Store(srcFd && dstFd && !cfg.NoDirectCopy)
	e.limiter.setRate(tun.RateLimitBytesPerSec)
	e.gate.setMin(bgMin(tun))
	fresh := st == nil
	pre := cfg.Prealloc.take(size, rs)
	e.zeroed = cfg.DestZeroed
	switch {
	case fresh && pre != nil:
		e.hyd = pre.hyd
	case fresh:
		e.hyd = newBitmap(regions)
	default:
		if st.regionSize != rs || st.size != size {
			mf.close()
			return nil, fmt.Errorf("%w: %s records a %d-byte device in %d-byte regions, but the source is %d bytes and the region size %d: it belongs to another clone", ErrMetadata, cfg.MetaPath, st.size, st.regionSize, size, rs)
		}
		e.hyd = st.bits
		e.cnt = st.counters
	}
	if pre != nil {
		e.busy, e.pageVer = pre.busy, pre.pageVer
		mf.img = pre.img
	} else {
		e.busy = newBitmap(regions)
		e.pageVer = make([]uint64, (int64(len(e.hyd))+wordsPerPage-1)/wordsPerPage)
	}
	mf.newImage(e.hyd)
	e.nHyd = e.hyd.count(regions)
	if err := e.applyKnownZero(cfg.KnownZero); err != nil {
		mf.close()
		return nil, err
	}
	// A new or changed bitmap is committed at once, by the committer when
	// it commits on its own: the destination's flush and the metadata's
	// write and fsync (10-40 ms at 20 GiB on a disk busy with the source's
	// own flush) then leave a migration's pause. Nothing relies on that
	// first commit: a flush commits before it returns, and a crash before
	// it leaves an empty metadata file, which opens as a new clone (the
	// known-zero list comes again with the configuration).
	commitFirst := fresh || e.version != 0
	if commitFirst && interval <= 0 {
		if err := e.commit(); err != nil {
			mf.close()
			return nil, err
		}
		commitFirst = false
	}
	e.rate.add(time.Now(), e.cnt.Fetched)
	e.checkDone()
	e.loopWG.Add(1)
	go e.committer(interval)
	if commitFirst {
		e.commitNow <- struct{}{} // buffered, and nothing else has sent yet
	}
	e.log.Info().Int64("regions", regions).Int64("region_size", rs).Int64("hydrated", e.nHyd).
		Bool("resumed", !fresh).Bool("preallocated", pre != nil).Bool("dest_zeroed", e.zeroed).Msg("clone opened")
	return e, nil
}

// applyKnownZero marks unhydrated regions fully inside a known-zero range as
// hydrated and discards them on the destination so they read as zeros there.
// It runs before any I/O, so it needs no claims.
func (e *Engine) applyKnownZero(ranges []blockdev.Range) error {
	for _, r := range ranges {
		if r.Len <= 0 || r.Off < 0 || r.Off >= e.size {
			continue
		}
		a, b := e.fullRegions(r.Off, min(r.End(), e.size))
		for i := a; i < b; {
			i = e.hyd.nextClear(i, b)
			if i >= b {
				break
			}
			j := e.hyd.nextSet(i+1, b)
			off, end := i*e.rs, min(j*e.rs, e.size)
			if !e.zeroed {
				if err := e.dst.Discard(off, end-off); err != nil {
					return fmt.Errorf("discard known-zero range %d+%d on the destination: %w", off, end-off, err)
				}
			}
			e.hyd.setRange(i, j)
			e.nHyd += j - i
			e.cnt.SkippedKnownZero += end - off
			e.version++
			e.markPages(i>>6, (j-1)>>6)
			i = j
		}
	}
	return nil
}

// markPages records that bitmap words [w0,w1] changed in e.version, so the
// next commit into each slot rewrites their pages.
func (e *Engine) markPages(w0, w1 int64) {
	for p := w0 / wordsPerPage; p <= w1/wordsPerPage; p++ {
		e.pageVer[p] = e.version
	}
}

// fullRegions returns the regions [a,b) entirely inside [off,end); the
// device's last region counts as full when end is the device end.
func (e *Engine) fullRegions(off, end int64) (int64, int64) {
	a := (off + e.rs - 1) / e.rs
	b := end / e.rs
	if end == e.size {
		b = e.regions
	}
	if b < a {
		b = a
	}
	return a, b
}

// spanRegions returns the regions [a,b) touched by [off,end).
func (e *Engine) spanRegions(off, end int64) (int64, int64) {
	return off / e.rs, (end + e.rs - 1) / e.rs
}

func (e *Engine) regionOff(r int64) int64 { return min(r*e.rs, e.size) }

// Size is the source's size.
func (e *Engine) Size() int64 { return e.size }

// forWords calls fn for each bitmap word overlapping bits [a,b) with the mask
// of the bits inside the range.
func forWords(a, b int64, fn func(w int64, mask uint64)) {
	for i := a; i < b; {
		w := i >> 6
		lo := uint(i & 63)
		hi := uint(64)
		if (w+1)<<6 > b {
			hi = uint(b - w<<6)
		}
		var mask uint64
		if hi-lo == 64 {
			mask = ^uint64(0)
		} else {
			mask = (uint64(1)<<(hi-lo) - 1) << lo
		}
		fn(w, mask)
		i = (w + 1) << 6
	}
}

// claim waits until no region in [a,b) is busy, then marks the unhydrated
// ones busy. It returns how many it claimed. mu must not be held.
func (e *Engine) claim(a, b int64) int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	for {
		busy := false
		forWords(a, b, func(w int64, m uint64) {
			if e.busy[w]&m != 0 {
				busy = true
			}
		})
		if !busy {
			break
		}
		e.cond.Wait()
	}
	var n int64
	forWords(a, b, func(w int64, m uint64) {
		c := ^e.hyd[w] & m
		e.busy[w] |= c
		n += int64(bits.OnesCount64(c))
	})
	e.nBusy += n
	return n
}

// release gives up the busy regions in [a,b); with hydrated they become
// hydrated (their bytes are on the destination).
func (e *Engine) release(a, b int64, hydrated bool) {
	if a >= b {
		return
	}
	e.mu.Lock()
	var n int64
	if hydrated {
		e.version++
	}
	forWords(a, b, func(w int64, m uint64) {
		mine := e.busy[w] & m
		e.busy[w] &^= mine
		if hydrated && mine != 0 {
			e.hyd[w] |= mine
			e.pageVer[w/wordsPerPage] = e.version
		}
		n += int64(bits.OnesCount64(mine))
	})
	e.nBusy -= n
	if hydrated && n > 0 {
		e.nHyd += n
	}
	e.cond.Broadcast()
	e.mu.Unlock()
	if hydrated && n > 0 {
		e.checkDone()
	}
}

// busyRuns lists the maximal runs of busy (claimed) regions inside [a,b).
func (e *Engine) busyRuns(a, b int64) [][2]int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	var runs [][2]int64
	for i := a; i < b; i++ {
		if !e.busy.get(i) {
			continue
		}
		j := i + 1
		for j < b && e.busy.get(j) {
			j++
		}
		runs = append(runs, [2]int64{i, j})
		i = j
	}
	return runs
}

func (e *Engine) allHydrated(a, b int64) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.nHyd == e.regions {
		return true
	}
	all := true
	forWords(a, b, func(w int64, m uint64) {
		if e.hyd[w]&m != m {
			all = false
		}
	})
	return all
}

func (e *Engine) enter() error {
	e.opMu.RLock()
	if e.closed {
		e.opMu.RUnlock()
		return blockdev.ErrClosed
	}
	return nil
}

func (e *Engine) leave() { e.opMu.RUnlock() }

// ReadAt reads from the destination where hydrated; unhydrated regions are
// fetched from the source, written to the destination and marked hydrated
// on the way, so each region is fetched once.
func (e *Engine) ReadAt(p []byte, off int64) (int, error) {
	if err := e.enter(); err != nil {
		return 0, err
	}
	defer e.leave()
	e.gate.touch()
	defer e.gate.touch()
	if err := blockdev.CheckRange(off, len(p), e.size); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	end := off + int64(len(p))
	a, b := e.spanRegions(off, end)
	if e.allHydrated(a, b) {
		return e.dst.ReadAt(p, off)
	}
	if e.claim(a, b) == 0 {
		return e.dst.ReadAt(p, off)
	}
	// The caller gets its bytes as soon as the source answers; writing them
	// to the destination and marking the regions hydrated happens behind it
	// (the regions stay claimed until then), so a read's latency is the
	// source's, not the destination's write path under a busy background copy.
	type fetched struct {
		off int64
		buf []byte
	}
	var bufs []fetched
	fail := func(err error) (int, error) {
		for _, f := range bufs {
			putBuf(f.buf)
		}
		e.release(a, b, false)
		return 0, err
	}
	pos := off // next byte of p to fill
	for _, run := range e.busyRuns(a, b) {
		roff, rend := e.regionOff(run[0]), e.regionOff(run[1])
		if pos < roff {
			if _, err := e.dst.ReadAt(p[pos-off:roff-off], pos); err != nil {
				return fail(fmt.Errorf("read destination: %w", err))
			}
		}
		buf, err := e.readSource(int(rend-roff), roff, true)
		if err != nil {
			return fail(err)
		}
		bufs = append(bufs, fetched{roff, buf})
		lo, hi := max(off, roff), min(end, rend)
		copy(p[lo-off:hi-off], buf[lo-roff:hi-roff])
		pos = hi
	}
	if pos < end {
		if _, err := e.dst.ReadAt(p[pos-off:], pos); err != nil {
			return fail(fmt.Errorf("read destination: %w", err))
		}
	}
	e.mu.Lock()
	e.writeBehind++
	e.mu.Unlock()
	go func() {
		ok := true
		var n int64
		for _, f := range bufs {
			if ok {
				if _, err := e.dst.WriteAt(f.buf, f.off); err != nil {
					e.log.Warn().Err(err).Int64("off", f.off).Msg("writing fetched regions to the destination failed; they stay unhydrated")
					ok = false
				}
				n += int64(len(f.buf))
			}
			putBuf(f.buf)
		}
		e.mu.Lock()
		e.cnt.Fetched += n
		e.writeBehind--
		e.mu.Unlock()
		e.release(a, b, ok) // broadcasts
	}()
	return len(p), nil
}

// waitWriteBehind waits until no fetched region is still being written.
func (e *Engine) waitWriteBehind() {
	e.mu.Lock()
	for e.writeBehind > 0 {
		e.cond.Wait()
	}
	e.mu.Unlock()
}

// fetch copies source bytes [off,end) to the destination and returns them
// (a pooled buffer: putBuf it). The caller has claimed the regions.
func (e *Engine) fetch(off, end int64, foreground bool) ([]byte, error) {
	buf, err := e.readSource(int(end-off), off, foreground)
	if err != nil {
		return nil, err
	}
	if _, err := e.dst.WriteAt(buf, off); err != nil {
		putBuf(buf)
		return nil, fmt.Errorf("write hydrated regions to the destination at %d+%d: %w", off, end-off, err)
	}
	e.mu.Lock()
	e.cnt.Fetched += end - off
	e.mu.Unlock()
	return buf, nil
}

// readSourceInto is a foreground readSource into p.
func (e *Engine) readSourceInto(p []byte, off int64) error {
	buf, err := e.readSource(len(p), off, true)
	if err != nil {
		return err
	}
	copy(p, buf)
	putBuf(buf)
	return nil
}

// WriteAt writes to the destination. An unhydrated region only partly
// covered is first filled from the source; wholly covered ones are not
// fetched at all.
func (e *Engine) WriteAt(p []byte, off int64) (int, error) {
	if err := e.enter(); err != nil {
		return 0, err
	}
	defer e.leave()
	defer e.userChanged() // after the regions' release, which sets their bits
	e.gate.touch()
	defer e.gate.touch()
	if err := blockdev.CheckRange(off, len(p), e.size); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	end := off + int64(len(p))
	a, b := e.spanRegions(off, end)
	if e.allHydrated(a, b) {
		return e.writeDst(p, off)
	}
	if e.claim(a, b) == 0 {
		return e.writeDst(p, off)
	}
	ok := false
	defer func() { e.release(a, b, ok) }()
	e.mu.Lock()
	headPartial := off > a*e.rs && e.busy.get(a)
	tailPartial := end < e.regionOff(b) && e.busy.get(b-1)
	e.mu.Unlock()
	wOff, wEnd := off, end
	if headPartial {
		wOff = a * e.rs
	}
	if tailPartial {
		wEnd = e.regionOff(b)
	}
	data := p
	var fetched int64
	if wOff != off || wEnd != end {
		data = make([]byte, wEnd-wOff)
		if headPartial {
			hEnd := e.regionOff(a + 1)
			if err := e.readSourceInto(data[:hEnd-wOff], wOff); err != nil {
				return 0, err
			}
			fetched += hEnd - wOff
		}
		if tailPartial && (!headPartial || b-1 != a) {
			tOff := (b - 1) * e.rs
			if err := e.readSourceInto(data[tOff-wOff:], tOff); err != nil {
				return 0, err
			}
			fetched += wEnd - tOff
		}
		copy(data[off-wOff:], p)
	}
	if _, err := e.dst.WriteAt(data, wOff); err != nil {
		return 0, fmt.Errorf("write destination at %d+%d: %w", wOff, len(data), err)
	}
	e.mu.Lock()
	e.cnt.Fetched += fetched
	var whole int64
	fa, fb := e.fullRegions(off, end)
	for r := fa; r < fb; r++ {
		if e.busy.get(r) {
			whole += e.regionOff(r+1) - e.regionOff(r)
		}
	}
	e.cnt.SkippedWrite += whole
	e.mu.Unlock()
	ok = true
	return len(p), nil
}

func (e *Engine) writeDst(p []byte, off int64) (int, error) {
	n, err := e.dst.WriteAt(p, off)
	if err != nil {
		return n, fmt.Errorf("write destination at %d+%d: %w", off, len(p), err)
	}
	return n, nil
}

// Discard marks wholly covered unhydrated regions hydrated without fetching
// them and discards them on the destination. Never reaches the source. A
// partly covered region is discarded on the destination only if hydrated;
// otherwise it keeps reading the source's bytes (discarded contents are
// unspecified).
func (e *Engine) Discard(off, length int64) error {
	if err := e.enter(); err != nil {
		return err
	}
	defer e.leave()
	defer e.userChanged()
	e.gate.touch()
	defer e.gate.touch()
	if length == 0 {
		return nil
	}
	if off < 0 || length < 0 || off+length > e.size {
		return fmt.Errorf("%w: discard offset %d length %d size %d", blockdev.ErrOutOfRange, off, length, e.size)
	}
	end := off + length
	a, b := e.spanRegions(off, end)
	fa, fb := e.fullRegions(off, end)
	e.claim(a, b)
	okFull := false
	defer func() {
		e.release(a, fa, false)
		e.release(fa, fb, okFull)
		e.release(fb, b, false)
	}()
	// Partly covered edge regions ([a,fa) and [fb,b), one region each at
	// most): punch only what is already hydrated. Busy ones are ours and
	// unhydrated, so they keep the source's bytes.
	for _, r := range [][2]int64{{a, fa}, {fb, b}} {
		if r[0] >= r[1] {
			continue
		}
		e.mu.Lock()
		hyd := e.hyd.get(r[0])
		e.mu.Unlock()
		if !hyd {
			continue
		}
		lo, hi := max(off, e.regionOff(r[0])), min(end, e.regionOff(r[1]))
		if err := e.dstDiscard(lo, hi-lo); err != nil {
			return err
		}
	}
	if fa >= fb {
		return nil
	}
	fOff, fEnd := fa*e.rs, e.regionOff(fb)
	if err := e.dstDiscard(fOff, fEnd-fOff); err != nil {
		return err
	}
	e.mu.Lock()
	var skipped int64
	forWords(fa, fb, func(w int64, m uint64) {
		skipped += int64(bits.OnesCount64(e.busy[w]&m)) * e.rs
	})
	if fb == e.regions && e.busy.get(fb-1) {
		skipped -= e.regions*e.rs - e.size // the short last region
	}
	e.cnt.SkippedDiscard += skipped
	e.mu.Unlock()
	okFull = true
	return nil
}

func (e *Engine) dstDiscard(off, n int64) error {
	if n <= 0 {
		return nil
	}
	if err := e.dst.Discard(off, n); err != nil {
		return fmt.Errorf("discard destination at %d+%d: %w", off, n, err)
	}
	return nil
}

// userChanged counts a completed write or discard (failed ones too: a
// flush then commits, which is never wrong).
func (e *Engine) userChanged() {
	e.mu.Lock()
	e.userDone++
	e.mu.Unlock()
}

// Flush makes completed writes durable: the destination first, then the
// bitmap that names them. With none since the last commit it returns at
// once.
func (e *Engine) Flush() error {
	if err := e.enter(); err != nil {
		return err
	}
	defer e.leave()
	e.mu.Lock()
	clean := e.userDone == e.userCommitted.Load()
	e.mu.Unlock()
	if clean {
		return nil
	}
	e.gate.touch()
	defer e.gate.touch()
	return e.commit()
}

// commit flushes the destination and writes the bitmap if it changed.
func (e *Engine) commit() error {
	e.commitMu.Lock()
	defer e.commitMu.Unlock()
	e.mu.Lock()
	ver, userDone := e.version, e.userDone
	var snap *metaState
	var pageVer []uint64
	// A slot never written takes the whole bitmap: the first two commits
	// are written in full, whatever changed.
	if ver != e.committed || e.meta.seq == 0 || !e.meta.slotOK[0] || !e.meta.slotOK[1] {
		snap = &metaState{regionSize: e.rs, size: e.size, regions: e.regions, counters: e.cnt}
		e.meta.refresh(e.hyd, e.pageVer, ver)
		pageVer = append([]uint64(nil), e.pageVer...)
	}
	e.mu.Unlock()
	if err := e.dst.Flush(); err != nil {
		return fmt.Errorf("flush destination: %w", err)
	}
	if snap != nil {
		if err := e.meta.commit(snap, ver, pageVer); err != nil {
			return err
		}
		e.mu.Lock()
		e.committed = ver
		e.mu.Unlock()
	}
	e.userCommitted.Store(userDone)
	return nil
}

// committer commits a changed bitmap every interval (dm-clone: every second)
// and samples the hydration rate.
func (e *Engine) committer(interval time.Duration) {
	defer e.loopWG.Done()
	auto := interval > 0
	if !auto {
		interval = time.Second // still sample the rate
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-e.stop:
			return
		case <-t.C:
		case <-e.commitNow:
		}
		if !auto {
			e.mu.Lock()
			fetched := e.cnt.Fetched
			e.mu.Unlock()
			e.rate.add(time.Now(), fetched)
			continue
		}
		e.mu.Lock()
		fetched := e.cnt.Fetched
		e.mu.Unlock()
		e.rate.add(time.Now(), fetched)
		err := e.commit()
		if err == nil && !e.slotsWritten() {
			// The open's first commit wrote one slot; the other is written
			// now too, in full (at 20 GiB, 640 KiB and an fdatasync), and
			// not by the machine's first fsync after a migration's cutover.
			err = e.commit()
		}
		if err != nil {
			e.log.Error().Err(err).Msg("periodic metadata commit failed; will retry")
		}
	}
}

// slotsWritten reports whether both metadata slots hold a commit.
func (e *Engine) slotsWritten() bool {
	e.commitMu.Lock()
	defer e.commitMu.Unlock()
	return e.meta.slotOK[0] && e.meta.slotOK[1]
}

func (e *Engine) checkDone() {
	e.mu.Lock()
	complete := e.nHyd == e.regions
	e.mu.Unlock()
	if !complete {
		return
	}
	e.doneOnce.Do(func() {
		close(e.done)
		e.log.Info().Msg("clone fully hydrated")
		select {
		case e.commitNow <- struct{}{}:
		default:
		}
	})
}

// Done is closed when every region is hydrated.
func (e *Engine) Done() <-chan struct{} { return e.done }

// Stalled reports whether the source is failing, and why.
func (e *Engine) Stalled() (bool, string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.stall != "", e.stall
}

// Progress returns a snapshot of the hydration state.
func (e *Engine) Progress() Progress {
	e.mu.Lock()
	defer e.mu.Unlock()
	rate := e.rate.rate(time.Now(), e.cnt.Fetched)
	p := Progress{
		RegionSize:            e.rs,
		TotalRegions:          e.regions,
		HydratedRegions:       e.nHyd,
		HydratingRegions:      e.nBusy,
		FetchedBytes:          e.cnt.Fetched,
		SkippedDiscardBytes:   e.cnt.SkippedDiscard,
		SkippedKnownZeroBytes: e.cnt.SkippedKnownZero,
		SkippedWriteBytes:     e.cnt.SkippedWrite,
		HydrationEnabled:      e.enabled,
		RateBPS:               rate,
		Complete:              e.nHyd == e.regions,
		Stalled:               e.stall != "",
		StalledReason:         e.stall,
		Tunables:              e.tun,
	}
	if rate > 0 && !p.Complete {
		left := float64((e.regions - e.nHyd) * e.rs)
		p.ETA = time.Duration(left / rate * float64(time.Second))
	}
	return p
}

// Dissolve hands back the destination once every region is hydrated. The
// engine keeps serving in-flight and later I/O straight from the destination
// until Close, so a caller can switch its users over without a gap; Close
// then no longer closes the destination, which the caller now owns.
func (e *Engine) Dissolve() (blockdev.Device, error) {
	if err := e.enter(); err != nil {
		return nil, err
	}
	defer e.leave()
	e.mu.Lock()
	complete := e.nHyd == e.regions
	dissolved := e.dissolved
	e.mu.Unlock()
	if dissolved {
		return e.dst, nil
	}
	if !complete {
		p := e.Progress()
		return nil, fmt.Errorf("%w: %d of %d regions hydrated; wait for Done", ErrNotHydrated, p.HydratedRegions, p.TotalRegions)
	}
	e.stopBackground()
	// The committer goes too: the destination now belongs to the caller,
	// who may close it long before this engine is closed.
	e.stopCommitter()
	if err := e.commit(); err != nil {
		return nil, err
	}
	e.mu.Lock()
	e.dissolved = true
	e.mu.Unlock()
	if err := e.src.Close(); err != nil {
		e.log.Warn().Err(err).Msg("closing the source after dissolve")
	}
	e.log.Info().Msg("clone dissolved into its destination")
	return e.dst, nil
}

// stopCommitter ends the periodic commit loop and waits for it; idempotent.
func (e *Engine) stopCommitter() {
	e.stopOnce.Do(func() { close(e.stop) })
	e.loopWG.Wait()
}

// Close stops hydration, commits the bitmap and closes the devices (the
// destination only if not dissolved).
func (e *Engine) Close() error {
	e.opMu.Lock()
	if e.closed {
		e.opMu.Unlock()
		return nil
	}
	e.closed = true
	e.opMu.Unlock()
	e.stopBackground()
	e.waitWriteBehind()
	e.stopCommitter()
	e.mu.Lock()
	dissolved := e.dissolved
	e.mu.Unlock()
	var err error
	if !dissolved { // Dissolve committed the full bitmap; the destination is the caller's now
		err = e.commit()
	}
	if cerr := e.meta.close(); err == nil {
		err = cerr
	}
	if !dissolved {
		if cerr := e.src.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("close source: %w", cerr)
		}
		if cerr := e.dst.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("close destination: %w", cerr)
		}
	}
	e.log.Info().Err(err).Msg("clone closed")
	return err
}
