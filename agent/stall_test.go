package agent

import (
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/datapath"
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

func TestNoProgressReason(t *testing.T) {
	// A temp dir has far less free space than an exabyte to hydrate.
	r := noProgressReason(t.TempDir(), &datapath.Progress{TotalBytes: 1 << 60}, 30*time.Second)
	if !strings.Contains(r, "no space left") {
		t.Fatalf("reason %q does not name the full disk", r)
	}
	r = noProgressReason(t.TempDir(), &datapath.Progress{TotalBytes: 4096, HydratedBytes: 4096}, 30*time.Second)
	if !strings.Contains(r, "no progress for 30s") {
		t.Fatalf("reason %q", r)
	}
}
