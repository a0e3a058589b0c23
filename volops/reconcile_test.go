package volops

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
)

// recordingBackend is a unit-test data path whose volumes live under a
// temporary folder; it records what it is asked to do.
type recordingBackend struct {
	datapath.Backend
	dir string
	mu  sync.Mutex
	did []string
}

func (b *recordingBackend) add(op string) {
	b.mu.Lock()
	b.did = append(b.did, op)
	b.mu.Unlock()
}
func (b *recordingBackend) ops() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.did)
}
func (b *recordingBackend) VolumeDir(vol string) string { return filepath.Join(b.dir, vol) }
func (b *recordingBackend) Remove(_ context.Context, vol string) error {
	b.add("remove " + vol)
	return os.RemoveAll(b.VolumeDir(vol))
}
func (b *recordingBackend) Capabilities() datapath.Capabilities {
	b.add("capabilities") // asked first by Extend (this one cannot extend)
	return datapath.Capabilities{Name: "recording"}
}

func TestReconcileGuardsGrowthAndRemovesDestroyed(t *testing.T) {
	b := &recordingBackend{dir: t.TempDir()}
	o := New(zerolog.Nop(), "w1", nil, nil, b, nil, nil)
	for _, v := range []string{"gone", "elsewhere"} {
		if err := os.MkdirAll(b.VolumeDir(v), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	layout := &fsm.LUKSLayout{}
	vols := []*fsm.Volume{
		{ID: "gone", Worker: "w1", State: fsm.VolDestroyed},
		{ID: "elsewhere", Worker: "w2", State: fsm.VolDestroyed},
		{ID: "../escape", Worker: "w1", State: fsm.VolDestroyed},
		{ID: "grow", Worker: "w1", State: fsm.VolCreated, Size: 1, WantSize: 2, Layout: layout, AttachedMachine: "m1"},
	}
	var guarded []string
	skip := func(machine string, fn func()) { guarded = append(guarded, machine) } // m1 is migrating
	o.Reconcile(context.Background(), vols, nil, skip)
	if got := b.ops(); !slices.Equal(got, []string{"remove gone"}) {
		t.Fatalf("data path did %q, want only the destroyed volume of this worker removed (and no growth of a migrating machine's volume)", got)
	}
	if !slices.Equal(guarded, []string{"m1"}) {
		t.Fatalf("growth guarded for %q, want m1", guarded)
	}
	run := func(machine string, fn func()) { fn() }
	o.Reconcile(context.Background(), vols[3:], nil, run)
	if got := b.ops(); len(got) < 2 || got[1] != "capabilities" {
		t.Fatalf("data path did %q, want the growth tried once the guard lets it", got)
	}
}

func TestReconcileJobRunsOnceAtATimePerVolume(t *testing.T) {
	o := New(zerolog.Nop(), "w1", nil, nil, &recordingBackend{dir: t.TempDir()}, nil, nil)
	release := make(chan struct{})
	var mu sync.Mutex
	runs := 0
	fn := func(context.Context, *fsm.Volume) {
		mu.Lock()
		runs++
		mu.Unlock()
		<-release
	}
	v := &fsm.Volume{ID: "f1"}
	for range 3 {
		o.job(context.Background(), v, fn)
	}
	if !o.jobBusy("f1") {
		t.Fatal("a running job is not reported busy")
	}
	close(release)
	o.WaitJobs()
	if o.jobBusy("f1") || runs != 1 {
		t.Fatalf("busy %v after the job ended, ran %d times; want false, 1", o.jobBusy("f1"), runs)
	}
	// Once it ended, the next pass may start it again.
	o.job(context.Background(), v, fn)
	o.WaitJobs()
	if runs != 2 {
		t.Fatalf("ran %d times, want 2", runs)
	}
}
