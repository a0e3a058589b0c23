package volops

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/stepmark"
)

// fakeTrim is a unit-test stand-in for fstrim: it counts its runs, fails
// while fail is set and, while hold is set, runs until its context ends
// (a hung fstrim killed at its deadline).
type fakeTrim struct {
	runs    atomic.Int32
	fail    atomic.Bool
	hold    atomic.Bool
	started chan struct{} // receives once per run, if set
}

func (f *fakeTrim) trim(ctx context.Context, mnt string) (string, error) {
	f.runs.Add(1)
	if f.started != nil {
		f.started <- struct{}{}
	}
	if f.hold.Load() {
		<-ctx.Done()
		return "", ctx.Err()
	}
	if f.fail.Load() {
		return "", errors.New("fstrim: FITRIM ioctl failed")
	}
	return mnt + ": 1 GiB trimmed", nil
}

func newTestTrims(t *testing.T, marks stepmark.Dir, f *fakeTrim) *Trims {
	tr := NewTrims(marks, f.trim, time.Minute)
	tr.Wait = 50 * time.Millisecond
	t.Cleanup(tr.WaitAll)
	return tr
}

func TestTrimRunsOncePerMigration(t *testing.T) {
	marks := stepmark.Dir(filepath.Join(t.TempDir(), "steps"))
	f := &fakeTrim{}
	f.hold.Store(true)
	tr := newTestTrims(t, marks, f)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for range 5 {
		wg.Go(func() { tr.Start(ctx, zerolog.Nop(), "mig-1", "/mnt/m1") })
	}
	wg.Wait()
	cancel() // the held trim ends (failed: not recorded)
	tr.WaitAll()
	if n := f.runs.Load(); n != 1 {
		t.Fatalf("fstrim ran %d times for one migration started 5 times, want 1", n)
	}

	f.hold.Store(false)
	// Its record is fsynced: on a loaded disk that outlasts the 50 ms the
	// hung-trim cases wait.
	tr.Wait = 30 * time.Second
	tr.Start(context.Background(), zerolog.Nop(), "mig-2", "/mnt/m2")
	if ended, err := tr.WaitFor(context.Background(), "mig-2"); err != nil || !ended {
		t.Fatalf("WaitFor = %v, %v; want true, nil", ended, err)
	}
	if !marks.Done("mig-2", trimMark) {
		t.Fatal("a successful trim was not recorded")
	}
	tr.Start(context.Background(), zerolog.Nop(), "mig-2", "/mnt/m2")
	tr.WaitAll()
	if n := f.runs.Load(); n != 2 {
		t.Fatalf("fstrim ran %d times in all, want 2 (a recorded trim is not run again)", n)
	}
}

func TestTrimFailedIsRunAgainBeforeHydration(t *testing.T) {
	marks := stepmark.Dir(filepath.Join(t.TempDir(), "steps"))
	f := &fakeTrim{}
	f.fail.Store(true)
	tr := newTestTrims(t, marks, f)
	tr.Start(context.Background(), zerolog.Nop(), "mig-1", "/mnt/m1")
	tr.WaitAll()
	if marks.Done("mig-1", trimMark) {
		t.Fatal("a failed trim was recorded done")
	}
	f.fail.Store(false)
	if err := tr.BeforeHydration(context.Background(), zerolog.Nop(), "mig-1", "/mnt/m1"); err != nil {
		t.Fatal(err)
	}
	if n := f.runs.Load(); n != 2 || !marks.Done("mig-1", trimMark) {
		t.Fatalf("fstrim ran %d times (want 2), recorded %v (want true)", n, marks.Done("mig-1", trimMark))
	}
	// A trim that fails again only costs fetching free blocks.
	f.fail.Store(true)
	if err := tr.BeforeHydration(context.Background(), zerolog.Nop(), "mig-2", "/mnt/m2"); err != nil {
		t.Fatalf("a trim failing before hydration held it back: %v", err)
	}
}

func TestTrimHungIsWaitedForAtMostTheBound(t *testing.T) {
	marks := stepmark.Dir(filepath.Join(t.TempDir(), "steps"))
	f := &fakeTrim{started: make(chan struct{}, 4)}
	f.hold.Store(true)
	tr := newTestTrims(t, marks, f)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tr.Start(ctx, zerolog.Nop(), "mig-1", "/mnt/m1")
	<-f.started
	t0 := time.Now()
	if err := tr.BeforeHydration(context.Background(), zerolog.Nop(), "mig-1", "/mnt/m1"); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(t0); took < tr.Wait || took > tr.Wait+2*time.Second {
		t.Fatalf("hydration waited %v for a hung trim, want about %v", took, tr.Wait)
	}
	if n := f.runs.Load(); n != 1 {
		t.Fatalf("fstrim ran %d times, want 1 (no second one beside the hung one)", n)
	}
	if ended, err := tr.WaitFor(context.Background(), "mig-1"); ended || err != nil {
		t.Fatalf("WaitFor on a hung trim = %v, %v; want false, nil", ended, err)
	}
}

func TestTrimRecordedIsNotRunAfterRestart(t *testing.T) {
	marks := stepmark.Dir(filepath.Join(t.TempDir(), "steps"))
	f := &fakeTrim{}
	tr := newTestTrims(t, marks, f)
	tr.Start(context.Background(), zerolog.Nop(), "mig-1", "/mnt/m1")
	tr.WaitAll()
	// A restarted agent: new Trims over the same markers.
	again := newTestTrims(t, stepmark.Dir(string(marks)), f)
	again.Start(context.Background(), zerolog.Nop(), "mig-1", "/mnt/m1")
	if err := again.BeforeHydration(context.Background(), zerolog.Nop(), "mig-1", "/mnt/m1"); err != nil {
		t.Fatal(err)
	}
	again.WaitAll()
	if n := f.runs.Load(); n != 1 {
		t.Fatalf("fstrim ran %d times, want 1 (recorded done before the restart)", n)
	}
	// Not recorded (the restart came before it ended): run before hydration.
	if err := again.BeforeHydration(context.Background(), zerolog.Nop(), "mig-2", "/mnt/m2"); err != nil {
		t.Fatal(err)
	}
	if n := f.runs.Load(); n != 2 || !marks.Done("mig-2", trimMark) {
		t.Fatalf("fstrim ran %d times (want 2), recorded %v", n, marks.Done("mig-2", trimMark))
	}
}

func TestTrimWaitEndsWithContext(t *testing.T) {
	marks := stepmark.Dir(filepath.Join(t.TempDir(), "steps"))
	f := &fakeTrim{started: make(chan struct{}, 4)}
	f.hold.Store(true)
	tr := newTestTrims(t, marks, f)
	tr.Wait = time.Minute
	run, stop := context.WithCancel(context.Background())
	defer stop()
	tr.Start(run, zerolog.Nop(), "mig-1", "/mnt/m1")
	<-f.started

	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(20*time.Millisecond, cancel)
	if err := tr.BeforeHydration(ctx, zerolog.Nop(), "mig-1", "/mnt/m1"); !errors.Is(err, context.Canceled) {
		t.Fatalf("BeforeHydration waiting on a trim = %v, want context.Canceled", err)
	}
	// Cancelled while running the trim again itself.
	ctx2, cancel2 := context.WithCancel(context.Background())
	time.AfterFunc(20*time.Millisecond, cancel2)
	if err := tr.BeforeHydration(ctx2, zerolog.Nop(), "mig-2", "/mnt/m2"); !errors.Is(err, context.Canceled) {
		t.Fatalf("BeforeHydration running a trim = %v, want context.Canceled", err)
	}
	if marks.Done("mig-2", trimMark) {
		t.Fatal("a cancelled trim was recorded done")
	}
}
