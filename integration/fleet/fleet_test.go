package fleet

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server/servertest"
)

// These are the end-to-end cases, run as server-level integration
// tests: a real 3-server cluster (in this process, mTLS, raft on loopback)
// and simulated agents speaking the real API with real worker
// certificates; the data path is the timing model of sim_test.go, which
// makes a migration take a second instead of a real LUKS2 clone's minutes.

type fleet struct {
	t      *testing.T
	c      *servertest.Cluster
	op     *api.Client
	fab    *Fabric
	agents map[string]*SimAgent
	ctx    context.Context
}

const gib = int64(1) << 30

func newFleet(t *testing.T) *fleet {
	c := servertest.New(t, 3, servertest.Options{ReconcileInterval: 200 * time.Millisecond, DrainBatch: 50 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return &fleet{t: t, c: c, op: c.Client("operator", tlsutil.KindOperator), ctx: ctx, agents: map[string]*SimAgent{},
		fab: &Fabric{LinkBPS: 4 * gib, CloneBPS: 2 * gib, StepDelay: 20 * time.Millisecond, Tick: 20 * time.Millisecond}}
}

// agent starts a simulated worker with free bytes free.
func (f *fleet) agent(name string, free int64) *SimAgent {
	f.t.Helper()
	a := NewSimAgent(name, uint32(len(f.agents)+1), f.c.Client(name, tlsutil.KindWorker), f.fab, 1<<40, free)
	a.TTL = 4 * time.Second
	a.Logf = f.t.Logf
	if err := a.Register(f.ctx); err != nil {
		f.t.Fatal(err)
	}
	go a.Run(f.ctx)
	f.agents[name] = a
	return a
}

// waitDrain waits until the drain of worker ends and returns it.
func (f *fleet) waitDrain(worker string, timeout time.Duration) *fsm.Drain {
	f.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		ds, err := f.op.ListDrains(f.ctx, worker)
		if err == nil && len(ds) > 0 && ds[0].State.Terminal() {
			return ds[0]
		}
		time.Sleep(100 * time.Millisecond)
	}
	ds, _ := f.op.ListDrains(f.ctx, worker)
	for _, d := range ds {
		f.t.Logf("drain %s: %s started %v waiting %v", d.ID, d.State, d.Started, d.Waiting)
	}
	ms, _ := f.op.ListMigrations(f.ctx, worker)
	for _, m := range ms {
		f.t.Logf("migration %s %s -> %s: %s stalled=%v %s", m.ID, m.Source, m.Target, m.State, m.Stalled, m.StallCause)
	}
	f.t.Fatalf("drain of %s did not end in %s", worker, timeout)
	return nil
}

// migrationsPerMachine counts the migrations of each machine that did not roll back.
func (f *fleet) migrationsPerMachine() map[string][]string {
	ms, err := f.op.ListMigrations(f.ctx, "")
	if err != nil {
		f.t.Fatal(err)
	}
	out := map[string][]string{}
	for _, m := range ms {
		if m.State != fsm.RolledBack {
			out[m.Machine] = append(out[m.Machine], m.ID)
		}
	}
	return out
}

// A drain goes on to the end after the leader is killed, with no client
// connected, and starts no machine twice.
func TestDrainContinuesAfterLeaderKill(t *testing.T) {
	f := newFleet(t)
	f.fab.CloneBPS, f.fab.LinkBPS = 1*gib, 2*gib // a migration hydrates for about a second
	for _, w := range []string{"src", "a", "b", "c"} {
		f.agent(w, 1<<40)
	}
	if err := seedMachines(f.ctx, f.op, "src", 8, gib, nil); err != nil {
		t.Fatal(err)
	}
	// The drain is recorded through a client that then goes away.
	cli := f.c.Client("operator", tlsutil.KindOperator)
	d, err := cli.Drain(f.ctx, api.DrainRequest{Worker: "src", Parallel: 2})
	if err != nil {
		t.Fatal(err)
	}
	cli.Close()
	// Kill the leader once the drain is under way.
	for {
		ms, _ := f.op.ListMigrations(f.ctx, "src")
		if len(ms) >= 2 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	old := f.c.Leader()
	f.c.Stop(old)
	t.Logf("stopped leader s%d with the drain under way", old)
	end := f.waitDrain("src", 2*time.Minute)
	if end.State != fsm.DrainComplete || end.ID != d.ID {
		t.Fatalf("drain ended %s: %+v", end.State, end)
	}
	if ms, _ := f.op.ListMachines(f.ctx, "src"); len(ms) != 0 {
		t.Fatalf("%d machines left on src", len(ms))
	}
	for m, ids := range f.migrationsPerMachine() {
		if len(ids) != 1 {
			t.Fatalf("machine %s migrated by %v: a duplicate", m, ids)
		}
	}
}

// A target without room for the volume plus margin is never chosen, and
// when no target has room the drain and --plan say which constraint.
func TestTargetWithoutRoomNeverChosen(t *testing.T) {
	f := newFleet(t)
	f.agent("src", 1<<40)
	f.agent("small", 5*gib) // reports 5 GiB free: no 4 GiB volume + 1 GiB margin fits... exactly not
	f.agent("big", 100*gib)
	if err := seedMachines(f.ctx, f.op, "src", 4, 4*gib+4096, nil); err != nil {
		t.Fatal(err)
	}
	p, err := f.op.PlanDrain(f.ctx, api.DrainRequest{Worker: "src"})
	if err != nil {
		t.Fatal(err)
	}
	for _, pl := range p.Placements {
		if pl.Target != "big" {
			t.Fatalf("plan placed %s on %s", pl.Machine, pl.Target)
		}
		if !strings.Contains(pl.Reason, "least loaded") {
			t.Fatalf("reason %q", pl.Reason)
		}
	}
	if len(p.Placements) != 4 {
		t.Fatalf("plan: %+v", p)
	}
	if _, err := f.op.Drain(f.ctx, api.DrainRequest{Worker: "src", Parallel: 4}); err != nil {
		t.Fatal(err)
	}
	if d := f.waitDrain("src", time.Minute); d.State != fsm.DrainComplete {
		t.Fatalf("drain: %+v", d)
	}
	if ms, _ := f.op.ListMachines(f.ctx, "small"); len(ms) != 0 {
		t.Fatalf("%d machines placed on the worker without room", len(ms))
	}
	// Now nothing fits anywhere: the refusal names the size.
	if err := seedMachines(f.ctx, f.op, "big", 1, 120*gib, nil); err != nil {
		t.Fatal(err)
	}
	p, err = f.op.PlanDrain(f.ctx, api.DrainRequest{Worker: "big"})
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Unplaced) != 5 || p.Unplaced[0].Machine != "big-m0" || !strings.HasPrefix(p.Unplaced[0].Reason, "no worker has 132 GiB free (volume 120 GiB + margin 12 GiB)") {
		t.Fatalf("plan: %+v", p)
	}
	if _, err := f.op.Drain(f.ctx, api.DrainRequest{Worker: "big", Deadline: api.Duration(time.Hour)}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ds, _ := f.op.ListDrains(f.ctx, "big")
		if len(ds) == 1 && strings.HasPrefix(ds[0].Waiting["big-m0"], "no worker has 132 GiB free") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("drain does not say why it waits: %+v", ds)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if ms, _ := f.op.ListMigrations(f.ctx, "big"); len(ms) != 4 { // the four that came in
		t.Fatalf("migrations naming big: %d", len(ms))
	}
}

// A cordoned worker is never chosen, by a drain or by an explicit migration.
func TestCordonedWorkerNeverChosen(t *testing.T) {
	f := newFleet(t)
	for _, w := range []string{"src", "a", "cordoned"} {
		f.agent(w, 1<<40)
	}
	if _, err := f.op.Cordon(f.ctx, "cordoned", true, "disk replacement"); err != nil {
		t.Fatal(err)
	}
	if err := seedMachines(f.ctx, f.op, "src", 6, gib, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := f.op.CreateMigration(f.ctx, api.PlanRequest{Machine: "src-m0", Target: "cordoned"}); api.ErrorCode(err) != fsm.CodeCordoned {
		t.Fatalf("explicit migration to a cordoned worker: %v", err)
	}
	if _, err := f.op.Drain(f.ctx, api.DrainRequest{Worker: "src", Parallel: 3}); err != nil {
		t.Fatal(err)
	}
	if d := f.waitDrain("src", time.Minute); d.State != fsm.DrainComplete {
		t.Fatalf("drain: %+v", d)
	}
	if ms, _ := f.op.ListMachines(f.ctx, "cordoned"); len(ms) != 0 {
		t.Fatalf("%d machines on the cordoned worker", len(ms))
	}
	// Uncordon works only once the drain ended; the drained worker stays cordoned.
	if w, _ := f.op.GetWorker(f.ctx, "src"); !w.Cordoned {
		t.Fatal("drained worker was uncordoned")
	}
	if _, err := f.op.Cordon(f.ctx, "cordoned", false, ""); err != nil {
		t.Fatal(err)
	}
}

// At the deadline the drain records what was left and why; running
// migrations are not killed.
func TestDeadlineReportsWhatWasLeft(t *testing.T) {
	f := newFleet(t)
	f.fab.CloneBPS, f.fab.LinkBPS = gib/2, gib/2 // 4 GiB volumes hydrate for 8 s
	f.agent("src", 1<<40)
	f.agent("a", 1<<40)
	if err := seedMachines(f.ctx, f.op, "src", 4, 4*gib, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := f.op.Drain(f.ctx, api.DrainRequest{Worker: "src", Parallel: 1, Deadline: api.Duration(2 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	d := f.waitDrain("src", 30*time.Second)
	if d.State != fsm.DrainDeadline {
		t.Fatalf("drain ended %s", d.State)
	}
	if len(d.Left) != 4 {
		t.Fatalf("left: %+v", d.Left)
	}
	running := ""
	for _, l := range d.Left {
		switch {
		case l.Migration != "":
			running = l.Migration
			if !strings.Contains(l.Reason, "goes on") {
				t.Fatalf("left %s: %q", l.Machine, l.Reason)
			}
		case !strings.Contains(l.Reason, "not started before the deadline"):
			t.Fatalf("left %s: %q", l.Machine, l.Reason)
		}
	}
	if running == "" {
		t.Fatalf("the running migration is not in the report: %+v", d.Left)
	}
	// It finishes: never killed.
	deadline := time.Now().Add(30 * time.Second)
	for {
		m, err := f.op.GetMigration(f.ctx, running)
		if err == nil && m.State == fsm.Completed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("migration %s after the deadline: %+v %v", running, m, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if ms, _ := f.op.ListMigrations(f.ctx, "src"); len(ms) != 1 {
		t.Fatalf("%d migrations started; the deadline must stop new starts", len(ms))
	}
}
