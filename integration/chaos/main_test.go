// Package chaos shows ferry's promise under faults: every migration ends
// completed or rolled back, the invariants hold (docs/architecture.md), no acknowledged
// record is lost and nothing leaks, whatever is killed or cut at whatever
// state. Real clusters (internal/testbed): agents and three servers (a raft
// cluster, mTLS) in network namespaces, LUKS2 volumes, FUSE + loop + ext4, iSCSI over the fabric.
//
// The tests run three at a time (unless -parallel is given), each on its
// own cluster: most of their time is spent waiting for outages and leases.
//
//	go test ./integration/chaos/                       # short forms (CI)
//	FERRY_CHAOS=full go test -timeout 60m -v ./integration/chaos/   # whole matrix, long soak
package chaos

import (
	"context"
	"flag"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/testbed"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/machine/workload"
)

var ferryBin string

// full selects the long forms (every participant, lease-expiry variants, long soak).
var full = os.Getenv("FERRY_CHAOS") == "full"

// reports are the outcome tables, printed after the run.
var (
	reportMu sync.Mutex
	reports  = map[string][]string{}
)

func report(table, line string) {
	reportMu.Lock()
	defer reportMu.Unlock()
	reports[table] = append(reports[table], line)
}

func TestMain(m *testing.M) {
	// The test binary doubles as the iSCSI export child (TestSourceReadErrors).
	if iscsi.IsExportChild() {
		iscsi.ServeChild()
	}
	// Three tests at a time unless -parallel says otherwise: they wait on
	// outages, leases and holds far more than they compute (the short form
	// uses about a third of one core on average), and each has its own cluster.
	flag.Parse()
	parallelSet := false
	flag.Visit(func(f *flag.Flag) { parallelSet = parallelSet || f.Name == "test.parallel" })
	if !parallelSet {
		if err := flag.Set("test.parallel", "3"); err != nil {
			panic(err)
		}
	}
	code := testbed.RunRaceBuilt(m, "chaos", &ferryBin)
	var names []string
	for n := range reports {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Printf("\n%s\n%s\n", n, strings.Join(reports[n], "\n"))
	}
	os.Exit(code)
}

func requireEnv(t testing.TB) {
	t.Helper()
	testenv.Root(t, "network namespaces, loop devices, mounts")
	testenv.Tools(t, "run scripts/deps.sh", "cryptsetup", "mkfs.ext4", "nsenter", "losetup", "fstrim", "fusermount3", "ip", "ss")
	testenv.Paths(t, "modprobe fuse", "/dev/fuse")
}

// servers is the size of every chaos cluster's raft cluster: a leader can
// die and the other two still commit.
const servers = 3

// observeInvariants, when set, checks what an invariant observer saw during
// a finished migration; finish calls it in every row, after the records
// verifier. The observer lives with the fencing work and plugs in here.
var observeInvariants func(t testing.TB, bed *testbed.Bed, migrationID string) error

// cluster is a test bed with the failpoints each agent currently runs with.
type cluster struct {
	t   testing.TB
	bed *testbed.Bed
	ctx context.Context
	ws  []string
	env map[string]string // worker -> FERRY_FAILPOINT_PAUSE_BEFORE it runs with
	// running machines the bed holds (for the leak check); 1 unless set
	running int
	// machineMayDie: the fault legitimately kills the machine's I/O (its
	// own disk is full), so finish checks the records without new writes.
	machineMayDie bool
}

func newCluster(t testing.TB, n int, agentArgs ...string) *cluster {
	return newClusterFP(t, n, "", agentArgs...)
}

// newClusterFP starts a cluster whose servers run with failpoints serverFP.
func newClusterFP(t testing.TB, n int, serverFP string, agentArgs ...string) *cluster {
	requireEnv(t)
	id := testbed.RandHex(2)
	var ws []string
	for i := 0; i < n; i++ {
		ws = append(ws, fmt.Sprintf("w%d%s", i, id))
	}
	// Kept when the test fails, for the logs and the machines' journals.
	dir, err := os.MkdirTemp("", "ferry-chaos-")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	sctx, scancel := context.WithTimeout(ctx, 3*time.Minute)
	defer scancel()
	bed, err := testbed.Start(sctx, testbed.Config{Dir: dir, Exe: ferryBin, Prefix: "c" + id, Workers: ws,
		Log: zerolog.Nop(), AgentArgs: agentArgs, Grace: time.Minute, Servers: servers, ServerFailpoints: serverFP})
	if err != nil {
		if bed != nil {
			t.Log(bed.DumpLogs(4000))
		}
		t.Fatalf("start cluster: %v", err)
	}
	c := &cluster{t: t, bed: bed, ctx: ctx, ws: ws, env: map[string]string{}}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(bed.DumpLogs(6000))
		}
		cctx, ccancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer ccancel()
		if err := bed.Close(cctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		for _, l := range bed.Leftovers() {
			t.Errorf("leaked after teardown: %s", l)
		}
		if t.Failed() {
			t.Logf("work dir kept: %s", dir)
		} else {
			os.RemoveAll(dir)
		}
	})
	return c
}

// setFailpoints restarts (SIGTERM) the agents whose failpoints differ from
// want, then waits until every worker holds a valid lease: a row starts on
// a healthy cluster, not on the tail of the previous row's outage.
func (c *cluster) setFailpoints(want map[string]string) {
	c.t.Helper()
	defer func() {
		if err := c.bed.WaitWorkers(c.ctx, 2*time.Minute); err != nil {
			c.t.Fatal(err)
		}
	}()
	for _, w := range c.ws {
		if c.env[w] == want[w] {
			continue
		}
		c.bed.Kill("agent/"+w, syscall.SIGTERM)
		c.startAgent(w, want[w])
	}
}

func (c *cluster) startAgent(w, failpoints string) {
	c.t.Helper()
	var env []string
	if failpoints != "" {
		env = []string{"FERRY_FAILPOINT_PAUSE_BEFORE=" + failpoints}
	}
	if err := c.bed.StartAgentEnv(w, env); err != nil {
		c.t.Fatal(err)
	}
	c.env[w] = failpoints
}

// isServer reports whether who is a server ID (else it is a worker).
func (c *cluster) isServer(who string) bool { return slices.Contains(c.bed.ServerIDs(), who) }

// server resolves "leader" or "follower" to a server ID: the one that says
// it leads now, or another running one.
func (c *cluster) server(role string) string {
	c.t.Helper()
	leader, err := c.bed.Leader(c.ctx, time.Minute)
	if err != nil {
		c.t.Fatal(err)
	}
	if role == "leader" {
		return leader
	}
	for _, id := range c.bed.ServerIDs() {
		if id != leader && c.bed.Running(testbed.ServerKey(id)) {
			return id
		}
	}
	c.t.Fatalf("no running follower besides leader %s", leader)
	return ""
}

// kill9 kills a participant: a server (by ID) or a worker's agent.
func (c *cluster) kill9(who string) {
	c.t.Helper()
	key := "agent/" + who
	if c.isServer(who) {
		key = testbed.ServerKey(who)
	}
	if err := c.bed.Kill(key, syscall.SIGKILL); err != nil {
		c.t.Fatal(err)
	}
	if !c.isServer(who) {
		c.env[who] = "<dead>"
	}
}

func (c *cluster) restart(who string) {
	c.t.Helper()
	if c.isServer(who) {
		if err := c.bed.StartServerID(who); err != nil {
			c.t.Fatal(err)
		}
		return
	}
	c.startAgent(who, "")
}

// failover waits until a server other than dead leads, and returns it.
func (c *cluster) failover(dead string, timeout time.Duration) (string, time.Duration) {
	c.t.Helper()
	start := time.Now()
	for time.Since(start) < timeout {
		l, err := c.bed.Leader(c.ctx, timeout)
		if err == nil && l != dead {
			return l, time.Since(start)
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.t.Fatalf("no new leader within %v of killing leader %s", timeout, dead)
	return "", 0
}

// stateAt is the state the migration was in at t, from the commit times of
// its final record (one host, one clock): the state entered last at or
// before t. It is how a row proves its fault landed where it meant to.
func stateAt(m *fsm.Migration, t time.Time) fsm.State {
	var best fsm.State
	var at time.Time
	for s, e := range m.EnteredAt {
		if !e.After(t) && (best == "" || e.After(at)) {
			best, at = s, e
		}
	}
	return best
}

// landed checks that the fault between from and to fell wholly in state
// want of the finished migration m, and returns the state it fell in.
func landed(t testing.TB, m *fsm.Migration, want fsm.State, from, to time.Time, path string) fsm.State {
	t.Helper()
	s, err := landedIn(m, want, from, to, path)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// landedIn is landed's check as an error: the fault missed its state.
func landedIn(m *fsm.Migration, want fsm.State, from, to time.Time, path string) (fsm.State, error) {
	a, b := stateAt(m, from), stateAt(m, to)
	if a != want || b != want {
		return a, fmt.Errorf("the fault missed its state: it began in %q and ended in %q, want both %s (path %s, entered %v)", a, b, want, path, m.EnteredAt)
	}
	return a, nil
}

// machineOn returns the worker a machine is recorded on.
func (c *cluster) machineOn(id string) string {
	c.t.Helper()
	var last error
	for i := 0; i < 100; i++ {
		m, err := c.bed.Client.GetMachine(c.ctx, id)
		if err == nil {
			return m.Worker
		}
		last = err
		time.Sleep(100 * time.Millisecond)
	}
	c.t.Fatalf("machine %s: %v", id, last)
	return ""
}

// other returns a worker that is not w.
func (c *cluster) other(w string) string {
	for _, x := range c.ws {
		if x != w {
			return x
		}
	}
	return ""
}

// outcome is what one faulted migration ended as, with the invariants checked.
type outcome struct {
	final      *fsm.Migration
	ranOn      string
	acked      uint64
	present    uint64
	frozenSame string // "yes", "n/a (rolled back)", "n/a (never stopped)"
	leaks      string
	took       time.Duration
}

// watcher follows a migration and hashes the source volume once it is
// frozen, to check invariant 1 at the end.
type watcher struct {
	mu     sync.Mutex
	frozen *[32]byte
	states []fsm.State
	stop   chan struct{}
	done   chan struct{}
}

func (c *cluster) watch(id, srcWorker, srcVol string) *watcher {
	w := &watcher{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			select {
			case <-w.stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			m, err := c.bed.Client.GetMigration(c.ctx, id)
			if err != nil {
				continue
			}
			w.mu.Lock()
			if n := len(w.states); n == 0 || w.states[n-1] != m.State {
				w.states = append(w.states, m.State)
			}
			frozen := w.frozen != nil
			w.mu.Unlock()
			if !frozen && (m.State == fsm.SourceStopped || m.State == fsm.Exported || (m.State.AfterCutover() && m.State != fsm.Completed) ||
				m.State == fsm.CloneBuilt || m.State == fsm.Trimmed) {
				if sum, err := testbed.FileSum(c.bed.SourceFile(srcWorker, srcVol)); err == nil {
					w.mu.Lock()
					w.frozen = &sum
					w.mu.Unlock()
				}
			}
		}
	}()
	return w
}

func (w *watcher) close() {
	close(w.stop)
	<-w.done
}

func (w *watcher) path() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var s []string
	for _, st := range w.states {
		s = append(s, string(st))
	}
	return strings.Join(s, ">")
}

// finish waits for the migration's end and checks every invariant: it ends
// completed or rolled back; the frozen source is unchanged if it completed;
// the machine runs on exactly the worker the ending says, never on two at
// once; every acknowledged record is there and new ones keep coming; no
// export, session, clone, mount, loop device, namespace or process is left
// beyond the one running machine's.
func (c *cluster) finish(id, machineID, src, dst, srcVol, ack string, w *watcher, start time.Time, timeout time.Duration) outcome {
	c.t.Helper()
	m, err := c.bed.WaitTerminal(c.ctx, id, timeout)
	w.close()
	if err != nil {
		c.t.Fatalf("never hangs: %v (states seen %s)", err, w.path())
	}
	o := outcome{final: m, took: time.Since(start)}
	want := dst
	if m.State == fsm.RolledBack {
		want = src
	}
	// The machine record and the running process agree.
	deadline := time.Now().Add(30 * time.Second)
	for c.machineOn(machineID) != want && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if got := c.machineOn(machineID); got != want {
		c.t.Fatalf("migration %s ended %s but the machine is recorded on %s, want %s", id, m.State, got, want)
	}
	o.ranOn = want
	before, _ := workload.Acked(ack)
	if _, err := testbed.WaitAcked(c.ctx, ack, before+20, time.Minute); err != nil && !c.machineMayDie {
		c.t.Fatalf("machine not writing on %s after %s: %v", want, m.State, err)
	}
	o.present, o.acked, err = c.bed.VerifyRecords(machineID, want, ack)
	if err != nil {
		c.t.Fatalf("zero acknowledged records lost: %v", err)
	}
	if err := c.bed.NeverTwice(machineID); err != nil {
		c.t.Fatal(err)
	}
	if observeInvariants != nil {
		if err := observeInvariants(c.t, c.bed, id); err != nil {
			c.t.Fatalf("invariant observer: %v", err)
		}
	}
	switch {
	case m.State == fsm.RolledBack:
		o.frozenSame = "n/a (rolled back)"
	case w.frozen == nil:
		c.t.Fatalf("completed migration %s: the source was never seen frozen (states %s)", id, w.path())
	default:
		sum, err := testbed.FileSum(c.bed.SourceFile(src, srcVol))
		if err != nil {
			c.t.Fatal(err)
		}
		if sum != *w.frozen {
			c.t.Fatalf("invariant 1: the source volume %s changed after source_stopped", srcVol)
		}
		o.frozenSame = "unchanged"
	}
	// Resources settle shortly after the end (the source's export goes at
	// source_released, which precedes completed; the rollback's steps precede
	// rolled_back).
	var r testbed.Resources
	// A worker that was cut off learns of the end through a blocking query
	// that may sit on a dead connection until its attempt times out (the
	// query's wait plus the client's request timeout, 40 s), then reaps.
	deadline = time.Now().Add(60 * time.Second)
	for {
		r = c.bed.Snapshot()
		if c.machineMayDie {
			r.Machines = make([]string, max(1, c.running)) // crash-looping: present or not
		}
		err = r.CheckSteady(max(1, c.running))
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if err != nil {
		c.t.Fatalf("leak after %s: %v", m.State, err)
	}
	o.leaks = "none"
	return o
}
