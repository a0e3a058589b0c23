// Package bench is ferry's benchmark suite: one command runs every
// measurement next to its reference taken in the same run, prints one
// table, and writes docs/benchmarks.md with plots (gonum/plot, SVG) of hydrated bytes
// over time. It is made of Benchmark functions only, so `go test ./...`
// never runs it.
//
//	make bench                     # the whole suite (root; 5m23s on 2 cores, 2026-12-01)
//	make bench-quick               # data-path rows at small sizes, under 3 minutes
//	go test -run '^$' -bench 'Suite/hydration' -benchtime 1x ./integration/bench
package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/iscsi"
)

var quick = os.Getenv("FERRY_BENCH_QUICK") != ""

func TestMain(m *testing.M) {
	// The test binary doubles as the iSCSI export child.
	if iscsi.IsExportChild() {
		iscsi.ServeChild()
	}
	os.Exit(m.Run())
}

// row is one line of the results table.
type row struct {
	Bench, Ferry, Ref, Ratio, Note string
}

type suite struct {
	mu    sync.Mutex
	rows  []row
	plots map[string][]series // file name -> curves
	notes []string
	exe   string // ferry binary, built on first use
	dir   string
}

func (s *suite) add(r row) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rows = append(s.rows, r)
	fmt.Printf("  %-48s %-22s %-30s %-10s %s\n", r.Bench, r.Ferry, r.Ref, r.Ratio, r.Note)
}

func (s *suite) plot(file string, ss ...series) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.plots[file] = append(s.plots[file], ss...)
}

func (s *suite) ferry(b *testing.B) string {
	if s.exe == "" && os.Getenv("FERRY_BENCH_EXE") != "" {
		// make bench and bench-quick pass the binary `make build` just made.
		s.exe = os.Getenv("FERRY_BENCH_EXE")
	}
	if s.exe == "" {
		exe, err := buildFerry(s.dir)
		if err != nil {
			b.Fatal(err)
		}
		s.exe = exe
	}
	return s.exe
}

// BenchmarkSuite runs every section once (b.N is ignored: these are
// end-to-end measurements with their own repetitions and medians).
func BenchmarkSuite(b *testing.B) {
	testenv.Root(b, "network namespaces, loop devices, mounts, tgtd, qemu-nbd, fio")
	dir, err := os.MkdirTemp("", "ferry-bench-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	s := &suite{plots: map[string][]series{}, dir: dir}
	fmt.Printf("\nferry benchmark suite (quick=%v)\n  %-48s %-22s %-30s %-10s %s\n", quick, "benchmark", "ferry", "reference", "ratio", "notes")
	start := time.Now()
	sections := []struct {
		name string
		fn   func(*testing.B, *suite)
	}{
		{"export", benchExport},
		{"hydration", benchHydration},
		{"contended", benchContended},
		{"downtime", benchDowntime},
		{"volume", benchVolume},
		{"tbf", benchTBF},
		{"sparse", benchSparse},
		{"controlplane", benchControlPlane},
		{"takeover", benchTakeover},
	}
	ran := 0
	for _, sec := range sections {
		// b.Run reports success for a section -bench filtered out, so count
		// the sections that really ran to the end.
		b.Run(sec.name, func(b *testing.B) {
			sec.fn(b, s)
			if !b.Failed() {
				ran++
			}
		})
	}
	b.StopTimer()
	s.summary(time.Since(start))
	if ran != len(sections) && os.Getenv("FERRY_BENCH_WRITE") == "" {
		fmt.Printf("\n%d of %d sections ran: not writing docs/benchmarks.md (set FERRY_BENCH_WRITE=1 to write anyway)\n", ran, len(sections))
		return
	}
	if err := s.write(time.Since(start)); err != nil {
		b.Fatal(err)
	}
}

// summary prints every row measured, together, after the sections' logs.
func (s *suite) summary(took time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fmt.Printf("\n%d rows measured in %v (quick=%v):\n  %-48s %-22s %-30s %-10s %s\n", len(s.rows), took.Round(time.Second), quick,
		"benchmark", "ferry", "reference", "ratio", "notes")
	for _, r := range s.rows {
		fmt.Printf("  %-48s %-22s %-30s %-10s %s\n", r.Bench, r.Ferry, r.Ref, r.Ratio, r.Note)
	}
}

// buildFerry builds without -race, unlike testbed.BuildFerry for e2e and
// chaos: the race detector slows ferry several times over, and these are the
// figures docs/benchmarks.md publishes.
func buildFerry(dir string) (string, error) {
	exe := filepath.Join(dir, "ferry")
	out, err := exec.Command("go", "build", "-o", exe, "github.com/ferry-dev/ferry/cmd/ferry").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("build ferry: %w\n%s", err, out)
	}
	return exe, nil
}

// keepMarker starts the part of docs/benchmarks.md written by hand from
// other benchmarks (the fleet simulation): the suite keeps it.
const keepMarker = "<!-- kept: fleet benchmark -->"

// docsDir is the repository's docs directory (tests run in the package dir).
func docsDir() string {
	if d := os.Getenv("FERRY_BENCH_DOCS"); d != "" {
		return d
	}
	return filepath.Join("..", "..", "docs")
}

func (s *suite) write(took time.Duration) error {
	docs := docsDir()
	plotDir := filepath.Join(docs, "benchmarks")
	if err := os.MkdirAll(plotDir, 0o755); err != nil {
		return err
	}
	var files []string
	for f := range s.plots {
		files = append(files, f)
	}
	sort.Strings(files)
	titles := map[string]string{
		"dense.svg":     "Dense volume: hydrated bytes over time",
		"sparse.svg":    "Sparse volume (mostly empty): hydrated bytes over time",
		"contended.svg": "Background hydration with and without a saturating foreground workload",
	}
	for _, f := range files {
		if err := writeSVG(filepath.Join(plotDir, f), titles[f], s.plots[f]); err != nil {
			return err
		}
	}
	var b strings.Builder
	b.WriteString("# Benchmarks\n\n")
	b.WriteString("Generated by the benchmark suite (`make bench`, i.e. `go test -run '^$' -bench Suite -benchtime 1x ./integration/bench`);\n")
	b.WriteString("every figure is measured next to its reference in the same run, except references marked as quoted. Do not edit by hand: re-run the suite. Where the time goes (profiles): `docs/profiles.md`.\n\n")
	fmt.Fprintf(&b, "## Machine\n\n%s\n\nSuite run: %s, took %v%s.\n\n", machine(), time.Now().UTC().Format("2006-01-02 15:04 UTC"), took.Round(time.Second), map[bool]string{true: " (FERRY_BENCH_QUICK: reduced sizes)", false: ""}[quick])
	b.WriteString("## Results\n\n| benchmark | ferry | reference | ratio | notes |\n|---|---|---|---|---|\n")
	for _, r := range s.rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", r.Bench, r.Ferry, r.Ref, r.Ratio, r.Note)
	}
	if len(s.notes) > 0 {
		b.WriteString("\n## How each figure is taken\n\n")
		for _, n := range s.notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	if len(files) > 0 {
		b.WriteString("\n## Plots\n\n")
		for _, f := range files {
			fmt.Fprintf(&b, "![%s](benchmarks/%s)\n\n", titles[f], f)
		}
	}
	// Sections other benchmarks own (from their marker on) are kept.
	if old, err := os.ReadFile(filepath.Join(docs, "benchmarks.md")); err == nil {
		if i := strings.Index(string(old), keepMarker); i >= 0 {
			b.WriteString("\n" + string(old[i:]))
		}
	}
	if err := os.WriteFile(filepath.Join(docs, "benchmarks.md"), []byte(b.String()), 0o644); err != nil {
		return err
	}
	fmt.Printf("\nwrote %s and %d plots under %s\n", filepath.Join(docs, "benchmarks.md"), len(files), plotDir)
	return nil
}

// machine describes the host the suite ran on.
func machine() string {
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				cpu = strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int64
		fmt.Sscanf(strings.SplitN(string(b), "\n", 2)[0], "MemTotal: %d kB", &kb)
		mem = fmt.Sprintf("%.1f GiB RAM", float64(kb)/(1<<20))
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	fs := ""
	if out, err := exec.Command("df", "-T", os.TempDir()).Output(); err == nil {
		if lines := strings.Split(strings.TrimSpace(string(out)), "\n"); len(lines) > 1 {
			f := strings.Fields(lines[1])
			if len(f) > 1 {
				fs = fmt.Sprintf("%s on %s", f[1], f[0])
			}
		}
	}
	return fmt.Sprintf("- CPU: %s, %d cores visible (shared with other jobs while the suite ran)\n- %s\n- Kernel %s (no dm-clone, NBD or SCSI modules: ferry's userspace data path)\n- Work files: %s in %s\n- %s",
		cpu, runtime.NumCPU(), mem, strings.TrimSpace(string(kernel)), os.TempDir(), fs, runtime.Version())
}

func dropCaches() {
	exec.Command("sync").Run()
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
}

func mibps(bytes int64, d time.Duration) float64 {
	if d <= 0 {
		return 0
	}
	return float64(bytes) / (1 << 20) / d.Seconds()
}

func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func ctxFor(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}
