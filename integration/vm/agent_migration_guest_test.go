package vm

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/datapath/backendtest"
	"github.com/ferry-dev/ferry/datapath/kernel"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/operator"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/machine/workload"
	"github.com/ferry-dev/ferry/netrewrite"
)

// The guest has no nsenter: the test binary re-executes itself with these
// variables, enters the named network namespace and execs the program.
const (
	envExecNetNS = "FERRY_VM_EXEC_NETNS"
	envExecBin   = "FERRY_VM_EXEC_BIN"
)

// maybeExecInNetNS is called first thing in TestMain.
func maybeExecInNetNS() {
	ns, bin := os.Getenv(envExecNetNS), os.Getenv(envExecBin)
	if ns == "" || bin == "" {
		return
	}
	runtime.LockOSThread()
	h, err := netns.GetFromName(ns)
	if err == nil {
		err = netns.Set(h)
	}
	if err == nil {
		var env []string
		for _, e := range os.Environ() {
			if !strings.HasPrefix(e, envExecNetNS+"=") && !strings.HasPrefix(e, envExecBin+"=") {
				env = append(env, e)
			}
		}
		err = syscall.Exec(bin, append([]string{bin}, os.Args[1:]...), env)
	}
	fmt.Fprintf(os.Stderr, "exec %s in network namespace %s: %v\n", bin, ns, err)
	os.Exit(111)
}

// guestCluster is a server and two agents inside the guest. The source
// worker lives in its own network namespace; the target worker in the
// guest's initial one, because that is where iscsid runs: the kernel's
// iSCSI netlink is not namespace-aware, so open-iscsi connects from the
// host's namespace (as it would on a production host).
type guestCluster struct {
	t     *testing.T
	dir   string
	ferry string
	tls   string
	c     *api.Client
	procs []*exec.Cmd
}

const (
	srcNS       = "ferry-vm-src"
	tgtAddr     = "10.99.0.1" // the guest's namespace: server and target worker
	srcAddr     = "10.99.0.2" // the source worker's namespace
	serverAddr  = tgtAddr + ":7400"
	workerSrc   = "wsrc"
	workerTgt   = "wtgt"
	vethHost    = "fv-tgt"
	vethWorker  = "fv-src"
	migVolume   = "mvol"
	migMachine  = "m1"
	migVolBytes = 40 << 20
)

// fabric connects the source worker's namespace to the guest's with a veth pair.
func (g *guestCluster) fabric() {
	t := g.t
	if err := netrewrite.EnsureNamespace(srcNS); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = netrewrite.DeleteNamespace(srcNS) })
	ns, err := netns.GetFromName(srcNS)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	la := netlink.NewLinkAttrs()
	la.Name = vethHost
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: la, PeerName: vethWorker}); err != nil {
		t.Fatalf("veth pair (is the veth module loaded?): %v", err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(vethHost); err == nil {
			_ = netlink.LinkDel(l)
		}
	})
	peer, err := netlink.LinkByName(vethWorker)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetNsFd(peer, int(ns)); err != nil {
		t.Fatal(err)
	}
	host, err := netlink.LinkByName(vethHost)
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := netlink.ParseAddr(tgtAddr + "/24")
	if err := netlink.AddrAdd(host, addr); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		t.Fatal(err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	wl, err := h.LinkByName(vethWorker)
	if err != nil {
		t.Fatal(err)
	}
	waddr, _ := netlink.ParseAddr(srcAddr + "/24")
	if err := h.AddrAdd(wl, waddr); err != nil {
		t.Fatal(err)
	}
	if err := h.LinkSetUp(wl); err != nil {
		t.Fatal(err)
	}
}

func (g *guestCluster) start(name, ns string, env []string, args ...string) *exec.Cmd {
	t := g.t
	logf, err := os.OpenFile(filepath.Join(g.dir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(g.ferry, args...)
	if ns != "" {
		cmd = exec.Command(os.Args[0], args...)
		cmd.Env = append(os.Environ(), envExecNetNS+"="+ns, envExecBin+"="+g.ferry)
	}
	if env != nil {
		cmd.Env = append(append(os.Environ(), cmd.Env...), env...)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go cmd.Wait()
	g.procs = append(g.procs, cmd)
	return cmd
}

func (g *guestCluster) stopAll() {
	for i := len(g.procs) - 1; i >= 0; i-- {
		p := g.procs[i].Process
		_ = p.Signal(syscall.SIGTERM)
		for j := 0; j < 100 && p.Signal(syscall.Signal(0)) == nil; j++ {
			time.Sleep(50 * time.Millisecond)
		}
		_ = p.Kill()
	}
	g.procs = nil
}

func (g *guestCluster) dumpLogs() {
	logs, _ := filepath.Glob(filepath.Join(g.dir, "*.log"))
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		if len(b) > 5000 {
			b = b[len(b)-5000:]
		}
		g.t.Logf("=== %s (tail)\n%s", filepath.Base(l), b)
	}
}

func (g *guestCluster) agentArgs(worker, addr string, hostID int) []string {
	return []string{"agent", "--worker", worker, "--host-id", fmt.Sprint(hostID), "--address", addr,
		"--server", serverAddr, "--tls-dir", g.tls, "--data-dir", filepath.Join(g.dir, worker),
		"--backend", "kernel", "--fast-kdf", "--log-level", "info",
		"--machine-user", "root"} // the workload's ack log lives in the guest's private folder
}

// TestGuestAgentMigration: an agent-driven migration on the kernel path. A
// server and two `ferry agent --backend kernel` processes (the source worker
// in its own network namespace), a LUKS2+ext4 volume the source agent
// formats, the records workload writing, a first migration aborted with its
// clone built (rollback: nothing left on the target, the machine writes on
// the source again), then `migrate`, the target agent killed
// (-9) after cutover and restarted (it adopts the live clone), hydration to
// linear; no acknowledged record lost. It reports downtime and per-state timings.
func TestGuestAgentMigration(t *testing.T) {
	inGuest(t)
	ferry := "/host/ferry"
	if _, err := os.Stat(ferry); err != nil {
		t.Fatalf("the host put no ferry binary in the share: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	g := &guestCluster{t: t, dir: t.TempDir(), ferry: ferry}
	g.tls = filepath.Join(g.dir, "tls")
	t0 := time.Now()
	g.fabric()
	var certs []tlsutil.Cert // the CA stays next to g.tls (tlsutil.DevCADir), never in it
	for _, c := range []struct{ name, kind, host string }{{"server", tlsutil.KindServer, tgtAddr}, {"operator", tlsutil.KindOperator, ""},
		{workerSrc, tlsutil.KindWorker, srcAddr}, {workerTgt, tlsutil.KindWorker, tgtAddr}} {
		var hosts []string
		if c.host != "" {
			hosts = []string{c.host}
		}
		certs = append(certs, tlsutil.Cert{Name: c.name, Kind: c.kind, Hosts: hosts})
	}
	if err := tlsutil.EnsureDev(g.tls, certs...); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			g.dumpLogs()
		}
		g.stopAll()
		for _, w := range []string{workerSrc, workerTgt} {
			out, err := exec.Command(ferry, "agent", "cleanup", "--worker", w, "--data-dir", filepath.Join(g.dir, w),
				"--tls-dir", g.tls, "--backend", "kernel", "--log-level", "warn").CombinedOutput()
			if err != nil {
				t.Errorf("cleanup of %s: %v: %s", w, err, out)
			}
		}
		if left := processesUsing(g.dir, ferry); len(left) > 0 {
			t.Errorf("processes left after cleanup (killed now): %s", strings.Join(left, "; "))
		}
	})
	g.start("server", "", nil, "server", "--name", "server", "--data-dir", filepath.Join(g.dir, "server"),
		"--listen", serverAddr, "--raft-addr", tgtAddr+":7401", "--tls-dir", g.tls, "--bootstrap")
	g.start("agent-"+workerSrc, srcNS, nil, g.agentArgs(workerSrc, srcAddr, 1)...)
	// First the target agent pauses before proposing clone_built, where the
	// operator aborts the migration (rollback on the kernel path).
	tgtAgent := g.start("agent-"+workerTgt, "", []string{"FERRY_FAILPOINT_PAUSE_BEFORE=clone_built=5s"}, g.agentArgs(workerTgt, tgtAddr, 2)...)
	tc, err := tlsutil.ClientConfig(g.tls, "operator")
	if err != nil {
		t.Fatal(err)
	}
	if g.c, err = api.NewClient([]string{serverAddr}, tc); err != nil {
		t.Fatal(err)
	}
	defer g.c.Close()
	waitFor(t, ctx, time.Minute, "both workers registered", func() bool {
		ws, err := g.c.ListWorkers(ctx)
		alive := 0
		for _, w := range ws {
			if w.Alive(time.Now()) {
				alive++
			}
		}
		return err == nil && alive == 2
	})
	tCluster := time.Since(t0)

	// The volume, formatted by the source agent's kernel backend.
	t1 := time.Now()
	// As an operator does once per cluster: the agent then makes and seals the key.
	if _, err := operator.RecoveryInit(ctx, g.c, filepath.Join(g.dir, "recovery.key")); err != nil {
		t.Fatal(err)
	}
	if _, err := g.c.CreateVolume(ctx, fsm.Volume{ID: migVolume, Worker: workerSrc, Size: migVolBytes, State: fsm.VolCreating}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, time.Minute, "the volume created", func() bool {
		v, err := g.c.GetVolume(ctx, migVolume)
		return err == nil && v.State == fsm.VolCreated
	})
	tVolume := time.Since(t1)
	ack := filepath.Join(g.dir, "records.ack")
	spec := fmt.Sprintf(`{"command":[%q,"workload","run","--ack",%q],"kill_signal":"SIGINT","kill_timeout":5000000000}`, ferry, ack)
	if _, err := g.c.CreateMachine(ctx, fsm.Machine{ID: migMachine, Worker: workerSrc, Volume: migVolume, State: fsm.MachineRunning, Spec: []byte(spec)}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, time.Minute, "records acknowledged on the source", func() bool {
		n, _ := workload.Acked(ack)
		return n >= 100
	})
	if n := dmNames(t, kernel.CryptName(migVolume)); len(n) != 1 {
		t.Fatalf("the source volume is not served by dm-crypt (devices %v): not the kernel backend", n)
	}

	// A migration aborted with the clone built: the target tears down every
	// kernel object it made, the source restarts the machine on its volume.
	t2 := time.Now()
	first, err := g.c.CreateMigration(ctx, api.PlanRequest{Machine: migMachine, Target: workerTgt})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, time.Minute, "the target paused with the clone built", func() bool {
		b, _ := os.ReadFile(filepath.Join(g.dir, "agent-"+workerTgt+".log"))
		return strings.Contains(string(b), "failpoint: pausing")
	})
	firstTV := ""
	if fm, err := g.c.GetMigration(ctx, first.ID); err == nil {
		firstTV = fm.TargetVol
	}
	if n := dmNames(t, kernel.CloneName(firstTV)); firstTV == "" || len(n) != 1 {
		t.Fatalf("no dm-clone for the first migration's destination %q: %v", firstTV, n)
	}
	if _, err := g.c.Abort(ctx, first.ID, "vm test: rollback on the kernel path"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, ctx, time.Minute, "the rollback", func() bool {
		fm, err := g.c.GetMigration(ctx, first.ID)
		return err == nil && fm.State == fsm.RolledBack
	})
	if n := dmNames(t, firstTV); len(n) != 0 {
		t.Fatalf("the rolled-back target left device-mapper devices %v", n)
	}
	if out, _ := exec.Command("iscsiadm", "-m", "session").CombinedOutput(); strings.Contains(string(out), "ferry") {
		t.Fatalf("an iSCSI session outlived the rollback: %s", out)
	}
	rolledBack, _ := workload.Acked(ack)
	waitFor(t, ctx, time.Minute, "records acknowledged on the source again", func() bool {
		n, _ := workload.Acked(ack)
		return n >= rolledBack+50
	})
	if p, a, err := workload.Verify(filepath.Join(g.dir, workerSrc, "mnt", migMachine), ack); err != nil || p < a {
		t.Fatalf("records after the rollback: %d present, %d acknowledged: %v", p, a, err)
	}
	tRollback := time.Since(t2)
	// Grown online on the source (loop, dm-crypt, ext4 under the writing
	// machine); the migration below carries the grown layout.
	extSrc := g.extendThroughCLI(ctx, migVolume, 56<<20, filepath.Join(g.dir, workerSrc, "mnt", migMachine), ack)
	// The target agent comes back pausing after cutover, before proposing
	// hydration_started; it is killed there (-9) and restarted: the new
	// process must adopt the live dm-clone, session, loops and mount.
	_ = tgtAgent.Process.Kill()
	for i := 0; i < 100 && tgtAgent.Process.Signal(syscall.Signal(0)) == nil; i++ {
		time.Sleep(20 * time.Millisecond)
	}
	_ = os.Rename(filepath.Join(g.dir, "agent-"+workerTgt+".log"), filepath.Join(g.dir, "agent-"+workerTgt+"-first.log"))
	tgtAgent = g.start("agent-"+workerTgt, "", []string{"FERRY_FAILPOINT_PAUSE_BEFORE=hydration_started=60s"}, g.agentArgs(workerTgt, tgtAddr, 2)...)

	// Migrate, watching the workload's acknowledgements for the longest gap.
	mig, err := g.c.CreateMigration(ctx, api.PlanRequest{Machine: migMachine, Target: workerTgt})
	if err != nil {
		t.Fatal(err)
	}
	tMig := time.Now()
	var m *fsm.Migration
	var lastAcked uint64
	lastMove, longestGap := time.Now(), time.Duration(0)
	var tv string
	sawClone, restarted := false, false
	for {
		if time.Since(tMig) > 2*time.Minute {
			t.Fatalf("migration %s not complete after 2m: %+v", mig.ID, m)
		}
		if n, _ := workload.Acked(ack); n != lastAcked {
			if gap := time.Since(lastMove); gap > longestGap {
				longestGap = gap
			}
			lastAcked, lastMove = n, time.Now()
		}
		if m, err = g.c.GetMigration(ctx, mig.ID); err == nil {
			if m.TargetVol != "" {
				tv = m.TargetVol
			}
			if tv != "" && !sawClone && (m.State == fsm.Trimmed || m.State == fsm.Cutover || m.State == fsm.Hydrating) {
				if tbl, err := exec.Command("dmsetup", "table", kernel.CloneName(tv)).Output(); err == nil && strings.Contains(string(tbl), " clone ") {
					sawClone = true
				}
			}
			if m.State == fsm.Cutover && !restarted {
				if b, _ := os.ReadFile(filepath.Join(g.dir, "agent-"+workerTgt+".log")); strings.Contains(string(b), "failpoint: pausing") {
					_ = tgtAgent.Process.Kill()
					for i := 0; i < 100 && tgtAgent.Process.Signal(syscall.Signal(0)) == nil; i++ {
						time.Sleep(20 * time.Millisecond)
					}
					g.start("agent-"+workerTgt, "", nil, g.agentArgs(workerTgt, tgtAddr, 2)...)
					restarted = true
				}
			}
			if m.State == fsm.Completed {
				break
			}
			if m.State.Terminal() {
				t.Fatalf("migration ended %s: rollback %+v, last error %q", m.State, m.Rollback, m.LastError)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	tMigration := time.Since(tMig)
	if !restarted {
		t.Errorf("the target agent never paused at the failpoint after cutover: it was not restarted")
	} else if b, _ := os.ReadFile(filepath.Join(g.dir, "agent-"+workerTgt+".log")); !strings.Contains(string(b), "adopting existing dm-clone device") {
		t.Errorf("the restarted target agent did not adopt the live dm-clone (no \"adopting existing dm-clone device\" in its log)")
	}
	if !sawClone {
		t.Errorf("never saw dm-clone under the destination %s during the migration", tv)
	}
	// Hydrated to linear under the running machine; the source session is gone.
	if tbl := guestRun(t, "dmsetup", "table", kernel.CloneName(tv)); !strings.Contains(tbl, " linear ") {
		t.Fatalf("destination after hydration: %q, want a linear mapping", tbl)
	}
	if out, _ := exec.Command("iscsiadm", "-m", "session").CombinedOutput(); strings.Contains(string(out), "ferry") {
		t.Fatalf("an iSCSI session outlived the migration: %s", out)
	}
	// The workload keeps writing on the target; nothing acknowledged is lost.
	before, _ := workload.Acked(ack)
	waitFor(t, ctx, time.Minute, "records acknowledged on the target", func() bool {
		n, _ := workload.Acked(ack)
		return n >= before+50
	})
	present, acked, err := workload.Verify(filepath.Join(g.dir, workerTgt, "mnt", migMachine), ack)
	if err != nil {
		t.Fatalf("records: %v (%d present, %d acknowledged)", err, present, acked)
	}
	if present < acked {
		t.Fatalf("%d records present, %d acknowledged", present, acked)
	}
	mach, err := g.c.GetMachine(ctx, migMachine)
	if err != nil || mach.Worker != workerTgt || mach.Volume != tv {
		t.Fatalf("machine record after the migration: %+v %v (destination volume %s)", mach, err, tv)
	}
	if got := backendtest.BlockBytes(t, "/dev/mapper/"+kernel.CryptName(tv)); got != extSrc.PayloadSize {
		t.Fatalf("the migrated volume shows %d plaintext bytes, the source was extended to %d", got, extSrc.PayloadSize)
	}
	// Grown online on the target, through the linear mapping the dissolved
	// clone became.
	g.extendThroughCLI(ctx, tv, 72<<20, filepath.Join(g.dir, workerTgt, "mnt", migMachine), ack)
	down, _ := m.Downtime()
	var steps []string
	prev := m.EnteredAt[fsm.Planned]
	for _, s := range []fsm.State{fsm.TargetPrepared, fsm.SourceStopped, fsm.Exported, fsm.CloneBuilt, fsm.Trimmed,
		fsm.Cutover, fsm.Hydrating, fsm.Hydrated, fsm.SourceReleased, fsm.Completed} {
		if at, ok := m.EnteredAt[s]; ok {
			steps = append(steps, fmt.Sprintf("%s +%s", s, at.Sub(prev).Round(time.Millisecond)))
			prev = at
		}
	}
	var fetched string
	if m.Progress != nil {
		fetched = fmt.Sprintf("%d of %d bytes hydrated", m.Progress.HydratedBytes, m.Progress.TotalBytes)
	}
	t.Logf("kernel-path agent migration: records %d acknowledged, %d present; downtime (source_stopped→cutover) %s, longest gap between the workload's acknowledgements %s; migration %s; %s",
		acked, present, down.Round(time.Millisecond), longestGap.Round(time.Millisecond), tMigration.Round(time.Millisecond), fetched)
	t.Logf("steps: %s", strings.Join(steps, ", "))
	t.Logf("setup: fabric+certificates+server+agents %s, volume create (LUKS2+ext4) %s; the aborted first migration, its rollback and the machine writing again on the source %s",
		tCluster.Round(time.Millisecond), tVolume.Round(time.Millisecond), tRollback.Round(time.Millisecond))
}

// extendThroughCLI grows vol to size with `ferry volume extend` while the
// machine's workload writes into mnt, and checks what the machine sees: the
// device under its mount and its filesystem grew online, it kept writing,
// and every acknowledged record is there. It returns the grown layout.
func (g *guestCluster) extendThroughCLI(ctx context.Context, vol string, size int64, mnt, ack string) fsm.LUKSLayout {
	t := g.t
	t.Helper()
	v0, err := g.c.GetVolume(ctx, vol)
	if err != nil || v0.Layout == nil {
		t.Fatalf("volume %s before extending: %+v %v", vol, v0, err)
	}
	fs0 := statfsBytes(t, mnt)
	acked0, _ := workload.Acked(ack)
	start := time.Now()
	out, err := exec.CommandContext(ctx, g.ferry, "volume", "extend", vol, "--size", fmt.Sprint(size), "--wait", "1m",
		"--server", serverAddr, "--tls-dir", g.tls, "--cert", "operator").CombinedOutput()
	took := time.Since(start)
	if err != nil {
		t.Fatalf("ferry volume extend %s --size %d: %v: %s", vol, size, err, out)
	}
	v, err := g.c.GetVolume(ctx, vol)
	if err != nil || v.Size != size || v.Extending() || v.Layout == nil || v.Layout.PayloadSize <= v0.Layout.PayloadSize {
		t.Fatalf("volume %s after the extend: %+v %v (was %+v)", vol, v, err, v0)
	}
	if got := backendtest.BlockBytes(t, "/dev/mapper/"+kernel.CryptName(vol)); got != v.Layout.PayloadSize {
		t.Fatalf("dm-crypt of %s shows %d bytes after the extend, the record says %d", vol, got, v.Layout.PayloadSize)
	}
	fs1 := statfsBytes(t, mnt)
	if fs1 < fs0+(size-v0.Size)*8/10 {
		t.Fatalf("the machine's filesystem is %d bytes after extending %s from %d to %d bytes (was %d): it did not grow online", fs1, vol, v0.Size, size, fs0)
	}
	acked1, _ := workload.Acked(ack)
	waitFor(t, ctx, time.Minute, "records acknowledged after the extend", func() bool {
		n, _ := workload.Acked(ack)
		return n >= acked1+30
	})
	present, acked, err := workload.Verify(mnt, ack)
	if err != nil || present < acked {
		t.Fatalf("records after extending %s: %d present, %d acknowledged: %v", vol, present, acked, err)
	}
	t.Logf("extended %s online through the CLI in %s: %d -> %d bytes, filesystem %d -> %d bytes; %d records acknowledged during the extend, %d in all, all present",
		vol, took.Round(time.Millisecond), v0.Size, size, fs0, fs1, acked1-acked0, acked)
	return *v.Layout
}

func statfsBytes(t *testing.T, mnt string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}

// processesUsing lists (and kills) processes running bin or whose command
// line or working directory is under dir.
func processesUsing(dir, bin string) []string {
	var out []string
	pids, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range pids {
		cmd, _ := os.ReadFile(filepath.Join(p, "cmdline"))
		cwd, _ := os.Readlink(filepath.Join(p, "cwd"))
		line := strings.ReplaceAll(string(cmd), "\x00", " ")
		if strings.HasPrefix(line, bin+" ") || strings.Contains(line, dir) || strings.HasPrefix(cwd, dir) {
			var pid int
			fmt.Sscan(filepath.Base(p), &pid)
			if pid == os.Getpid() {
				continue
			}
			out = append(out, fmt.Sprintf("pid %d %q cwd %s", pid, line, cwd))
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return out
}

func waitFor(t *testing.T, ctx context.Context, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
