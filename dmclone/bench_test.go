package dmclone

// Measurements the issue asks for. They are benchmarks, not tests: run them
// by hand (see docs/clone.md), e.g.
//
//	go test -run '^$' -bench 'HydrateDense|ForegroundLatency' -benchtime 1x ./dmclone
//
// FERRY_BENCH_DIR picks where the files go (default: a temp dir on the
// test's TMPDIR; use a real disk, not tmpfs), FERRY_BENCH_MIB the dense
// source size (default 1024).

import (
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
)

func benchDir(b *testing.B) string {
	if d := os.Getenv("FERRY_BENCH_DIR"); d != "" {
		dir, err := os.MkdirTemp(d, "ferry-bench")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(dir) })
		return dir
	}
	return b.TempDir()
}

// denseSource writes a dense source file of FERRY_BENCH_MIB MiB (random
// data, so no layer can elide it) once per benchmark run.
func denseSource(b *testing.B, dir string) string {
	mib := 1024
	if s := os.Getenv("FERRY_BENCH_MIB"); s != "" {
		mib, _ = strconv.Atoi(s)
	}
	p := filepath.Join(dir, "dense-src")
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 1<<20)
	rng := rand.New(rand.NewSource(1))
	rng.Read(chunk)
	for i := 0; i < mib; i++ {
		chunk[i%len(chunk)]++ // every MiB differs
		if _, err := f.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	f.Sync()
	return p
}

func settle() {
	exec.Command("sync").Run()
	time.Sleep(2 * time.Second)
	exec.Command("sync").Run()
}

// BenchmarkHydrateDense measures background hydration of a dense file
// against cp of the same file (the limit), both from a warm page cache into
// a fresh file, with and without the final fsync.
func BenchmarkHydrateDense(b *testing.B) {
	for _, direct := range []bool{true, false} {
		name := "copy_file_range"
		if !direct {
			name = "read-write" // the path an iSCSI source takes
		}
		b.Run(name, func(b *testing.B) { benchHydrateDense(b, direct) })
	}
}

func benchHydrateDense(b *testing.B, direct bool) {
	dir := benchDir(b)
	src := denseSource(b, dir)
	st, _ := os.Stat(src)
	size := float64(st.Size())
	if f, err := os.Open(src); err == nil { // warm the page cache for both contenders
		io.Copy(io.Discard, f)
		f.Close()
	}
	for i := 0; i < b.N; i++ {
		// Each contender starts after a global sync and a pause, so neither
		// pays for the other's writeback or for the discards a filesystem
		// mounted with -o discard issues after the previous file's removal.
		// Alternate who goes first: the first writer after the source was
		// written (or a big file removed) is slower on this machine.
		var cpTime, cpSync, engTime, engSync time.Duration
		runEngine := func() {
			settle()
			s, err := blockdev.OpenFile(src, true)
			if err != nil {
				b.Fatal(err)
			}
			d, err := blockdev.CreateSparse(filepath.Join(dir, "eng-dst"), s.Size())
			if err != nil {
				b.Fatal(err)
			}
			cfg := Config{Source: s, Dest: d, MetaPath: filepath.Join(dir, "meta"), NoDirectCopy: !direct}
			if v := os.Getenv("FERRY_BENCH_TUNABLES"); v != "" { // "batch,inflight"
				var bt, fl int
				fmt.Sscanf(v, "%d,%d", &bt, &fl)
				cfg.Tunables = Tunables{BatchRegions: bt, InFlight: fl, MinShare: 0.25}
			}
			if os.Getenv("FERRY_BENCH_COMMIT") != "" { // e.g. -1ns (flush only), 5s
				cfg.CommitInterval, _ = time.ParseDuration(os.Getenv("FERRY_BENCH_COMMIT"))
			}
			e, err := Open(testLog(), cfg)
			if err != nil {
				b.Fatal(err)
			}
			t0 := time.Now()
			e.EnableHydration()
			<-e.Done()
			engTime = time.Since(t0)
			if err := e.Flush(); err != nil {
				b.Fatal(err)
			}
			engSync = time.Since(t0)
			e.Close()
			os.Remove(filepath.Join(dir, "eng-dst"))
			os.Remove(filepath.Join(dir, "meta"))
		}
		runCp := func() {
			settle()
			cpDst := filepath.Join(dir, "cp-dst")
			t0 := time.Now()
			if out, err := exec.Command("cp", src, cpDst).CombinedOutput(); err != nil {
				b.Fatalf("cp: %v %s", err, out)
			}
			cpTime = time.Since(t0)
			exec.Command("sync", cpDst).Run()
			cpSync = time.Since(t0)
			os.Remove(cpDst)
		}
		if i%2 == 0 {
			runEngine()
			runCp()
		} else {
			runCp()
			runEngine()
		}
		b.ReportMetric(size/cpTime.Seconds()/(1<<20), "cp-MiB/s")
		b.ReportMetric(size/engTime.Seconds()/(1<<20), "engine-MiB/s")
		b.ReportMetric(cpTime.Seconds()/engTime.Seconds(), "ratio")
		b.ReportMetric(cpSync.Seconds()/engSync.Seconds(), "ratio-with-fsync")
		b.Logf("%.0f MiB: cp %v (+sync %v), engine %v (+flush %v): engine/cp = %.2f (%.2f with fsync)",
			size/(1<<20), cpTime.Round(time.Millisecond), cpSync.Round(time.Millisecond),
			engTime.Round(time.Millisecond), engSync.Round(time.Millisecond),
			cpTime.Seconds()/engTime.Seconds(), cpSync.Seconds()/engSync.Seconds())
	}
}

// BenchmarkForegroundLatency measures 4 KiB random reads of unhydrated
// regions while background hydration runs at full speed, on the engine
// itself (the FUSE + loop layers add their own, see docs/clone.md).
func BenchmarkForegroundLatency(b *testing.B) {
	dir := benchDir(b)
	src := denseSource(b, dir)
	for i := 0; i < b.N; i++ {
		s, _ := blockdev.OpenFile(src, true)
		d, _ := blockdev.CreateSparse(filepath.Join(dir, "lat-dst"), s.Size())
		// The read-write copy path, as with an iSCSI source.
		e, err := Open(testLog(), Config{Source: s, Dest: d, MetaPath: filepath.Join(dir, "lat-meta"), NoDirectCopy: true})
		if err != nil {
			b.Fatal(err)
		}
		e.EnableHydration()
		rng := rand.New(rand.NewSource(2))
		buf := make([]byte, 4096)
		var lat []time.Duration
		start := time.Now()
		for len(lat) < 5000 {
			select {
			case <-e.Done():
			default:
			}
			// Pick a region in the second half, ahead of the background copy.
			r := e.regions/2 + rng.Int63n(e.regions/2)
			e.mu.Lock()
			unhydrated := !e.hyd.get(r) && !e.busy.get(r)
			done := e.nHyd == e.regions
			e.mu.Unlock()
			if done {
				break
			}
			if !unhydrated {
				continue
			}
			t0 := time.Now()
			if _, err := e.ReadAt(buf, r*e.rs); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(t0))
		}
		elapsed := time.Since(start)
		bgRate := float64(e.Progress().FetchedBytes) / elapsed.Seconds()
		e.Close()
		os.Remove(filepath.Join(dir, "lat-dst"))
		os.Remove(filepath.Join(dir, "lat-meta"))
		if len(lat) == 0 {
			b.Fatal("hydration finished before any read of an unhydrated region")
		}
		slices.Sort(lat)
		p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
		b.ReportMetric(float64(p50.Microseconds()), "p50-µs")
		b.ReportMetric(float64(p99.Microseconds()), "p99-µs")
		b.Logf("%d reads of unhydrated regions in %v while hydrating (~%.0f MiB/s): p50 %v p99 %v max %v",
			len(lat), elapsed.Round(time.Millisecond), bgRate/(1<<20), p50, p99, lat[len(lat)-1])
	}
}

// BenchmarkFlushAfterWrite20GiB is a machine's fsync on a 20 GiB clone (4 KiB
// regions, 640 KiB of bitmap): one region written, then Flush, on sparse
// files in the work directory. What it measures beyond the two fdatasyncs is
// the commit's own cost, which grew with the bitmap.
func BenchmarkFlushAfterWrite20GiB(b *testing.B) {
	dir := b.TempDir()
	const size = 20 << 30
	src, err := blockdev.CreateSparse(filepath.Join(dir, "src"), size)
	if err != nil {
		b.Fatal(err)
	}
	dst, err := blockdev.CreateSparse(filepath.Join(dir, "dst"), size)
	if err != nil {
		b.Fatal(err)
	}
	e := mustOpen(b, Config{Source: src, Dest: dst, MetaPath: filepath.Join(dir, "meta"), CommitInterval: -1})
	defer e.Close()
	buf := make([]byte, 4096)
	for i := 0; i < 2; i++ { // both slots written whole before the timing
		e.WriteAt(buf, int64(i)*4096)
		if err := e.Flush(); err != nil {
			b.Fatal(err)
		}
	}
	rng := rand.New(rand.NewSource(1))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := e.WriteAt(buf, rng.Int63n(size/4096)*4096); err != nil {
			b.Fatal(err)
		}
		if err := e.Flush(); err != nil {
			b.Fatal(err)
		}
	}
}
