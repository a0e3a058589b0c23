package userspace

import (
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath/fuseexport"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/internal/fio"
	"github.com/ferry-dev/ferry/luks"
)

// benchEnv reads an integer knob of the volume benchmark from the environment.
func benchEnv(b *testing.B, name string, def int64) int64 {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}

// fillRandom writes n random bytes at off in f, syncs and drops them from
// the page cache, so reads of both sides start from the disk.
func fillRandom(b *testing.B, f *os.File, off, n int64) {
	b.Helper()
	buf := make([]byte, 1<<20)
	rand.Read(buf)
	for p := int64(0); p < n; p += int64(len(buf)) {
		if _, err := f.WriteAt(buf[:min(int64(len(buf)), n-p)], off+p); err != nil {
			b.Fatal(err)
		}
	}
	dropCache(b, f)
}

// dropCache writes back and evicts one file's pages (not the whole
// machine's), so neither side of a pair reads the other's warm cache.
func dropCache(b *testing.B, f *os.File) {
	b.Helper()
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		b.Fatal(err)
	}
}

// evictWhile keeps f's pages out of the page cache every interval until
// stop is closed. With a buffered backing file and the host file read with
// O_DIRECT, the volume would otherwise serve re-reads from memory and beat
// the disk it is compared with.
// The goroutine sends the CPU time it used on done, so that it can be
// subtracted from the server's.
func evictWhile(f *os.File, interval time.Duration, stop <-chan struct{}) <-chan time.Duration {
	done := make(chan time.Duration, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		start := cpuTime(unix.RUSAGE_THREAD)
		defer func() { done <- cpuTime(unix.RUSAGE_THREAD) - start }()
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
			}
		}
	}()
	return done
}

// cpuTime is the user+system CPU time of this process or thread.
func cpuTime(who int) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(who, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func runFio(b *testing.B, path string, size int64, j fio.Job, runFor time.Duration) fio.Side {
	b.Helper()
	side, err := fio.Run(context.Background(), path, size, j, runFor)
	if err != nil {
		b.Fatal(err)
	}
	return side
}

// BenchmarkVolumeFio runs fio against the volume a machine lives on in
// userspace (loop with direct I/O → FUSE → LUKS2 plaintext view → file) and
// against a plain file on the same host filesystem, alternating the two in
// the same run, and reports the median ratio of the pairs (volume/host: >1
// is better for throughput, <1 better for the p50 latency rows). Needs root,
// /dev/fuse, loop devices and fio. Knobs: FERRY_BENCH_VOLUME_SIZE (bytes,
// default 1 GiB), FERRY_BENCH_SECTOR (512 or 4096), FERRY_BENCH_PAIRS
// (default 5), FERRY_BENCH_RUNTIME (seconds per fio run, default 3),
// FERRY_BENCH_BACKING=buffered (the view reaches the volume file through
// the host page cache, as ferry did before it used O_DIRECT; default direct,
// as the volume server does), FERRY_BENCH_EVICT_MS (buffered only: how
// often the backing file's page cache is dropped during the volume's runs,
// default 20, so re-reads are not served from memory while the host file is
// read with O_DIRECT; "off" keeps the cache warm).
//
//	go test -run XXX -bench VolumeFio -benchtime 1x ./datapath/
func BenchmarkVolumeFio(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root to mount FUSE and attach loop devices")
	}
	for _, p := range []string{"/dev/fuse", "/dev/loop-control"} {
		if _, err := os.Stat(p); err != nil {
			b.Skipf("needs %s: modprobe fuse loop", p)
		}
	}
	for _, tool := range []string{"fio", "losetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("needs %s: apt-get install fio util-linux", tool)
		}
	}
	size := benchEnv(b, "FERRY_BENCH_VOLUME_SIZE", 1<<30) &^ (1<<20 - 1)
	pairs := int(benchEnv(b, "FERRY_BENCH_PAIRS", 5))
	runFor := time.Duration(benchEnv(b, "FERRY_BENCH_RUNTIME", 3)) * time.Second
	var evict time.Duration
	if os.Getenv("FERRY_BENCH_EVICT_MS") != "off" {
		evict = time.Duration(benchEnv(b, "FERRY_BENCH_EVICT_MS", 20)) * time.Millisecond
	}
	dir := b.TempDir()

	hostPath := filepath.Join(dir, "host.img")
	host, err := os.OpenFile(hostPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer host.Close()
	fillRandom(b, host, 0, size)

	layout := luks.Layout{UUID: "bench", DataOffset: 16 << 20, MetadataSize: 16384, KeyslotsSize: 16744448,
		SectorSize: int(benchEnv(b, "FERRY_BENCH_SECTOR", 4096)), Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: size}
	backing, err := blockdev.CreateSparse(filepath.Join(dir, "volume.img"), layout.DeviceSize())
	if err != nil {
		b.Fatal(err)
	}
	defer backing.Close()
	raw, err := os.OpenFile(backing.Name(), os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer raw.Close()
	fillRandom(b, raw, layout.DataOffset, size)
	lower := blockdev.Device(backing)
	switch os.Getenv("FERRY_BENCH_BACKING") {
	case "buffered":
	case "", "direct":
		// As the volume server does (server.viewDest).
		direct, err := blockdev.OpenDirect(backing, false)
		if err != nil {
			b.Fatal(err)
		}
		defer direct.Close()
		lower = direct
		evict = 0 // nothing to evict: the data bypasses the page cache
	default:
		b.Fatalf("FERRY_BENCH_BACKING=%q: want buffered or direct", os.Getenv("FERRY_BENCH_BACKING"))
	}
	key := make([]byte, layout.KeyBytes)
	rand.Read(key)
	view, err := luks.OpenView(lower, layout, luks.NewVolumeKey(key))
	if err != nil {
		b.Fatal(err)
	}
	defer view.Close()
	exp, err := fuseexport.Mount(zerolog.Nop(), filepath.Join(dir, "mnt"), "disk", view)
	if err != nil {
		b.Fatal(err)
	}
	defer exp.Close()
	loop, err := loopdev.Attach(exp.Path(), true)
	if err != nil {
		b.Fatal(err)
	}
	defer loopdev.Detach(loop)

	b.ResetTimer()
	for range b.N {
		for _, j := range fio.Jobs {
			b.Run(strings.ReplaceAll(j.Name, " ", "-"), func(b *testing.B) {
				var ratios, cpus []float64
				var hostV, volV float64
				for range pairs {
					dropCache(b, host)
					dropCache(b, raw)
					h := runFio(b, hostPath, size, j, runFor)
					// The server's CPU per I/O (FUSE, view, cipher and
					// their syscalls: everything in this process) is what
					// a shared machine pays; it is far less noisy than
					// the throughput.
					cpu0 := cpuTime(unix.RUSAGE_SELF)
					var v fio.Side
					if evict > 0 {
						stop := make(chan struct{})
						done := evictWhile(raw, evict, stop)
						v = runFio(b, loop, size, j, runFor)
						close(stop)
						cpu0 += <-done
					} else {
						v = runFio(b, loop, size, j, runFor)
					}
					if v.TotalIOs == 0 {
						b.Fatalf("fio %s on the volume completed no I/O", j.Name)
					}
					cpus = append(cpus, float64(cpuTime(unix.RUSAGE_SELF)-cpu0)/1e3/v.TotalIOs)
					hostV, volV = j.Value(h), j.Value(v)
					if hostV == 0 {
						b.Fatalf("fio %s on the host file reported nothing", j.Name)
					}
					ratios = append(ratios, volV/hostV)
					b.Logf("%s: host %.1f volume %.1f ratio %.2f server CPU %.1f µs/IO", j.Name, hostV, volV, volV/hostV, cpus[len(cpus)-1])
				}
				slices.Sort(ratios)
				unit := j.Unit()
				b.ReportMetric(ratios[len(ratios)/2], "x-host")
				slices.Sort(cpus)
				b.ReportMetric(cpus[len(cpus)/2], "server-cpu-µs/IO")
				b.ReportMetric(hostV, "host-"+unit)
				b.ReportMetric(volV, "volume-"+unit)
				b.ReportMetric(0, "ns/op")
			})
		}
	}
}
