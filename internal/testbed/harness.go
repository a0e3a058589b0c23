package testbed

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/machine"
	"github.com/ferry-dev/ferry/machine/workload"
	"github.com/ferry-dev/ferry/netrewrite"
)

// This file holds the helpers the chaos tests and the benchmark command share:
// they return errors instead of taking a testing.TB, so a plain program can
// drive a cluster too.

// BuildFerry compiles the ferry binary with the race detector into dir and
// returns its path, so the multi-process tests run the daemons' own code
// (agent, server, volume serve, the export) under -race, not only the
// in-process unit tests. It also points GORACE's log_path into dir/race for
// every process this one starts from now on (they inherit the environment):
// the daemons run until they are killed, so their exit status 66 on a race is
// never seen, and RaceReports is how a test learns of one.
func BuildFerry(dir string) (string, error) {
	exe := filepath.Join(dir, "ferry")
	cmd := exec.Command("go", "build", "-race", "-o", exe, "github.com/ferry-dev/ferry/cmd/ferry")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1") // -race needs cgo (gcc, in scripts/packages.txt)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build ferry with -race (needs gcc: run scripts/deps.sh): %w\n%s", err, out)
	}
	race := filepath.Join(dir, "race")
	if err := os.MkdirAll(race, 0o755); err != nil {
		return "", err
	}
	opts := strings.TrimSpace(os.Getenv("GORACE") + " log_path=" + filepath.Join(race, "ferry"))
	if err := os.Setenv("GORACE", opts); err != nil {
		return "", err
	}
	return exe, nil
}

// RunRaceBuilt is the TestMain of a suite that drives ferry's daemons: it
// builds the race-detecting binary (BuildFerry) into a temporary folder,
// sets *bin to it, runs the tests and fails the run on any race report of
// the daemons. It returns the exit code for os.Exit.
func RunRaceBuilt(m interface{ Run() int }, suite string, bin *string) int {
	dir, err := os.MkdirTemp("", "ferry-"+suite+"-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if *bin, err = BuildFerry(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	code := m.Run()
	if err := RaceReports(dir, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, err)
		code = 1
	}
	return code
}

// depRaces are modules whose own races RaceReports lists but does not fail
// on: a report where every frame of both accesses is inside one of them is
// the dependency's bug, which ferry cannot fix without forking it.
// gotgt v0.2.2 reads iscsiConnection.state in handler() while the rxHandler
// goroutine it started writes it, with no lock (iscsid.go:292/304 vs
// 343/463/480), and its accept loop and its handlers write
// isClientConnected with no lock (iscsid.go:237 vs 851); any frame of
// ferry's own code in an access still fails, except the goroutine entry
// that called into gotgt (raceInDeps).
var depRaces = []string{"github.com/gostor/gotgt/"}

// RaceReports returns an error holding every race report that a process of
// the binary BuildFerry wrote into dir, or nil when there is none. Reports
// wholly inside a module of depRaces are printed to w and not counted.
func RaceReports(dir string, w io.Writer) error {
	files, err := filepath.Glob(filepath.Join(dir, "race", "ferry.*"))
	if err != nil {
		return err
	}
	var reports []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return fmt.Errorf("read race report: %w", err)
		}
		ours, deps := splitRaces(string(b))
		if deps > 0 {
			fmt.Fprintf(w, "%s: %d data races inside dependencies (%s), not counted\n", filepath.Base(f), deps, strings.Join(depRaces, ", "))
		}
		for _, r := range ours {
			reports = append(reports, fmt.Sprintf("== %s\n%s", filepath.Base(f), r))
		}
	}
	if len(reports) == 0 {
		return nil
	}
	return fmt.Errorf("the race detector reported %d data races in ferry processes:\n%s", len(reports), strings.Join(reports, "\n"))
}

// splitRaces splits a race log into the reports that touch ferry's code
// and the number that lie wholly inside depRaces.
func splitRaces(log string) (ours []string, deps int) {
	for _, block := range strings.Split(log, "==================") {
		if !strings.Contains(block, "WARNING: DATA RACE") {
			continue
		}
		if raceInDeps(block) {
			deps++
		} else {
			ours = append(ours, strings.TrimSpace(block))
		}
	}
	return ours, deps
}

// raceInDeps reports whether both accesses of the report ("Write at …",
// "Previous read at …") happen in a depRaces module: in each access
// stack, every function frame is the dependency's, except that the
// outermost one may be the goroutine's entry in ferry that called into it
// (ferry's `go drv.Run()` running gotgt's accept loop). The innermost frame,
// the access itself, must be the dependency's. The goroutine-creation stacks
// do not count, and neither do the standard library's frames.
func raceInDeps(block string) bool {
	var stacks [][]string
	inAccess := false
	for _, line := range strings.Split(block, "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case trimmed == "":
			inAccess = false
		case strings.HasSuffix(trimmed, ":") && strings.Contains(trimmed, " at 0x"):
			inAccess = true
			stacks = append(stacks, nil)
		case strings.HasPrefix(trimmed, "Goroutine "):
			inAccess = false
		case inAccess && !strings.HasPrefix(trimmed, "/"):
			if stdFrame(trimmed) {
				continue // a map or sync primitive the dependency called
			}
			stacks[len(stacks)-1] = append(stacks[len(stacks)-1], trimmed)
		}
	}
	if len(stacks) == 0 {
		return false
	}
	for _, frames := range stacks {
		if len(frames) == 0 {
			return false
		}
		for i, f := range frames {
			if !depFrame(f) && (i == 0 || i < len(frames)-1) {
				return false
			}
		}
	}
	return true
}

func depFrame(frame string) bool {
	for _, m := range depRaces {
		if strings.HasPrefix(frame, m) {
			return true
		}
	}
	return false
}

// stdFrame reports whether a stack frame is the standard library's (its
// package path's first element has no dot: runtime.mapassign,
// internal/runtime/maps…): neutral, it belongs to whoever called it.
func stdFrame(frame string) bool {
	elem, _, slash := strings.Cut(frame, "/")
	if !slash {
		elem, _, _ = strings.Cut(frame, ".")
		if elem == "main" {
			return false // ferry's own cmd/ferry
		}
	}
	return !strings.Contains(elem, ".")
}

// RandHex returns n random bytes, hex encoded.
func RandHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Workers returns the bed's worker names.
func (b *Bed) Workers() []string { return append([]string(nil), b.cfg.Workers...) }

// Dir is the bed's work dir.
func (b *Bed) Dir() string { return b.cfg.Dir }

// Prefix is the bed's namespace prefix.
func (b *Bed) Prefix() string { return b.cfg.Prefix }

// Exe is the ferry binary the bed runs.
func (b *Bed) Exe() string { return b.cfg.Exe }

// CreateVolume registers a volume on worker and waits until the worker's
// agent made its key, sealed it and formatted the volume.
func (b *Bed) CreateVolume(ctx context.Context, id, worker string, size int64) error {
	if _, err := b.Client.CreateVolume(ctx, fsm.Volume{ID: id, Worker: worker, Size: size, State: fsm.VolCreating}); err != nil {
		return fmt.Errorf("create volume %s: %w", id, err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		v, err := b.Client.GetVolume(ctx, id)
		if err == nil && v.State == fsm.VolCreated {
			return nil
		}
		if !sleepCtx(ctx, 100*time.Millisecond) {
			return ctx.Err()
		}
	}
	return fmt.Errorf("volume %s not created within 2m; see the agent log of %s", id, worker)
}

// RunRecords starts the checksummed-records workload as machine id on worker
// with volume vol in private network org, and waits for its first
// acknowledged record. It returns the ack file (kept outside every volume).
func (b *Bed) RunRecords(ctx context.Context, id, worker, vol string, org uint32) (string, error) {
	if err := b.Fabric.RouteOrg(ctx, zerolog.Nop(), org); err != nil {
		return "", err
	}
	ack := filepath.Join(b.cfg.Dir, id+".ack")
	addr, err := netrewrite.Build(org, b.HostID(worker), 1)
	if err != nil {
		return "", err
	}
	spec := fmt.Sprintf(`{"command":[%q,"workload","run","--ack",%q,"--listen","[::]:7000"],"kill_signal":"SIGINT","kill_timeout":5000000000}`, b.cfg.Exe, ack)
	if _, err := b.Client.CreateMachine(ctx, fsm.Machine{ID: id, Worker: worker, Volume: vol, Network: org, MachineNo: 1,
		Addr6PN: addr.String(), State: fsm.MachineRunning, Spec: []byte(spec)}); err != nil {
		return "", fmt.Errorf("create machine %s: %w", id, err)
	}
	_, err = WaitAcked(ctx, ack, 1, time.Minute)
	return ack, err
}

// WaitAcked waits until the workload acknowledged at least n records.
func WaitAcked(ctx context.Context, ack string, n uint64, timeout time.Duration) (uint64, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if a, _ := workload.Acked(ack); a >= n {
			return a, nil
		}
		if !sleepCtx(ctx, 50*time.Millisecond) {
			return 0, ctx.Err()
		}
	}
	a, _ := workload.Acked(ack)
	return a, fmt.Errorf("workload acknowledged %d records, fewer than %d, within %v", a, n, timeout)
}

// WaitTerminal waits until migration id is completed or rolled back.
func (b *Bed) WaitTerminal(ctx context.Context, id string, timeout time.Duration) (*fsm.Migration, error) {
	return b.WaitState(ctx, id, timeout, fsm.Completed, fsm.RolledBack)
}

// WaitState waits until migration id is in one of states; reaching another
// terminal state is an error.
func (b *Bed) WaitState(ctx context.Context, id string, timeout time.Duration, states ...fsm.State) (*fsm.Migration, error) {
	deadline := time.Now().Add(timeout)
	var m *fsm.Migration
	var err error
	for time.Now().Before(deadline) {
		m, err = b.Client.GetMigration(ctx, id)
		if err == nil {
			for _, s := range states {
				if m.State == s {
					return m, nil
				}
			}
			if m.State.Terminal() {
				return m, fmt.Errorf("migration %s ended %s (rollback %+v), waiting for %v", id, m.State, m.Rollback, states)
			}
		}
		if !sleepCtx(ctx, 50*time.Millisecond) {
			return m, ctx.Err()
		}
	}
	if m != nil {
		return m, fmt.Errorf("migration %s still %s after %v, waiting for %v (stalled %v: %s; last error %q)", id, m.State, timeout, states, m.Stalled, m.StallCause, m.LastError)
	}
	return nil, fmt.Errorf("migration %s: no record after %v: %v", id, timeout, err)
}

// VerifyRecords checks every acknowledged record is on the machine's mount on worker.
func (b *Bed) VerifyRecords(machineID, worker, ack string) (present, acked uint64, err error) {
	return workload.Verify(filepath.Join(b.WorkerDir(worker), "mnt", machineID), ack)
}

// NeverTwice checks the machine's run intervals on different workers never
// overlap (invariant 2 in docs/architecture.md).
func (b *Bed) NeverTwice(machineID string) error {
	type iv struct {
		w    string
		a, b time.Time
	}
	var all []iv
	for _, w := range b.cfg.Workers {
		ivs, err := machine.Journal(filepath.Join(b.WorkerDir(w), "machines"), machineID)
		if err != nil {
			return err
		}
		for k, i := range ivs {
			end := i.Stop
			if end.IsZero() && k+1 < len(ivs) {
				// The agent was killed between stopping the process and
				// journaling it; the driver starts a machine only once its
				// previous process is gone, so that one ended by the next start.
				end = ivs[k+1].Start
			}
			if end.IsZero() {
				end = time.Now().Add(time.Hour)
			}
			all = append(all, iv{w, i.Start, end})
		}
	}
	for i := range all {
		for j := range all {
			if i != j && all[i].w != all[j].w && all[i].a.Before(all[j].b) && all[j].a.Before(all[i].b) {
				return fmt.Errorf("machine %s ran on %s (%v..%v) and on %s (%v..%v) at once", machineID,
					all[i].w, all[i].a, all[i].b, all[j].w, all[j].a, all[j].b)
			}
		}
	}
	return nil
}

// SourceFile is a volume's data file on a worker.
func (b *Bed) SourceFile(worker, vol string) string {
	return filepath.Join(b.WorkerDir(worker), "volumes", vol, "data")
}

// FileSum is the SHA-256 of a file.
func FileSum(path string) ([32]byte, error) {
	var s [32]byte
	f, err := os.Open(path)
	if err != nil {
		return s, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return s, err
	}
	copy(s[:], h.Sum(nil))
	return s, nil
}

// Leftovers lists every namespace, mount, loop device and process of the bed
// still present; after Close it must be empty.
func (b *Bed) Leftovers() []string {
	var out []string
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), b.cfg.Prefix+"-") {
				out = append(out, "namespace "+e.Name())
			}
			for _, w := range b.cfg.Workers {
				if strings.HasPrefix(e.Name(), "fm-"+w+"-") {
					out = append(out, "machine namespace "+e.Name())
				}
			}
		}
	}
	for _, l := range linesWith(readString("/proc/self/mounts"), b.cfg.Dir) {
		out = append(out, "mount "+l)
	}
	loops, _ := exec.Command("losetup", "-a").CombinedOutput()
	for _, l := range linesWith(string(loops), b.cfg.Dir) {
		out = append(out, "loop "+l)
	}
	ps, _ := exec.Command("ps", "-eo", "pid,args").CombinedOutput()
	for _, l := range linesWith(string(ps), b.cfg.Dir) {
		out = append(out, "process "+l)
	}
	return out
}

// Resources is what a running bed holds, counted to find leaks between
// migrations: with k machines running and no migration active, a bed holds
// k mounts, k loop devices, k datapaths, k workloads, k machine namespaces,
// no export, no iSCSI session and no clone. A machine's volume is two mounts
// (the datapath's FUSE file and the ext4 on its loop device).
type Resources struct {
	Mounts, Loops, Datapaths, Machines, MachineNS []string
	Exports                                       []string // export records and gates (listening iSCSI portals)
	Sessions                                      []string // established TCP connections between worker namespaces
	Clones                                        []string // clone metadata files
}

// Count is a one-line summary.
func (r Resources) String() string {
	return fmt.Sprintf("mounts=%d loops=%d datapaths=%d machines=%d machine-ns=%d exports=%d sessions=%d clones=%d",
		len(r.Mounts), len(r.Loops), len(r.Datapaths), len(r.Machines), len(r.MachineNS), len(r.Exports), len(r.Sessions), len(r.Clones))
}

// Snapshot lists the bed's resources now.
func (b *Bed) Snapshot() Resources {
	var r Resources
	for _, l := range linesWith(readString("/proc/self/mounts"), b.cfg.Dir) {
		// A worker's mnt/ and fuse/ are shared binds of themselves while
		// volumes are mounted under them (so other namespaces' copies drop
		// their mounts): the agent's, not a machine's.
		if f := strings.Fields(l); len(f) > 1 && (filepath.Base(f[1]) == "mnt" || filepath.Base(f[1]) == "fuse") && filepath.Dir(filepath.Dir(f[1])) == filepath.Clean(b.cfg.Dir) {
			continue
		}
		r.Mounts = append(r.Mounts, l)
	}
	loops, _ := exec.Command("losetup", "-a").CombinedOutput()
	r.Loops = linesWith(string(loops), b.cfg.Dir)
	ps, _ := exec.Command("ps", "-eo", "pid,args").CombinedOutput()
	for _, l := range linesWith(string(ps), b.cfg.Dir) {
		switch {
		case strings.Contains(l, " volume serve"):
			r.Datapaths = append(r.Datapaths, l)
		case strings.Contains(l, " workload run"):
			r.Machines = append(r.Machines, l)
		}
	}
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range ents {
			for _, w := range b.cfg.Workers {
				if strings.HasPrefix(e.Name(), "fm-"+w+"-") {
					r.MachineNS = append(r.MachineNS, e.Name())
				}
			}
		}
	}
	for _, w := range b.cfg.Workers {
		recs, _ := filepath.Glob(filepath.Join(b.WorkerDir(w), "exports", "*.json"))
		for _, rec := range recs {
			r.Exports = append(r.Exports, w+": record "+filepath.Base(rec))
		}
		metas, _ := filepath.Glob(filepath.Join(b.WorkerDir(w), "volumes", "*", "clone.meta"))
		for _, m := range metas {
			r.Clones = append(r.Clones, w+": "+m)
		}
		addr := b.Addr(w).String()
		out, _ := exec.Command("ip", "netns", "exec", b.NSOf(w), "ss", "-Htn", "state", "listening").CombinedOutput()
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, addr) {
				r.Exports = append(r.Exports, w+": listening "+strings.Join(strings.Fields(l), " "))
			}
		}
		out, _ = exec.Command("ip", "netns", "exec", b.NSOf(w), "ss", "-Htn", "state", "established").CombinedOutput()
		for _, l := range strings.Split(string(out), "\n") {
			f := strings.Fields(l)
			if len(f) < 4 {
				continue
			}
			// Worker-to-worker connections only: a server is not a worker.
			local, peer := f[len(f)-2], f[len(f)-1]
			toServer := false
			for _, id := range b.servers {
				toServer = toServer || strings.Contains(peer, "["+b.addr[id].String()+"]")
			}
			if strings.Contains(local, addr) && !toServer {
				r.Sessions = append(r.Sessions, w+": "+local+" -> "+peer)
			}
		}
	}
	return r
}

// CheckSteady reports leaks against the steady state of `running` machines
// with no migration active.
func (r Resources) CheckSteady(running int) error {
	var bad []string
	check := func(what string, got []string, want int) {
		if len(got) != want {
			bad = append(bad, fmt.Sprintf("%d %s, want %d:\n  %s", len(got), what, want, strings.Join(got, "\n  ")))
		}
	}
	check("mounts", r.Mounts, 2*running)
	check("loop devices", r.Loops, running)
	check("datapaths", r.Datapaths, running)
	check("machine processes", r.Machines, running)
	check("machine namespaces", r.MachineNS, running)
	check("exports", r.Exports, 0)
	check("iSCSI sessions", r.Sessions, 0)
	check("clones", r.Clones, 0)
	if len(bad) > 0 {
		return fmt.Errorf("resources after the migration ended: %s", strings.Join(bad, "; "))
	}
	return nil
}

func readString(path string) string {
	b, _ := os.ReadFile(path)
	return string(b)
}

func linesWith(s, sub string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, strings.TrimSpace(l))
		}
	}
	return out
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}

// Migrate plans a migration of machineID to target and returns its ID.
func (b *Bed) Migrate(ctx context.Context, machineID, target string) (string, error) {
	m, err := b.Client.CreateMigration(ctx, api.PlanRequest{Machine: machineID, Target: target})
	if err != nil {
		return "", fmt.Errorf("migrate %s to %s: %w", machineID, target, err)
	}
	return m.ID, nil
}

// SetLink brings a worker's fabric link (fab0 in its namespace) down or up,
// like a pulled cable: the host keeps its configuration (addresses stay,
// and the routes through the link, which Linux flushes on down, are put
// back on up), so what a test sees is the outage itself.
func (b *Bed) SetLink(ctx context.Context, worker string, up bool) error {
	ns := b.NSOf(worker)
	ipc := func(args ...string) (string, error) {
		out, err := exec.CommandContext(ctx, "ip", append([]string{"-n", ns}, args...)...).CombinedOutput()
		if err != nil {
			return "", fmt.Errorf("ip -n %s %s: %w: %s", ns, strings.Join(args, " "), err, out)
		}
		return string(out), nil
	}
	if !up {
		if out, err := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "sysctl", "-qw",
			"net.ipv6.conf."+netrewrite.FabricIf+".keep_addr_on_down=1").CombinedOutput(); err != nil {
			return fmt.Errorf("keep the fabric addresses of %s: %w: %s", ns, err, out)
		}
		routes, err := ipc("-6", "route", "show", "dev", netrewrite.FabricIf)
		if err != nil {
			return err
		}
		var keep []string
		for _, l := range strings.Split(routes, "\n") {
			if l = strings.TrimSpace(l); l != "" && !strings.Contains(l, "proto kernel") {
				keep = append(keep, l)
			}
		}
		savedRoutesMu.Lock()
		savedRoutes[ns] = keep
		savedRoutesMu.Unlock()
		_, err = ipc("link", "set", netrewrite.FabricIf, "down")
		return err
	}
	if _, err := ipc("link", "set", netrewrite.FabricIf, "up"); err != nil {
		return err
	}
	savedRoutesMu.Lock()
	keep := savedRoutes[ns]
	delete(savedRoutes, ns)
	savedRoutesMu.Unlock()
	for _, r := range keep {
		args := append([]string{"-6", "route", "replace"}, strings.Fields(r)...)
		if _, err := ipc(append(args, "dev", netrewrite.FabricIf)...); err != nil {
			return err
		}
	}
	return nil
}

var (
	savedRoutesMu sync.Mutex
	savedRoutes   = map[string][]string{}
)

// DumpLogs returns the tails of every log of the bed.
func (b *Bed) DumpLogs(tail int) string {
	logs, _ := filepath.Glob(filepath.Join(b.cfg.Dir, "*.log"))
	more, _ := filepath.Glob(filepath.Join(b.cfg.Dir, "*", "run", "*.log"))
	var sb strings.Builder
	for _, l := range append(logs, more...) {
		c, _ := os.ReadFile(l)
		if len(c) > tail {
			c = c[len(c)-tail:]
		}
		fmt.Fprintf(&sb, "=== %s (tail)\n%s\n", l, c)
	}
	return sb.String()
}

var cutSeq atomic.Uint64

// Cut drops, silently as a lost packet on the wire would be, every packet
// from member from to each member of to, and (unless oneWay) every packet
// back: nftables input rules in the receiving members' namespaces, so the
// sender sees no error, only silence. Members are worker names or server
// IDs. It returns the function that heals the cut (safe to call twice); the
// namespaces, and so the rules, go when the bed closes.
func (b *Bed) Cut(ctx context.Context, from string, to []string, oneWay bool) (heal func() error, err error) {
	if len(to) == 0 {
		return nil, fmt.Errorf("cut from %s to nobody", from)
	}
	addr := func(m string) (string, error) {
		a, ok := b.addr[m]
		if !ok {
			return "", fmt.Errorf("testbed: no member %q to cut", m)
		}
		return a.String(), nil
	}
	fromAddr, err := addr(from)
	if err != nil {
		return nil, err
	}
	table := fmt.Sprintf("ferrycut%d", cutSeq.Add(1))
	// drops[ns] are the sources whose packets ns drops.
	drops := map[string][]string{}
	for _, m := range to {
		a, err := addr(m)
		if err != nil {
			return nil, err
		}
		drops[b.NSOf(m)] = append(drops[b.NSOf(m)], fromAddr)
		if !oneWay {
			drops[b.NSOf(from)] = append(drops[b.NSOf(from)], a)
		}
	}
	var done []string
	heal = func() error {
		var errs []error
		for _, ns := range done {
			out, err := exec.Command("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", table).CombinedOutput()
			if err != nil && netrewrite.NamespaceExists(ns) {
				errs = append(errs, fmt.Errorf("heal the cut in %s: %w: %s", ns, err, out))
			}
		}
		done = nil
		return errors.Join(errs...)
	}
	for ns, srcs := range drops {
		rules := fmt.Sprintf("table inet %s {\n chain in {\n  type filter hook input priority -10; policy accept;\n  ip6 saddr { %s } counter drop\n }\n}\n",
			table, strings.Join(srcs, ", "))
		cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, "nft", "-f", "-")
		cmd.Stdin = strings.NewReader(rules)
		if out, err := cmd.CombinedOutput(); err != nil {
			herr := heal()
			return nil, errors.Join(fmt.Errorf("cut in %s (nft, from scripts/deps.sh): %w: %s", ns, err, out), herr)
		}
		done = append(done, ns)
	}
	return heal, nil
}
