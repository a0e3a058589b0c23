package machine

import (
	"context"
	"os"
	"runtime"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/testenv"
)

// zombieLeaderArg makes this test binary, started as a machine, end its
// main thread alone (the leader then shows as a zombie) and exit the
// whole process after the duration that follows it.
const zombieLeaderArg = "ferry-test-zombie-leader"

func init() {
	if len(os.Args) != 3 || os.Args[1] != zombieLeaderArg {
		return
	}
	d, err := time.ParseDuration(os.Args[2])
	if err != nil {
		os.Exit(2)
	}
	// Package init runs on the main thread, locked to it.
	runtime.LockOSThread()
	go func() {
		time.Sleep(d)
		os.Exit(0)
	}()
	// exit, not exit_group: only this thread ends.
	syscall.RawSyscall(syscall.SYS_EXIT, 0, 0, 0)
}

// A process whose leader thread exited while another thread still runs is
// the state a killed machine is in while one of its threads finishes an
// I/O it cannot leave: it still holds its volume, so it is not stopped
// until the last thread ends.
func TestMachineWithZombieLeaderRunsUntilItsLastThreadEnds(t *testing.T) {
	testenv.Root(t, "machines start as another user")
	// As root: the test binary is not for other users to run.
	e := &Exec{StateDir: t.TempDir(), Log: zerolog.Nop(), User: &User{}}
	s := Spec{ID: "z1", Command: []string{os.Args[0], zombieLeaderArg, "1500ms"}, MountDir: t.TempDir()}
	ctx := context.Background()
	if err := e.Start(ctx, s); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Stop(ctx, s) })
	ref, err := e.readRef(s.ID)
	if err != nil || ref == nil {
		t.Fatalf("no record of the started machine: %v", err)
	}
	for deadline := time.Now().Add(10 * time.Second); running(ref.Pid); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the machine's leader thread never exited")
		}
	}
	if _, err := os.Stat("/proc/" + strconv.Itoa(ref.Pid) + "/task"); err != nil {
		t.Fatalf("the machine ended before its leader showed as a zombie: %v", err)
	}
	if st, err := e.Status(ctx, s); err != nil || st != Running {
		t.Fatalf("machine with a zombie leader and a live thread: status %s, %v; want running", st, err)
	}
	members, _ := groupMembers(ref.Pid)
	if n := len(members); n != 1 {
		t.Fatalf("group of the machine has %d members, want 1", n)
	}
	if _, runs := members[0].inGroup(ref.Pid); !runs {
		t.Fatal("the group's zombie leader with a live thread does not count as running")
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if st, _ := e.Status(ctx, s); st == Stopped {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the machine still runs after its last thread exited")
		}
	}
}
