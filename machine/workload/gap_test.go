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
	if got < truth-20*time.Millisecond || got > truth+100*time.Millisecond {
		t.Fatalf("longest gap %v, the writer paused at most %v", got, truth)
	}
	// Stop is idempotent, and the open gap counts once the machine is silent.
	if again := g.Stop(); again < got {
		t.Fatalf("second Stop %v < first %v", again, got)
	}
}
