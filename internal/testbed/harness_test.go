package testbed

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestRaceReports(t *testing.T) {
	depLog, err := os.ReadFile("testdata/gotgt-race.log")
	if err != nil {
		t.Fatal(err)
	}
	// The same report with one access in ferry's own code.
	oursLog := strings.Replace(string(depLog),
		"github.com/gostor/gotgt/pkg/port/iscsit.(*ISCSITargetDriver).rxHandler()",
		"github.com/ferry-dev/ferry/iscsi.(*Export).serve()", 1)

	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "race"), 0o755); err != nil {
		t.Fatal(err)
	}
	var w bytes.Buffer
	if err := RaceReports(dir, &w); err != nil {
		t.Fatalf("no report files: %v", err)
	}
	// An empty log (a process that found nothing) is no report.
	os.WriteFile(filepath.Join(dir, "race", "ferry.1"), nil, 0o644)
	os.WriteFile(filepath.Join(dir, "race", "ferry.2"), depLog, 0o644)
	if err := RaceReports(dir, &w); err != nil {
		t.Fatalf("races wholly inside gotgt failed the run: %v", err)
	}
	if !strings.Contains(w.String(), "ferry.2: 4 data races inside dependencies") {
		t.Errorf("the dependency races are not listed: %q", w.String())
	}
	os.WriteFile(filepath.Join(dir, "race", "ferry.3"), []byte(oursLog), 0o644)
	err = RaceReports(dir, &w)
	if err == nil || !strings.Contains(err.Error(), "1 data races") || !strings.Contains(err.Error(), "ferry-dev/ferry/iscsi") {
		t.Fatalf("a race through ferry's code: %v", err)
	}
}

// A race on a map inside gotgt has runtime frames on top: they belong to
// whoever called them, so the report is still wholly gotgt's; a frame of
// ferry's own main package is not the standard library.
func TestRaceInDepsStandardLibraryFrames(t *testing.T) {
	block := `WARNING: DATA RACE
Write at 0x00c0004c8750 by goroutine 92:
  runtime.mapassign()
      /usr/local/go/src/internal/runtime/maps/runtime.go:206 +0x0
  github.com/gostor/gotgt/pkg/scsi.AddITNexus()
      /root/go/pkg/mod/github.com/gostor/gotgt@v0.2.2/pkg/scsi/target.go:84 +0x104

Previous read at 0x00c0004c8750 by goroutine 87:
  runtime.mapIterStart()
      /usr/local/go/src/runtime/map.go:156 +0x0
  github.com/gostor/gotgt/pkg/scsi.(*SCSITargetService).AddCommandQueue()
      /root/go/pkg/mod/github.com/gostor/gotgt@v0.2.2/pkg/scsi/scsi.go:93 +0x1cb
`
	if !raceInDeps(block) {
		t.Fatal("a map race wholly inside gotgt counted as ferry's")
	}
	if raceInDeps(strings.Replace(block, "runtime.mapIterStart()", "main.runAgent()", 1)) {
		t.Fatal("a frame of ferry's main package counted as the standard library")
	}
	for frame, std := range map[string]bool{"runtime.mapassign()": true, "internal/runtime/maps.(*Map).Put()": true, "sync.(*Mutex).Lock()": true,
		"main.main()": false, "github.com/gostor/gotgt/pkg/scsi.AddITNexus()": false, "github.com/ferry-dev/ferry/iscsi.Dial()": false} {
		if stdFrame(frame) != std {
			t.Errorf("stdFrame(%q) = %v, want %v", frame, !std, std)
		}
	}
}

// Seen in CI: gotgt's accept loop (Run, started by ferry's goroutine) and a
// handler gotgt started both write its client status. The only ferry frame
// is the outermost one of an access, the goroutine that called into gotgt:
// the race is still gotgt's. A ferry frame anywhere else in an access, or
// as its innermost frame, is ferry's.
func TestRaceInDepsGoroutineEntry(t *testing.T) {
	block := `WARNING: DATA RACE
Write at 0x00c0001d22d0 by goroutine 51:
  github.com/gostor/gotgt/pkg/port/iscsit.(*ISCSITargetDriver).setClientStatus()
      /root/go/pkg/mod/github.com/gostor/gotgt@v0.2.2/pkg/port/iscsit/iscsid.go:252 +0x1e04
  github.com/gostor/gotgt/pkg/port/iscsit.(*ISCSITargetDriver).handler.func1()
      /root/go/pkg/mod/github.com/gostor/gotgt@v0.2.2/pkg/port/iscsit/iscsid.go:291 +0x47

Previous write at 0x00c0001d22d0 by goroutine 13:
  github.com/gostor/gotgt/pkg/port/iscsit.(*ISCSITargetDriver).setClientStatus()
      /root/go/pkg/mod/github.com/gostor/gotgt@v0.2.2/pkg/port/iscsit/iscsid.go:252 +0x647
  github.com/gostor/gotgt/pkg/port/iscsit.(*ISCSITargetDriver).Run()
      /root/go/pkg/mod/github.com/gostor/gotgt@v0.2.2/pkg/port/iscsit/iscsid.go:237 +0x63a
  github.com/ferry-dev/ferry/iscsi.startGotgt.func2()
      /tmp/ci-clone/iscsi/serve.go:290 +0x3e

Goroutine 13 (running) created at:
  github.com/ferry-dev/ferry/iscsi.startGotgt()
      /tmp/ci-clone/iscsi/serve.go:290 +0xafc
`
	if !raceInDeps(block) {
		t.Fatal("a race wholly inside gotgt, reached from ferry's goroutine entry, counted as ferry's")
	}
	middle := strings.Replace(block, "github.com/gostor/gotgt/pkg/port/iscsit.(*ISCSITargetDriver).Run()",
		"github.com/ferry-dev/ferry/iscsi.(*Export).run()", 1)
	if raceInDeps(middle) {
		t.Fatal("a ferry frame between gotgt's frames counted as gotgt's")
	}
	inner := strings.Replace(block, "github.com/gostor/gotgt/pkg/port/iscsit.(*ISCSITargetDriver).setClientStatus()\n      /root/go/pkg/mod/github.com/gostor/gotgt@v0.2.2/pkg/port/iscsit/iscsid.go:252 +0x647",
		"github.com/ferry-dev/ferry/iscsi.setStatus()\n      /tmp/ci-clone/iscsi/serve.go:1 +0x1", 1)
	if inner == block {
		t.Fatal("test bug: the innermost frame was not replaced")
	}
	if raceInDeps(inner) {
		t.Fatal("an access made by ferry's code counted as gotgt's")
	}
}
