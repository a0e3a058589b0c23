package e2e

import (
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/machine/workload"
)

const volSize = 64 << 20

func fileSum(t *testing.T, path string) [32]byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	var s [32]byte
	copy(s[:], h.Sum(nil))
	return s
}

// A full migration while the workload writes: nothing acknowledged is lost,
// the source volume is not written after source_stopped, the machine never
// runs on two workers, and it keeps answering on its old 6PN address.
func TestMigrationWithWritingWorkload(t *testing.T) {
	e := newEnv(t, 2)
	a, b := e.ws[0], e.ws[1]
	e.createVolume("vol1", a, volSize)
	ack, _ := e.runMachine("m1", a, "vol1", 7)
	e.waitAcked(ack, 200, time.Minute)

	id := e.migrate("m1", b)
	// Snapshot the frozen source as soon as it is exported.
	e.waitState(id, 2*time.Minute, fsm.Exported, fsm.CloneBuilt, fsm.Trimmed, fsm.Cutover, fsm.Hydrating, fsm.Hydrated, fsm.SourceReleased, fsm.Completed)
	frozen := fileSum(t, sourceFile(e, a, "vol1"))
	m := e.waitState(id, 2*time.Minute, fsm.Completed)

	if got := fileSum(t, sourceFile(e, a, "vol1")); got != frozen {
		t.Fatal("the source volume changed after source_stopped (invariant 1)")
	}
	st, err := os.Stat(sourceFile(e, a, "vol1"))
	if err != nil {
		t.Fatal(err)
	}
	if st.ModTime().After(m.EnteredAt[fsm.SourceStopped]) {
		t.Fatalf("source volume modified at %v, after source_stopped at %v", st.ModTime(), m.EnteredAt[fsm.SourceStopped])
	}
	before, _ := workload.Acked(ack)
	e.waitAcked(ack, before+50, time.Minute) // it writes on the target
	present, acked := e.verifyRecords("m1", b, ack)
	t.Logf("records: %d acknowledged, %d present", acked, present)
	e.assertNeverTwice("m1")

	d, ok := m.Downtime()
	if !ok || d <= 0 {
		t.Fatalf("downtime not computable from %v", m.EnteredAt)
	}
	// A bound, not a benchmark (make bench measures it: under 200 ms on an
	// idle 2-core machine). Ten seconds leaves room for a loaded 2-core CI
	// running race-built daemons, and still fails a cutover that waits on
	// something it should not: the hydration, a lease or a retry timer.
	const maxDowntime = 10 * time.Second
	if d > maxDowntime {
		t.Fatalf("downtime %v (source_stopped %v, cutover %v) exceeds %v", d,
			m.EnteredAt[fsm.SourceStopped], m.EnteredAt[fsm.Cutover], maxDowntime)
	}
	t.Logf("downtime %v, fetched %d of %d bytes, skipped %d", d, m.Progress.FetchedBytes, m.Progress.TotalBytes, m.Progress.SkippedBytes)
	if m.Progress.FetchedBytes >= m.Progress.TotalBytes {
		t.Fatalf("fetched %d bytes of a %d-byte volume: fstrim and known-zero skipped nothing", m.Progress.FetchedBytes, m.Progress.TotalBytes)
	}
	mach, err := e.c.GetMachine(e.ctx, "m1")
	if err != nil || mach.Worker != b || !mach.Migrated || mach.Addr6PN != m.New6PN {
		t.Fatalf("machine record after migration: %+v (err %v)", mach, err)
	}
	src, _ := e.c.GetVolume(e.ctx, "vol1")
	if src.State != fsm.VolPendingDelete || src.DestroyAfter.IsZero() {
		t.Fatalf("source volume is %s (destroy after %v), want pending_destroy with a retention deadline", src.State, src.DestroyAfter)
	}
	// The target agent's metrics saw the cutover.
	body, err := metricsOf(e, b)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(body, "ferry_agent_downtime_seconds_count 1") || !strings.Contains(body, `ferry_agent_steps_total{state="hydrating"}`) {
		t.Fatalf("target metrics lack the cutover:\n%s", body)
	}
	e.assertNoKeysInLogs()
	// The old address keeps answering during the grace period.
	if err := echo(e, m.Old6PN); err != nil {
		t.Fatalf("old 6PN address %s: %v", m.Old6PN, err)
	}
	if err := echo(e, m.New6PN); err != nil {
		t.Fatalf("new 6PN address %s: %v", m.New6PN, err)
	}
}

// Abort before cutover: the machine is back on the source, the target clean.
// Abort after cutover: refused, and the migration completes.
func TestAbort(t *testing.T) {
	e := newEnv(t, 2)
	a, b := e.ws[0], e.ws[1]
	// The target pauses before proposing clone_built, so the abort lands before cutover.
	e.bed.Kill("agent/"+b, 15)
	if err := e.bed.StartAgentEnv(b, []string{"FERRY_FAILPOINT_PAUSE_BEFORE=clone_built=3s"}); err != nil {
		t.Fatal(err)
	}
	e.createVolume("vola", a, volSize)
	ack, _ := e.runMachine("ma", a, "vola", 8)
	id := e.migrate("ma", b)
	e.waitState(id, time.Minute, fsm.Exported)
	// The build maps the machine's old address on the target before it
	// proposes clone_built (held back 3 s here).
	mappings := filepath.Join(e.bed.WorkerDir(b), "net", "mappings", "*.json")
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if made, _ := filepath.Glob(mappings); len(made) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the target's build did not map the machine's old address")
		}
	}
	if _, err := e.c.Abort(e.ctx, id, "test abort"); err != nil {
		t.Fatalf("abort before cutover refused: %v", err)
	}
	m := e.waitState(id, 2*time.Minute, fsm.RolledBack)
	if m.Rollback == nil || !m.Rollback.TargetTornDown || !m.Rollback.SourceRestored {
		t.Fatalf("rollback record %+v", m.Rollback)
	}
	before, _ := workload.Acked(ack)
	e.waitAcked(ack, before+50, time.Minute) // writing again, on the source
	e.verifyRecords("ma", a, ack)
	e.assertNeverTwice("ma")
	if left, _ := filepath.Glob(filepath.Join(e.bed.WorkerDir(b), "volumes", "vola-*")); len(left) > 0 {
		t.Fatalf("the target kept its destination volume after rollback: %v", left)
	}
	if left, _ := filepath.Glob(mappings); len(left) > 0 {
		t.Fatalf("the target kept the old address's mapping after rollback: %v", left)
	}
	mach, _ := e.c.GetMachine(e.ctx, "ma")
	if mach.Worker != a {
		t.Fatalf("machine is on %s after rollback, want %s", mach.Worker, a)
	}

	// Now migrate again with slow hydration and abort after cutover.
	e.bed.Kill("agent/"+b, 15)
	if err := e.bed.StartAgentEnv(b, []string{"FERRY_FAILPOINT_PAUSE_BEFORE=hydrated=4s"}); err != nil {
		t.Fatal(err)
	}
	id2 := e.migrate("ma", b)
	e.waitState(id2, 2*time.Minute, fsm.Hydrating, fsm.Hydrated)
	_, err := e.c.Abort(e.ctx, id2, "too late")
	if api.ErrorCode(err) != fsm.CodePastCutover {
		t.Fatalf("abort after cutover: err = %v, want code %s", err, fsm.CodePastCutover)
	}
	e.waitState(id2, 2*time.Minute, fsm.Completed)
	e.verifyRecords("ma", b, ack)
	e.assertNeverTwice("ma")
}

// kill -9 of the source agent before export and of the target agent during
// hydration: each restarted, the migration completes with nothing lost.
func TestAgentCrashes(t *testing.T) {
	e := newEnv(t, 2)
	a, b := e.ws[0], e.ws[1]
	e.bed.Kill("agent/"+a, 15)
	if err := e.bed.StartAgentEnv(a, []string{"FERRY_FAILPOINT_PAUSE_BEFORE=exported=30s"}); err != nil {
		t.Fatal(err)
	}
	e.bed.Kill("agent/"+b, 15)
	if err := e.bed.StartAgentEnv(b, []string{"FERRY_FAILPOINT_PAUSE_BEFORE=hydrated=30s"}); err != nil {
		t.Fatal(err)
	}
	e.createVolume("volc", a, volSize)
	ack, _ := e.runMachine("mc", a, "volc", 9)
	id := e.migrate("mc", b)
	e.waitState(id, time.Minute, fsm.SourceStopped)
	time.Sleep(300 * time.Millisecond) // inside the export step
	e.kill9(a)
	if err := e.bed.StartAgent(a); err != nil {
		t.Fatal(err)
	}
	e.waitState(id, 2*time.Minute, fsm.Hydrating)
	time.Sleep(300 * time.Millisecond)
	e.kill9(b)
	if err := e.bed.StartAgent(b); err != nil {
		t.Fatal(err)
	}
	e.waitState(id, 2*time.Minute, fsm.Completed)
	before, _ := workload.Acked(ack)
	e.waitAcked(ack, before+50, time.Minute)
	e.verifyRecords("mc", b, ack)
	e.assertNeverTwice("mc")
}

// A target agent killed before cutover and never restarted: its lease
// expires, the server rolls the migration back; the operator confirms the
// dead target's teardown and the machine runs on the source again.
func TestLeaseExpiryRollsBack(t *testing.T) {
	t0 := time.Now()
	phase := func(what string) { t.Logf("%6.1fs %s", time.Since(t0).Seconds(), what) }
	t.Cleanup(func() { phase("cleanup done") })
	e := newEnv(t, 2, "--lease-ttl", "3s")
	phase("cluster up")
	a, b := e.ws[0], e.ws[1]
	e.bed.Kill("agent/"+b, 15)
	if err := e.bed.StartAgentEnv(b, []string{"FERRY_FAILPOINT_PAUSE_BEFORE=clone_built=60s"}); err != nil {
		t.Fatal(err)
	}
	e.createVolume("voll", a, volSize)
	ack, _ := e.runMachine("ml", a, "voll", 10)
	id := e.migrate("ml", b)
	e.waitState(id, time.Minute, fsm.Exported)
	phase("exported")
	e.kill9(b)
	m := e.waitState(id, time.Minute, fsm.RollingBack)
	phase("rolling back")
	if m.Rollback == nil || m.Rollback.Reason == "" {
		t.Fatalf("rollback without a reason: %+v", m.Rollback)
	}
	t.Logf("rollback reason: %s", m.Rollback.Reason)
	// The source must not restart the machine before the target's teardown is committed.
	time.Sleep(time.Second)
	if m, _ := e.c.GetMigration(e.ctx, id); m.State != fsm.RollingBack {
		t.Fatalf("migration left rolling_back (%s) without the target's teardown", m.State)
	}
	// The operator's word counts only after the target's lease expired plus
	// the fence margin: until then its agent may still run the machine.
	_, err := e.c.Propose(e.ctx, id, fsm.EvTargetTornDown, "operator-confirms-early", fsm.EventPayload{Reason: "target gone"})
	var ref *api.Error
	if !errors.As(err, &ref) || ref.Code != fsm.CodeTargetMayRun {
		t.Fatalf("operator target_torn_down right after the lease expired: err = %v, want a %s refusal", err, fsm.CodeTargetMayRun)
	}
	deadline := time.Now().Add(fsm.FenceMargin + 10*time.Second)
	for {
		_, err = e.c.Propose(e.ctx, id, fsm.EvTargetTornDown, "operator-confirms", fsm.EventPayload{Reason: "target gone"})
		if err == nil || !errors.As(err, &ref) || ref.Code != fsm.CodeTargetMayRun || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	phase("operator confirmed the target gone")
	e.waitState(id, time.Minute, fsm.RolledBack)
	phase("rolled back")
	before, _ := workload.Acked(ack)
	e.waitAcked(ack, before+50, time.Minute)
	e.verifyRecords("ml", a, ack)
	e.assertNeverTwice("ml")
	phase("verified")
}

// A drain of a worker holding four machines to two targets, two at a time.
func TestDrain(t *testing.T) {
	e := newEnv(t, 3)
	src := e.ws[0]
	acks := map[string]string{}
	for i, id := range []string{"d1", "d2", "d3", "d4"} {
		e.createVolume("v"+id, src, volSize)
		acks[id], _ = e.runMachine(id, src, "v"+id, uint32(20+i))
	}
	ctx, cancel := context.WithTimeout(e.ctx, 4*time.Minute)
	defer cancel()
	// Watch the number of active migrations off the source while the CLI drains.
	var mu sync.Mutex
	maxActive := 0
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			ms, err := e.c.ListMigrations(ctx, src)
			if err != nil {
				continue
			}
			n := 0
			for _, m := range ms {
				if !m.State.Terminal() && m.Source == src {
					n++
				}
			}
			mu.Lock()
			if n > maxActive {
				maxActive = n
			}
			mu.Unlock()
		}
	}()
	out, err := runCLI(ctx, e, "drain", src, "--to", e.ws[1]+","+e.ws[2], "--parallel", "2", "--yes", "--wait")
	close(stop)
	if err != nil {
		t.Fatalf("drain: %v\n%s", err, out)
	}
	t.Logf("drain output:\n%s", out)
	mu.Lock()
	defer mu.Unlock()
	if maxActive > 2 || maxActive < 1 {
		t.Fatalf("saw %d concurrent migrations off %s, want 1..2", maxActive, src)
	}
	ms, _ := e.c.ListMachines(e.ctx, "")
	for _, m := range ms {
		if m.Worker == src {
			t.Fatalf("machine %s still on %s after the drain", m.ID, src)
		}
		e.verifyRecords(m.ID, m.Worker, acks[m.ID])
		e.assertNeverTwice(m.ID)
	}
}

// Keys go only to the owner or target; attached volumes cannot be destroyed.
func TestKeyAndDestroyRefusals(t *testing.T) {
	e := newEnv(t, 3)
	a, c3 := e.ws[0], e.ws[2]
	e.createVolume("volk", a, volSize)
	e.runMachine("mk", a, "volk", 30)
	tc, err := tlsutil.ClientConfig(e.bed.TLSDir(), c3)
	if err != nil {
		t.Fatal(err)
	}
	third, err := api.NewClient([]string{e.bed.ServerAddr}, tc)
	if err != nil {
		t.Fatal(err)
	}
	third.SetDialer(e.bed.DialIn("ctl"))
	for _, p := range []fsm.Purpose{fsm.PurposeOwner, fsm.PurposeMigration, fsm.PurposeRecovery} {
		env, err := third.GetEnvelope(e.ctx, "volk", p, 0)
		if err == nil || len(env.Ciphertext) > 0 {
			t.Fatalf("a worker that neither owns nor targets the volume got its %s envelope", p)
		}
		if api.ErrorCode(err) != fsm.CodeForbidden {
			t.Fatalf("%s envelope request by a third worker: %v, want %s", p, err, fsm.CodeForbidden)
		}
	}
	// Operators do not read owner envelopes either.
	if _, err := e.c.GetEnvelope(e.ctx, "volk", fsm.PurposeOwner, 0); api.ErrorCode(err) != fsm.CodeForbidden {
		t.Fatalf("owner envelope request by an operator: %v, want %s", err, fsm.CodeForbidden)
	}
	_, err = e.c.DestroyVolume(e.ctx, "volk", time.Hour)
	if api.ErrorCode(err) != fsm.CodeAttached {
		t.Fatalf("destroy of an attached volume: %v, want code %s", err, fsm.CodeAttached)
	}
	out, err := runCLI(e.ctx, e, "volume", "destroy", "volk")
	if err == nil {
		t.Fatalf("ferry volume destroy of an attached volume succeeded:\n%s", out)
	}
	if code := exitCode(err); code != 3 {
		t.Fatalf("ferry volume destroy exit code %d, want 3 (refused):\n%s", code, out)
	}
}
