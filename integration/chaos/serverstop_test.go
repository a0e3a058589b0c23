package chaos

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/testbed"
)

// The raft leader frozen with SIGSTOP: its kernel still accepts connections
// and ACKs their bytes, so only deadlines notice it. The agents must fail
// over to the other servers within seconds: every worker's lease keeps being
// renewed (the server side sees no lapse), no agent fences its running
// machine, and a migration planned while the old leader is frozen
// completes.
func TestFenceServerStoppedAgentsFailOver(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	const ttl = 6 * time.Second
	c := newCluster(t, 2, "--lease-ttl", ttl.String())
	a, b := c.ws[0], c.ws[1]
	if err := c.bed.CreateVolume(c.ctx, "svol", a, matrixVolSize); err != nil {
		t.Fatal(err)
	}
	ack, err := c.bed.RunRecords(c.ctx, "smach", a, "svol", 62)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := testbed.WaitAcked(c.ctx, ack, 20, time.Minute); err != nil {
		t.Fatal(err)
	}
	obs := c.observe("smach")
	leader := c.server("leader")
	key := testbed.ServerKey(leader)
	if err := c.bed.Signal(key, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	frozen := time.Now()
	thawed := false
	thaw := func() {
		if !thawed {
			thawed = true
			if err := c.bed.Signal(key, syscall.SIGCONT); err != nil {
				t.Error(err)
			}
		}
	}
	t.Cleanup(thaw) // before the cluster's own cleanup (cleanups run last-in first-out)
	_, elected := c.failover(leader, 30*time.Second)

	// Two lease periods with the leader frozen: each worker's lease is
	// renewed through another server, and the machine keeps running.
	renewedAt := map[string]time.Time{}
	lastExpiry := map[string]time.Time{}
	var worstGap time.Duration
	for time.Since(frozen) < 2*ttl {
		if !c.runningOn(a, "smach") {
			t.Fatalf("the machine stopped on %s %v after the leader froze: an agent fenced instead of failing over", a, time.Since(frozen).Round(time.Millisecond))
		}
		// The test's own client fails over like the agents': a bounded
		// attempt, then the next server.
		qctx, cancel := context.WithTimeout(c.ctx, 2*time.Second)
		ws, err := c.bed.Client.ListWorkers(qctx)
		cancel()
		if err != nil {
			if time.Since(frozen) > ttl {
				t.Fatalf("listing workers %v after the leader froze: %v", time.Since(frozen).Round(time.Millisecond), err)
			}
			continue
		}
		now := time.Now()
		for _, w := range ws {
			if !w.Alive(now) {
				t.Fatalf("worker %s's lease lapsed %v after the leader froze (expired %v): its agent did not fail over", w.Name, now.Sub(frozen).Round(time.Millisecond), w.LeaseExpiry)
			}
			if w.LeaseExpiry.After(lastExpiry[w.Name]) {
				if prev, ok := renewedAt[w.Name]; ok {
					worstGap = max(worstGap, now.Sub(prev))
				} else {
					worstGap = max(worstGap, now.Sub(frozen))
				}
				lastExpiry[w.Name], renewedAt[w.Name] = w.LeaseExpiry, now
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, w := range c.ws {
		if renewedAt[w].IsZero() {
			t.Fatalf("worker %s's lease was never renewed in the %v the leader was frozen", w, 2*ttl)
		}
	}

	// The agents' side: when their last heartbeat failed.
	lastFailed := map[string]time.Duration{}
	for _, wk := range c.ws {
		lastFailed[wk] = lastLogged(t, filepath.Join(c.bed.Dir(), "agent-"+wk+".log"), "heartbeat failed", frozen)
	}

	start := time.Now()
	id, err := c.bed.Migrate(c.ctx, "smach", b)
	if err != nil {
		t.Fatalf("planning a migration with the old leader frozen: %v", err)
	}
	w := c.watch(id, a, "svol")
	if _, err := c.bed.WaitState(c.ctx, id, 2*time.Minute, fsm.Completed); err != nil {
		w.close()
		t.Fatal(err)
	}
	migrated := time.Since(start)
	thaw()
	o := c.finish(id, "smach", a, b, "svol", ack, w, start, 3*time.Minute)
	if o.final.State != fsm.Completed {
		t.Fatalf("a migration with the old leader frozen ended %s, want completed", o.final.State)
	}
	seen := c.checkObserved(obs)
	t.Logf("leader %s frozen: new leader after %v; longest wait between lease renewals seen %v (lease %v, renewed when half is left); last failed heartbeat after the freeze per worker %v (-1s: none); migration planned with it frozen completed in %v; observer %s",
		leader, elected.Round(time.Millisecond), worstGap.Round(time.Millisecond), ttl, lastFailed, migrated.Round(time.Millisecond), seen)
	report("fencing", fmt.Sprintf("| raft leader frozen (SIGSTOP, lease %v) | no fence; agents' last failed heartbeat %v after the freeze | new leader after %v; migration planned during the freeze %s in %v, records %d/%d, leaks %s, observer: %s |",
		ttl, lastFailed, elected.Round(100*time.Millisecond), o.final.State, migrated.Round(100*time.Millisecond), o.acked, o.present, o.leaks, seen))
}

// lastLogged is how long after since a JSON log line with message msg was
// last written (whole seconds: the logs' resolution), or -1s when none was.
func lastLogged(t *testing.T, path, msg string, since time.Time) time.Duration {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("agent log: %v", err)
	}
	defer f.Close()
	last := time.Duration(-1) * time.Second
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var l struct {
			Message string    `json:"message"`
			Time    time.Time `json:"time"`
		}
		if json.Unmarshal(sc.Bytes(), &l) != nil || l.Message != msg || l.Time.Before(since.Truncate(time.Second)) {
			continue
		}
		last = l.Time.Sub(since.Truncate(time.Second))
	}
	return last
}
