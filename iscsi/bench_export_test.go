package iscsi

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
)

// The export against Debian's tgtd on the same file, both read by libiscsi's
// iscsi-perf (one session, QD32, 1 MiB, sequential): the two alternate
// within each iteration, order swapped every other time, so both see the
// same load on a shared machine; the reported ratio is the median of the
// per-pair ratios.
//
//	go test -run XXX -bench ExportVsTgtd -benchtime 6x ./iscsi/
//
// FERRY_ISCSI_BENCH_MIB sets the LUN size (default 1024).
func BenchmarkExportVsTgtd(b *testing.B) {
	needRoot(b)
	if _, err := exec.LookPath("iscsi-perf"); err != nil {
		b.Skip("needs iscsi-perf: apt-get install libiscsi-bin")
	}
	mib := 1024
	if v, err := strconv.Atoi(os.Getenv("FERRY_ISCSI_BENCH_MIB")); err == nil && v > 0 {
		mib = v
	}
	path := filepath.Join(b.TempDir(), "lun")
	writeRandomFile(b, path, int64(mib)<<20)
	e, _ := startTestExport(b, path, nil)
	tgtPortal, tgtIQN := startTgtd(b, path)
	const qd, kib = 32, 1024
	ferryURL := fmt.Sprintf("iscsi://%s/%s/0", e.Portal(), e.IQN())
	tgtdURL := fmt.Sprintf("iscsi://%s/%s/1", tgtPortal, tgtIQN)
	var ferry, tgtd, ratios []float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var f, t float64
		if i%2 == 0 {
			f, t = runISCSIPerf(b, ferryURL, qd, kib), runISCSIPerf(b, tgtdURL, qd, kib)
		} else {
			t, f = runISCSIPerf(b, tgtdURL, qd, kib), runISCSIPerf(b, ferryURL, qd, kib)
		}
		b.Logf("pair %d: ferry %.0f MB/s, tgtd %.0f MB/s, ratio %.2f", i, f, t, f/t)
		ferry, tgtd, ratios = append(ferry, f), append(tgtd, t), append(ratios, f/t)
	}
	b.StopTimer()
	b.ReportMetric(median(ferry), "ferry-MB/s")
	b.ReportMetric(median(tgtd), "tgtd-MB/s")
	b.ReportMetric(median(ratios), "ratio")
}

// runISCSIPerf runs iscsi-perf for 3 s against url and returns its average
// rate in MB/s (10^6 bytes).
func runISCSIPerf(b *testing.B, url string, qd, kib int) float64 {
	out, err := exec.Command("iscsi-perf", "-t", "3", "-m", strconv.Itoa(qd), "-b", strconv.Itoa(kib*2), url).CombinedOutput()
	m := perfAverage.FindSubmatch(out)
	if err != nil || m == nil {
		b.Fatalf("iscsi-perf %s: %v\n%s", url, err, out)
	}
	v, _ := strconv.ParseFloat(string(m[1]), 64)
	return v * (1 << 20) / 1e6
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
