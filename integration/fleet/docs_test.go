package fleet

import (
	"fmt"
	"image/color"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgsvg"
)

// The fleet benchmark writes its own section of docs/benchmarks.md (from
// fleetMarker to the end, which the benchmark suite keeps when it rewrites
// the rest) and its plot, so every published figure comes from the run
// that states its command and date.

const fleetMarker = "<!-- kept: fleet benchmark -->"

// fleetCommand is the command whose run the section reports.
const fleetCommand = "go test -run '^$' -bench FleetDrain -benchtime 1x ./integration/fleet/"

// fleetResult is what one run measured.
type fleetResult struct {
	At                 time.Time
	Took               time.Duration
	Load               string // load averages at the end of the run
	Agents, PerAgent   int
	TTL                time.Duration
	SteadyWrites       float64
	SteadyWindow       time.Duration
	P99                time.Duration
	Calls              int
	CallKinds          []string // p99 (count) by kind of call
	Election           string   // a leader change in the steady window, said
	PlanS              float64
	Planned, Placed    int
	Drained            int
	DrainDur, Ideal    time.Duration
	Wall               time.Duration
	LinkMiB            int64
	LeaderRSS          float64
	StoreMiB, SnapMiB  float64
	Killed             int
	KillDur            time.Duration
	Dups               int
	Curve              []sample
	EnvScaled          bool // FERRY_FLEET_AGENTS or FERRY_FLEET_MACHINES set
	GoalWritesPerSec   float64
	DrainVsIdeal       float64
	FinishedMigrations int
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// fleetSection renders the section from the marker on.
func fleetSection(r fleetResult) string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("%s\n## Fleet simulation: servers running drains (BenchmarkFleetDrain)\n\n", fleetMarker)
	w("Written by the benchmark itself: `%s`", fleetCommand)
	if r.EnvScaled {
		w(" with FERRY_FLEET_AGENTS=%d FERRY_FLEET_MACHINES=%d", r.Agents, r.PerAgent)
	}
	w(".\nRun %s on %d cores (%s; shared with other jobs: load average %s at the end); the whole\n",
		r.At.UTC().Format("2006-01-02 15:04 UTC"), runtime.NumCPU(), runtime.Version(), r.Load)
	w("benchmark took %s (ferry build, certificates, cluster, seeding, all phases). Do not edit by hand:\nre-run the benchmark.\n\n", r.Took.Round(time.Second))
	w("What runs: three `ferry server` processes (mTLS API and raft on loopback, default raft timing); %d\n", r.Agents)
	w("simulated agents in the benchmark's process, each with its own worker certificate, speaking the\n")
	w("real API: registration, heartbeats every TTL/4 with a capacity report (lease TTL %s), a list of\n", r.TTL)
	w("its volumes and machines every second (the real agent's reconcile; each agent's loops start at a\n")
	w("random phase, as agents started at different times would), a blocking watch of its\n")
	w("migrations, and every step of its roles with step IDs. The data path is a timing model: 50 ms per\n")
	w("step before cutover; hydrations at min(clone cap 200 MiB/s, the source's %d MiB/s link shared by\n", r.LinkMiB)
	w("the hydrations it serves). %d machines with 4 GiB volumes, %d per worker. The issue's 1000 agents\n", r.Agents*r.PerAgent, r.PerAgent)
	w("and 10 000 machines do not fit in 10 minutes on these 2 shared cores (the servers and the agents\n")
	w("share them); `FERRY_FLEET_AGENTS` and `FERRY_FLEET_MACHINES` (per agent) scale the run.\n\n")
	w("| metric | result | goal | how |\n|---|---|---|---|\n")
	w("| `steady-writes/s` | %.1f | <= %d workers / %s lease = %.1f | raft index delta over %s with no migration running; a heartbeat is written only when less than a TTL of lease is left (the write grants 2 TTL) or the capacity report changed; reconcile lists and key reads are reads |\n",
		r.SteadyWrites, r.Agents, r.TTL, r.GoalWritesPerSec, r.SteadyWindow)
	w("| `api-p99-ms` | %.1f | <= 50 | p99 of the agents' short calls in that window (heartbeats, list volumes, list machines: %d calls; by kind: %s), measured in the agents' process, so it includes their own scheduling on the shared cores |\n",
		float64(r.P99.Microseconds())/1000, r.Calls, strings.Join(r.CallKinds, ", ")+map[bool]string{true: "; " + r.Election, false: ""}[r.Election != ""])
	w("| `plan-s` | %.3f | <= 2 | %d workers (%d machines) planned through `POST /v1/drains/plan`, one after the other, after cordoning them |\n",
		r.PlanS, r.Planned, r.Placed)
	w("| `drain-vs-ideal` | %.2f | <= 1.2 | %d workers (%d machines) drained at once, `--parallel 8` (the bandwidth budget allows 5 per source): longest drain by its record (created to complete) %s over the ideal %s (%d GiB per source at %d MiB/s); %s from the first request to the last completion |\n",
		r.DrainVsIdeal, r.Drained, r.Drained*r.PerAgent, r.DrainDur.Round(100*time.Millisecond), r.Ideal.Round(100*time.Millisecond), r.PerAgent*4, r.LinkMiB, r.Wall.Round(100*time.Millisecond))
	w("| `leader-rss-MiB` | %.0f | <= 1024 | VmRSS of the leader process after the drain (%d machines, %d finished migrations) |\n",
		r.LeaderRSS, r.Agents*r.PerAgent, r.FinishedMigrations)
	w("| `store-100k-MiB` | %.0f | (leader <= 1024) | heap of a store restored from a snapshot of 10 000 machines and volumes, 1000 workers and 100 000 finished migrations copied from a real completed one (snapshot %.0f MiB): the leader with the issue's history is about %.0f + %.0f MiB. Finished records are also deleted by the replicated `gc` after `--gc-retention` |\n",
		r.StoreMiB, r.SnapMiB, r.LeaderRSS, r.StoreMiB)
	w("| `dup-migrations` | %d | 0 | %d more drains; the leader process is killed (SIGKILL) once they started; every drain completes (%s, through an election and the new leader's barrier) and no machine has two migrations off the same worker without a rollback |\n\n",
		r.Dups, r.Killed, r.KillDur.Round(100*time.Millisecond))
	w("The drain's curve: machines the drains started over time, and the ideal duration (dashed).\n\n")
	w("![Drain of %d workers: migrations started over time](benchmarks/fleet-drain.svg)\n", r.Drained)
	return b.String()
}

// writeFleetDocs replaces the fleet section of docs/benchmarks.md (or
// appends it) and writes the plot under docs/benchmarks.
func writeFleetDocs(docs string, r fleetResult) error {
	if err := os.MkdirAll(filepath.Join(docs, "benchmarks"), 0o755); err != nil {
		return err
	}
	if err := writeDrainSVG(filepath.Join(docs, "benchmarks", "fleet-drain.svg"),
		fmt.Sprintf("Drain of %d workers (%d machines): migrations started", r.Drained, r.Drained*r.PerAgent), r.Curve, r.Ideal); err != nil {
		return err
	}
	path := filepath.Join(docs, "benchmarks.md")
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	head := string(old)
	if i := strings.Index(head, fleetMarker); i >= 0 {
		head = head[:i]
	} else if head != "" {
		head = strings.TrimRight(head, "\n") + "\n\n"
	}
	return os.WriteFile(path, []byte(head+fleetSection(r)), 0o644)
}

// writeDrainSVG plots machines started by the drains over time, with the
// ideal duration given the bandwidth budget, with gonum/plot.
func writeDrainSVG(path, title string, curve []sample, ideal time.Duration) error {
	if len(curve) == 0 {
		return fmt.Errorf("plot %s: no samples", path)
	}
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "seconds since the drains were requested"
	p.Y.Label.Text = "migrations started"
	p.X.Min, p.Y.Min = 0, 0
	p.Add(plotter.NewGrid())
	xys := make(plotter.XYs, len(curve))
	maxY := 0.0
	for i, s := range curve {
		xys[i] = plotter.XY{X: s.t.Seconds(), Y: float64(s.moved)}
		maxY = max(maxY, float64(s.moved))
	}
	l, err := plotter.NewLine(xys)
	if err != nil {
		return fmt.Errorf("plot %s: %w", path, err)
	}
	l.Color = color.RGBA{0x1f, 0x77, 0xb4, 0xff}
	l.Width = vg.Points(1.5)
	id, err := plotter.NewLine(plotter.XYs{{X: ideal.Seconds(), Y: 0}, {X: ideal.Seconds(), Y: maxY}})
	if err != nil {
		return fmt.Errorf("plot %s: %w", path, err)
	}
	id.Color = color.RGBA{0xd6, 0x27, 0x28, 0xff}
	id.Dashes = []vg.Length{vg.Points(6), vg.Points(4)}
	p.Add(l, id)
	p.Legend.Top, p.Legend.Left = true, true
	p.Legend.Add("started", l)
	p.Legend.Add(fmt.Sprintf("ideal duration %.1fs", ideal.Seconds()), id)
	c := vgsvg.New(7.5*vg.Inch, 4.2*vg.Inch)
	p.Draw(draw.New(c))
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := c.WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("write plot %s: %w", path, err)
	}
	return f.Close()
}
