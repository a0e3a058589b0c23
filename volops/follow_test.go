package volops

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
)

// scriptedClone is a clone handle whose progress the test sets.
type scriptedClone struct {
	mu        sync.Mutex
	st        datapath.Status
	enabled   bool
	dissolved int
	portals   []string
}

func (c *scriptedClone) set(f func(*datapath.Status)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	f(&c.st)
}

func (c *scriptedClone) Status(context.Context) (*datapath.Status, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.st
	if st.Progress != nil {
		p := *st.Progress
		st.Progress = &p
	}
	return &st, nil
}

func (c *scriptedClone) EnableHydration(context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.enabled = true
	return nil
}

func (c *scriptedClone) Dissolve(context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dissolved++
	return nil
}

func (c *scriptedClone) Retarget(_ context.Context, portal, _ string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.portals = append(c.portals, portal)
	return nil
}

// A copy that stops moving is reported stalled with why; a moved export is
// followed; a complete copy is dissolved and its last progress returned.
func TestFollowHydrationReportsStallsFollowsTheExportAndDissolves(t *testing.T) {
	o := New(zerolog.Nop(), "w1", nil, nil, &recordingBackend{dir: t.TempDir()}, nil, nil)
	c := &scriptedClone{st: datapath.Status{Cloning: true, Progress: &fsm.Progress{HydratedBytes: 10, TotalBytes: 100}}}
	moved := &fsm.Export{Portal: "[fd00::9]:3260", IQN: "iqn.x"}
	var mu sync.Mutex
	var stalls []string
	var reports, polls int
	r := HydrationReports{
		Stalled: func(reason string) { mu.Lock(); stalls = append(stalls, reason); mu.Unlock() },
		Progress: func(*datapath.Progress) *fsm.Export {
			mu.Lock()
			defer mu.Unlock()
			reports++
			return moved
		},
		Polled: func(*datapath.Progress) { mu.Lock(); polls++; mu.Unlock() },
	}
	type result struct {
		p   *datapath.Progress
		err error
	}
	done := make(chan result, 1)
	go func() {
		p, err := o.FollowHydration(t.Context(), zerolog.Nop(), c, "dv1", &fsm.Export{Portal: "[fd00::1]:3260", IQN: "iqn.x"}, 300*time.Millisecond, r)
		done <- result{p, err}
	}()
	waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(stalls) > 0 }, "a stall report for a copy that stopped moving")
	c.set(func(st *datapath.Status) { st.Complete = true; st.Progress.HydratedBytes = 100 })
	var res result
	select {
	case res = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("FollowHydration did not return once the copy was complete")
	}
	if res.err != nil || res.p == nil || res.p.HydratedBytes != 100 {
		t.Fatalf("FollowHydration = %+v, %v; want the complete progress", res.p, res.err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	mu.Lock()
	defer mu.Unlock()
	if !c.enabled || c.dissolved != 1 {
		t.Fatalf("hydration enabled %v, dissolved %d times; want enabled and one dissolve", c.enabled, c.dissolved)
	}
	if !strings.Contains(stalls[0], "no progress") && !strings.Contains(stalls[0], "no space") {
		t.Fatalf("stall reason %q says neither", stalls[0])
	}
	if reports == 0 || polls == 0 {
		t.Fatalf("%d progress reports, %d polls", reports, polls)
	}
	// The recorded export first, then the moved one, once.
	if len(c.portals) != 2 || c.portals[0] != "[fd00::1]:3260" || c.portals[1] != moved.Portal {
		t.Fatalf("retargeted to %v; want the recorded portal, then the moved one once", c.portals)
	}
}

// A stall the engine reports itself is passed on with its reason.
func TestFollowHydrationPassesTheEnginesStall(t *testing.T) {
	o := New(zerolog.Nop(), "w1", nil, nil, &recordingBackend{dir: t.TempDir()}, nil, nil)
	c := &scriptedClone{st: datapath.Status{Progress: &fsm.Progress{TotalBytes: 100, Stalled: true, StalledReason: "source unreachable"}}}
	got := make(chan string, 1)
	ctx, cancel := context.WithCancel(t.Context())
	go func() {
		_, _ = o.FollowHydration(ctx, zerolog.Nop(), c, "dv1", nil, time.Hour, HydrationReports{
			Stalled: func(reason string) {
				select {
				case got <- reason:
				default:
				}
			},
			Progress: func(*datapath.Progress) *fsm.Export { return nil },
		})
	}()
	defer cancel()
	select {
	case r := <-got:
		if r != "source unreachable" {
			t.Fatalf("stall reason %q", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no stall reported")
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
