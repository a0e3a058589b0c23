package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

func TestPrintDrainPlanNamesReasons(t *testing.T) {
	var b bytes.Buffer
	printDrainPlan(&b, &api.DrainPlan{Worker: "a",
		Placements: []api.Placement{{Machine: "m1", Bytes: 10 << 30, Target: "b", Reason: "least loaded of 2 with room: 0/2 inbound"}},
		Unplaced:   []api.Unplaced{{Machine: "m2", Bytes: 120 << 30, Reason: "no worker has 132 GiB free (volume 120 GiB + margin 12 GiB)"}},
	}, api.DrainRequest{})
	out := b.String()
	for _, want := range []string{"1 machines placed, 1 without a target", "m1", "-> b", "least loaded", "m2", "(none)", "no worker has 132 GiB free", "at most 2 at a time"} {
		if !strings.Contains(out, want) {
			t.Errorf("plan output lacks %q:\n%s", want, out)
		}
	}
}

func TestPrintDrainsShowsWaitingAndLeft(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	var b bytes.Buffer
	printDrains(&b, []*fsm.Drain{
		{ID: "d-old", Worker: "w1", State: fsm.DrainDeadline, CreatedAt: now.Add(-2 * time.Hour), Deadline: now.Add(-time.Hour),
			Left: []fsm.DrainLeft{{Machine: "m9", Reason: "not started before the deadline"}}},
		{ID: "d-new", Worker: "w2", State: fsm.DrainRunning, CreatedAt: now.Add(-time.Minute), Deadline: now.Add(59 * time.Minute),
			Started: map[string]string{"m1": "x"}, Waiting: map[string]string{"m2": "no worker has 132 GiB free"}},
	}, now)
	out := b.String()
	if i, j := strings.Index(out, "d-new"), strings.Index(out, "d-old"); i < 0 || j < 0 || i > j {
		t.Fatalf("running drains first:\n%s", out)
	}
	for _, want := range []string{"deadline in 59m", "waiting m2: no worker has 132 GiB free", "left m9: not started before the deadline", "started 1, waiting 1"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
}
