package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/console"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/logging"
	"github.com/ferry-dev/ferry/internal/testbed"
	"github.com/ferry-dev/ferry/netrewrite"
	"github.com/ferry-dev/ferry/workload"
)

func init() {
	var size string
	var keep bool
	var dir string
	var runFor time.Duration
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Migrate a running machine and its encrypted volume between two local agents, then verify and clean up",
		Long: `Starts a server and two agents, each in its own network namespace joined by a private IPv6
fabric; creates a LUKS2-encrypted volume with ext4 on worker A; runs a machine that appends
checksummed records to it; migrates it to worker B with a progress bar; verifies that every
acknowledged record survived and that the old 6PN address still answers; prints downtime and
bytes fetched vs skipped; and removes everything it made, also on Ctrl-C. Needs root.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			n, err := parseSize(size)
			if err != nil {
				return withCode(ExitUsage, err)
			}
			if os.Geteuid() != 0 {
				return withCode(ExitUsage, errors.New("the demo creates network namespaces, loop devices and mounts: run it as root"))
			}
			ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			err = runDemo(ctx, cmd.OutOrStdout(), n, dir, keep, runFor)
			if err != nil && ctx.Err() != nil && !keep {
				return withCode(130, errors.New("interrupted; everything the demo made was removed"))
			}
			return err
		},
	}
	cmd.Flags().StringVar(&size, "size", "1G", "volume size")
	cmd.Flags().StringVar(&dir, "dir", "", "work dir (default: a new folder under /tmp)")
	cmd.Flags().BoolVar(&keep, "keep", false, "leave the cluster running until Ctrl-C and print the commands that run `ferry status` and `ferry ui` against it")
	cmd.Flags().DurationVar(&runFor, "warmup", 2*time.Second, "how long the machine writes on worker A before the migration")
	register(cmd)
}

func runDemo(ctx context.Context, out io.Writer, size int64, dir string, keep bool, warmup time.Duration) (err error) {
	log := logging.For(logging.Default(), "demo").Level(levelOr("warn"))
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	suffix := make([]byte, 2)
	rand.Read(suffix)
	id := hex.EncodeToString(suffix)
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
	step("cluster up in %v; creating a %s LUKS2 volume with ext4 on %s", time.Since(start).Round(time.Millisecond), humanBytes(size), wa)
	t0 := time.Now()
	vol := "vol_demo"
	if _, err := c.CreateVolume(ctx, fsm.Volume{ID: vol, Worker: wa, Size: size, State: fsm.VolCreating}); err != nil {
		return err
	}
	key := make([]byte, 32)
	rand.Read(key)
	pass := []byte(hex.EncodeToString(key))
	if err := c.SetVolumeKey(ctx, vol, pass); err != nil {
		return err
	}
	clear(pass)
	v, err := waitVolume(ctx, c, vol, fsm.VolCreated, 3*time.Minute)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "    volume %s created in %v (data offset %s, cipher %s)\n", v.ID, time.Since(t0).Round(time.Millisecond),
		humanBytes(v.Layout.DataOffset), v.Layout.Cipher)

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
	if err := waitAcked(ctx, ack, 1, 2*time.Minute); err != nil {
		return err
	}
	if err := echoCheck(ctx, bed, addr); err != nil {
		return fmt.Errorf("machine not reachable at its 6PN address %s: %w", addr, err)
	}
	sleepCtx(ctx, warmup)
	before, _ := workload.Acked(ack)
	step("machine writing (%d records acknowledged); migrating m1 to %s", before, wb)
	m, err := c.CreateMigration(ctx, api.PlanRequest{Machine: "m1", Target: wb})
	if err != nil {
		return err
	}
	final, err := waitMigrations(ctx, c, out, []string{m.ID}, isTerminal(os.Stdout))
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
	// Let the machine write on B for a moment, then verify from B's mount.
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
	d, _ := fm.Downtime()
	fmt.Fprintf(out, "    downtime (source stopped -> machine started on target): %v\n", d.Round(time.Millisecond))
	if p := fm.Progress; p != nil {
		fmt.Fprintf(out, "    bytes fetched from the source: %s of %s; skipped (trim + known-zero): %s\n",
			humanBytes(p.FetchedBytes), humanBytes(p.TotalBytes), humanBytes(p.SkippedBytes))
		if hs, ok1 := fm.EnteredAt[fsm.Hydrating]; ok1 {
			if hd, ok2 := fm.EnteredAt[fsm.Hydrated]; ok2 && hd.After(hs) {
				fmt.Fprintf(out, "    hydration: %v, %s/s of fetched data\n", hd.Sub(hs).Round(time.Millisecond),
					humanBytes(int64(float64(p.FetchedBytes)/hd.Sub(hs).Seconds())))
			}
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

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:=,@+") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'"'"'`) + "'"
}

func levelOr(def string) zerologLevel { return parseLevel(def) }

func waitAcked(ctx context.Context, ack string, n uint64, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if a, _ := workload.Acked(ack); a >= n {
			return nil
		}
		if !sleepCtx(ctx, 100*time.Millisecond) {
			return ctx.Err()
		}
	}
	return fmt.Errorf("the machine acknowledged no record within %v", timeout)
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
