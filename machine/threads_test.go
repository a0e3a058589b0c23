package machine

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/testenv"
)

// Machines are started from a thread that enters their namespace and
// folder: no thread of the agent may stay there. The main thread, which
// /proc/self names and which the runtime parks rather than ends, was left
// in the machine's namespace in about one run of two of 20 starts (and
// netrewrite then took the machine's namespace for the agent's own).
func TestStartLeavesTheAgentsThreadsAlone(t *testing.T) {
	testenv.Root(t, "machines start in a network namespace")
	ns := fmt.Sprintf("ferry-thr-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	wd, _ := os.Getwd()
	e := &Exec{StateDir: t.TempDir(), Log: zerolog.Nop()}
	for i := 0; i < 40; i++ {
		s := Spec{ID: fmt.Sprintf("m%d", i), MountDir: t.TempDir(), NetNS: ns, KillTimeout: time.Second, Command: []string{"sleep", "30"}}
		if err := e.Start(context.Background(), s); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.Stop(context.Background(), s) })
	}
	tasks, err := filepath.Glob("/proc/self/task/*/ns/net")
	if err != nil || len(tasks) == 0 {
		t.Fatalf("list this process's threads: %v", err)
	}
	for _, p := range tasks {
		if l, _ := os.Readlink(p); l != self {
			t.Errorf("thread %s is in %s, the process in %s", filepath.Base(filepath.Dir(filepath.Dir(p))), l, self)
		}
	}
	if now, _ := os.Getwd(); now != wd {
		t.Errorf("the process's folder is %s, was %s", now, wd)
	}
}
