package volops

import (
	"context"
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// TrimMarks records, durably, the migrations whose clone was trimmed
// (stepmark.Dir): a trim recorded done is not run again, also after the
// agent restarted.
type TrimMarks interface {
	Done(migration, what string) bool
	Mark(migration, what string) error
}

// TrimFunc discards the unused blocks of the filesystem mounted at mnt
// (Ops.Trim) and returns what the tool reported.
type TrimFunc func(ctx context.Context, mnt string) (string, error)

// trimMark is the step marker of a migration's successful trim.
const trimMark = "fstrim"

// DefaultTrimWait bounds how long hydration waits for a trim (the trim
// step's, still running, or one run again): a hung fstrim must not hold the
// copy back, it only costs fetching free blocks too.
const DefaultTrimWait = 30 * time.Second

// Trims runs the fstrim of each migration's clone, one per agent. A trim is
// a hint (free blocks need no fetch) that only the background copy needs,
// so the agent starts it after cutover, once the machine's start-up reads
// are over (HeadStart): run inside the pause, or beside the cutover and the
// machine's start, it lengthened the machine's pause by about its own
// length (55-65 ms at 20 GiB). It runs beside the machine, which is safe:
// ext4 discards only free blocks and holds each while it discards it, and
// the clone treats a discard like a full write. Hydration starts only once
// it ended (BeforeHydration), so no free block is fetched that the trim
// would have spared.
type Trims struct {
	marks TrimMarks
	trim  TrimFunc
	// Timeout bounds a background trim (the agent's step timeout).
	Timeout time.Duration
	// Wait bounds how long BeforeHydration and Wait wait for a trim
	// (DefaultTrimWait).
	Wait time.Duration

	wg sync.WaitGroup
	// running holds the trims Start began (migration id -> a channel
	// closed when it ended): hydration and a teardown wait for them.
	running sync.Map
}

// NewTrims makes the trims of one agent: trim does the work, marks records
// each success, timeout bounds a background trim.
func NewTrims(marks TrimMarks, trim TrimFunc, timeout time.Duration) *Trims {
	return &Trims{marks: marks, trim: trim, Timeout: timeout, Wait: DefaultTrimWait}
}

// Start runs fstrim on migration id's clone mounted at mnt in the
// background, once per process, unless a trim of it was recorded done;
// success is recorded. The trim runs under parent (the agent's run
// context, not the step's: it outlives the step), bounded by Timeout.
func (t *Trims) Start(parent context.Context, log zerolog.Logger, id, mnt string) {
	if t.marks.Done(id, trimMark) {
		return
	}
	ended := make(chan struct{})
	if _, running := t.running.LoadOrStore(id, ended); running {
		return
	}
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		defer close(ended)
		ctx, cancel := context.WithTimeout(parent, t.Timeout)
		defer cancel()
		t0 := time.Now()
		out, err := t.trim(ctx, mnt)
		if err != nil {
			log.Warn().Err(err).Msg("fstrim failed; tried again before hydration starts")
			return
		}
		if err := t.marks.Mark(id, trimMark); err != nil {
			log.Warn().Err(err).Msg("recording the trim")
		}
		log.Info().Str("fstrim", out).Dur("took", time.Since(t0)).Msg("trimmed")
	}()
}

// WaitFor waits up to Wait for the trim this process started for migration
// id, if any; it reports whether none is still running. A teardown calls it
// first: a trim still running holds the mount; one that hangs fails once
// the teardown abandons the volume.
func (t *Trims) WaitFor(ctx context.Context, id string) (bool, error) {
	v, ok := t.running.Load(id)
	if !ok {
		return true, nil
	}
	timer := time.NewTimer(t.Wait)
	defer timer.Stop()
	select {
	case <-v.(chan struct{}):
		t.running.Delete(id)
		return true, nil
	case <-timer.C:
		return false, nil
	case <-ctx.Done():
		return false, ctx.Err()
	}
}

// BeforeHydration makes sure migration id's clone, mounted at mnt, was
// trimmed before the background copy starts: it waits for the trim step's
// fstrim, or runs fstrim now when this process did not (it restarted since)
// or it failed. A trim that fails again is logged: hydration then fetches
// free blocks too. Only ctx ending is an error.
func (t *Trims) BeforeHydration(ctx context.Context, log zerolog.Logger, id, mnt string) error {
	ended, err := t.WaitFor(ctx, id)
	if err != nil {
		return err
	}
	if !ended {
		log.Warn().Dur("waited", t.Wait).Msg("fstrim still running; hydration starts beside it and may fetch free blocks")
		return nil
	}
	if t.marks.Done(id, trimMark) {
		return nil
	}
	tctx, cancel := context.WithTimeout(ctx, t.Wait)
	out, err := t.trim(tctx, mnt)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return err
		}
		log.Warn().Err(err).Msg("fstrim failed again; hydration fetches the free blocks too")
		return nil
	}
	if err := t.marks.Mark(id, trimMark); err != nil {
		log.Warn().Err(err).Msg("recording the trim")
	}
	log.Info().Str("fstrim", out).Msg("trimmed before hydration")
	return nil
}

// WaitAll waits for every background trim to end; the agent calls it on
// the way out, once its run context (the trims' parent) ended.
func (t *Trims) WaitAll() { t.wg.Wait() }
