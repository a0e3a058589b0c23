package demo

import (
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
)

func TestReport(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	fm := &fsm.Migration{
		EnteredAt: map[fsm.State]time.Time{
			fsm.SourceStopped: t0, fsm.Cutover: t0.Add(1500 * time.Millisecond),
			fsm.Hydrating: t0.Add(2 * time.Second), fsm.Hydrated: t0.Add(4 * time.Second),
		},
		Progress: &fsm.Progress{FetchedBytes: 64 << 20, TotalBytes: 1 << 30, SkippedBytes: 960 << 20},
	}
	var b strings.Builder
	Report(&b, fm, 0)
	if strings.Contains(b.String(), "machine saw") {
		t.Errorf("report shows a machine-observed downtime that was not measured:\n%s", b.String())
	}
	for _, want := range []string{"downtime (source stopped -> machine started on target): 1.5s",
		"fetched from the source: 64 MiB of 1.0 GiB; skipped (trim + known-zero): 960 MiB", "hydration: 2s, 32 MiB/s"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, b.String())
		}
	}
	// A migration without the timestamps or progress prints no made-up numbers.
	b.Reset()
	Report(&b, &fsm.Migration{}, 0)
	if b.Len() != 0 {
		t.Fatalf("report of an empty migration: %q", b.String())
	}
}

func TestReportLeadsWithTheMachinesDowntime(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	fm := &fsm.Migration{EnteredAt: map[fsm.State]time.Time{fsm.SourceStopped: t0, fsm.Cutover: t0.Add(120 * time.Millisecond)}}
	var b strings.Builder
	Report(&b, fm, 297*time.Millisecond)
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "DOWNTIME as the machine saw it: 297ms") || !strings.Contains(lines[1], "control plane's downtime") ||
		!strings.Contains(lines[1], "120ms") {
		t.Fatalf("report:\n%s", b.String())
	}
}

func TestRunRefusesBadConfig(t *testing.T) {
	var b strings.Builder
	for _, cfg := range []Config{{Exe: "/bin/true"}, {Size: 1 << 30}} {
		cfg.Log = zerolog.Nop()
		if err := Run(t.Context(), &b, cfg); err == nil {
			t.Fatalf("Run(%+v) accepted", cfg)
		}
	}
	if b.Len() != 0 {
		t.Fatalf("a refused demo printed %q", b.String())
	}
}

// Steps splits the machine's pause at the states committed inside it and
// ends with the machine's start until its first record; states outside the
// pause (or missing) are left out.
func TestSteps(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ms := func(n int) time.Time { return t0.Add(time.Duration(n) * time.Millisecond) }
	fm := &fsm.Migration{EnteredAt: map[fsm.State]time.Time{fsm.TargetPrepared: ms(-5), fsm.SourceStopped: ms(35),
		fsm.Exported: ms(40), fsm.CloneBuilt: ms(110), fsm.Cutover: ms(130), fsm.Hydrating: ms(150)}}
	got := FormatSteps(Steps(fm, t0, ms(170)))
	want := "source_stopped +35 · exported +5 · clone_built +70 · cutover +20 · first record +40"
	if got != want {
		t.Fatalf("steps %q, want %q", got, want)
	}
}
