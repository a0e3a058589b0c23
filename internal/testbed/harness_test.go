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
