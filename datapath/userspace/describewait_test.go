package userspace

import (
	"os/exec"
	"strings"
	"testing"
	"time"
)

// describeWait names the state and wait of a process's threads: a child
// asleep is in state S, and a pid that is gone says so.
func TestDescribeWait(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	var got string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		got = describeWait(cmd.Process.Pid)
		if strings.Contains(got, "S ") {
			break
		}
	}
	if !strings.HasPrefix(got, "threads by state and wait: S ") || !strings.Contains(got, "×1") {
		t.Fatalf("a sleeping child: %q, want its one thread in state S", got)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if got := describeWait(cmd.Process.Pid); !strings.Contains(got, "cannot be read") {
		t.Fatalf("a reaped child: %q, want that its threads cannot be read", got)
	}
}
