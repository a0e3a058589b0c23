package workload

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestGapWatchMeasuresTheLongestPause(t *testing.T) {
	ack := filepath.Join(t.TempDir(), "ack.log")
	f, err := os.Create(ack)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	g := WatchGaps(ack, time.Millisecond)
	// The writer's own longest interval is the truth (sleeps overshoot on
	// a loaded machine).
	n, prev, truth := 0, time.Now(), time.Duration(0)
	write := func(pause time.Duration) {
		time.Sleep(pause)
		n++
		fmt.Fprintf(f, "%d\n", n)
		truth = max(truth, time.Since(prev))
		prev = time.Now()
	}
	for range 5 {
		write(10 * time.Millisecond)
	}
	write(150 * time.Millisecond) // the pause to find
	for range 5 {
		write(10 * time.Millisecond)
	}
	time.Sleep(5 * time.Millisecond)
	got := g.Stop()
	// Loose bounds: the 1 ms watcher may be descheduled on a loaded host
	// (it then sees a write late), and the other gaps are 10 ms.
	if got < truth-60*time.Millisecond || got > truth+150*time.Millisecond {
		t.Fatalf("longest gap %v, the writer paused at most %v", got, truth)
	}
	// Stop is idempotent, and the open gap counts once the machine is silent.
	if again := g.Stop(); again < got {
		t.Fatalf("second Stop %v < first %v", again, got)
	}
}

// PauseAround finds the records on both sides of a moment by the times
// stamped in them, and refuses a file with no record after it.
func TestPauseAround(t *testing.T) {
	path := filepath.Join(t.TempDir(), RecordsFile)
	t0 := time.Unix(1000, 0)
	var b []byte
	for i, at := range []time.Duration{0, 5, 10, 300, 305} {
		b = append(b, encode(uint64(i+1), t0.Add(at*time.Millisecond), "w")...)
	}
	b = append(b, 1, 2, 3) // a torn tail
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	last, first, err := PauseAround(path, t0.Add(100*time.Millisecond))
	if err != nil || !last.Equal(t0.Add(10*time.Millisecond)) || !first.Equal(t0.Add(300*time.Millisecond)) {
		t.Fatalf("PauseAround = %v, %v, %v; want +10ms and +300ms", last, first, err)
	}
	if _, _, err := PauseAround(path, t0.Add(time.Second)); err == nil {
		t.Fatal("no record after the moment, yet no error")
	}
}
