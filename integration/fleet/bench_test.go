package fleet

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/sealing"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server"
)

// BenchmarkFleetDrain runs a real 3-server cluster (separate `ferry server`
// processes, mTLS) and simulated agents in this process (real API, real
// worker certificates, timing-model data path), then measures the steady
// state, the planning and the drain of many workers, and a drain across a
// killed leader. Scale with FERRY_FLEET_AGENTS (default 100) and
// FERRY_FLEET_MACHINES (per agent, default 10): the 1000 agents and
// 10 000 machines do not fit in 10 minutes on 2 cores shared with the
// servers. Run:
//
//	go test -run '^$' -bench FleetDrain -benchtime 1x ./integration/fleet/
func BenchmarkFleetDrain(b *testing.B) {
	if testing.Short() {
		b.Skip("fleet simulation: minutes")
	}
	nAgents := envInt("FERRY_FLEET_AGENTS", 100)
	perAgent := envInt("FERRY_FLEET_MACHINES", 10)
	nPlan := min(50, nAgents/2)
	nDrain := max(1, min(50, nAgents/4))
	nKill := max(1, min(10, nAgents/10))
	const (
		volSize = 4 << 30
		ttl     = 10 * time.Second
	)
	for range b.N {
		runFleetBench(b, nAgents, perAgent, nPlan, nDrain, nKill, volSize, ttl)
	}
}

func envInt(k string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(k)); err == nil && v > 0 {
		return v
	}
	return def
}

type proc struct {
	id, api, raft string
	cmd           *exec.Cmd
	dir           string
}

func freePort(b *testing.B) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func buildFerry(b *testing.B, dir string) string {
	bin := filepath.Join(dir, "ferry")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/ferry-dev/ferry/cmd/ferry").CombinedOutput()
	if err != nil {
		b.Fatalf("building ferry: %v\n%s", err, out)
	}
	return bin
}

func (p *proc) start(b *testing.B, bin, tlsDir string, join string) {
	args := []string{"server", "--name", p.id, "--data-dir", p.dir, "--listen", p.api, "--raft-addr", p.raft,
		"--tls-dir", tlsDir, "--log-level", "error",
		// One operator certificate seeds thousands of records: the
		// per-certificate write limit is not what is measured.
		"--write-rate=-1"}
	if join == "" {
		args = append(args, "--bootstrap")
	} else {
		args = append(args, "--join", join)
	}
	p.cmd = exec.Command(bin, args...)
	logf, err := os.Create(filepath.Join(filepath.Dir(p.dir), p.id+".log"))
	if err != nil {
		b.Fatal(err)
	}
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		b.Fatal(err)
	}
}

func (p *proc) kill() {
	if p.cmd != nil && p.cmd.Process != nil {
		_ = p.cmd.Process.Signal(syscall.SIGKILL)
		_, _ = p.cmd.Process.Wait()
		p.cmd = nil
	}
}

// rssMiB reads a process's resident set from /proc.
func rssMiB(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

func runFleetBench(b *testing.B, nAgents, perAgent, nPlan, nDrain, nKill int, volSize int64, ttl time.Duration) {
	b.StopTimer()
	started := time.Now()
	dir := b.TempDir()
	tlsDir := filepath.Join(dir, "tls")
	bin := buildFerry(b, dir)
	certs := map[string]string{"s0": tlsutil.KindServer, "s1": tlsutil.KindServer, "s2": tlsutil.KindServer, "operator": tlsutil.KindOperator}
	for i := range nAgents {
		certs[fmt.Sprintf("w%04d", i)] = tlsutil.KindWorker
	}
	if err := server.EnsureCerts(tlsDir, certs); err != nil {
		b.Fatal(err)
	}
	procs := make([]*proc, 3)
	var addrs []string
	for i := range procs {
		procs[i] = &proc{id: fmt.Sprintf("s%d", i), api: freePort(b), raft: freePort(b), dir: filepath.Join(dir, fmt.Sprintf("s%d", i))}
		addrs = append(addrs, procs[i].api)
	}
	b.Cleanup(func() {
		for _, p := range procs {
			p.kill()
		}
	})
	for i, p := range procs {
		join := ""
		if i > 0 {
			join = procs[0].api
		}
		p.start(b, bin, tlsDir, join)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 9*time.Minute)
	defer cancel()
	client := func(name string, rotate int) *api.Client {
		tc, err := tlsutil.ClientConfig(tlsDir, name)
		if err != nil {
			b.Fatal(err)
		}
		a := append(append([]string(nil), addrs[rotate%3:]...), addrs[:rotate%3]...)
		c, err := api.NewClient(a, tc)
		if err != nil {
			b.Fatal(err)
		}
		c.RetryFor = time.Minute
		return c
	}
	op := client("operator", 0)
	t0 := time.Now()
	for {
		st, err := op.Status(ctx)
		if err == nil && len(st.Voters) == 3 && len(st.Servers) == 3 {
			break
		}
		if time.Since(t0) > time.Minute {
			b.Fatalf("cluster did not form: %+v %v", st, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	b.Logf("cluster of 3 server processes up in %s", time.Since(t0).Round(time.Millisecond))
	// Volumes are refused until a recovery key is registered, as
	// `ferry keys recovery-init` does once per cluster.
	rk, err := sealing.Generate()
	if err != nil {
		b.Fatal(err)
	}
	if err := op.SetRecoveryKey(ctx, rk.Public()); err != nil {
		b.Fatalf("registering the recovery key: %v", err)
	}

	// Agents and their machines.
	fab := &Fabric{LinkBPS: 1000 << 20, CloneBPS: 200 << 20, StepDelay: 50 * time.Millisecond, Tick: 100 * time.Millisecond}
	lat := &Latencies{}
	agents := make([]*SimAgent, nAgents)
	t0 = time.Now()
	clients := make([]*api.Client, nAgents)
	for i := range clients {
		clients[i] = client(fmt.Sprintf("w%04d", i), i)
	}
	if err := parallelDo(16, nAgents, func(i int) error {
		name := fmt.Sprintf("w%04d", i)
		a := NewSimAgent(name, uint32(i+1), clients[i], fab, 4<<40, 4<<40-int64(perAgent)*volSize)
		a.TTL, a.Reconcile, a.Lat = ttl, time.Second, lat
		a.SlotsIn, a.SlotsOut = 4, 8
		if err := a.Register(ctx); err != nil {
			return fmt.Errorf("register %s: %w", name, err)
		}
		agents[i] = a
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	seedOps := make([]*api.Client, 16)
	for i := range seedOps {
		seedOps[i] = client("operator", i)
	}
	if err := parallelDo(16, nAgents, func(i int) error {
		return seedMachines(ctx, seedOps[i%16], agents[i].Name, perAgent, volSize, nil)
	}); err != nil {
		b.Fatal(err)
	}
	b.Logf("%d agents and %d machines registered in %s", nAgents, nAgents*perAgent, time.Since(t0).Round(time.Millisecond))
	actx, acancel := context.WithCancel(ctx)
	defer acancel()
	for _, a := range agents {
		go a.Run(actx)
	}

	// Steady state: no migration; agents beat every TTL/4 and reconcile every second.
	time.Sleep(ttl + 2*time.Second) // every lease settles into its period
	window := 2 * ttl
	i0, l0 := index(b, ctx, op)
	lat.Start()
	time.Sleep(window)
	i1, l1 := index(b, ctx, op)
	election := ""
	if l0 != l1 {
		// Starved of CPU, raft's heartbeats time out and the servers
		// elect again: the calls meanwhile wait, and the p99 shows it.
		election = fmt.Sprintf("the leader changed during the window (%s, then %s): an election, which the calls waited out", l0, l1)
		b.Log(election)
	}
	p99, nCalls := lat.Stop(99)
	steadyWrites := float64(i1-i0) / window.Seconds()
	kinds := lat.Kinds(99)
	b.Logf("steady state: %d raft entries in %s (%.1f/s; goal <= %d workers / %s = %.1f/s); %d agent calls, p99 %s (%s)",
		i1-i0, window, steadyWrites, nAgents, ttl, float64(nAgents)/ttl.Seconds(), nCalls, p99, strings.Join(kinds, ", "))

	// Plan the drain of nPlan workers (cordoned first, as for any
	// multi-worker drain), then drain the first nDrain of them.
	planned := agents[:nPlan]
	drained := agents[:nDrain]
	for _, a := range planned {
		if _, err := op.Cordon(ctx, a.Name, true, "fleet bench"); err != nil {
			b.Fatal(err)
		}
	}
	t0 = time.Now()
	placed := 0
	for _, a := range planned {
		p, err := op.PlanDrain(ctx, api.DrainRequest{Worker: a.Name})
		if err != nil {
			b.Fatal(err)
		}
		placed += len(p.Placements)
		if len(p.Unplaced) > 0 {
			b.Fatalf("plan of %s: %+v", a.Name, p.Unplaced[0])
		}
	}
	planS := time.Since(t0).Seconds()
	b.Logf("planned %d workers, %d machines in %.3fs", nPlan, placed, planS)
	for _, a := range planned[nDrain:] { // the rest stay targets
		if _, err := op.Cordon(ctx, a.Name, false, ""); err != nil {
			b.Fatal(err)
		}
	}

	// Drain them all at once; the servers run it.
	leader := leaderProc(b, ctx, op, procs)
	b.StartTimer()
	t0 = time.Now()
	for _, a := range drained {
		if _, err := op.Drain(ctx, api.DrainRequest{Worker: a.Name, Parallel: 8}); err != nil {
			b.Fatal(err)
		}
	}
	curve := waitDrains(b, ctx, op, drained, t0)
	wall := time.Since(t0)
	b.StopTimer()
	drainDur := longestDrain(b, ctx, op, drained)
	if os.Getenv("FERRY_FLEET_TRACE") != "" {
		traceDrain(b, ctx, op, drained[0].Name)
	}
	ideal := time.Duration(float64(perAgent) * float64(volSize) / float64(fab.LinkBPS) * float64(time.Second))
	leaderRSS := rssMiB(leader.cmd.Process.Pid)
	b.Logf("drained %d workers (%d machines) in %s (longest drain, by its record; %s from the first request to the last completion); ideal at %s/s per source: %s; leader RSS %.0f MiB",
		nDrain, nDrain*perAgent, drainDur.Round(time.Millisecond), wall.Round(time.Millisecond), humanRate(fab.LinkBPS), ideal, leaderRSS)

	// A drain across a killed leader: count machines started twice.
	killed := agents[nDrain : nDrain+nKill]
	for _, a := range killed {
		if _, err := op.Cordon(ctx, a.Name, true, "fleet bench"); err != nil {
			b.Fatal(err)
		}
	}
	t1 := time.Now()
	for _, a := range killed {
		if _, err := op.Drain(ctx, api.DrainRequest{Worker: a.Name, Parallel: 8}); err != nil {
			b.Fatal(err)
		}
	}
	for {
		ms, err := op.ListMigrations(ctx, killed[0].Name)
		if err == nil && len(ms) >= 3 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	leader = leaderProc(b, ctx, op, procs)
	leader.kill()
	b.Logf("killed leader %s with %d drains under way", leader.id, nKill)
	waitDrains(b, ctx, op, killed, t1)
	killDur := time.Since(t1)
	b.Logf("drains across the leader kill ended in %s (longest %s)", killDur.Round(time.Millisecond), longestDrain(b, ctx, op, killed).Round(time.Millisecond))
	if ms, err := op.ListMigrations(ctx, ""); err == nil {
		rolled := map[string]int{}
		for _, m := range ms {
			if m.State == fsm.RolledBack && m.Rollback != nil {
				rolled[m.Rollback.Reason]++
			}
		}
		b.Logf("rolled back: %v", rolled)
	}
	dups := duplicates(b, ctx, op)

	// Leader memory with the history: a store holding 10 000
	// machines and 100 000 finished migrations, measured in this process.
	storeMiB, snapMiB := storeHeapMiB(b, ctx, op, 10000, 100000)

	b.ReportMetric(steadyWrites, "steady-writes/s")
	b.ReportMetric(float64(nAgents)/ttl.Seconds(), "steady-writes-goal/s")
	b.ReportMetric(float64(p99.Microseconds())/1000, "api-p99-ms")
	b.ReportMetric(planS, "plan-s")
	b.ReportMetric(drainDur.Seconds()/ideal.Seconds(), "drain-vs-ideal")
	b.ReportMetric(leaderRSS, "leader-rss-MiB")
	b.ReportMetric(storeMiB, "store-100k-MiB")
	b.ReportMetric(float64(dups), "dup-migrations")
	b.ReportMetric(float64(nAgents), "agents")
	b.ReportMetric(float64(nAgents*perAgent), "machines")
	scaled := os.Getenv("FERRY_FLEET_AGENTS") != "" || os.Getenv("FERRY_FLEET_MACHINES") != ""
	if os.Getenv("FERRY_FLEET_WRITE") != "" || !scaled {
		docs := os.Getenv("FERRY_FLEET_DOCS")
		if docs == "" {
			docs = filepath.Join("..", "..", "docs")
		}
		r := fleetResult{At: started, Took: time.Since(started), Load: loadAvg(), Agents: nAgents, PerAgent: perAgent, TTL: ttl,
			SteadyWrites: steadyWrites, SteadyWindow: window, GoalWritesPerSec: float64(nAgents) / ttl.Seconds(), P99: p99, Calls: nCalls, CallKinds: kinds, Election: election,
			PlanS: planS, Planned: nPlan, Placed: placed, Drained: nDrain, DrainDur: drainDur, Ideal: ideal, Wall: wall,
			DrainVsIdeal: drainDur.Seconds() / ideal.Seconds(), LinkMiB: fab.LinkBPS >> 20, LeaderRSS: leaderRSS, FinishedMigrations: nDrain * perAgent,
			StoreMiB: storeMiB, SnapMiB: snapMiB, Killed: nKill, KillDur: killDur, Dups: dups, Curve: curve, EnvScaled: scaled}
		if err := writeFleetDocs(docs, r); err != nil {
			b.Fatal(err)
		}
		b.Logf("wrote the fleet section of %s and its plot", filepath.Join(docs, "benchmarks.md"))
	} else {
		b.Logf("scaled run: not writing docs/benchmarks.md (set FERRY_FLEET_WRITE=1 to write anyway)")
	}
	acancel()
}

func humanRate(n int64) string { return fmt.Sprintf("%d MiB", n>>20) }

// parallelDo runs fn(0..total-1) on n goroutines and returns the first
// error (the rest still run: the caller fails on its own goroutine, where
// b.Fatal may be called).
func parallelDo(n, total int, fn func(i int) error) error {
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	ch := make(chan int)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range ch {
				if err := fn(i); err != nil {
					once.Do(func() { first = err })
				}
			}
		}()
	}
	for i := range total {
		ch <- i
	}
	close(ch)
	wg.Wait()
	return first
}

// index returns the raft index and the leader.
func index(b *testing.B, ctx context.Context, op *api.Client) (uint64, string) {
	st, err := op.Status(ctx)
	if err != nil {
		b.Fatal(err)
	}
	return st.Index, st.Leader
}

func leaderProc(b *testing.B, ctx context.Context, op *api.Client, procs []*proc) *proc {
	for range 100 {
		st, err := op.Status(ctx)
		if err == nil {
			for _, p := range procs {
				if p.id == st.Leader && p.cmd != nil {
					return p
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	b.Fatal("no leader")
	return nil
}

type sample struct {
	t     time.Duration
	moved int
}

// waitDrains waits for every drain of ws to complete; it returns the
// machines moved off them over time.
func waitDrains(b *testing.B, ctx context.Context, op *api.Client, ws []*SimAgent, t0 time.Time) []sample {
	want := map[string]bool{}
	for _, a := range ws {
		want[a.Name] = true
	}
	var curve []sample
	for {
		ds, err := op.ListDrains(ctx, "")
		if err != nil {
			if ctx.Err() != nil {
				b.Fatal(err)
			}
			time.Sleep(200 * time.Millisecond)
			continue
		}
		done, moved := 0, 0
		for _, d := range ds {
			if !want[d.Worker] {
				continue
			}
			if d.State == fsm.DrainComplete {
				done++
			} else if d.State.Terminal() {
				b.Fatalf("drain of %s ended %s: %+v", d.Worker, d.State, d.Left)
			}
			for _, id := range d.Started {
				_ = id
				moved++
			}
		}
		curve = append(curve, sample{time.Since(t0), moved})
		if done == len(ws) {
			return curve
		}
		if ctx.Err() != nil || time.Since(t0) > 4*time.Minute {
			dctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			ds, _ := op.ListDrains(dctx, "")
			for _, d := range ds {
				if want[d.Worker] && d.State != fsm.DrainComplete {
					b.Logf("drain %s of %s: %s, started %d, waiting %v", d.ID, d.Worker, d.State, len(d.Started), d.Waiting)
				}
			}
			ms, _ := op.ListMigrations(dctx, "")
			for _, m := range ms {
				if m.Active() {
					b.Logf("active %s %s -> %s: %s stalled=%v %s", m.ID, m.Source, m.Target, m.State, m.Stalled, m.StallCause)
				}
			}
			b.Fatalf("drains did not complete: %d of %d", done, len(ws))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// traceDrain logs when each migration off worker entered each state,
// relative to its drain's creation.
func traceDrain(b *testing.B, ctx context.Context, op *api.Client, worker string) {
	ds, _ := op.ListDrains(ctx, worker)
	ms, _ := op.ListMigrations(ctx, worker)
	if len(ds) == 0 {
		return
	}
	t0 := ds[0].CreatedAt
	for _, m := range ms {
		if m.Source != worker {
			continue
		}
		var parts []string
		for _, st := range []fsm.State{fsm.Planned, fsm.TargetPrepared, fsm.Cutover, fsm.Hydrating, fsm.Hydrated, fsm.SourceReleased, fsm.Completed} {
			if at, ok := m.EnteredAt[st]; ok {
				parts = append(parts, fmt.Sprintf("%s %.1f", st, at.Sub(t0).Seconds()))
			}
		}
		b.Logf("%s: %s", m.ID, strings.Join(parts, ", "))
	}
	b.Logf("drain finished at %.1f", ds[0].FinishedAt.Sub(t0).Seconds())
}

// longestDrain is the longest duration (creation to end, by the leader's
// clock in the record) among the drains of ws.
func longestDrain(b *testing.B, ctx context.Context, op *api.Client, ws []*SimAgent) time.Duration {
	want := map[string]bool{}
	for _, a := range ws {
		want[a.Name] = true
	}
	ds, err := op.ListDrains(ctx, "")
	if err != nil {
		b.Fatal(err)
	}
	var longest time.Duration
	for _, d := range ds {
		if want[d.Worker] && d.State.Terminal() {
			longest = max(longest, d.FinishedAt.Sub(d.CreatedAt))
		}
	}
	return longest
}

// duplicates counts machines migrated off the same worker more than once
// without a rollback (a machine drained in the first phase may rightly be
// moved again off its new worker in the second).
func duplicates(b *testing.B, ctx context.Context, op *api.Client) int {
	ms, err := op.ListMigrations(ctx, "")
	if err != nil {
		b.Fatal(err)
	}
	per := map[string]int{}
	for _, m := range ms {
		if m.State != fsm.RolledBack {
			per[m.Machine+" from "+m.Source]++
		}
	}
	dups := 0
	for _, n := range per {
		dups += n - 1
	}
	return dups
}

// storeHeapMiB measures the heap a store takes holding machines machines
// (with their volumes and workers) and finished migrations copied from a
// real completed one, restored from a snapshot as a new leader would.
func storeHeapMiB(b *testing.B, ctx context.Context, op *api.Client, machines, finished int) (heapMiB, snapMiB float64) {
	ms, err := op.ListMigrations(ctx, "")
	if err != nil {
		b.Fatal(err)
	}
	var tmpl *fsm.Migration
	for _, m := range ms {
		if m.State == fsm.Completed {
			tmpl = m
			break
		}
	}
	if tmpl == nil {
		b.Fatal("no completed migration to copy")
	}
	var buf bytes.Buffer
	buf.WriteString(`{"index":1,"locks":{},"keys":{},"servers":{},"workers":{`)
	for i := range 1000 {
		if i > 0 {
			buf.WriteByte(',')
		}
		w := fsm.Worker{Name: fmt.Sprintf("w%04d", i), HostID: uint32(i + 1), Report: &fsm.WorkerReport{FreeBytes: 1 << 40, TotalBytes: 2 << 40}}
		j, _ := json.Marshal(w)
		fmt.Fprintf(&buf, "%q:%s", w.Name, j)
	}
	buf.WriteString(`},"volumes":{`)
	for i := range machines {
		if i > 0 {
			buf.WriteByte(',')
		}
		v := fsm.Volume{ID: fmt.Sprintf("v%05d", i), Worker: fmt.Sprintf("w%04d", i%1000), Size: 2 << 30, State: fsm.VolCreated, Layout: simLayout(2 << 30), AttachedMachine: fmt.Sprintf("m%05d", i)}
		j, _ := json.Marshal(v)
		fmt.Fprintf(&buf, "%q:%s", v.ID, j)
	}
	buf.WriteString(`},"machines":{`)
	for i := range machines {
		if i > 0 {
			buf.WriteByte(',')
		}
		m := fsm.Machine{ID: fmt.Sprintf("m%05d", i), Worker: fmt.Sprintf("w%04d", i%1000), Volume: fmt.Sprintf("v%05d", i), State: fsm.MachineRunning, Addr6PN: "fdaa:0:7:0:1:0:9:0"}
		j, _ := json.Marshal(m)
		fmt.Fprintf(&buf, "%q:%s", m.ID, j)
	}
	buf.WriteString(`},"migrations":{`)
	for i := range finished {
		if i > 0 {
			buf.WriteByte(',')
		}
		c := *tmpl
		c.ID = fmt.Sprintf("mig-%06d", i)
		c.Machine, c.Source, c.Target = fmt.Sprintf("m%05d", i%machines), fmt.Sprintf("w%04d", i%1000), fmt.Sprintf("w%04d", (i+1)%1000)
		j, _ := json.Marshal(&c)
		fmt.Fprintf(&buf, "%q:%s", c.ID, j)
	}
	buf.WriteString(`}}`)
	snapMiB = float64(buf.Len()) / (1 << 20)
	var before, after runtime.MemStats
	runtime.GC()
	debug.FreeOSMemory()
	runtime.ReadMemStats(&before)
	st := fsm.NewStore(zerolog.Nop())
	if err := st.Restore(io.NopCloser(&buf)); err != nil {
		b.Fatal(err)
	}
	buf = bytes.Buffer{}
	runtime.GC()
	runtime.ReadMemStats(&after)
	heap := float64(after.HeapAlloc-min(before.HeapAlloc, after.HeapAlloc)) / (1 << 20)
	b.Logf("store with %d machines and %d finished migrations: %.0f MiB of heap (snapshot %.0f MiB)", machines, finished, heap, snapMiB)
	runtime.KeepAlive(st)
	return heap, snapMiB
}
