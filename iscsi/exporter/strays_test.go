package exporter

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/internal/testenv"
)

func TestKillStrayExports(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "exports", "mig-1")
	other := filepath.Join(t.TempDir(), "exports", "mig-2")
	// Stand-ins with the export child's argv shape: sh -c keeps the trailing
	// words in its argv, which is what killStrayExports matches.
	start := func(d string) *exec.Cmd {
		c := exec.Command("sh", "-c", "sleep 30", "iscsi", "serve", "--state-dir", d)
		err := c.Start()
		testenv.Require(t, fmt.Sprintf("sh: %v", err), err == nil)
		t.Cleanup(func() { c.Process.Kill(); c.Wait() })
		return c
	}
	stray, keep := start(dir), start(other)
	killStrayExports(dir)
	done := make(chan error, 1)
	go func() { done <- stray.Wait() }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("the stray export of mig-1 survived")
	}
	if err := keep.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("the export of another migration was killed: %v", err)
	}
	if !hasSeq([][]byte{[]byte("a"), []byte("b"), []byte("c")}, [][]byte{[]byte("b"), []byte("c")}) ||
		hasSeq([][]byte{[]byte("b")}, [][]byte{[]byte("b"), []byte("c")}) {
		t.Fatal("hasSeq")
	}
}
