package chaos

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// Control-plane and data-plane splits: nftables in the fabric namespaces
// silently drop the packets between two sides, both ways or one way, while
// the migration is held in a state before or after cutover. The sides are
// the servers (all three, or only the leader: the agent must go through a
// follower), the source and the target. The agents run with a short lease,
// so a split of a worker from the servers outlives its lease.

const splitLease = 5 * time.Second

type splitCase struct {
	state  fsm.State
	a, b   string // servers, leader, source, target
	oneWay bool   // drop a → b only
}

func (k splitCase) name() string {
	arrow := "<->"
	if k.oneWay {
		arrow = "->"
	}
	return fmt.Sprintf("%s/%s%s%s", k.state, k.a, arrow, k.b)
}

// splitCases: the short form cuts each pair once (the source from the whole
// control plane before cutover, the target's replies from the servers at
// the cutover step, the source's iSCSI answers to the target during
// hydration); FERRY_CHAOS=full cuts every pair both ways and each way
// alone, before cutover (exported) and after (hydrating), and the leader
// alone from the source.
func splitCases() []splitCase {
	if !full {
		return []splitCase{
			{fsm.Exported, "servers", "source", false},
			{fsm.Trimmed, "servers", "target", true},
			{fsm.Hydrating, "source", "target", true},
		}
	}
	var out []splitCase
	for _, s := range []fsm.State{fsm.Exported, fsm.Hydrating} {
		for _, p := range [][2]string{{"servers", "source"}, {"servers", "target"}, {"source", "target"}} {
			out = append(out, splitCase{s, p[0], p[1], false}, splitCase{s, p[0], p[1], true}, splitCase{s, p[1], p[0], true})
		}
		out = append(out, splitCase{s, "leader", "source", false})
	}
	return out
}

func TestNetSplitTable(t *testing.T) {
	var before, after bool
	pairs := map[string]bool{}
	for _, k := range splitCases() {
		before = before || k.state.BeforeCutover()
		after = after || k.state.AfterCutover()
		p := []string{k.a, k.b}
		slices.Sort(p)
		pairs[p[0]+"|"+p[1]] = true
		if lt, ok := leaving(k.state); !ok || agentRole(lt) == "" {
			t.Errorf("%s: no agent failpoint holds %s", k.name(), k.state)
		}
	}
	if !before || !after {
		t.Errorf("splits before cutover %v, after %v; want both", before, after)
	}
	for _, p := range []string{"servers|source", "servers|target", "source|target"} {
		if !pairs[p] {
			t.Errorf("no split between %s", p)
		}
	}
}

func TestNetSplit(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	testenv.Tools(t, "run scripts/deps.sh (nftables)", "nft")
	c := newCluster(t, 2, "--lease-ttl", splitLease.String())
	if err := c.bed.CreateVolume(c.ctx, "xvol", c.ws[0], matrixVolSize); err != nil {
		t.Fatal(err)
	}
	ack, err := c.bed.RunRecords(c.ctx, "xmach", c.ws[0], "xvol", 63)
	if err != nil {
		t.Fatal(err)
	}
	outage := 8 * time.Second // longer than the lease
	if full {
		outage = 20 * time.Second
	}
	table := fmt.Sprintf("network splits (nftables drops, %v from the state's commit; lease %v)", outage, splitLease)
	report(table, "| state | split | landed in | ended | path | acked/present | source after | leaks | took |")
	report(table, "|---|---|---|---|---|---|---|---|---|")
	for _, k := range splitCases() {
		ok := t.Run(k.name(), func(t *testing.T) {
			parent := c.t
			c.t = t
			defer func() { c.t = parent }()
			// A row whose migration ended before its state (under CI load a
			// healthy worker's lease can lapse while planned, and the
			// servers roll back) tested nothing: it runs again. Each run
			// still checks every invariant.
			report(table, untilLanded(t, func() (string, error) { return runSplit(c, k, "xmach", ack, outage) }))
		})
		if !ok {
			report(table, fmt.Sprintf("| %s | %s | | FAILED | | | | | |", k.state, k.name()))
		}
	}
}

// runSplit runs one row; the error says the migration ended before its state.
func runSplit(c *cluster, k splitCase, machineID, ack string, outage time.Duration) (string, error) {
	t := c.t
	src := c.machineOn(machineID)
	dst := c.other(src)
	mach, err := c.bed.Client.GetMachine(c.ctx, machineID)
	if err != nil {
		t.Fatal(err)
	}
	roleWorker := map[string]string{"source": src, "target": dst}
	want := map[string]string{}
	lt, _ := leaving(k.state)
	want[roleWorker[agentRole(lt)]] = fmt.Sprintf("%s=%s", lt.Event, pause)
	c.setFailpoints(want)

	start := time.Now()
	id, err := c.bed.Migrate(c.ctx, machineID, dst)
	if err != nil {
		t.Fatal(err)
	}
	w := c.watch(id, src, mach.Volume)
	if _, err := c.bed.WaitState(c.ctx, id, 2*time.Minute, k.state); err != nil {
		if m := mustGet(c, id); m.State.Terminal() && m.EnteredAt[k.state].IsZero() {
			// Ended without the split: check the invariants all the same.
			c.finish(id, machineID, src, dst, mach.Volume, ack, w, start, 4*time.Minute)
			return "", fmt.Errorf("the split missed its state: %v (path %s)", err, w.path())
		}
		w.close()
		t.Fatalf("the split missed its state: %v (path %s)", err, w.path())
	}
	members := func(side string) []string {
		switch side {
		case "servers":
			return c.bed.ServerIDs()
		case "leader":
			return []string{c.server("leader")}
		}
		return []string{roleWorker[side]}
	}
	from, to := members(k.a), members(k.b)
	cutFrom := time.Now()
	var heals []func() error
	for _, f := range from {
		h, err := c.bed.Cut(c.ctx, f, to, k.oneWay)
		if err != nil {
			t.Fatal(err)
		}
		heals = append(heals, h)
	}
	cutTo := time.Now()
	heal := func() {
		for _, h := range heals {
			if err := h(); err != nil {
				t.Error(err)
			}
		}
		heals = nil
	}
	t.Cleanup(heal)
	time.Sleep(outage)
	mid, _ := c.bed.Client.GetMigration(c.ctx, id)
	heal()
	o := c.finish(id, machineID, src, dst, mach.Volume, ack, w, start, 4*time.Minute)
	at := landed(t, o.final, k.state, cutFrom, cutTo, w.path())
	if at.AfterCutover() && o.final.State != fsm.Completed {
		t.Fatalf("a split after cutover ended %s; after cutover the only way is forward", o.final.State)
	}
	during := ""
	if mid != nil {
		during = fmt.Sprintf("%s, stalled %v %q", mid.State, mid.Stalled, mid.StallCause)
	}
	t.Logf("%s: split %v in %s (at its end: %s), ended %s via %s, records %d/%d, source %s, %v", k.name(), outage, at, during,
		o.final.State, w.path(), o.acked, o.present, o.frozenSame, o.took.Round(time.Millisecond))
	return fmt.Sprintf("| %s | %s | %s | %s | %s | %d/%d | %s | %s | %s |", k.state, k.name(), at, o.final.State, w.path(),
		o.acked, o.present, o.frozenSame, o.leaks, o.took.Round(100*time.Millisecond)), nil
}
