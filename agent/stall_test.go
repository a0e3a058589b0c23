package agent

import (
	"testing"
	"time"
)

func TestProgressWatch(t *testing.T) {
	var w progressWatch
	t0 := time.Unix(1000, 0)
	if w.stuck(t0, 10, time.Second) {
		t.Fatal("stuck at the first sample")
	}
	if w.stuck(t0.Add(500*time.Millisecond), 10, time.Second) {
		t.Fatal("stuck before the threshold")
	}
	if !w.stuck(t0.Add(time.Second), 10, time.Second) {
		t.Fatal("not stuck after a second without progress")
	}
	if w.stuck(t0.Add(2*time.Second), 11, time.Second) {
		t.Fatal("stuck right after progress")
	}
}
