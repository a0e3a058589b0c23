package volops

import (
	"testing"
	"time"
)

func TestProgressWatch(t *testing.T) {
	var w ProgressWatch
	t0 := time.Unix(1000, 0)
	if w.Stuck(t0, 10, time.Second) {
		t.Fatal("stuck at the first sample")
	}
	if w.Stuck(t0.Add(500*time.Millisecond), 10, time.Second) {
		t.Fatal("stuck before the threshold")
	}
	if !w.Stuck(t0.Add(time.Second), 10, time.Second) {
		t.Fatal("not stuck after a second without progress")
	}
	if w.Stuck(t0.Add(2*time.Second), 11, time.Second) {
		t.Fatal("stuck right after progress")
	}
	if !w.Since().Equal(t0.Add(2 * time.Second)) {
		t.Fatalf("last progress at %v, want %v", w.Since(), t0.Add(2*time.Second))
	}
}
