package bench

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/demo"
	"github.com/ferry-dev/ferry/internal/testbed"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/machine/workload"
	"github.com/ferry-dev/ferry/server/servertest"
)

// bed starts a two-worker cluster (server + agents in namespaces).
func bed(b *testing.B, s *suite, args ...string) *testbed.Bed {
	exe := s.ferry(b)
	id := testbed.RandHex(2)
	dir, err := os.MkdirTemp("", "ferry-bench-bed-")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := ctxFor(3 * time.Minute)
	defer cancel()
	bd, err := testbed.Start(ctx, testbed.Config{Dir: dir, Exe: exe, Prefix: "b" + id,
		Workers: []string{"a" + id, "b" + id}, Log: zerolog.Nop(), AgentArgs: args, Grace: time.Minute})
	if err != nil {
		if bd != nil {
			b.Log(bd.DumpLogs(4000))
		}
		b.Fatalf("start cluster: %v", err)
	}
	b.Cleanup(func() {
		cctx, ccancel := ctxFor(2 * time.Minute)
		defer ccancel()
		if err := bd.Close(cctx); err != nil {
			b.Errorf("cleanup: %v", err)
		}
		// A leak is a finding, reported with the results; the suite then
		// ends the leaked processes (its own) so the machine stays clean.
		time.Sleep(time.Second)
		if l := bd.Leftovers(); len(l) > 0 {
			b.Logf("leftovers after the cluster's teardown: %v", l)
			s.mu.Lock()
			s.notes = append(s.notes, fmt.Sprintf("**Leak found** (%s section): after the cluster's teardown (`ferry agent cleanup`) these remained: %s", b.Name(), strings.Join(l, "; ")))
			s.mu.Unlock()
			for _, x := range l {
				var pid int
				if _, err := fmt.Sscanf(x, "process %d", &pid); err == nil && pid > 0 {
					if pr, err := os.FindProcess(pid); err == nil {
						pr.Kill()
					}
				}
			}
		}
		if os.Getenv("FERRY_BENCH_KEEP") != "" {
			// Kept for reading the agents' and datapaths' logs afterwards.
			b.Logf("cluster dir kept: %s", dir)
			return
		}
		os.RemoveAll(dir)
	})
	return bd
}

// writeFiles writes n files of size bytes of random data into a machine's mount.
func writeFiles(b *testing.B, bd *testbed.Bed, worker, machineID string, n int, size int64) {
	for i := 0; i < n; i++ {
		f, err := os.Create(filepath.Join(bd.WorkerDir(worker), "mnt", machineID, fmt.Sprintf("file%d", i)))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.CopyN(f, rand.Reader, size); err != nil {
			b.Fatal(err)
		}
		f.Sync()
		f.Close()
	}
}

// migrateOnce runs one migration to completion and returns the record and
// the longest gap between acknowledged records the workload saw meanwhile.
func migrateOnce(b *testing.B, bd *testbed.Bed, machineID, target, ack string, sample func(*fsm.Migration, time.Time)) (*fsm.Migration, time.Duration) {
	ctx := context.Background()
	gaps := workload.WatchGaps(ack, 5*time.Millisecond)
	defer gaps.Stop()
	id, err := bd.Migrate(ctx, machineID, target)
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	var m *fsm.Migration
	for time.Since(start) < 30*time.Minute {
		m, err = bd.Client.GetMigration(ctx, id)
		if err == nil {
			if sample != nil {
				sample(m, start)
			}
			if m.State.Terminal() {
				break
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The machine writes again on the target: the gap closed.
	before, _ := workload.Acked(ack)
	testbed.WaitAcked(ctx, ack, before+5, time.Minute)
	gap := gaps.Stop()
	if m == nil || m.State != fsm.Completed {
		b.Log(bd.DumpLogs(4000))
		b.Fatalf("migration %s did not complete: %+v", id, m)
	}
	if _, _, err := bd.VerifyRecords(machineID, target, ack); err != nil {
		b.Fatal(err)
	}
	return m, gap
}

// benchDowntime: downtime as the machine sees it (the longest pause between
// its acknowledged records) over migrations of a machine writing records on
// 1 GiB and 20 GiB volumes, next to the control plane's source_stopped ->
// cutover, median of the runs each.
func benchDowntime(b *testing.B, s *suite) {
	bd := bed(b, s)
	ws := bd.Workers()
	ctx := context.Background()
	type size struct {
		label string
		bytes int64
		runs  int
	}
	sizes := []size{{"1 GiB", 1 << 30, 5}, {"20 GiB", 20 << 30, 3}}
	if quick {
		sizes = []size{{"256 MiB", 256 << 20, 3}, {"2 GiB", 2 << 30, 1}}
	}
	for i, sz := range sizes {
		vol, mach := fmt.Sprintf("dv%d", i), fmt.Sprintf("dm%d", i)
		if err := bd.CreateVolume(ctx, vol, ws[0], sz.bytes); err != nil {
			b.Fatal(err)
		}
		ack, err := bd.RunRecords(ctx, mach, ws[0], vol, uint32(100+i))
		if err != nil {
			b.Fatal(err)
		}
		testbed.WaitAcked(ctx, ack, 200, time.Minute)
		var downs, gaps []time.Duration
		var fetched int64
		legs := map[string][]time.Duration{}
		var order []string
		for r := 0; r < sz.runs; r++ {
			target := ws[(r+1)%2]
			m, gap := migrateOnce(b, bd, mach, target, ack, nil)
			d, _ := m.Downtime()
			downs = append(downs, d)
			gaps = append(gaps, gap)
			if m.Progress != nil {
				fetched = m.Progress.FetchedBytes
			}
			// Where the pause went, from the times stamped in the records.
			last, first, err := workload.PauseAround(filepath.Join(bd.WorkerDir(target), "mnt", mach, workload.RecordsFile), m.EnteredAt[fsm.SourceStopped])
			if err != nil {
				b.Fatal(err)
			}
			steps := demo.Steps(m, last, first)
			b.Logf("run %d: machine's gap %v, control plane %v: %s", r, gap.Round(time.Millisecond), d.Round(time.Millisecond), demo.FormatSteps(steps))
			for _, st := range steps {
				if _, ok := legs[st.Name]; !ok {
					order = append(order, st.Name)
				}
				legs[st.Name] = append(legs[st.Name], st.Took)
			}
		}
		var med []demo.Step
		for _, name := range order {
			med = append(med, demo.Step{Name: name, Took: median(legs[name])})
		}
		s.notes = append(s.notes, fmt.Sprintf("Downtime breakdown, %s volume (median of %d runs of each leg, ms after the machine's last record on the source, from the times stamped in its records and the store's commits): %s",
			sz.label, sz.runs, demo.FormatSteps(med)))
		md, mg := median(downs), median(gaps)
		s.add(row{fmt.Sprintf("downtime as the machine sees it, %s volume (median of %d)", sz.label, sz.runs), mg.Round(time.Millisecond).String(),
			fmt.Sprintf("control plane's source_stopped -> cutover: %v", md.Round(time.Millisecond)), fmt.Sprintf("%.2f", mg.Seconds()/md.Seconds()),
			fmt.Sprintf("all runs %v (control plane %v); last fetched %.1f MiB", roundAll(gaps), roundAll(downs), float64(fetched)/(1<<20))})
	}
	s.notes = append(s.notes, "Downtime: the headline is what the machine saw: the longest interval between two acknowledged records (the ack file polled every 5 ms, so up to 5 ms long) from the migration's plan until the machine writes again on the target, median of the runs. The reference is the control plane's figure, source_stopped -> cutover as committed in the store (the agents' clocks); the ratio is machine over control plane, the cost of stopping and starting the machine and its mount that the store does not see. The machine is the records workload (fsync per record) on ext4 in a LUKS2 volume; migrations go back and forth between two agents in their own network namespaces.")
}

func roundAll(ds []time.Duration) []time.Duration {
	out := make([]time.Duration, len(ds))
	for i, d := range ds {
		out[i] = d.Round(time.Millisecond)
	}
	return out
}

func tc(ns string, args ...string) error {
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns, "tc"}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("tc %v in %s: %w: %s", args, ns, err, out)
	}
	return nil
}

// benchTBF: a migration over a link capped at 1 Gbit/s with tc tbf (the
// source's egress towards the fabric), against the ideal: the bytes that
// had to move divided by the link rate.
func benchTBF(b *testing.B, s *suite) {
	bd := bed(b, s)
	ws := bd.Workers()
	ctx := context.Background()
	volSize, dense := int64(1<<30), int64(512<<20)
	if quick {
		volSize, dense = 256<<20, 128<<20
	}
	if err := bd.CreateVolume(ctx, "tv", ws[0], volSize); err != nil {
		b.Fatal(err)
	}
	ack, err := bd.RunRecords(ctx, "tm", ws[0], "tv", 120)
	if err != nil {
		b.Fatal(err)
	}
	writeFiles(b, bd, ws[0], "tm", int(dense>>26), 64<<20)
	const rate = 1e9 // bit/s
	if err := tc(bd.NSOf(ws[0]), "qdisc", "add", "dev", "fab0", "root", "tbf", "rate", "1gbit", "burst", "256kb", "latency", "50ms"); err != nil {
		b.Fatal(err)
	}
	defer tc(bd.NSOf(ws[0]), "qdisc", "del", "dev", "fab0", "root")
	// What the link carried: tbf counts whole frames (the Ethernet header
	// included).
	tx0, err := shapedBytes(bd.NSOf(ws[0]))
	if err != nil {
		b.Fatal(err)
	}
	m, _ := migrateOnce(b, bd, "tm", ws[1], ack, nil)
	tx1, err := shapedBytes(bd.NSOf(ws[0]))
	if err != nil {
		b.Fatal(err)
	}
	took := m.EnteredAt[fsm.Completed].Sub(m.CreatedAt)
	fetched := m.Progress.FetchedBytes
	ideal := time.Duration(float64(fetched) * 8 / rate * float64(time.Second))
	wire := time.Duration(float64(tx1-tx0) * 8 / rate * float64(time.Second))
	hyd := m.EnteredAt[fsm.Hydrated].Sub(m.EnteredAt[fsm.Hydrating])
	s.add(row{fmt.Sprintf("migration over a 1 Gbit/s tbf link, %d MiB volume, %d MiB dense", volSize>>20, dense>>20), took.Round(10 * time.Millisecond).String(),
		fmt.Sprintf("ideal %v (%.0f MiB / 1 Gbit/s)", ideal.Round(10*time.Millisecond), float64(fetched)/(1<<20)), fmt.Sprintf("%.2f", took.Seconds()/ideal.Seconds()),
		fmt.Sprintf("planned -> completed; tbf sent %.0f MiB (×%.3f the bytes fetched: framing), %v at the link rate; hydration %v",
			float64(tx1-tx0)/(1<<20), float64(tx1-tx0)/float64(fetched), wire.Round(10*time.Millisecond), hyd.Round(10*time.Millisecond))})
	b.Logf("tbf legs (ms after the plan): %s", legs(m))
	s.notes = append(s.notes, "tbf, where the time went (ms after the plan, as committed): "+legs(m))
	s.notes = append(s.notes, "tbf: `tc qdisc add dev fab0 root tbf rate 1gbit burst 256kb latency 50ms` in the source worker's namespace (its egress carries the iSCSI data); time is the migration's planned -> completed; the ideal is the bytes fetched (after fstrim and known-zero skipping) at exactly the link rate. The link carries more than those bytes (tbf's own count of the bytes it sent, as it charges them, is in the row): tbf counts whole Ethernet frames, and a full frame of the fabric (IPv6, TCP with timestamps) carries MTU - 72 bytes of the stream in MTU + 14 on the wire (1428 in 1514 at MTU 1500, ×1.060), TLS and iSCSI headers a little more. Those bytes at the link rate are the floor of the hydration leg; the legs before it (the machine's stop, the clone, the cutover: no byte may move while the machine runs on the source) add to it.")
}

// shapedBytes is what the root qdisc of the fabric link in namespace ns
// sent, as it charged it: a segmentation-offload packet counts with the
// headers of every frame it becomes (the link's own tx_bytes counts one).
func shapedBytes(ns string) (int64, error) {
	out, err := exec.Command("ip", "netns", "exec", ns, "tc", "-s", "-j", "qdisc", "show", "dev", "fab0", "root").Output()
	if err != nil {
		return 0, fmt.Errorf("qdisc statistics of fab0 in %s: %w", ns, err)
	}
	var qs []struct {
		Kind  string `json:"kind"`
		Bytes int64  `json:"bytes"`
	}
	if err := json.Unmarshal(out, &qs); err != nil || len(qs) != 1 || qs[0].Kind != "tbf" {
		return 0, fmt.Errorf("qdisc statistics of fab0 in %s: want one tbf, got %s (%v)", ns, out, err)
	}
	return qs[0].Bytes, nil
}

// legs lists each forward state a migration entered, in ms after its plan.
func legs(m *fsm.Migration) string {
	var parts []string
	for _, st := range []fsm.State{fsm.TargetPrepared, fsm.SourceStopped, fsm.Exported, fsm.CloneBuilt, fsm.Trimmed, fsm.Cutover, fsm.Hydrating, fsm.Hydrated, fsm.SourceReleased, fsm.Completed} {
		if t, ok := m.EnteredAt[st]; ok {
			parts = append(parts, fmt.Sprintf("%s %d", st, t.Sub(m.CreatedAt).Milliseconds()))
		}
	}
	return strings.Join(parts, " · ")
}

// benchSparse: a 100 GiB volume holding 5 MiB of files: bytes fetched and wall time.
func benchSparse(b *testing.B, s *suite) {
	bd := bed(b, s)
	ws := bd.Workers()
	ctx := context.Background()
	volSize := int64(100 << 30)
	if quick {
		volSize = 10 << 30
	}
	if err := bd.CreateVolume(ctx, "sv", ws[0], volSize); err != nil {
		b.Fatal(err)
	}
	ack, err := bd.RunRecords(ctx, "sm", ws[0], "sv", 130)
	if err != nil {
		b.Fatal(err)
	}
	writeFiles(b, bd, ws[0], "sm", 5, 1<<20)
	var pts []point
	var t0 time.Time
	sample := func(m *fsm.Migration, start time.Time) {
		if m.Progress == nil {
			return
		}
		if t0.IsZero() {
			t0 = time.Now()
		}
		pts = append(pts, point{time.Since(t0).Seconds(), float64(m.Progress.HydratedBytes)})
	}
	m, _ := migrateOnce(b, bd, "sm", ws[1], ack, sample)
	took := m.EnteredAt[fsm.Completed].Sub(m.CreatedAt)
	down, _ := m.Downtime()
	p := m.Progress
	s.plot("sparse.svg", series{fmt.Sprintf("ferry, %d GiB volume, 5 MiB of files", volSize>>30), pts})
	s.add(row{fmt.Sprintf("sparse %d GiB volume holding 5 MiB of files", volSize>>30), fmt.Sprintf("fetched %.1f MiB in %v", float64(p.FetchedBytes)/(1<<20), took.Round(10*time.Millisecond)),
		fmt.Sprintf("volume %d GiB; files 5 MiB", volSize>>30), fmt.Sprintf("%.5f of volume", float64(p.FetchedBytes)/float64(volSize)),
		fmt.Sprintf("hydration %v; skipped %.1f GiB (trim + known-zero); downtime %v", m.EnteredAt[fsm.Hydrated].Sub(m.EnteredAt[fsm.Hydrating]).Round(10*time.Millisecond),
			float64(p.SkippedBytes)/(1<<30), down.Round(time.Millisecond))})
	s.notes = append(s.notes, "Sparse: the volume file is sparse on the source; the export lists its holes (known-zero) and the target's fstrim marks free blocks hydrated, so only written blocks (files, ext4 metadata, journal, the workload's records) are fetched. The plot samples the store's progress (committed at most every 5 s, so it is coarse).")
}

// benchControlPlane: migrations per second through a 3-node server cluster
// (raft over mTLS, loopback), the agents' proposals made directly by
// clients holding worker certificates: plan, nine events, server completion.
func benchControlPlane(b *testing.B, s *suite) {
	c := servertest.New(b, 3, servertest.Options{HeartbeatTimeout: time.Second, WriteRate: -1}) // throughput, not the per-identity limit
	ctx := context.Background()
	op := c.Client("operator", tlsutil.KindOperator)
	pairs, per := 16, 8
	if quick {
		pairs, per = 8, 4
	}
	layout := &fsm.LUKSLayout{UUID: "u", DataOffset: 16 << 20, MetadataSize: 16384, KeyslotsSize: 16744448,
		SectorSize: 4096, Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: 32 << 20}
	type pair struct{ src, dst *api.Client }
	ps := make([]pair, pairs)
	for i := range ps {
		sn, dn := fmt.Sprintf("cs%d", i), fmt.Sprintf("cd%d", i)
		ps[i] = pair{c.Client(sn, tlsutil.KindWorker), c.Client(dn, tlsutil.KindWorker)}
		for j, w := range []*api.Client{ps[i].src, ps[i].dst} {
			name := []string{sn, dn}[j]
			if _, err := w.RegisterWorker(ctx, fsm.Worker{Name: name, HostID: uint32(2*i + j + 1), Address: "127.0.0.1"}, time.Hour); err != nil {
				b.Fatal(err)
			}
		}
		for k := 0; k < per; k++ {
			id := fmt.Sprintf("p%dm%d", i, k)
			if _, err := ps[i].src.CreateVolume(ctx, fsm.Volume{ID: "v" + id, Worker: sn, Size: 48 << 20, State: fsm.VolCreated, Layout: layout}); err != nil {
				b.Fatal(err)
			}
			// The target's volume, which target_prepared names.
			if _, err := ps[i].dst.CreateVolume(ctx, fsm.Volume{ID: "t" + id, Worker: dn, Size: 48 << 20, State: fsm.VolHydrating}); err != nil {
				b.Fatal(err)
			}
			if _, err := op.CreateMachine(ctx, fsm.Machine{ID: id, Worker: sn, Volume: "v" + id, Network: uint32(1000 + i*per + k), MachineNo: 1,
				State: fsm.MachineRunning, Addr6PN: fmt.Sprintf("fdaa:0:%x:0:%x:0:1:0", 1000+i*per+k, 2*i+1)}); err != nil {
				b.Fatal(err)
			}
		}
	}
	var done, failed atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for i := range ps {
		// Two migrations in flight per pair: the per-worker limit.
		for lane := 0; lane < 2; lane++ {
			wg.Add(1)
			go func(i, lane int) {
				defer wg.Done()
				for k := lane; k < per; k += 2 {
					if err := driveMigration(ctx, op, ps[i].src, ps[i].dst, fmt.Sprintf("p%dm%d", i, k), fmt.Sprintf("cd%d", i)); err != nil {
						b.Log(err)
						failed.Add(1)
						continue
					}
					done.Add(1)
				}
			}(i, lane)
		}
	}
	wg.Wait()
	took := time.Since(start)
	if failed.Load() > 0 {
		b.Fatalf("%d control-plane migrations failed", failed.Load())
	}
	rate := float64(done.Load()) / took.Seconds()
	// Reference: single proposals per second through the same cluster.
	hb := c.Client("cs0", tlsutil.KindWorker)
	const n = 400
	var next atomic.Int64
	t0 := time.Now()
	var hwg sync.WaitGroup
	for g := 0; g < 2*pairs; g++ {
		hwg.Add(1)
		go func() {
			defer hwg.Done()
			for next.Add(1) <= n {
				hb.Heartbeat(ctx, "cs0", time.Hour)
			}
		}()
	}
	hwg.Wait()
	props := float64(n) / time.Since(t0).Seconds()
	s.add(row{fmt.Sprintf("control plane: migrations/s, 3-node servers, %d in flight", 2*pairs), fmt.Sprintf("%.1f migrations/s", rate),
		fmt.Sprintf("%.0f proposals/s (heartbeats)", props), fmt.Sprintf("%.2f of capacity", rate*11/props),
		fmt.Sprintf("%d migrations in %v; each = plan + 9 events + completion, mTLS HTTP", done.Load(), took.Round(time.Millisecond))})
	s.notes = append(s.notes, "Control plane: three `ferry server`s (in-process, raft over mTLS on loopback); clients with the workers' certificates propose each event as the agents would (no data moves); a migration counts when the store marks it completed. The reference is the same cluster's throughput of single proposals (heartbeats) with as many clients in flight; the ratio is the commands a migration makes (plan, 9 events, completion: 11) times migrations/s over that capacity. Each migration's events are sequential, so the rate is bound by commit latency, not capacity.")
}

// driveMigration plans one migration and proposes every event as the agents would.
func driveMigration(ctx context.Context, op, src, dst *api.Client, machineID, target string) error {
	m, err := op.CreateMigration(ctx, api.PlanRequest{Machine: machineID, Target: target})
	if err != nil {
		return fmt.Errorf("plan %s: %w", machineID, err)
	}
	id := m.ID
	steps := []struct {
		c  *api.Client
		ev fsm.Event
		p  fsm.EventPayload
	}{
		{dst, fsm.EvTargetPrepared, fsm.EventPayload{TargetVolume: "t" + machineID, Layout: m.Layout}},
		{src, fsm.EvSourceStopped, fsm.EventPayload{Layout: m.Layout}},
		{src, fsm.EvExported, fsm.EventPayload{Export: &fsm.Export{Portal: "127.0.0.1:3260", IQN: "iqn.2026-11.dev.ferry:ferry:" + id}}},
		{dst, fsm.EvCloneBuilt, fsm.EventPayload{}},
		{dst, fsm.EvTrimmed, fsm.EventPayload{}},
		{dst, fsm.EvCutover, fsm.EventPayload{}},
		{dst, fsm.EvHydrationStarted, fsm.EventPayload{}},
		{dst, fsm.EvHydrated, fsm.EventPayload{}},
		{src, fsm.EvSourceReleased, fsm.EventPayload{}},
	}
	for _, st := range steps {
		if _, err := st.c.Propose(ctx, id, st.ev, id+"/"+string(st.ev), st.p); err != nil {
			return fmt.Errorf("%s %s: %w", id, st.ev, err)
		}
	}
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); {
		m, err := op.GetMigration(ctx, id)
		if err == nil && m.State == fsm.Completed {
			return nil
		}
		time.Sleep(2 * time.Millisecond)
	}
	return fmt.Errorf("%s not completed by the server", id)
}
