package dmclone

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/internal/retry"
)

// EnableHydration starts background hydration (dm-clone: enable_hydration).
func (e *Engine) EnableHydration() error {
	if err := e.enter(); err != nil {
		return err
	}
	defer e.leave()
	e.mu.Lock()
	if e.enabled || e.dissolved {
		e.mu.Unlock()
		return nil
	}
	e.enabled = true
	tun := e.tun
	e.mu.Unlock()
	e.startWorkers(tun)
	e.log.Info().Interface("tunables", tun).Msg("background hydration enabled")
	return nil
}

// DisableHydration stops background hydration; I/O still hydrates on demand.
func (e *Engine) DisableHydration() error {
	e.mu.Lock()
	was := e.enabled
	e.enabled = false
	e.mu.Unlock()
	if was {
		e.stopBackground()
		e.log.Info().Msg("background hydration disabled")
	}
	return nil
}

// SetTunables changes the background hydration's shape; running workers are
// restarted with it.
func (e *Engine) SetTunables(t Tunables) error {
	t = t.withDefaults(e.rs)
	if err := t.validate(); err != nil {
		return err
	}
	e.mu.Lock()
	e.tun = t
	enabled := e.enabled
	e.mu.Unlock()
	e.limiter.setRate(t.RateLimitBytesPerSec)
	e.gate.setMin(bgMin(t))
	if enabled {
		e.stopBackground()
		e.startWorkers(t)
	}
	return nil
}

func bgMin(t Tunables) int {
	return max(1, int(math.Ceil(float64(t.InFlight)*t.MinShare)))
}

// idleBatch is the batch of an idle machine's copies. Under a rate limit it
// is the batch: the limit sets the rate, and a worker pays for a copy after
// it (so InFlight larger copies would burst past the limit at the start).
func idleBatch(t Tunables) int {
	if t.RateLimitBytesPerSec > 0 {
		return t.BatchRegions
	}
	return max(t.BatchRegions, t.IdleBatchRegions)
}

func (e *Engine) startWorkers(t Tunables) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.bgStop != nil {
		return
	}
	stop := make(chan struct{})
	e.bgStop = stop
	for i := 0; i < t.InFlight; i++ {
		e.bgWG.Add(1)
		go e.worker(stop, t.BatchRegions, idleBatch(t))
	}
}

// stopBackground stops the workers and waits for their copies to finish.
func (e *Engine) stopBackground() {
	e.mu.Lock()
	stop := e.bgStop
	e.bgStop = nil
	if stop != nil {
		close(stop) // before the broadcast, so a woken worker sees it
	}
	e.cond.Broadcast()
	e.mu.Unlock()
	e.gate.wake()
	e.bgWG.Wait()
}

// hydrateRetryMax caps the background retry delay (before jitter).
const hydrateRetryMax = 2 * time.Second

// worker copies batches of contiguous unhydrated regions until everything is
// hydrated or it is stopped: idleBatch regions at a time while no foreground
// I/O has come from the machine for IdleAfter, batch otherwise.
func (e *Engine) worker(stop chan struct{}, batch, idleBatch int) {
	defer e.bgWG.Done()
	// Capped at a few seconds and jittered: when a lost source comes back,
	// hydration resumes within seconds, and workers do not retry in step.
	bo := retry.New(100*time.Millisecond, hydrateRetryMax)
	for {
		select {
		case <-stop:
			return
		default:
		}
		// Wait for a source slot before claiming, so a waiting worker holds
		// no region a foreground request may need.
		if !e.gate.bgAcquire(stop) {
			return
		}
		n := batch
		if idleBatch > batch && e.gate.idleFor(IdleAfter) {
			n = idleBatch
		}
		a, b, ok := e.pickBatch(stop, int64(n))
		if !ok {
			e.gate.bgRelease()
			return
		}
		off, end := e.regionOff(a), e.regionOff(b)
		e.allocateAhead(off, end)
		err := e.copyBatch(off, end)
		e.gate.bgRelease()
		if err != nil {
			e.release(a, b, false)
			d := bo.Next()
			e.log.Warn().Err(err).Dur("retry_in", d).Msg("background hydration failed")
			t := time.NewTimer(d)
			select {
			case <-stop:
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		bo.Reset()
		e.release(a, b, true)
		// Pay for the bytes afterwards (shared pacing across workers), so a
		// short batch in fragmented space costs only what it fetched.
		if !e.limiter.wait(end-off, stop) {
			return
		}
	}
}

// pickBatch claims up to n contiguous unhydrated, idle regions from the
// cursor on. It waits while every unhydrated region is busy and returns
// false when all are hydrated or stop is closed.
func (e *Engine) pickBatch(stop chan struct{}, n int64) (int64, int64, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for {
		select {
		case <-stop:
			return 0, 0, false
		default:
		}
		if e.nHyd == e.regions {
			return 0, 0, false
		}
		wrapped := false
		i := e.cursor
		for {
			i = e.hyd.nextClear(i, e.regions)
			for i < e.regions && e.busy.get(i) {
				i = e.hyd.nextClear(i+1, e.regions)
			}
			if i < e.regions || wrapped {
				break
			}
			wrapped = true
			i = 0
		}
		if i < e.regions {
			j := i + 1
			for j < e.regions && j-i < n && !e.hyd.get(j) && !e.busy.get(j) {
				j++
			}
			forWords(i, j, func(w int64, m uint64) { e.busy[w] |= m })
			e.nBusy += j - i
			e.cursor = j
			return i, j, true
		}
		// Everything left is being copied by someone else; wait for a release.
		e.cond.Wait()
	}
}

// fder is a device backed by a file descriptor (blockdev.File).
type fder interface{ Fd() uintptr }

// copyBatch copies source [off,end) to the destination for the background
// hydration. When both ends are regular files it uses copy_file_range, so
// the bytes never leave the kernel (what cp does); otherwise, and if the
// kernel refuses, it reads into memory and writes.
func (e *Engine) copyBatch(off, end int64) error {
	if e.direct.Load() {
		err := e.copyDirect(off, end)
		if err == nil {
			e.mu.Lock()
			e.cnt.Fetched += end - off
			e.bgFetched += end - off
			if e.stall != "" {
				e.log.Info().Msg("source reads succeed again; no longer stalled")
			}
			e.stall = ""
			e.mu.Unlock()
			return nil
		}
		if !errors.Is(err, errNoDirect) {
			e.log.Warn().Err(err).Msg("in-kernel copy failed; falling back to read and write")
		}
		e.direct.Store(false)
	}
	buf, err := e.fetch(off, end, false)
	if err != nil {
		return err
	}
	putBuf(buf)
	e.mu.Lock()
	e.bgFetched += end - off
	e.mu.Unlock()
	return nil
}

var errNoDirect = errors.New("in-kernel copy not supported between these files")

func (e *Engine) copyDirect(off, end int64) error {
	sf, ok1 := e.src.(fder)
	df, ok2 := e.dst.(fder)
	if !ok1 || !ok2 {
		return errNoDirect
	}
	so, do := off, off
	for so < end {
		n, err := unix.CopyFileRange(int(sf.Fd()), &so, int(df.Fd()), &do, int(end-so), 0)
		switch {
		case err == unix.EXDEV || err == unix.EINVAL || err == unix.ENOSYS || err == unix.EOPNOTSUPP || err == unix.EBADF:
			return errNoDirect
		case err != nil:
			return fmt.Errorf("copy_file_range at %d: %w", so, err)
		case n == 0:
			return fmt.Errorf("copy_file_range at %d: source ended early", so)
		}
	}
	return nil
}

// readSource reads n bytes at off from the source with bounded retries and
// a timeout per attempt, into a pooled buffer the caller owns (putBuf it).
// After the last failure the engine is marked stalled with the reason and
// the error is returned; a later success clears the stall.
func (e *Engine) readSource(n int, off int64, foreground bool) ([]byte, error) {
	if foreground {
		t0 := time.Now()
		e.gate.fgAcquire()
		defer e.gate.fgRelease()
		defer func() {
			took := time.Since(t0)
			e.mu.Lock()
			e.fg.Count++
			e.fg.Bytes += int64(n)
			e.fg.Wait += took
			e.mu.Unlock()
			e.log.Debug().Int64("off", off).Int("len", n).Dur("took", took).Msg("fetched on demand")
		}()
	}
	var last error
	bo := retry.New(20*time.Millisecond, time.Second)
	// A foreground read (the machine is waiting on it) has one budget for
	// all its attempts; background copies retry on their own schedule.
	var deadline time.Time
	if foreground {
		deadline = time.Now().Add(e.fgWait)
	}
	attempts := 0
	for attempt := 0; attempt <= e.retries; attempt++ {
		timeout := e.timeout
		if foreground {
			left := time.Until(deadline)
			if attempt > 0 {
				d := bo.Next()
				if d >= left {
					break
				}
				time.Sleep(d)
				left -= d
			}
			if timeout <= 0 || timeout > left {
				timeout = left
			}
		} else if attempt > 0 {
			time.Sleep(bo.Next())
		}
		attempts++
		buf, err := e.readSourceOnce(n, off, timeout)
		if err == nil {
			e.mu.Lock()
			if e.stall != "" {
				e.log.Info().Msg("source reads succeed again; no longer stalled")
			}
			e.stall = ""
			e.mu.Unlock()
			return buf, nil
		}
		last = err
		if errors.Is(err, blockdev.ErrOutOfRange) || errors.Is(err, blockdev.ErrClosed) {
			break
		}
	}
	reason := fmt.Sprintf("source read at %d+%d failed after %d attempts: %v", off, n, attempts, last)
	e.mu.Lock()
	if e.stall == "" {
		e.log.Error().Str("reason", reason).Msg("clone stalled")
	}
	e.stall = reason
	e.mu.Unlock()
	return nil, fmt.Errorf("%s (check the source's connection; hydration resumes when it answers): %w", reason, last)
}

// readSourceOnce is one attempt; a source that does not answer within the
// timeout counts as failed. A timed-out attempt's buffer is abandoned to
// the late reader, never reused.
func (e *Engine) readSourceOnce(n int, off int64, timeout time.Duration) ([]byte, error) {
	buf := getBuf(n)
	if timeout <= 0 {
		if _, err := e.src.ReadAt(buf, off); err != nil {
			putBuf(buf)
			return nil, err
		}
		return buf, nil
	}
	res := make(chan error, 1)
	go func() {
		_, err := e.src.ReadAt(buf, off)
		res <- err
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case err := <-res:
		if err != nil {
			putBuf(buf)
			return nil, err
		}
		return buf, nil
	case <-t.C:
		return nil, fmt.Errorf("source did not answer within %v", timeout)
	}
}

// gate gives foreground source reads priority: while any is in flight,
// background copies are held to min at once (never zero, so a busy workload
// cannot starve hydration). It also notes when the machine's I/O last came
// or went, so the workers can tell an idle machine from a busy one.
type gate struct {
	mu       sync.Mutex
	cond     *sync.Cond
	fgActive int
	bgActive int
	min      int

	base   time.Time    // lastIO counts from here, on the monotonic clock
	lastIO atomic.Int64 // nanoseconds after base of the machine's last I/O
}

func newGate() *gate {
	g := &gate{min: 1, base: time.Now()}
	g.cond = sync.NewCond(&g.mu)
	g.lastIO.Store(math.MinInt64 / 2) // none yet: idle from the start
	return g
}

// touch notes the machine's I/O (any read, write, discard or flush).
func (g *gate) touch() { g.lastIO.Store(int64(time.Since(g.base))) }

// idleFor reports whether no foreground source read is in flight and the
// machine has done no I/O for d.
func (g *gate) idleFor(d time.Duration) bool {
	if time.Since(g.base)-time.Duration(g.lastIO.Load()) < d {
		return false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.fgActive == 0
}

func (g *gate) setMin(n int) {
	g.mu.Lock()
	g.min = n
	g.cond.Broadcast()
	g.mu.Unlock()
}

func (g *gate) fgAcquire() {
	g.mu.Lock()
	g.fgActive++
	g.mu.Unlock()
}

func (g *gate) fgRelease() {
	g.mu.Lock()
	g.fgActive--
	g.cond.Broadcast()
	g.mu.Unlock()
}

func (g *gate) bgAcquire(stop chan struct{}) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.fgActive > 0 && g.bgActive >= g.min {
		select {
		case <-stop:
			return false
		default:
		}
		g.cond.Wait()
	}
	g.bgActive++
	return true
}

func (g *gate) bgRelease() {
	g.mu.Lock()
	g.bgActive--
	g.cond.Broadcast()
	g.mu.Unlock()
}

func (g *gate) wake() {
	g.mu.Lock()
	g.cond.Broadcast()
	g.mu.Unlock()
}

// limiter paces background bytes to a rate (0 = unlimited).
type limiter struct {
	mu   sync.Mutex
	rate int64
	next time.Time
}

func (l *limiter) setRate(r int64) {
	l.mu.Lock()
	l.rate = r
	l.next = time.Time{}
	l.mu.Unlock()
}

// wait blocks until n bytes may be fetched; false if stopped first.
func (l *limiter) wait(n int64, stop chan struct{}) bool {
	l.mu.Lock()
	if l.rate <= 0 {
		l.mu.Unlock()
		return true
	}
	now := time.Now()
	at := l.next
	if at.Before(now) {
		at = now
	}
	l.next = at.Add(time.Duration(float64(n) / float64(l.rate) * float64(time.Second)))
	l.mu.Unlock()
	d := time.Until(at)
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-stop:
		return false
	}
}

// rateMeter estimates bytes fetched per second over the last few samples.
type rateMeter struct {
	mu      sync.Mutex
	samples []rateSample
}

type rateSample struct {
	t time.Time
	n int64
}

func (r *rateMeter) add(t time.Time, n int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.samples = append(r.samples, rateSample{t, n})
	if len(r.samples) > 10 {
		r.samples = r.samples[len(r.samples)-10:]
	}
}

// rate is the bytes per second from the oldest kept sample to (now, n).
func (r *rateMeter) rate(now time.Time, n int64) float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.samples) == 0 {
		return 0
	}
	first := r.samples[0]
	dt := now.Sub(first.t).Seconds()
	if dt < 0.05 {
		return 0
	}
	return float64(n-first.n) / dt
}

// Buffers are pooled by power-of-two size class (up to 4 MiB, the default
// idle batch), so 4 KiB foreground fetches and 1 MiB background batches do
// not evict each other.
const maxPooledClass = 22

var bufPools [maxPooledClass + 1]sync.Pool

// getBuf returns a buffer of n bytes.
func getBuf(n int) []byte {
	c := bits.Len(uint(max(n, 1) - 1))
	if c > maxPooledClass {
		return make([]byte, n)
	}
	if b, ok := bufPools[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 1<<c)
}

func putBuf(b []byte) {
	c := bits.Len(uint(cap(b) - 1))
	if cap(b) == 0 || c > maxPooledClass || cap(b) != 1<<c {
		return
	}
	bufPools[c].Put(&b)
}
