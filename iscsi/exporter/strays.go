package exporter

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// killStrayExports ends export processes serving stateDir that no record
// knows: an agent killed between starting the export child and recording
// its pid leaves one behind, holding the gate's listening socket (found by
// the chaos matrix: kill -9 of the source during its export step).
func killStrayExports(stateDir string) {
	want := [][]byte{[]byte("iscsi"), []byte("serve"), []byte("--state-dir"), []byte(filepath.Clean(stateDir))}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmd, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := bytes.Split(bytes.TrimRight(cmd, "\x00"), []byte{0})
		if !hasSeq(args, want) {
			continue
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
		for i := 0; i < 100 && syscall.Kill(pid, 0) == nil; i++ {
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// hasSeq reports whether want appears as consecutive elements of args.
func hasSeq(args, want [][]byte) bool {
	for i := 0; i+len(want) <= len(args); i++ {
		ok := true
		for j := range want {
			if !bytes.Equal(args[i+j], want[j]) {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}
