package supervisor

import (
	"fmt"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/internal/testenv"
)

func TestKillStrayMachines(t *testing.T) {
	start := func(id, dir string) *exec.Cmd {
		c := exec.Command("sleep", "30")
		c.Env = []string{"FERRY_MACHINE_ID=" + id, "FERRY_VOLUME_DIR=" + dir}
		err := c.Start()
		testenv.Require(t, fmt.Sprintf("sleep: %v", err), err == nil)
		t.Cleanup(func() { c.Process.Kill(); c.Wait() })
		return c
	}
	stray := start("m1", "/data/w1/mnt/m1")
	otherWorker := start("m1", "/data/w2/mnt/m1")
	otherMachine := start("m2", "/data/w1/mnt/m1")
	done := make(chan struct{})
	go func() { stray.Wait(); close(done) }()
	if n := killStrayMachines("m1", "/data/w1/mnt/m1/"); n != 1 {
		t.Fatalf("killed %d processes, want 1", n)
	}
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("the stray machine survived")
	}
	for _, c := range []*exec.Cmd{otherWorker, otherMachine} {
		if err := c.Process.Signal(syscall.Signal(0)); err != nil {
			t.Fatalf("a process of another worker or machine was killed: %v", err)
		}
	}
}
