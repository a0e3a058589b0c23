package chaos

import (
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// The soak: migrations back and forth between three workers, each with a
// random fault injected at a random moment, bounded in time; every one must
// end completed or rolled back with the invariants held and nothing leaked.
// CI runs a short form; FERRY_CHAOS=full runs 40 migrations (or
// FERRY_SOAK_N) within 40 minutes. FERRY_SOAK_SEED replays a run. Every
// requested migration must run: the budget only bounds a hang, and a soak
// that ran fewer fails rather than passing on what it skipped.
func TestSoak(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	n, budget := 4, 5*time.Minute
	if full {
		n, budget = 40, 40*time.Minute
	}
	if v, err := strconv.Atoi(os.Getenv("FERRY_SOAK_N")); err == nil && v > 0 {
		n = v
	}
	seed := time.Now().UnixNano()
	if v, err := strconv.ParseInt(os.Getenv("FERRY_SOAK_SEED"), 10, 64); err == nil {
		seed = v
	}
	rng := rand.New(rand.NewSource(seed))
	t.Logf("soak: %d migrations within %v, FERRY_SOAK_SEED=%d", n, budget, seed)
	// Hydration capped so each migration spends seconds in every phase:
	// faults land all along the way, not only after the end.
	c := newCluster(t, 3, "--hydration-rate", "4M")
	machines := []string{"s1", "s2"}
	acks := map[string]string{}
	for i, m := range machines {
		if err := c.bed.CreateVolume(c.ctx, "v"+m, c.ws[i], 64<<20); err != nil {
			t.Fatal(err)
		}
		ack, err := c.bed.RunRecords(c.ctx, m, c.ws[i], "v"+m, uint32(70+i))
		if err != nil {
			t.Fatal(err)
		}
		acks[m] = ack
		c.fill(c.ws[i], m, 8)
	}
	c.running = len(machines)
	faults := []string{"none", "kill-source", "kill-target", "kill-leader", "kill-follower", "flap-source", "flap-target", "abort"}
	table := fmt.Sprintf("soak (seed %d)", seed)
	report(table, "| # | machine | from → to | fault | injected at | ended | records acked/present | source after | took |")
	report(table, "|---|---|---|---|---|---|---|---|---|")
	deadline := time.Now().Add(budget)
	counts := map[fsm.State]int{}
	ran := 0
	for i := 0; i < n && time.Now().Before(deadline); i++ {
		ran++
		mach := machines[rng.Intn(len(machines))]
		fault := faults[rng.Intn(len(faults))]
		delay := time.Duration(rng.Intn(2500)) * time.Millisecond
		ok := t.Run(fmt.Sprintf("%02d-%s-%s", i, mach, fault), func(t *testing.T) {
			parent := c.t
			c.t = t
			defer func() { c.t = parent }()
			src := c.machineOn(mach)
			// Any worker but the source and the one running the other machine's
			// migration target (all sequential here, so any other worker).
			var dsts []string
			for _, w := range c.ws {
				if w != src {
					dsts = append(dsts, w)
				}
			}
			dst := dsts[rng.Intn(len(dsts))]
			m, _ := c.bed.Client.GetMachine(c.ctx, mach)
			// The previous fault may have outlived a lease: plan on a healthy cluster.
			if err := c.bed.WaitWorkers(c.ctx, 2*time.Minute); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			id, err := c.bed.Migrate(c.ctx, mach, dst)
			if err != nil {
				t.Fatal(err)
			}
			w := c.watch(id, src, m.Volume)
			time.Sleep(delay)
			injected := time.Now()
			switch fault {
			case "kill-source", "kill-target":
				who := src
				if fault == "kill-target" {
					who = dst
				}
				c.kill9(who)
				time.Sleep(time.Duration(rng.Intn(2000)) * time.Millisecond)
				c.restart(who)
			case "kill-leader", "kill-follower":
				who := c.server(fault[len("kill-"):])
				c.kill9(who)
				time.Sleep(time.Duration(rng.Intn(2000)) * time.Millisecond)
				c.restart(who)
			case "flap-source", "flap-target":
				who := src
				if fault == "flap-target" {
					who = dst
				}
				up := c.linkDown(who)
				time.Sleep(time.Duration(2000+rng.Intn(4000)) * time.Millisecond)
				up()
			case "abort":
				// Refused at or after cutover: then it must complete.
				c.bed.Client.Abort(c.ctx, id, "soak: operator abort")
			}
			o := c.finish(id, mach, src, dst, m.Volume, acks[mach], w, start, 4*time.Minute)
			counts[o.final.State]++
			// Where the fault landed, from the commit times (a random moment:
			// reported, not asserted).
			at := stateAt(o.final, injected)
			report(table, fmt.Sprintf("| %d | %s | %s → %s | %s | %s (+%v) | %s | %d/%d | %s | %v |", i, mach, src, dst, fault, at,
				delay.Round(100*time.Millisecond), o.final.State, o.acked, o.present, o.frozenSame, o.took.Round(100*time.Millisecond)))
		})
		if !ok {
			report(table, fmt.Sprintf("| %d | %s | | %s | | FAILED | | | |", i, mach, fault))
			// A broken cluster makes every later row meaningless.
			break
		}
	}
	report(table, fmt.Sprintf("\n%d completed, %d rolled back", counts[fsm.Completed], counts[fsm.RolledBack]))
	if done := counts[fsm.Completed] + counts[fsm.RolledBack]; done < n && !t.Failed() {
		t.Fatalf("the soak finished %d of its %d migrations (%d started) within %v: raise the budget or find what slows it", done, n, ran, budget)
	}
}
