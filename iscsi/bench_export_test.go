package iscsi

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
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
	tgtdPID := findProcess(b, "tgtd", tgtPortal)
	// CPU time per byte served is what the targets cost, whatever else the
	// machine runs; the rates are what the goal is about.
	measure := func(url string, pid int) (rate, cpuMsPerMB float64) {
		c0 := processCPU(b, pid)
		rate = runISCSIPerf(b, url, qd, kib)
		return rate, (processCPU(b, pid) - c0).Seconds() * 1e3 / (rate * 3)
	}
	var ferry, tgtd, ratios, ferryCPU, tgtdCPU []float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var f, t, fc, tc float64
		if i%2 == 0 {
			f, fc = measure(ferryURL, e.PID())
			t, tc = measure(tgtdURL, tgtdPID)
		} else {
			t, tc = measure(tgtdURL, tgtdPID)
			f, fc = measure(ferryURL, e.PID())
		}
		b.Logf("pair %d: ferry %.0f MB/s (%.2f ms CPU/MB), tgtd %.0f MB/s (%.2f ms CPU/MB), ratio %.2f", i, f, fc, t, tc, f/t)
		ferry, tgtd, ratios = append(ferry, f), append(tgtd, t), append(ratios, f/t)
		ferryCPU, tgtdCPU = append(ferryCPU, fc), append(tgtdCPU, tc)
	}
	b.StopTimer()
	b.ReportMetric(median(ferry), "ferry-MB/s")
	b.ReportMetric(median(tgtd), "tgtd-MB/s")
	b.ReportMetric(median(ratios), "ratio")
	b.ReportMetric(median(ferryCPU), "ferry-cpu-ms/MB")
	b.ReportMetric(median(tgtdCPU), "tgtd-cpu-ms/MB")
}

// processCPU is the user and system time pid has used so far.
func processCPU(b *testing.B, pid int) time.Duration {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(string(st[bytes.LastIndexByte(st, ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+stime) * time.Second / 100 // USER_HZ
}

// findProcess returns the pid of the process named name whose command line
// contains arg.
func findProcess(b *testing.B, name, arg string) int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cl, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		args := strings.Split(string(cl), "\x00")
		if filepath.Base(args[0]) == name && strings.Contains(string(cl), arg) {
			return pid
		}
	}
	b.Fatalf("no %s process serving %s", name, arg)
	return 0
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
