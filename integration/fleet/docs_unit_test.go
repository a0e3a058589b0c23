package fleet

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The benchmark rewrites only its own section, states the command and the
// date of the run, and draws the plot itself.
func TestFleetDocsReplaceOnlyTheirSection(t *testing.T) {
	dir := t.TempDir()
	head := "# Benchmarks\n\nthe suite's part\n\n"
	if err := os.WriteFile(filepath.Join(dir, "benchmarks.md"), []byte(head+fleetMarker+"\n## old fleet numbers\n| `api-p99-ms` | 273 |\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 12, 1, 18, 5, 0, 0, time.UTC)
	r := fleetResult{At: at, Took: 4 * time.Minute, Load: "3.00 2.00 1.00", Agents: 100, PerAgent: 10, TTL: 10 * time.Second,
		SteadyWrites: 10, SteadyWindow: 20 * time.Second, GoalWritesPerSec: 10, P99: 42500 * time.Microsecond, Calls: 4800,
		PlanS: 0.017, Planned: 50, Placed: 500, Drained: 25, DrainDur: 45 * time.Second, Ideal: 41 * time.Second, Wall: 46 * time.Second,
		DrainVsIdeal: 45.0 / 41, LinkMiB: 1000, LeaderRSS: 47, StoreMiB: 148, SnapMiB: 246, Killed: 10, KillDur: time.Minute,
		Curve: []sample{{0, 0}, {time.Second, 125}, {20 * time.Second, 250}}}
	if err := writeFleetDocs(dir, r); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "benchmarks.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(b)
	if !strings.HasPrefix(doc, head+fleetMarker) {
		t.Fatalf("the part before the marker changed:\n%s", doc)
	}
	for _, want := range []string{fleetCommand, "2026-12-01 18:05 UTC", "| `api-p99-ms` | 42.5 | <= 50 |", "| `drain-vs-ideal` | 1.10 |", "load average 3.00 2.00 1.00", "benchmarks/fleet-drain.svg"} {
		if !strings.Contains(doc, want) {
			t.Errorf("section lacks %q:\n%s", want, doc)
		}
	}
	if strings.Contains(doc, "old fleet numbers") || strings.Count(doc, fleetMarker) != 1 {
		t.Errorf("the old section was not replaced:\n%s", doc)
	}
	svg, err := os.ReadFile(filepath.Join(dir, "benchmarks", "fleet-drain.svg"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(svg), "<svg") || !strings.Contains(string(svg), "ideal duration 41.0s") {
		t.Errorf("plot is not the drain's SVG: %.300s", svg)
	}
}
