package dmclone

import (
	crand "crypto/rand"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath/fuseexport"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

func needRootStack(b *testing.B) {
	b.Helper()
	testenv.Root(b, "FUSE and loop devices")
	testenv.Tools(b, "apt-get install e2fsprogs util-linux", "losetup", "mkfs.ext4", "fstrim", "mount")
}

func benchSh(b *testing.B, name string, args ...string) {
	b.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		b.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// BenchmarkSparse100GiB: a 100 GiB sparse source holding a fresh ext4 with
// 5 MiB of files. Measures bytes fetched and wall time from opening the
// clone to fully hydrated, including mount and fstrim through
// engine -> FUSE -> loop, with the known-zero hint from the source's holes
// and without it (fstrim alone).
func BenchmarkSparse100GiB(b *testing.B) {
	needRootStack(b)
	dir := benchDir(b)
	src := filepath.Join(dir, "src.img")
	f, _ := os.Create(src)
	f.Truncate(100 << 30)
	f.Close()
	benchSh(b, "mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "nodiscard", src)
	loop, err := loopdev.Attach(src, false)
	if err != nil {
		b.Fatal(err)
	}
	mnt := filepath.Join(dir, "mnt")
	os.MkdirAll(mnt, 0o700)
	benchSh(b, "mount", loop, mnt)
	for i := 0; i < 5; i++ {
		p := make([]byte, 1<<20)
		crand.Read(p)
		os.WriteFile(filepath.Join(mnt, "f"+string(rune('0'+i))), p, 0o600)
	}
	benchSh(b, "umount", mnt)
	loopdev.Detach(loop)
	var st unix.Stat_t
	unix.Stat(src, &st)
	allocated := st.Blocks * 512
	for _, hint := range []bool{true, false} {
		name := "holes+fstrim"
		if !hint {
			name = "fstrim-only"
		}
		b.Run(name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				exec.Command("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches").Run()
				t0 := time.Now()
				s, _ := blockdev.OpenFile(src, true)
				var kz []blockdev.Range
				if hint {
					f, _ := os.Open(src)
					kz, err = blockdev.Holes(f)
					f.Close()
					if err != nil {
						b.Fatal(err)
					}
				}
				dstPath := filepath.Join(dir, "dst.img")
				d, _ := blockdev.CreateSparse(dstPath, s.Size())
				e, err := Open(testLog(), Config{Source: s, Dest: d, MetaPath: filepath.Join(dir, "meta"), KnownZero: kz})
				if err != nil {
					b.Fatal(err)
				}
				exp, err := fuseexport.Mount(testLog(), filepath.Join(dir, "export"), "disk", e)
				if err != nil {
					b.Fatal(err)
				}
				lp, err := loopdev.Attach(exp.Path(), true)
				if err != nil {
					b.Fatal(err)
				}
				benchSh(b, "mount", "-o", "nodiscard", lp, mnt)
				benchSh(b, "fstrim", mnt)
				e.EnableHydration()
				<-e.Done()
				wall := time.Since(t0)
				p := e.Progress()
				benchSh(b, "umount", mnt)
				loopdev.Detach(lp)
				exp.Close()
				e.Close()
				os.Remove(dstPath)
				os.Remove(filepath.Join(dir, "meta"))
				b.ReportMetric(float64(p.FetchedBytes)/(1<<20), "fetched-MiB")
				b.ReportMetric(wall.Seconds(), "wall-s")
				b.Logf("%s: fetched %.1f MiB (source file allocates %.1f MiB), skipped %.1f GiB known-zero + %.1f GiB discard, create->hydrated %v",
					name, float64(p.FetchedBytes)/(1<<20), float64(allocated)/(1<<20),
					float64(p.SkippedKnownZeroBytes)/(1<<30), float64(p.SkippedDiscardBytes)/(1<<30), wall.Round(time.Millisecond))
			}
		})
	}
}

// BenchmarkStackLatency: 4 KiB O_DIRECT random reads of unhydrated regions
// through loop -> FUSE -> engine while background hydration runs.
func BenchmarkStackLatency(b *testing.B) {
	needRootStack(b)
	dir := benchDir(b)
	src := denseSource(b, dir)
	for i := 0; i < b.N; i++ {
		s, _ := blockdev.OpenFile(src, true)
		d, _ := blockdev.CreateSparse(filepath.Join(dir, "lat-dst"), s.Size())
		e, err := Open(testLog(), Config{Source: s, Dest: d, MetaPath: filepath.Join(dir, "lat-meta")})
		if err != nil {
			b.Fatal(err)
		}
		exp, err := fuseexport.Mount(testLog(), filepath.Join(dir, "export"), "disk", e)
		if err != nil {
			b.Fatal(err)
		}
		lp, err := loopdev.Attach(exp.Path(), true)
		if err != nil {
			b.Fatal(err)
		}
		f, err := os.OpenFile(lp, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			b.Fatal(err)
		}
		raw := make([]byte, 8192)
		buf := raw[4096-int(uintptr(unsafe.Pointer(&raw[0]))&4095):][:4096]
		e.EnableHydration()
		rng := rand.New(rand.NewSource(3))
		var lat []time.Duration
		for len(lat) < 3000 {
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
			if _, err := f.ReadAt(buf, r*e.rs); err != nil {
				b.Fatal(err)
			}
			lat = append(lat, time.Since(t0))
		}
		rate := e.Progress().RateBPS
		f.Close()
		loopdev.Detach(lp)
		exp.Close()
		e.Close()
		os.Remove(filepath.Join(dir, "lat-dst"))
		os.Remove(filepath.Join(dir, "lat-meta"))
		if len(lat) == 0 {
			b.Fatal("no read hit an unhydrated region")
		}
		slices.Sort(lat)
		p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
		b.ReportMetric(float64(p50.Microseconds()), "p50-µs")
		b.ReportMetric(float64(p99.Microseconds()), "p99-µs")
		b.Logf("%d O_DIRECT 4 KiB reads of unhydrated regions via loop+FUSE while hydrating (~%.0f MiB/s): p50 %v p99 %v max %v",
			len(lat), rate/(1<<20), p50, p99, lat[len(lat)-1])
	}
}
