package machine

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/testenv"
)

// A shell machine's background child is part of the machine (its process
// group): it must not outlive the machine, whether the machine is stopped
// with its kill signal, killed after ignoring it, or its shell exits.
func TestExecStopEndsBackgroundChildren(t *testing.T) {
	testenv.Root(t, "machines start as another user")
	// A non-interactive shell starts its background jobs ignoring SIGINT,
	// so only a signal to the whole group ends the loop.
	const loop = `(while :; do sleep 0.05; done) & echo $! > "$0"; `
	cases := []struct {
		name   string
		script string
		stop   bool
	}{
		{"stopped", loop + `wait`, true},
		{"killed after ignoring its signal", `trap '' INT; ` + loop + `while :; do sleep 0.05; done`, true},
		{"its shell exited", loop + `sleep 0.3`, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := &Exec{StateDir: t.TempDir(), Log: zerolog.Nop(), User: &User{}}
			dir := t.TempDir()
			pidFile := filepath.Join(dir, "child")
			s := Spec{ID: "bg1", Command: []string{"sh", "-c", c.script, pidFile}, MountDir: dir, KillTimeout: 300 * time.Millisecond}
			ctx := context.Background()
			if err := e.Start(ctx, s); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { e.Stop(ctx, s) })
			child := waitChildPid(t, pidFile)
			// Never leak the loop, whatever the driver did.
			t.Cleanup(func() { syscall.Kill(child, syscall.SIGKILL) })
			if !running(child) {
				t.Fatalf("the machine's background child %d is not running", child)
			}
			if c.stop {
				if err := e.Stop(ctx, s); err != nil {
					t.Fatal(err)
				}
				if st, _ := e.Status(ctx, s); st != Stopped {
					t.Fatalf("stopped machine reports %s", st)
				}
			}
			for deadline := time.Now().Add(3 * time.Second); running(child); time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("the machine's background child %d still runs after its shell ended", child)
				}
			}
		})
	}
}

// A machine adopted by a new agent process (the one that started it
// exited, so init reaps it) loses its background children on Stop too.
func TestExecStopEndsAdoptedMachinesChildren(t *testing.T) {
	testenv.Root(t, "machines start as another user")
	stateDir, dir := t.TempDir(), t.TempDir()
	pidFile := filepath.Join(dir, "child")
	// An earlier agent: this test binary starting the machine and exiting.
	cmd := exec.Command(os.Args[0], "-test.run=^TestExecStartHelper$")
	cmd.Env = append(os.Environ(), "FERRY_TEST_START_MACHINE="+stateDir, "FERRY_TEST_MACHINE_DIR="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("the earlier agent could not start the machine: %v: %s", err, out)
	}
	child := waitChildPid(t, pidFile)
	t.Cleanup(func() { syscall.Kill(child, syscall.SIGKILL) })
	if !running(child) {
		t.Fatalf("the machine's background child %d is not running", child)
	}
	e := &Exec{StateDir: stateDir, Log: zerolog.Nop(), User: &User{}}
	if err := e.Stop(context.Background(), Spec{ID: "bg1", MountDir: dir}); err != nil {
		t.Fatal(err)
	}
	if running(child) {
		t.Fatalf("the adopted machine's background child %d still runs after Stop", child)
	}
}

// TestExecStartHelper is the earlier agent of the test above; run alone it
// does nothing.
func TestExecStartHelper(t *testing.T) {
	stateDir, dir := os.Getenv("FERRY_TEST_START_MACHINE"), os.Getenv("FERRY_TEST_MACHINE_DIR")
	if stateDir == "" || dir == "" {
		return
	}
	e := &Exec{StateDir: stateDir, Log: zerolog.Nop(), User: &User{}}
	s := Spec{ID: "bg1", Command: []string{"sh", "-c", `(while :; do sleep 0.05; done) & echo $! > "$0"; wait`, filepath.Join(dir, "child")}, MountDir: dir}
	if err := e.Start(context.Background(), s); err != nil {
		t.Fatal(err)
	}
}

// waitChildPid reads the pid the machine wrote to path.
func waitChildPid(t *testing.T, path string) int {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		b, err := os.ReadFile(path)
		if s := strings.TrimSpace(string(b)); err == nil && strings.HasSuffix(string(b), "\n") {
			pid, err := strconv.Atoi(s)
			if err != nil {
				t.Fatalf("the machine wrote %q as its child's pid", b)
			}
			return pid
		}
		if time.Now().After(deadline) {
			t.Fatal("the machine never wrote its child's pid")
		}
	}
}

// running reports whether pid exists and is not a zombie.
func running(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && !strings.HasPrefix(strings.TrimSpace(s[i+1:]), "Z")
}

// Stop of a machine this process started returns when its reaper saw it
// go, not at the next poll: with polling made slower than the test's
// bound, only the reaper's word ends the wait in time. One started by
// another process (no reaper here) is still polled for.
func TestExecStopWakesAtTheMachinesExit(t *testing.T) {
	old := stopPoll
	stopPoll = 20 * time.Second
	t.Cleanup(func() { stopPoll = old })
	e := &Exec{StateDir: t.TempDir(), Log: zerolog.Nop()}
	s := Spec{ID: "w1", Command: []string{"sleep", "30"}, MountDir: t.TempDir(), KillTimeout: time.Minute}
	ctx := context.Background()
	if err := e.Start(ctx, s); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopPoll = old; e.Stop(ctx, s) })
	ref, err := e.readRef("w1")
	if err != nil || ref == nil {
		t.Fatalf("no record of the started machine: %v", err)
	}
	ch, ok := e.reaped.Load(ref.Pid)
	if !ok {
		t.Fatal("no reaper's channel for a machine this process started")
	}
	start := time.Now()
	if err := e.Stop(ctx, s); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 10*time.Second {
		t.Fatalf("Stop took %v: it waited for the poll, not the reaper", took)
	}
	if st, _ := e.Status(ctx, s); st != Stopped {
		t.Fatalf("status %s after stop, want stopped", st)
	}
	// The reaper forgets the channel, then closes it.
	select {
	case <-ch.(chan struct{}):
	case <-time.After(10 * time.Second):
		t.Fatal("the reaper never closed its channel")
	}
	if _, left := e.reaped.Load(ref.Pid); left {
		t.Fatal("the reaper's channel outlived the machine")
	}
}
