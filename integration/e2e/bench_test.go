package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// BenchmarkMigration1GiB migrates a machine writing to a 1 GiB LUKS2 volume
// from one agent to another, b.N times, and reports the median downtime
// (source stopped -> machine started on the target), bytes fetched, and the
// hydration rate next to a raw copy of a dense 1 GiB file on the same disk.
//
//	go test -run '^$' -bench Migration1GiB -benchtime 5x ./integration/e2e/
func BenchmarkMigration1GiB(b *testing.B) {
	e := newEnv(b, 2)
	var downs []time.Duration
	var fetched, total, skipped int64
	var hydrateRates []float64
	for i := 0; i < b.N; i++ {
		src, dst := e.ws[0], e.ws[1]
		vol := fmt.Sprintf("bv%d", i)
		e.createVolume(vol, src, 1<<30)
		ack, _ := e.runMachine(fmt.Sprintf("bm%d", i), src, vol, uint32(40+i))
		e.waitAcked(ack, 100, time.Minute)
		id := e.migrate(fmt.Sprintf("bm%d", i), dst)
		m := e.waitState(id, 5*time.Minute, fsm.Completed)
		d, _ := m.Downtime()
		downs = append(downs, d)
		if p := m.Progress; p != nil {
			fetched, total, skipped = p.FetchedBytes, p.TotalBytes, p.SkippedBytes
			if hd := m.EnteredAt[fsm.Hydrated].Sub(m.EnteredAt[fsm.Hydrating]); hd > 0 {
				hydrateRates = append(hydrateRates, float64(p.FetchedBytes)/hd.Seconds())
			}
		}
	}
	b.StopTimer()
	sort.Slice(downs, func(i, j int) bool { return downs[i] < downs[j] })
	med := downs[len(downs)/2]
	b.ReportMetric(float64(med.Milliseconds()), "downtime-median-ms")
	b.ReportMetric(float64(fetched)/(1<<20), "fetched-MiB")
	b.ReportMetric(float64(total)/(1<<20), "volume-MiB")
	b.ReportMetric(float64(skipped)/(1<<20), "skipped-MiB")
	sort.Float64s(hydrateRates)
	if len(hydrateRates) > 0 {
		b.ReportMetric(hydrateRates[len(hydrateRates)/2]/(1<<20), "hydration-MiB/s")
	}
	// The limit: a raw copy of a dense 1 GiB file on the same filesystem.
	dense := filepath.Join(e.dir, "dense")
	if out, err := exec.Command("dd", "if=/dev/urandom", "of="+dense, "bs=1M", "count=1024", "status=none").CombinedOutput(); err != nil {
		b.Fatalf("dd: %v %s", err, out)
	}
	exec.Command("sync").Run()
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
	start := time.Now()
	if out, err := exec.Command("cp", dense, dense+".copy").CombinedOutput(); err != nil {
		b.Fatalf("cp: %v %s", err, out)
	}
	exec.Command("sync").Run()
	b.ReportMetric(1024/time.Since(start).Seconds(), "raw-cp-MiB/s")
	b.Logf("downtimes: %v", downs)
}
