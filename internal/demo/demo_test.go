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
	Report(&b, fm)
	for _, want := range []string{"downtime (source stopped -> machine started on target): 1.5s",
		"fetched from the source: 64 MiB of 1.0 GiB; skipped (trim + known-zero): 960 MiB", "hydration: 2s, 32 MiB/s"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, b.String())
		}
	}
	// A migration without the timestamps or progress prints no made-up numbers.
	b.Reset()
	Report(&b, &fsm.Migration{})
	if b.Len() != 0 {
		t.Fatalf("report of an empty migration: %q", b.String())
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
