package chaos

import (
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// fill writes mib MiB of random data into a machine's mount, so a
// migration has that much to fetch over the link.
func (c *cluster) fill(worker, machineID string, mib int) {
	c.t.Helper()
	f, err := os.Create(filepath.Join(c.bed.WorkerDir(worker), "mnt", machineID, "dense.bin"))
	if err != nil {
		c.t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for i := 0; i < mib; i++ {
		rand.Read(buf)
		if _, err := f.Write(buf); err != nil {
			c.t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		c.t.Fatal(err)
	}
}

// inNS runs a command in a worker's namespace.
func (c *cluster) inNS(worker string, stdin string, args ...string) error {
	cmd := exec.Command("ip", append([]string{"netns", "exec", c.bed.NSOf(worker)}, args...)...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s in %s: %w: %s", strings.Join(args, " "), c.bed.NSOf(worker), err, out)
	}
	return nil
}

// linkDown takes a worker's fabric link down and guarantees it comes back.
func (c *cluster) linkDown(w string) func() {
	c.t.Helper()
	if err := c.bed.SetLink(c.ctx, w, false); err != nil {
		c.t.Fatal(err)
	}
	up := false
	restore := func() {
		if !up {
			up = true
			if err := c.bed.SetLink(c.ctx, w, true); err != nil {
				c.t.Error(err)
			}
		}
	}
	c.t.Cleanup(restore)
	return restore
}

// The link of the source down for 30 s during hydration: the migration
// stalls visibly (stalled flag with a reason on the record), then resumes
// and completes, nothing lost.
func TestPartitionSourceDuringHydration(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	c := newCluster(t, 2, "--hydration-rate", "2M")
	a, b := c.ws[0], c.ws[1]
	if err := c.bed.CreateVolume(c.ctx, "nvol", a, 96<<20); err != nil {
		t.Fatal(err)
	}
	ack, err := c.bed.RunRecords(c.ctx, "nmach", a, "nvol", 60)
	if err != nil {
		t.Fatal(err)
	}
	c.fill(a, "nmach", 24)
	start := time.Now()
	id, err := c.bed.Migrate(c.ctx, "nmach", b)
	if err != nil {
		t.Fatal(err)
	}
	w := c.watch(id, a, "nvol")
	if _, err := c.bed.WaitState(c.ctx, id, 2*time.Minute, fsm.Hydrating); err != nil {
		w.close()
		t.Fatal(err)
	}
	// The source's link: the target keeps reaching the server and reports.
	const outage = 30 * time.Second
	down := time.Now()
	up := c.linkDown(a)
	var stalledAfter time.Duration
	var reason string
	var before *fsm.Migration
	for time.Since(down) < outage {
		m, err := c.bed.Client.GetMigration(c.ctx, id)
		if err == nil {
			before = m
			if m.Stalled && stalledAfter == 0 {
				stalledAfter, reason = time.Since(down), m.StallCause
			}
			if m.State.Terminal() || m.State == fsm.Hydrated {
				t.Logf("migration reached %s with the source unreachable (nothing left to fetch)", m.State)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	up()
	upAt := time.Now()
	var resumedAfter time.Duration
	for time.Since(upAt) < 2*time.Minute {
		m, err := c.bed.Client.GetMigration(c.ctx, id)
		if err == nil && (!m.Stalled || m.State != fsm.Hydrating) && (m.Progress == nil || before == nil || before.Progress == nil ||
			m.Progress.HydratedBytes > before.Progress.HydratedBytes || m.State != fsm.Hydrating) {
			resumedAfter = time.Since(upAt)
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	o := c.finish(id, "nmach", a, b, "nvol", ack, w, start, 3*time.Minute)
	if o.final.State != fsm.Completed {
		t.Fatalf("a link outage after cutover ended %s; after cutover the only way is forward", o.final.State)
	}
	if stalledAfter == 0 {
		t.Fatalf("the migration never showed stalled during a %v outage of the source (last record: stalled %v, %q, progress %+v)",
			outage, before.Stalled, before.StallCause, before.Progress)
	}
	t.Logf("stalled after %v: %q; resumed %v after the link came back; completed in %v", stalledAfter.Round(time.Millisecond), reason, resumedAfter.Round(time.Millisecond), o.took.Round(time.Millisecond))
	report("network faults", fmt.Sprintf("| source link down %v during hydration | stalled after %v: %q | resumed %v after link up | %s, records %d/%d, source %s, leaks %s, %v |",
		outage, stalledAfter.Round(100*time.Millisecond), reason, resumedAfter.Round(100*time.Millisecond), o.final.State, o.acked, o.present, o.frozenSame, o.leaks, o.took.Round(100*time.Millisecond)))
}

// The link of a participant down during each pre-cutover step: the
// migration rolls back or completes, never hangs. Short form: the source's
// link at exported (the target cannot build its clone, the source cannot
// heartbeat); FERRY_CHAOS=full: both links at every pre-cutover state.
func TestLinkDownBeforeCutover(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	c := newCluster(t, 2)
	a := c.ws[0]
	if err := c.bed.CreateVolume(c.ctx, "pvol", a, matrixVolSize); err != nil {
		t.Fatal(err)
	}
	ack, err := c.bed.RunRecords(c.ctx, "pmach", a, "pvol", 61)
	if err != nil {
		t.Fatal(err)
	}
	type pc struct {
		state fsm.State
		who   string
	}
	var cases []pc
	outage := 20 * time.Second
	if full {
		outage = 30 * time.Second
		for _, s := range forwardPath() {
			if s.BeforeCutover() {
				cases = append(cases, pc{s, "source"}, pc{s, "target"})
			}
		}
	} else {
		cases = []pc{{fsm.Exported, "source"}}
	}
	for _, k := range cases {
		t.Run(fmt.Sprintf("%s/%s", k.state, k.who), func(t *testing.T) {
			parent := c.t
			c.t = t
			defer func() { c.t = parent }()
			src := c.machineOn("pmach")
			dst := c.other(src)
			mach, _ := c.bed.Client.GetMachine(c.ctx, "pmach")
			roleWorker := map[string]string{"source": src, "target": dst}
			// Hold the migration at the state so the outage starts there.
			want := map[string]string{}
			if lt, ok := leaving(k.state); ok {
				if r := agentRole(lt); r != "" {
					want[roleWorker[r]] = fmt.Sprintf("%s=%s", lt.Event, 2*time.Second)
				}
			}
			c.setFailpoints(want)
			start := time.Now()
			id, err := c.bed.Migrate(c.ctx, "pmach", dst)
			if err != nil {
				t.Fatal(err)
			}
			w := c.watch(id, src, mach.Volume)
			if _, err := c.bed.WaitState(c.ctx, id, 2*time.Minute, k.state); err != nil {
				w.close()
				t.Fatal(err)
			}
			downFrom := time.Now()
			up := c.linkDown(roleWorker[k.who])
			downTo := time.Now()
			time.Sleep(outage)
			up()
			o := c.finish(id, "pmach", src, dst, mach.Volume, ack, w, start, 4*time.Minute)
			landed(t, o.final, k.state, downFrom, downTo, w.path())
			reason := ""
			if o.final.Rollback != nil {
				reason = o.final.Rollback.Reason
			}
			report("network faults", fmt.Sprintf("| %s link down %v at %s | %s %s | via %s | records %d/%d, source %s, leaks %s, %v |",
				k.who, outage, k.state, o.final.State, reason, w.path(), o.acked, o.present, o.frozenSame, o.leaks, o.took.Round(100*time.Millisecond)))
		})
	}
}

// Packet loss (nftables numgen drops a random 10% of the source's packets to
// the target) and a bandwidth cap (tc tbf on the source's fabric link): the
// migration completes, nothing lost, and under the cap the copy never runs
// faster than the link allows.
func TestLossAndBandwidthCap(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	testenv.Tools(t, "run scripts/deps.sh (nftables, iproute2)", "nft", "tc")
	c := newCluster(t, 2)
	a := c.ws[0]
	if err := c.bed.CreateVolume(c.ctx, "qvol", a, 96<<20); err != nil {
		t.Fatal(err)
	}
	ack, err := c.bed.RunRecords(c.ctx, "qmach", a, "qvol", 62)
	if err != nil {
		t.Fatal(err)
	}
	const capMbit = 40
	for _, fault := range []string{"loss", "tbf"} {
		t.Run(fault, func(t *testing.T) {
			parent := c.t
			c.t = t
			defer func() { c.t = parent }()
			src := c.machineOn("qmach")
			dst := c.other(src)
			mach, _ := c.bed.Client.GetMachine(c.ctx, "qmach")
			c.fill(src, "qmach", 16)
			var desc string
			switch fault {
			case "loss":
				rules := fmt.Sprintf("table inet ferrychaos {\n chain out {\n  type filter hook output priority 0; policy accept;\n  ip6 daddr %s numgen random mod 100 < 10 counter drop\n }\n}\n", c.bed.Addr(dst))
				if err := c.inNS(src, rules, "nft", "-f", "-"); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.inNS(src, "", "nft", "delete", "table", "inet", "ferrychaos") })
				desc = "nftables numgen: 10% of the source's packets to the target dropped"
			case "tbf":
				if err := c.inNS(src, "", "tc", "qdisc", "add", "dev", "fab0", "root", "tbf", "rate", fmt.Sprintf("%dmbit", capMbit), "burst", "32kb", "latency", "100ms"); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.inNS(src, "", "tc", "qdisc", "del", "dev", "fab0", "root") })
				desc = fmt.Sprintf("tc tbf %d Mbit/s on the source's fabric link", capMbit)
			}
			start := time.Now()
			id, err := c.bed.Migrate(c.ctx, "qmach", dst)
			if err != nil {
				t.Fatal(err)
			}
			w := c.watch(id, src, mach.Volume)
			o := c.finish(id, "qmach", src, dst, mach.Volume, ack, w, start, 4*time.Minute)
			if o.final.State != fsm.Completed {
				t.Fatalf("%s: ended %s (%+v); a degraded link must not fail a migration", fault, o.final.State, o.final.Rollback)
			}
			m := o.final
			window := m.EnteredAt[fsm.Hydrated].Sub(m.EnteredAt[fsm.Exported])
			var fetched int64
			if m.Progress != nil {
				fetched = m.Progress.FetchedBytes
			}
			rate := float64(fetched) / window.Seconds()
			down, _ := m.Downtime()
			if fault == "tbf" {
				limit := float64(capMbit) * 1e6 / 8
				t.Logf("fetched %d bytes in %v: %.1f MB/s under a %.1f MB/s cap", fetched, window, rate/1e6, limit/1e6)
				if rate > 1.15*limit {
					t.Fatalf("copied at %.1f MB/s through a %.1f MB/s link: the cap was not in the path", rate/1e6, limit/1e6)
				}
				if fetched < 16<<20 {
					t.Fatalf("fetched only %d bytes after writing 16 MiB of random data", fetched)
				}
			}
			report("network faults", fmt.Sprintf("| %s | %s, downtime %v | fetched %.1f MiB at %.1f MB/s (exported→hydrated %v) | records %d/%d, source %s, leaks %s, %v |",
				desc, m.State, down.Round(time.Millisecond), float64(fetched)/(1<<20), rate/1e6, window.Round(100*time.Millisecond), o.acked, o.present, o.frozenSame, o.leaks, o.took.Round(100*time.Millisecond)))
		})
	}
}
