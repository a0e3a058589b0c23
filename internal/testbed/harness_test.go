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
