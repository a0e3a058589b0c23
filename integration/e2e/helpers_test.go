// Package e2e runs real migrations between real agents: a server and agents
// in network namespaces, LUKS2 volumes made by cryptsetup on sparse files,
// FUSE + loop + ext4, iSCSI over the fabric, and a workload that appends
// checksummed records. Needs root; CI runs it as root.
package e2e

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/sealing"
	"github.com/ferry-dev/ferry/internal/testbed"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/machine"
	"github.com/ferry-dev/ferry/machine/workload"
	"github.com/ferry-dev/ferry/netrewrite"
)

var ferryBin string

func TestMain(m *testing.M) {
	os.Exit(testbed.RunRaceBuilt(m, "e2e", &ferryBin))
}

func requireEnv(t testing.TB) {
	t.Helper()
	testenv.Root(t, "network namespaces, loop devices, mounts")
	testenv.Tools(t, "run scripts/deps.sh", "cryptsetup", "mkfs.ext4", "nsenter", "losetup", "fstrim", "fusermount3", "ip")
	testenv.Paths(t, "modprobe fuse", "/dev/fuse")
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

type env struct {
	t   testing.TB
	bed *testbed.Bed
	c   *api.Client
	ctx context.Context
	dir string
	ws  []string
	// keys are the volume passphrases this test set, to prove no log holds them.
	keys map[string]string
}

// newEnv starts a cluster with n workers named w0<id>, w1<id>, ...
func newEnv(t testing.TB, n int, agentArgs ...string) *env {
	requireEnv(t)
	id := randHex(2)
	var ws []string
	for i := 0; i < n; i++ {
		ws = append(ws, fmt.Sprintf("w%d%s", i, id))
	}
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	bed, err := testbed.Start(ctx, testbed.Config{Dir: dir, Exe: ferryBin, Prefix: "e" + id, Workers: ws,
		Log: zerolog.Nop(), AgentArgs: agentArgs, Grace: time.Minute})
	if err != nil {
		dumpLogs(t, dir)
		t.Fatalf("start cluster: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			dumpLogs(t, dir)
		}
		cctx, ccancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer ccancel()
		if err := bed.Close(cctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		assertNoLeftovers(t, dir, "e"+id, ws)
	})
	return &env{t: t, bed: bed, c: bed.Client, ctx: ctx, dir: dir, ws: ws, keys: map[string]string{}}
}

func dumpLogs(t testing.TB, dir string) {
	logs, _ := filepath.Glob(filepath.Join(dir, "*.log"))
	more, _ := filepath.Glob(filepath.Join(dir, "*", "run", "*.log"))
	for _, l := range append(logs, more...) {
		b, _ := os.ReadFile(l)
		if len(b) > 6000 {
			b = b[len(b)-6000:]
		}
		t.Logf("=== %s (tail)\n%s", l, b)
	}
}

// assertNoLeftovers: no namespace, mount, loop device or process of this cluster remains.
func assertNoLeftovers(t testing.TB, dir, prefix string, ws []string) {
	t.Helper()
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), prefix+"-") {
				t.Errorf("leaked namespace %s", e.Name())
			}
			for _, w := range ws {
				if strings.HasPrefix(e.Name(), "fm-"+w+"-") {
					t.Errorf("leaked machine namespace %s", e.Name())
				}
			}
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mounts")
	if strings.Contains(string(mounts), dir) {
		t.Errorf("leaked mounts under %s:\n%s", dir, grepLines(string(mounts), dir))
	}
	loops, _ := exec.Command("losetup", "-a").CombinedOutput()
	if strings.Contains(string(loops), dir) {
		t.Errorf("leaked loop devices:\n%s", grepLines(string(loops), dir))
	}
	ps, _ := exec.Command("ps", "-eo", "pid,args").CombinedOutput()
	if strings.Contains(string(ps), dir) {
		t.Errorf("leaked processes:\n%s", grepLines(string(ps), dir))
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func (e *env) createVolume(id, worker string, size int64) *fsm.Volume {
	e.t.Helper()
	if _, err := e.c.CreateVolume(e.ctx, fsm.Volume{ID: id, Worker: worker, Size: size, State: fsm.VolCreating}); err != nil {
		e.t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		v, err := e.c.GetVolume(e.ctx, id)
		if err == nil && v.State == fsm.VolCreated {
			e.keys[id] = string(e.recoverKey(id))
			return v
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.t.Fatalf("volume %s not created", id)
	return nil
}

// runMachine starts the records workload on worker with vol; org is its private network.
func (e *env) runMachine(id, worker, vol string, org uint32) (ack string, addr netrewrite.Addr) {
	e.t.Helper()
	if err := e.bed.Fabric.RouteOrg(e.ctx, zerolog.Nop(), org); err != nil {
		e.t.Fatal(err)
	}
	ack = filepath.Join(e.dir, id+".ack")
	addr, err := netrewrite.Build(org, e.bed.HostID(worker), 1)
	if err != nil {
		e.t.Fatal(err)
	}
	spec := fmt.Sprintf(`{"command":[%q,"workload","run","--ack",%q,"--listen","[::]:7000"],"kill_signal":"SIGINT","kill_timeout":5000000000}`, ferryBin, ack)
	if _, err := e.c.CreateMachine(e.ctx, fsm.Machine{ID: id, Worker: worker, Volume: vol, Network: org, MachineNo: 1,
		Addr6PN: addr.String(), State: fsm.MachineRunning, Spec: []byte(spec)}); err != nil {
		e.t.Fatal(err)
	}
	e.waitAcked(ack, 1, time.Minute)
	return ack, addr
}

func (e *env) waitAcked(ack string, n uint64, timeout time.Duration) uint64 {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if a, _ := workload.Acked(ack); a >= n {
			return a
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.t.Fatalf("workload acknowledged fewer than %d records within %v", n, timeout)
	return 0
}

// waitState waits until the migration is in one of states (or terminal, which fails unless listed).
func (e *env) waitState(id string, timeout time.Duration, states ...fsm.State) *fsm.Migration {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	var m *fsm.Migration
	var err error
	for time.Now().Before(deadline) {
		m, err = e.c.GetMigration(e.ctx, id)
		if err == nil {
			for _, s := range states {
				if m.State == s {
					return m
				}
			}
			if m.State.Terminal() {
				e.t.Fatalf("migration %s ended %s (rollback %+v), waiting for %v", id, m.State, m.Rollback, states)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.t.Fatalf("migration %s not in %v after %v (last: %+v, err %v)", id, states, timeout, m, err)
	return nil
}

func (e *env) migrate(machineID, target string) string {
	e.t.Helper()
	m, err := e.c.CreateMigration(e.ctx, api.PlanRequest{Machine: machineID, Target: target})
	if err != nil {
		e.t.Fatalf("migrate %s to %s: %v", machineID, target, err)
	}
	return m.ID
}

// verifyRecords checks every acknowledged record is on the machine's current mount.
func (e *env) verifyRecords(machineID, worker, ack string) (present, acked uint64) {
	e.t.Helper()
	mnt := filepath.Join(e.bed.WorkerDir(worker), "mnt", machineID)
	present, acked, err := workload.Verify(mnt, ack)
	if err != nil {
		e.t.Fatalf("records of %s on %s: %v", machineID, worker, err)
	}
	return present, acked
}

// assertNeverTwice: the machine's run intervals on different workers never overlap (invariant 2).
func (e *env) assertNeverTwice(machineID string) {
	e.t.Helper()
	type iv struct {
		w    string
		a, b time.Time
	}
	var all []iv
	for _, w := range e.ws {
		ivs, err := machine.Journal(filepath.Join(e.bed.WorkerDir(w), "machines"), machineID)
		if err != nil {
			e.t.Fatal(err)
		}
		for _, i := range ivs {
			end := i.Stop
			if end.IsZero() {
				end = time.Now().Add(time.Hour)
			}
			all = append(all, iv{w, i.Start, end})
		}
	}
	for i := range all {
		for j := range all {
			if i != j && all[i].w != all[j].w && all[i].a.Before(all[j].b) && all[j].a.Before(all[i].b) {
				e.t.Fatalf("machine %s ran on %s (%v..%v) and %s (%v..%v) at once", machineID,
					all[i].w, all[i].a, all[i].b, all[j].w, all[j].a, all[j].b)
			}
		}
	}
}

func (e *env) kill9(worker string) {
	e.t.Helper()
	if err := e.bed.Kill("agent/"+worker, syscall.SIGKILL); err != nil {
		e.t.Fatal(err)
	}
}

func sourceFile(e *env, worker, vol string) string {
	return filepath.Join(e.bed.WorkerDir(worker), "volumes", vol, "data")
}

// recoverKey opens volume id's recovery envelope with the bed's recovery
// key, as `ferry volume recover` does: the test learns the passphrase the
// worker's agent made without any server holding it.
func (e *env) recoverKey(id string) []byte {
	e.t.Helper()
	k, err := sealing.Load(e.bed.RecoveryKeyFile)
	if err != nil {
		e.t.Fatal(err)
	}
	env, err := e.c.GetEnvelope(e.ctx, id, fsm.PurposeRecovery, 0)
	if err != nil {
		e.t.Fatalf("recovery envelope of %s: %v", id, err)
	}
	pass, err := sealing.Open(k, *env, sealing.Binding{Volume: id, Recipient: fsm.RecoveryRecipient, Purpose: fsm.PurposeRecovery})
	if err != nil {
		e.t.Fatalf("open the recovery envelope of %s: %v", id, err)
	}
	return pass
}

// assertNoKeysInLogs: no passphrase appears in any log, state file, raft
// log, snapshot or volume file under the cluster's dir, nor in any
// process's command line or environment (invariant 6).
func (e *env) assertNoKeysInLogs() {
	e.t.Helper()
	t, ok := e.t.(*testing.T)
	if !ok {
		return
	}
	var secrets []secret
	for vol, k := range e.keys {
		secrets = append(secrets, secret{"the key of volume " + vol, secretForms([]byte(k))})
	}
	leaks, scanned := scanKeyMaterial(t, e.dir, secrets)
	for _, l := range leaks {
		e.t.Errorf("%s", l)
	}
	if len(scanned) == 0 {
		e.t.Fatal("no files scanned for keys")
	}
}
