package placement

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

var now = time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)

func worker(name string, freeGiB int64) fsm.Worker {
	return fsm.Worker{Name: name, LeaseExpiry: now.Add(time.Minute),
		Report: &fsm.WorkerReport{FreeBytes: freeGiB << 30, TotalBytes: 1 << 40, SlotsIn: 4, SlotsOut: 8}}
}

// input: a source holding n machines of sizeGiB each, and the given targets.
func input(n int, sizeGiB int64, targets ...fsm.Worker) Input {
	src := worker("src", 0)
	in := Input{Now: now, Source: src, Workers: append([]fsm.Worker{src}, targets...), Volumes: map[string]fsm.Volume{}}
	for i := range n {
		id := fmt.Sprintf("m%02d", i)
		in.Machines = append(in.Machines, fsm.Machine{ID: id, Worker: "src", Volume: "v" + id})
		in.Volumes["v"+id] = fsm.Volume{ID: "v" + id, Worker: "src", Size: sizeGiB << 30, State: fsm.VolCreated}
	}
	return in
}

func TestNoRoomNamesTheConstraint(t *testing.T) {
	in := input(1, 120, worker("a", 80), worker("b", 100))
	placed, waiting := Plan(in, Options{Whole: true})
	if len(placed) != 0 || len(waiting) != 1 {
		t.Fatalf("placed %v waiting %v", placed, waiting)
	}
	want := "no worker has 132 GiB free (volume 120 GiB + margin 12 GiB); most free: 100 GiB on b"
	if waiting[0].Reason != want {
		t.Fatalf("reason %q, want %q", waiting[0].Reason, want)
	}
}

func TestRoomCountsRunningInbound(t *testing.T) {
	// b reports 290 GiB free but a 250 GiB volume is on its way there.
	in := input(1, 40, worker("b", 290))
	in.Volumes["big"] = fsm.Volume{ID: "big", Size: 250 << 30}
	in.Active = []*fsm.Migration{{ID: "x", Volume: "big", Source: "other", Target: "b", State: fsm.Hydrating}}
	if placed, waiting := Plan(in, Options{Whole: true}); len(placed) != 0 || !strings.Contains(waiting[0].Reason, "no worker has 44 GiB free") {
		t.Fatalf("placed %v waiting %v", placed, waiting)
	}
}

func TestCordonedAndDeadNeverChosen(t *testing.T) {
	c := worker("cordoned", 1000)
	c.Cordoned = true
	d := worker("dead", 1000)
	d.LeaseExpiry = now.Add(-time.Second)
	in := input(6, 10, c, d, worker("ok", 1000))
	placed, waiting := Plan(in, Options{Whole: true})
	if len(waiting) != 0 || len(placed) != 6 {
		t.Fatalf("placed %v waiting %v", placed, waiting)
	}
	for _, p := range placed {
		if p.Target != "ok" {
			t.Fatalf("placed on %s", p.Target)
		}
	}
	in = input(1, 10, c, d)
	if _, waiting := Plan(in, Options{Whole: true}); len(waiting) != 1 || waiting[0].Reason != "no worker can take it: 1 without a lease, 1 cordoned" {
		t.Fatalf("waiting %v", waiting)
	}
}

func TestLeastLoadedSpreadsAndLimits(t *testing.T) {
	in := input(6, 10, worker("a", 1000), worker("b", 1000), worker("c", 500))
	in.Active = []*fsm.Migration{{ID: "x", Volume: "vm00", Source: "zz", Target: "a", State: fsm.Planned}}
	placed, waiting := Plan(in, Options{Parallel: 4})
	if len(placed) != 4 || len(waiting) != 2 {
		t.Fatalf("placed %d waiting %d", len(placed), len(waiting))
	}
	per := map[string]int{}
	for _, p := range placed {
		per[p.Target]++
		if !strings.HasPrefix(p.Reason, "least loaded") {
			t.Fatalf("reason %q", p.Reason)
		}
	}
	// a already has one inbound: b and c take the first two, then b (more free) before a.
	if per["a"] != 1 || per["b"] != 2 || per["c"] != 1 {
		t.Fatalf("spread %v", per)
	}
	if !strings.Contains(waiting[0].Reason, "runs 4 of 4 outbound") {
		t.Fatalf("waiting reason %q", waiting[0].Reason)
	}
	// Inbound slots: one target with 4 slots takes 4 at once, then refuses.
	in = input(6, 10, worker("a", 1000))
	placed, waiting = Plan(in, Options{Parallel: 8})
	if len(placed) != 4 || !strings.Contains(waiting[0].Reason, "inbound limit") {
		t.Fatalf("placed %d waiting %v", len(placed), waiting)
	}
}

func TestGroupsKeptApart(t *testing.T) {
	in := input(3, 10, worker("a", 1000), worker("b", 1000))
	for i := range in.Machines {
		in.Machines[i].Group = "db"
	}
	in.Groups = map[string]map[string]int{"b": {"db": 1}}
	placed, waiting := Plan(in, Options{Whole: true})
	if len(placed) != 1 || placed[0].Target != "a" || len(waiting) != 2 {
		t.Fatalf("placed %v waiting %v", placed, waiting)
	}
	if !strings.Contains(waiting[0].Reason, "group db") {
		t.Fatalf("reason %q", waiting[0].Reason)
	}
}

func TestBandwidthBudget(t *testing.T) {
	a := worker("a", 1000)
	a.Report.HydrateBPS = 100 << 20
	in := input(8, 10, a, worker("b", 1000))
	in.Workers[2].Report.HydrateBPS = 100 << 20
	// 250 MiB/s over clones of 100 MiB/s: two at once, whatever --parallel says.
	placed, waiting := Plan(in, Options{Parallel: 8, BandwidthBPS: 250 << 20})
	if len(placed) != 2 || !strings.Contains(waiting[0].Reason, "bandwidth budget of src") {
		t.Fatalf("placed %d waiting %v", len(placed), waiting)
	}
	// Hydrating migrations count at their reported rate.
	in.Active = []*fsm.Migration{{ID: "x", Volume: "vm00", Source: "src", Target: "a", State: fsm.Hydrating,
		Progress: &fsm.Progress{RateBPS: 200 << 20}}}
	in.Machines = in.Machines[1:]
	if placed, _ := Plan(in, Options{Parallel: 8, BandwidthBPS: 250 << 20}); len(placed) != 0 {
		t.Fatalf("placed %v past the budget", placed)
	}
}

func TestLargestFirst(t *testing.T) {
	in := input(3, 10, worker("a", 1000))
	in.Volumes["vm02"] = fsm.Volume{ID: "vm02", Size: 50 << 30, State: fsm.VolCreated}
	placed, _ := Plan(in, Options{Whole: true})
	if placed[0].Machine != "m02" {
		t.Fatalf("first placed %s, want the largest", placed[0].Machine)
	}
}

func TestBytes(t *testing.T) {
	for n, want := range map[int64]string{120 << 30: "120 GiB", 1536 << 20: "1.5 GiB", 10: "10 B"} {
		if got := Bytes(n); got != want {
			t.Errorf("Bytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestFinishingHydrationFreesItsShare(t *testing.T) {
	a := worker("a", 1000)
	a.Report.HydrateBPS = 100 << 20
	in := input(2, 10, a)
	// One hydration at the whole budget, ending in 1 s by its report 0.5 s ago.
	in.Active = []*fsm.Migration{{ID: "x", Volume: "vm00", Source: "src", Target: "a", State: fsm.Hydrating,
		Progress: &fsm.Progress{RateBPS: 100 << 20, ETASeconds: 1, UpdatedAt: now.Add(-500 * time.Millisecond)}}}
	in.Machines = in.Machines[1:]
	if placed, _ := Plan(in, Options{Parallel: 1, BandwidthBPS: 100 << 20}); len(placed) != 1 {
		t.Fatal("a hydration about to end still blocks the next start")
	}
	in.Active[0].Progress.ETASeconds = 30
	if placed, waiting := Plan(in, Options{Parallel: 1, BandwidthBPS: 100 << 20}); len(placed) != 0 {
		t.Fatalf("started past --parallel: %v %v", placed, waiting)
	}
}

func TestDeadSourceAndBusyVolumeWait(t *testing.T) {
	in := input(2, 10, worker("a", 1000))
	in.Volumes["vm01"] = fsm.Volume{ID: "vm01", Size: 10 << 30, State: fsm.VolPendingDelete}
	placed, waiting := Plan(in, Options{})
	if len(placed) != 1 || len(waiting) != 1 || !strings.Contains(waiting[0].Reason, "pending_destroy") {
		t.Fatalf("placed %v waiting %v", placed, waiting)
	}
	in.Source.LeaseExpiry = now.Add(-time.Second)
	if placed, waiting := Plan(in, Options{}); len(placed) != 0 || !strings.Contains(waiting[0].Reason, "no valid lease") {
		t.Fatalf("dead source: placed %v waiting %v", placed, waiting)
	}
}
