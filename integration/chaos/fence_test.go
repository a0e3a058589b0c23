package chaos

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/failpoint"
	"github.com/ferry-dev/ferry/internal/testbed"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/machine"
	"github.com/ferry-dev/ferry/machine/workload"
)

// runningOn reports whether machineID's journal on worker has an open run.
func (c *cluster) runningOn(worker, machineID string) bool {
	ivs, err := machine.Journal(filepath.Join(c.bed.WorkerDir(worker), "machines"), machineID)
	return err == nil && len(ivs) > 0 && ivs[len(ivs)-1].Stop.IsZero()
}

func (c *cluster) waitFor(what string, timeout time.Duration, cond func() bool) time.Duration {
	c.t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > timeout {
			c.t.Fatalf("%s: not within %v", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Since(start)
}

// The split brain of the old design, fenced. The target starts the machine
// before cutover commits (--start-before-cutover) and is then cut off from
// everyone (its fabric link down) with its proposal of cutover still
// pending. Its agent cannot renew its lease and stops the machine by itself;
// the server rolls back when the lease expires; an operator's "target gone"
// is refused until the lease plus the fence margin passed, then the source
// restarts the machine. When the link returns the target reaps its clone.
// The observer never sees the machine answer from both workers, the
// journals never overlap, every acknowledged record survives.
func TestFenceTargetCutOffBeforeCutover(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	// A 5s lease: with 3s, heartbeats of healthy agents timed out on a
	// starved CI host and fenced them before the cut.
	c := newCluster(t, 2, "--lease-ttl", "5s", "--start-before-cutover")
	a, b := c.ws[0], c.ws[1]
	if err := c.bed.CreateVolume(c.ctx, "fvol", a, matrixVolSize); err != nil {
		t.Fatal(err)
	}
	ack, err := c.bed.RunRecords(c.ctx, "fmach", a, "fvol", 62)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := testbed.WaitAcked(c.ctx, ack, 20, time.Minute); err != nil {
		t.Fatal(err)
	}
	obs := c.observe("fmach")
	// Hold the target after it started the machine, before it proposes cutover.
	c.setFailpoints(map[string]string{b: "cutover=40s"})
	start := time.Now()
	id, err := c.bed.Migrate(c.ctx, "fmach", b)
	if err != nil {
		t.Fatal(err)
	}
	w := c.watch(id, a, "fvol")
	if _, err := c.bed.WaitState(c.ctx, id, 2*time.Minute, fsm.Trimmed); err != nil {
		w.close()
		t.Fatal(err)
	}
	c.waitFor("the target starts the machine before cutover", time.Minute, func() bool { return c.runningOn(b, "fmach") })
	up := c.linkDown(b)
	cut := time.Now()
	fencedAfter := c.waitFor("the cut-off target stops its machine by itself", 30*time.Second, func() bool { return !c.runningOn(b, "fmach") })
	if _, err := c.bed.WaitState(c.ctx, id, time.Minute, fsm.RollingBack); err != nil {
		w.close()
		t.Fatal(err)
	}
	rolledAfter := time.Since(cut)
	// The operator vouches for the silent target: refused until its lease
	// and the fence margin passed.
	refusals := 0
	var confirmedAfter time.Duration
	for {
		_, err := c.bed.Client.Propose(c.ctx, id, fsm.EvTargetTornDown, "chaos-target-gone", fsm.EventPayload{Reason: "target cut off"})
		if err == nil {
			confirmedAfter = time.Since(cut)
			break
		}
		var ref *api.Error
		if !errors.As(err, &ref) || ref.Code != fsm.CodeTargetMayRun {
			w.close()
			t.Fatalf("operator target_torn_down: %v", err)
		}
		refusals++
		if time.Since(cut) > time.Minute {
			w.close()
			t.Fatalf("target_torn_down still refused a minute after the cut: %v", err)
		}
		time.Sleep(250 * time.Millisecond)
	}
	if refusals == 0 {
		t.Errorf("the operator's target_torn_down was accepted at once, %v after the cut (before the lease and margin could pass)", confirmedAfter)
	}
	if _, err := c.bed.WaitState(c.ctx, id, time.Minute, fsm.RolledBack); err != nil {
		w.close()
		t.Fatal(err)
	}
	restoredAfter := time.Since(cut)
	up()
	o := c.finish(id, "fmach", a, b, "fvol", ack, w, start, 3*time.Minute)
	if o.final.State != fsm.RolledBack {
		t.Fatalf("a target cut off before cutover: migration ended %s, want rolled_back", o.final.State)
	}
	seen := c.checkObserved(obs)
	t.Logf("fenced %v after the cut, rolled back at %v, operator confirmation accepted at %v (%d refusals), source restored at %v; observer %s",
		fencedAfter.Round(time.Millisecond), rolledAfter.Round(time.Millisecond), confirmedAfter.Round(time.Millisecond), refusals, restoredAfter.Round(time.Millisecond), seen)
	report("fencing", fmt.Sprintf("| target cut off before cutover (lease 5s) | machine fenced %v after the cut | rolled back at %v, target_gone accepted at %v, source restarted at %v | %s, records %d/%d, leaks %s, observer: %s |",
		fencedAfter.Round(100*time.Millisecond), rolledAfter.Round(100*time.Millisecond), confirmedAfter.Round(100*time.Millisecond), restoredAfter.Round(100*time.Millisecond),
		o.final.State, o.acked, o.present, o.leaks, seen))
}

// kill -9 of the userspace datapath under a writing machine: the agent
// finds it dead, restarts it over the same files and the machine with it;
// every acknowledged record is there and new ones keep coming.
func TestDatapathCrashUnderWritingMachine(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	c := newCluster(t, 2)
	a := c.ws[0]
	if err := c.bed.CreateVolume(c.ctx, "dvol", a, matrixVolSize); err != nil {
		t.Fatal(err)
	}
	ack, err := c.bed.RunRecords(c.ctx, "dmach", a, "dvol", 63)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := testbed.WaitAcked(c.ctx, ack, 50, time.Minute); err != nil {
		t.Fatal(err)
	}
	obs := c.observe("dmach")
	marker := filepath.Join(c.bed.WorkerDir(a), "run", "dvol.json")
	pids := pidsWith(marker)
	if len(pids) != 1 {
		t.Fatalf("datapath processes of dvol: %v, want one (marker %s)", pids, marker)
	}
	before, _ := workload.Acked(ack)
	if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	if _, err := testbed.WaitAcked(c.ctx, ack, before+20, 2*time.Minute); err != nil {
		t.Fatalf("the machine never wrote again after its datapath was killed: %v", err)
	}
	recovered := time.Since(killed)
	if now := pidsWith(marker); len(now) != 1 || now[0] == pids[0] {
		t.Fatalf("datapath processes after recovery: %v (the killed one was %d)", now, pids[0])
	}
	present, acked, err := c.bed.VerifyRecords("dmach", a, ack)
	if err != nil {
		t.Fatalf("acknowledged records lost across the datapath crash: %v", err)
	}
	if err := c.bed.NeverTwice("dmach"); err != nil {
		t.Fatal(err)
	}
	var steady error
	for deadline := time.Now().Add(20 * time.Second); ; {
		if steady = c.bed.Snapshot().CheckSteady(1); steady == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if steady != nil {
		t.Fatalf("after the datapath crash: %v", steady)
	}
	seen := c.checkObserved(obs)
	t.Logf("writing again %v after kill -9 of the datapath; records %d acknowledged, %d present; observer %s", recovered.Round(time.Millisecond), acked, present, seen)
	report("datapath crash", fmt.Sprintf("| kill -9 of the datapath under a writing machine | writing again after %v | records %d/%d, leaks none, observer: %s |",
		recovered.Round(100*time.Millisecond), acked, present, seen))
}

// pidsWith lists the processes whose command line contains marker.
func pidsWith(marker string) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && strings.Contains(string(b), marker) {
			out = append(out, pid)
		}
	}
	return out
}

// The target cut off after cutover committed (during hydration), long
// enough for its lease to lapse: its fence keeps the machine, which the
// store assigns there, running; the migration stalls and completes when the
// link returns; the machine never answers from two workers.
func TestPartitionTargetAfterCutover(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	c := newCluster(t, 2, "--lease-ttl", "3s", "--hydration-rate", "2M")
	a, b := c.ws[0], c.ws[1]
	if err := c.bed.CreateVolume(c.ctx, "qvol", a, 96<<20); err != nil {
		t.Fatal(err)
	}
	ack, err := c.bed.RunRecords(c.ctx, "qmach", a, "qvol", 64)
	if err != nil {
		t.Fatal(err)
	}
	c.fill(a, "qmach", 24)
	obs := c.observe("qmach")
	start := time.Now()
	id, err := c.bed.Migrate(c.ctx, "qmach", b)
	if err != nil {
		t.Fatal(err)
	}
	w := c.watch(id, a, "qvol")
	if _, err := c.bed.WaitState(c.ctx, id, 2*time.Minute, fsm.Hydrating); err != nil {
		w.close()
		t.Fatal(err)
	}
	const outage = 12 * time.Second
	up := c.linkDown(b)
	cut := time.Now()
	for time.Since(cut) < outage {
		if !c.runningOn(b, "qmach") {
			w.close()
			t.Fatalf("the target stopped the machine %v into the partition although cutover had committed", time.Since(cut).Round(time.Millisecond))
		}
		time.Sleep(100 * time.Millisecond)
	}
	up()
	o := c.finish(id, "qmach", a, b, "qvol", ack, w, start, 3*time.Minute)
	if o.final.State != fsm.Completed {
		t.Fatalf("a partition after cutover ended %s; the only way is forward", o.final.State)
	}
	seen := c.checkObserved(obs)
	t.Logf("machine kept running through a %v partition of the target after cutover; completed in %v; observer %s", outage, o.took.Round(time.Millisecond), seen)
	report("fencing", fmt.Sprintf("| target cut off %v after cutover (lease 3s) | machine kept running (cutover committed) | %s, records %d/%d, source %s, leaks %s, %v, observer: %s |",
		outage, o.final.State, o.acked, o.present, o.frozenSame, o.leaks, o.took.Round(100*time.Millisecond), seen))
}

// A step that hangs before cutover (the target's trim step, held by the
// failpoint trimmed=hang until the step's context ends, as a hung tool run
// with that context would be): the step is cut at the end of the downtime
// budget and the migration rolls back with that reason; the downtime stays
// within the budget plus the rollback.
func TestFenceHungToolRollsBackWithinBudget(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	c := newCluster(t, 2)
	a, b := c.ws[0], c.ws[1]
	c.bed.Kill("agent/"+b, syscall.SIGTERM)
	if err := c.bed.StartAgentEnv(b, []string{failpoint.PauseBeforeEnv + "=trimmed=hang"}); err != nil {
		t.Fatal(err)
	}
	if err := c.bed.CreateVolume(c.ctx, "hvol", a, matrixVolSize); err != nil {
		t.Fatal(err)
	}
	ack, err := c.bed.RunRecords(c.ctx, "hmach", a, "hvol", 65)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := testbed.WaitAcked(c.ctx, ack, 20, time.Minute); err != nil {
		t.Fatal(err)
	}
	// Long enough that the steps before the trim fit even across a raft
	// election on a starved CI host (with 8s the budget once ran out in the
	// clone step, so the hang was never reached).
	const budget = 20 * time.Second
	start := time.Now()
	m, err := c.bed.Client.CreateMigration(c.ctx, api.PlanRequest{Machine: "hmach", Target: b, MaxDowntime: api.Duration(budget)})
	if err != nil {
		t.Fatal(err)
	}
	w := c.watch(m.ID, a, "hvol")
	o := c.finish(m.ID, "hmach", a, b, "hvol", ack, w, start, 3*time.Minute)
	if o.final.State != fsm.RolledBack {
		t.Fatalf("a hung trim step: migration ended %s, want rolled_back", o.final.State)
	}
	rb := o.final.Rollback
	// Normally the budget runs out in the trim step (clone_built), the one
	// that hangs; on a starved host an earlier step can take it all, which
	// the budget must cut just the same.
	if rb == nil || !strings.Contains(rb.Reason, "downtime budget") ||
		(rb.From != fsm.CloneBuilt && rb.From != fsm.Exported && rb.From != fsm.SourceStopped) {
		t.Fatalf("rollback %+v: want the downtime budget spent in a step after source_stopped and before cutover", rb)
	}
	if rb.From != fsm.CloneBuilt {
		t.Logf("the budget ran out in %s, before the hung trim was reached (a starved host)", rb.From)
	}
	stopped := o.final.EnteredAt[fsm.SourceStopped]
	failed := o.final.EnteredAt[fsm.RollingBack]
	if spent := failed.Sub(stopped); spent > budget+5*time.Second {
		t.Fatalf("rolled back %v after source_stopped, want within the %v budget (plus a few seconds)", spent, budget)
	}
	down := o.final.EnteredAt[fsm.RolledBack].Sub(stopped)
	t.Logf("hung trim step: rolled back %v after source_stopped (budget %v); machine back on the source %v after it stopped; reason %q",
		failed.Sub(stopped).Round(time.Millisecond), budget, down.Round(time.Millisecond), rb.Reason)
	report("deadlines", fmt.Sprintf("| the trim step hangs on the target (budget %v) | rolling back %v after source_stopped | machine back %v after it stopped | %s, records %d/%d, leaks %s |",
		budget, failed.Sub(stopped).Round(100*time.Millisecond), down.Round(100*time.Millisecond), o.final.State, o.acked, o.present, o.leaks))
}

// Copies of the mount table made while a machine runs: one made by
// `ip netns exec` (a slave copy) drops the machine's mount when ferry
// unmounts it, so the next migration completes; a fully private copy pins
// the volume, and the rollback's reason names the process that holds it.
func TestFenceMountCopiesDoNotPinVolumes(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	testenv.Tools(t, "util-linux", "unshare")
	c := newCluster(t, 2)
	a, b := c.ws[0], c.ws[1]
	if err := c.bed.CreateVolume(c.ctx, "svol", a, matrixVolSize); err != nil {
		t.Fatal(err)
	}
	ack, err := c.bed.RunRecords(c.ctx, "smach", a, "svol", 66)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := testbed.WaitAcked(c.ctx, ack, 20, time.Minute); err != nil {
		t.Fatal(err)
	}
	holder := func(args ...string) *exec.Cmd {
		cmd := exec.Command(args[0], args[1:]...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		time.Sleep(500 * time.Millisecond) // its copy of the mount table is made
		return cmd
	}
	// A slave copy, as a newcomer running the CLI under ip netns exec makes.
	slave := holder("ip", "netns", "exec", c.bed.NSOf(a), "sleep", "600")
	start := time.Now()
	id, err := c.bed.Migrate(c.ctx, "smach", b)
	if err != nil {
		t.Fatal(err)
	}
	w := c.watch(id, a, "svol")
	o := c.finish(id, "smach", a, b, "svol", ack, w, start, 3*time.Minute)
	if o.final.State != fsm.Completed {
		t.Fatalf("with an `ip netns exec` process (pid %d) started while the machine ran: migration ended %s (%+v)", slave.Process.Pid, o.final.State, o.final.Rollback)
	}
	// A private copy of the target's mounts, then the migration back.
	// It drops every other test's mounts from its copy first: tests of
	// other packages run at the same time, and a private copy must pin
	// only this cluster's volumes.
	keep := filepath.Dir(c.bed.WorkerDir(b))
	private := holder("unshare", "-m", "--propagation", "private", "sh", "-c",
		`awk '{print $2}' /proc/self/mounts | sort -r | while read -r m; do case "$m" in "$0"/*) ;; /tmp/*) umount -l "$m" 2>/dev/null ;; esac; done; exec sleep 600`, keep)
	mach, _ := c.bed.Client.GetMachine(c.ctx, "smach")
	start = time.Now()
	id, err = c.bed.Migrate(c.ctx, "smach", a)
	if err != nil {
		t.Fatal(err)
	}
	m, err := c.bed.WaitState(c.ctx, id, 3*time.Minute, fsm.RollingBack, fsm.RolledBack, fsm.Completed)
	if err != nil {
		t.Fatal(err)
	}
	// Free the volume before the source remounts it.
	private.Process.Kill()
	private.Wait()
	if m.State == fsm.Completed {
		t.Fatalf("a private copy of the mount table (pid %d) did not pin the volume: the test proves nothing", private.Process.Pid)
	}
	want := "pid " + strconv.Itoa(private.Process.Pid) + " (unshare"
	if m.Rollback == nil || (!strings.Contains(m.Rollback.Reason, "pid "+strconv.Itoa(private.Process.Pid)+" ")) {
		t.Fatalf("rollback reason %q does not name the holder (%s...)", m.Rollback.Reason, want)
	}
	if !strings.Contains(m.Rollback.Reason, "nsenter -t") {
		t.Fatalf("rollback reason %q does not say what to do", m.Rollback.Reason)
	}
	w = c.watch(id, b, mach.Volume)
	o2 := c.finish(id, "smach", b, a, mach.Volume, ack, w, start, 3*time.Minute)
	t.Logf("slave copy: %s in %v; private copy: %s, reason %q", o.final.State, o.took.Round(time.Millisecond), o2.final.State, m.Rollback.Reason)
	report("mount copies", fmt.Sprintf("| `ip netns exec` process during a migration | %s in %v |", o.final.State, o.took.Round(100*time.Millisecond)))
	report("mount copies", fmt.Sprintf("| private mount namespace copy | %s, reason names pid %d |", o2.final.State, private.Process.Pid))
}

// fstrim hanging on the target (a wrapper on its agent's PATH that sleeps)
// costs the machine nothing: the trim is a hint that runs beside the
// cutover; hydration waits for it a bounded time, then copies without it.
func TestFenceHungFstrimDoesNotHoldTheMigration(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	c := newCluster(t, 2)
	a, b := c.ws[0], c.ws[1]
	wrap := t.TempDir()
	if err := os.WriteFile(filepath.Join(wrap, "fstrim"), []byte("#!/bin/sh\nexec sleep 600\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	c.bed.Kill("agent/"+b, syscall.SIGTERM)
	if err := c.bed.StartAgentEnv(b, []string{"PATH=" + wrap + ":" + os.Getenv("PATH")}); err != nil {
		t.Fatal(err)
	}
	if err := c.bed.CreateVolume(c.ctx, "tvol", a, matrixVolSize); err != nil {
		t.Fatal(err)
	}
	ack, err := c.bed.RunRecords(c.ctx, "tmach", a, "tvol", 66)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := testbed.WaitAcked(c.ctx, ack, 20, time.Minute); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	m, err := c.bed.Client.CreateMigration(c.ctx, api.PlanRequest{Machine: "tmach", Target: b})
	if err != nil {
		t.Fatal(err)
	}
	w := c.watch(m.ID, a, "tvol")
	o := c.finish(m.ID, "tmach", a, b, "tvol", ack, w, start, 3*time.Minute)
	if o.final.State != fsm.Completed {
		t.Fatalf("a hung fstrim: migration ended %s (rollback %+v), want completed", o.final.State, o.final.Rollback)
	}
	down := o.final.EnteredAt[fsm.Cutover].Sub(o.final.EnteredAt[fsm.SourceStopped])
	t.Logf("hung fstrim: completed in %v; source_stopped -> cutover %v", o.took.Round(time.Millisecond), down.Round(time.Millisecond))
	report("deadlines", fmt.Sprintf("| fstrim hangs on the target | source_stopped -> cutover %v (the trim runs beside it) | %s in %v, records %d/%d, leaks %s |",
		down.Round(time.Millisecond), o.final.State, o.took.Round(100*time.Millisecond), o.acked, o.present, o.leaks))
}
