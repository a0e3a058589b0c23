// Package demo is `ferry demo`: a server and two agents in network
// namespaces (internal/testbed), a LUKS2 volume with a machine writing
// checksummed records, one migration with a progress bar, then checks that
// no acknowledged record was lost and that the old 6PN address still
// answers, and a cleanup that leaves nothing behind.
package demo

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/console"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/bytesize"
	"github.com/ferry-dev/ferry/internal/operator"
	"github.com/ferry-dev/ferry/internal/testbed"
	"github.com/ferry-dev/ferry/machine/workload"
	"github.com/ferry-dev/ferry/netrewrite"
)

// Config is what `ferry demo` takes from its flags.
type Config struct {
	Exe    string        // the ferry binary the cluster runs
	Size   int64         // volume size in bytes
	Dir    string        // work dir; a new folder under the temp dir when empty
	Keep   bool          // leave the cluster up until ctx ends
	Warmup time.Duration // how long the machine writes before the migration
	Live   bool          // redraw the progress line in place (out is a terminal)
	Log    zerolog.Logger
}

// Run runs the demo, writing its steps to out. Everything it made is
// removed when it returns, also when ctx is cancelled (Ctrl-C).
func Run(ctx context.Context, out io.Writer, cfg Config) (err error) {
	if cfg.Size <= 0 {
		return fmt.Errorf("demo volume size %d: must be positive", cfg.Size)
	}
	if cfg.Exe == "" {
		return fmt.Errorf("demo: the ferry binary to run is required")
	}
	log := cfg.Log
	exe, size, dir, keep, warmup := cfg.Exe, cfg.Size, cfg.Dir, cfg.Keep, cfg.Warmup
	id := testbed.RandHex(2)
	if dir == "" {
		dir = filepath.Join(os.TempDir(), "ferry-demo-"+id)
	}
	step := func(format string, a ...any) { fmt.Fprintf(out, "==> "+format+"\n", a...) }
	wa, wb := "a"+id, "b"+id
	step("starting a server and agents %s and %s in network namespaces (work dir %s)", wa, wb, dir)
	// Teardown must run even when ctx is cancelled (Ctrl-C), with its own deadline.
	start := time.Now()
	bed, err := testbed.Start(ctx, testbed.Config{Dir: dir, Exe: exe, Prefix: "fd" + id, Workers: []string{wa, wb}, Log: log})
	defer func() {
		if bed == nil {
			return
		}
		step("cleaning up")
		cctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if cerr := bed.Close(cctx); cerr != nil {
			fmt.Fprintf(out, "cleanup: %v\n", cerr)
			if err == nil {
				err = cerr
			}
		} else if !keep || err == nil {
			os.RemoveAll(dir)
			fmt.Fprintln(out, "    no namespace, mount, loop device or process left")
		}
	}()
	if err != nil {
		return fmt.Errorf("start the cluster: %w", err)
	}
	c := bed.Client
	const org, machineNo = 0x10, 0x1
	if err := bed.Fabric.RouteOrg(ctx, log, org); err != nil {
		return err
	}
	fmt.Fprintf(out, "    recovery key made (ferry keys recovery-init): private half in %s\n", bed.RecoveryKeyFile)
	step("cluster up in %v; creating a %s LUKS2 volume with ext4 on %s", time.Since(start).Round(time.Millisecond), bytesize.Format(size), wa)
	t0 := time.Now()
	vol := "vol_demo"
	if _, err := c.CreateVolume(ctx, fsm.Volume{ID: vol, Worker: wa, Size: size, State: fsm.VolCreating}); err != nil {
		return err
	}
	v, err := operator.WaitVolume(ctx, c, vol, fsm.VolCreated, 3*time.Minute)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "    volume %s created in %v (data offset %s, cipher %s)\n", v.ID, time.Since(t0).Round(time.Millisecond),
		bytesize.Format(v.Layout.DataOffset), v.Layout.Cipher)

	ack := filepath.Join(dir, "ack.log")
	addr, err := netrewrite.Build(org, bed.HostID(wa), machineNo)
	if err != nil {
		return err
	}
	spec := fmt.Sprintf(`{"command":[%q,"workload","run","--ack",%q,"--listen","[::]:7000"],"kill_signal":"SIGINT","kill_timeout":5000000000}`, exe, ack)
	step("running machine m1 on %s at %s: it appends checksummed records and answers TCP on :7000", wa, addr)
	if _, err := c.CreateMachine(ctx, fsm.Machine{ID: "m1", Worker: wa, Volume: vol, Network: org, MachineNo: machineNo,
		Addr6PN: addr.String(), State: fsm.MachineRunning, Spec: []byte(spec)}); err != nil {
		return err
	}
	if _, err := testbed.WaitAcked(ctx, ack, 1, 2*time.Minute); err != nil {
		return err
	}
	if err := echoCheck(ctx, bed, addr); err != nil {
		return fmt.Errorf("machine not reachable at its 6PN address %s: %w", addr, err)
	}
	sleepCtx(ctx, warmup)
	before, _ := workload.Acked(ack)
	step("machine writing (%d records acknowledged); migrating m1 to %s", before, wb)
	// The machine's own view of the downtime: the longest pause between
	// its acknowledged records, from the plan until it writes on wb.
	gaps := workload.WatchGaps(ack, 5*time.Millisecond)
	defer gaps.Stop()
	m, err := c.CreateMigration(ctx, api.PlanRequest{Machine: "m1", Target: wb})
	if err != nil {
		return err
	}
	final, err := operator.FollowMigrations(ctx, c, out, []string{m.ID}, cfg.Live)
	if err != nil {
		return err
	}
	fm := final[m.ID]
	if fm.State != fsm.Completed {
		reason := ""
		if fm.Rollback != nil {
			reason = fm.Rollback.Reason
		}
		return fmt.Errorf("migration %s ended %s: %s", fm.ID, fm.State, reason)
	}
	// Let the machine write on B for a moment (which closes the gap), then
	// verify from B's mount.
	resumed, _ := workload.Acked(ack)
	if _, err := testbed.WaitAcked(ctx, ack, resumed+3, time.Minute); err != nil {
		return fmt.Errorf("machine m1 does not write on %s after the migration: %w", wb, err)
	}
	machineDown := gaps.Stop()
	sleepCtx(ctx, time.Second)
	acked, _ := workload.Acked(ack)
	mnt := filepath.Join(bed.WorkerDir(wb), "mnt", "m1")
	present, _, err := workload.Scan(filepath.Join(mnt, workload.RecordsFile))
	if err != nil {
		return err
	}
	if present < acked {
		return fmt.Errorf("LOST RECORDS: %d acknowledged, %d present on %s", acked, present, wb)
	}
	step("verified: %d records acknowledged, all %d present on %s (none lost)", acked, present, wb)
	Report(out, fm, machineDown)
	if ss, ok := fm.EnteredAt[fsm.SourceStopped]; ok {
		if last, first, err := workload.PauseAround(filepath.Join(mnt, workload.RecordsFile), ss); err == nil {
			fmt.Fprintf(out, "    where the pause went (ms after the machine's last record on %s): %s\n", wa, FormatSteps(Steps(fm, last, first)))
		}
	}
	mach, err := c.GetMachine(ctx, "m1")
	if err == nil {
		fmt.Fprintf(out, "    6PN: %s -> %s\n", addr, mach.Addr6PN)
		newAddr, perr := netrewrite.Parse(mach.Addr6PN)
		if perr == nil {
			if err := echoCheck(ctx, bed, newAddr); err != nil {
				return fmt.Errorf("machine not reachable at its new address %s: %w", newAddr, err)
			}
		}
	}
	if err := echoCheck(ctx, bed, addr); err != nil {
		return fmt.Errorf("old 6PN address %s does not answer during the grace period: %w", addr, err)
	}
	fmt.Fprintf(out, "    old address %s still answers (grace period), new address answers\n", addr)
	if keep {
		// The server answers only inside the control namespace: enter its
		// network namespace alone (a mount namespace copy would pin the
		// volume's mounts). The console's socket is opened outside by
		// systemd-socket-activate, so a browser on this host reaches it.
		ns := "/run/netns/" + bed.NSOf("ctl")
		client := fmt.Sprintf("--server %s --tls-dir %s --cert operator", shellQuote(bed.ServerAddr), shellQuote(bed.TLSDir()))
		step("cluster kept running; Ctrl-C to clean up. From another shell, as root:")
		fmt.Fprintf(out, "    nsenter --net=%s -- %s status %s\n", shellQuote(ns), shellQuote(exe), client)
		fmt.Fprintf(out, "    systemd-socket-activate --listen=%s nsenter --net=%s -- %s ui %s\n", console.DefaultListen, shellQuote(ns), shellQuote(exe), client)
		fmt.Fprintf(out, "    then open http://%s/\n", console.DefaultListen)
		<-ctx.Done()
	}
	return nil
}

// Report prints what a completed migration cost: downtime as the machine
// saw it (machineDown, the longest pause between its acknowledged records;
// zero when not measured), the control plane's downtime, bytes fetched and
// skipped, hydration time and rate.
func Report(out io.Writer, fm *fsm.Migration, machineDown time.Duration) {
	if machineDown > 0 {
		fmt.Fprintf(out, "    DOWNTIME as the machine saw it: %v (longest pause between two acknowledged records)\n", machineDown.Round(time.Millisecond))
	}
	if d, ok := fm.Downtime(); ok {
		fmt.Fprintf(out, "    control plane's downtime (source stopped -> machine started on target): %v\n", d.Round(time.Millisecond))
	}
	if p := fm.Progress; p != nil {
		fmt.Fprintf(out, "    bytes fetched from the source: %s of %s; skipped (trim + known-zero): %s\n",
			bytesize.Format(p.FetchedBytes), bytesize.Format(p.TotalBytes), bytesize.Format(p.SkippedBytes))
		if hs, ok1 := fm.EnteredAt[fsm.Hydrating]; ok1 {
			if hd, ok2 := fm.EnteredAt[fsm.Hydrated]; ok2 && hd.After(hs) {
				fmt.Fprintf(out, "    hydration: %v, %s/s of fetched data\n", hd.Sub(hs).Round(time.Millisecond),
					bytesize.Format(int64(float64(p.FetchedBytes)/hd.Sub(hs).Seconds())))
			}
		}
	}
}

// Step is one leg of a migration's downtime as the machine saw it.
type Step struct {
	Name string        // the state committed (or "first record")
	Took time.Duration // since the previous leg ended
}

// Steps splits the machine's pause, from its last record on the source
// (last) to its first on the target (first), at the states the store
// committed in between: the stop and unmount on the source
// (source_stopped), the export, the clone and its mount, fstrim, the
// cutover and the machine's start until its first record.
func Steps(m *fsm.Migration, last, first time.Time) []Step {
	var out []Step
	prev := last
	for _, st := range []fsm.State{fsm.SourceStopped, fsm.Exported, fsm.CloneBuilt, fsm.Trimmed, fsm.Cutover} {
		t, ok := m.EnteredAt[st]
		if !ok || t.Before(prev) || t.After(first) {
			continue
		}
		out = append(out, Step{string(st), t.Sub(prev)})
		prev = t
	}
	return append(out, Step{"first record", first.Sub(prev)})
}

// FormatSteps prints steps as "source_stopped +35 · exported +5 · …" in ms.
func FormatSteps(steps []Step) string {
	parts := make([]string, len(steps))
	for i, s := range steps {
		parts[i] = fmt.Sprintf("%s +%.0f", s.Name, float64(s.Took)/float64(time.Millisecond))
	}
	return strings.Join(parts, " · ")
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

// echoCheck connects from the control namespace (a peer on the fabric) to
// addr:7000 and expects its bytes back.
func echoCheck(ctx context.Context, bed *testbed.Bed, addr netrewrite.Addr) error {
	var lastErr error
	for i := 0; i < 50; i++ {
		conn, err := bed.DialIn("ctl")(ctx, "tcp", net.JoinHostPort(addr.String(), strconv.Itoa(7000)))
		if err == nil {
			conn.SetDeadline(time.Now().Add(3 * time.Second))
			_, err = conn.Write([]byte("ping\n"))
			if err == nil {
				var line string
				line, err = bufio.NewReader(conn).ReadString('\n')
				if err == nil && line != "ping\n" {
					err = fmt.Errorf("echo answered %q", line)
				}
			}
			conn.Close()
			if err == nil {
				return nil
			}
		}
		lastErr = err
		if !sleepCtx(ctx, 100*time.Millisecond) {
			return ctx.Err()
		}
	}
	return lastErr
}

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:=,@+") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'"'"'`) + "'"
}
