package bench

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/datapath/userspace"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/fio"
	"github.com/ferry-dev/ferry/machine/workload"
)

// fioGoal is the volume's throughput goal, a fraction of the host file's.
const fioGoal = 0.8

// runFio runs j on path and returns fio's figures and the whole machine's
// CPU while it ran.
func runFio(b *testing.B, path string, size int64, j fio.Job, runFor time.Duration) (fio.Side, cpuUse) {
	b.Helper()
	c0 := readCPU(b)
	side, err := fio.Run(context.Background(), path, size, j, runFor)
	if err != nil {
		b.Fatal(err)
	}
	return side, readCPU(b).since(c0)
}

// cpuPerIO is the machine's busy CPU per completed I/O, in µs.
func cpuPerIO(s fio.Side, u cpuUse) float64 {
	if s.TotalIOs == 0 {
		return 0
	}
	return u.coreSec * 1e6 / s.TotalIOs
}

// mounted reports whether mnt is a mount point in this mount namespace.
func mounted(mnt string) bool {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fs := strings.Fields(sc.Text()); len(fs) > 4 && fs[4] == mnt {
			return true
		}
	}
	return false
}

// benchVolume: fio on the volume a migrated machine lives on (ext4 on the
// loop device → FUSE → LUKS2 view → the destination file, hydration done)
// against a file on the host's own filesystem (the one the volume files
// live on), both with O_DIRECT, alternating in the same run; the ratio is
// the median of the per-pair ratios.
func benchVolume(b *testing.B, s *suite) {
	if _, err := exec.LookPath("fio"); err != nil {
		s.add(row{"the migrated machine's volume, fio", "", "skipped", "", "needs fio (apt-get install fio)"})
		return
	}
	bd := bed(b, s)
	ws := bd.Workers()
	ctx := context.Background()
	volSize, fileSize, pairs, runFor := int64(2<<30), int64(1<<30), 5, 3*time.Second
	if quick {
		volSize, fileSize, pairs, runFor = 512<<20, 256<<20, 1, 2*time.Second
	}
	if err := bd.CreateVolume(ctx, "fv", ws[0], volSize); err != nil {
		b.Fatal(err)
	}
	ack, err := bd.RunRecords(ctx, "fm", ws[0], "fv", 140)
	if err != nil {
		b.Fatal(err)
	}
	migrateOnce(b, bd, "fm", ws[1], ack, nil)
	// How the hydration laid the volume file out: a 1 MiB write that spans
	// extents runs alone on ext4 (docs/profiles.md).
	destFile := filepath.Join(bd.WorkerDir(ws[1]), "volumes", "fv*", "data")
	layout := "the destination file after hydration: " + extentsOf(destFile)
	// fio alone on the volume: the machine stops, its volume stays mounted.
	stopped := fsm.MachineStopped
	if _, err := bd.Client.UpdateMachine(ctx, "fm", api.MachineUpdate{State: &stopped}); err != nil {
		b.Fatal(err)
	}
	for last, since := uint64(0), time.Now(); ; time.Sleep(100 * time.Millisecond) {
		n, _ := workload.Acked(ack)
		if n != last {
			last, since = n, time.Now()
		} else if time.Since(since) > time.Second {
			break
		}
	}
	mnt := filepath.Join(bd.WorkerDir(ws[1]), "mnt", "fm")
	note := "machine stopped, volume mounted"
	if !mounted(mnt) {
		// The machine's stop released its mount: run it again (its light
		// record writes then share the volume with fio).
		running := fsm.MachineRunning
		if _, err := bd.Client.UpdateMachine(ctx, "fm", api.MachineUpdate{State: &running}); err != nil {
			b.Fatal(err)
		}
		for deadline := time.Now().Add(time.Minute); !mounted(mnt); time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				b.Fatalf("the migrated machine's volume is not mounted at %s", mnt)
			}
		}
		note = "the machine's record writes (8 records and an fsync every 5 ms) ran alongside"
	}
	// The transport alone, over memory and over the disk: the same FUSE
	// file and loop device served raw (no clone, no LUKS2 view), with a file
	// in tmpfs or a written file on the work disk behind it.
	overMem, stopMem := transportFloor(b, s, fileSize, "")
	defer stopMem()
	overDisk, stopDisk := transportFloor(b, s, fileSize, s.dir)
	defer stopDisk()
	note += "; " + layout
	base := note
	volFile := filepath.Join(mnt, "fio.dat")
	hostFile := filepath.Join(s.dir, "fio-host.dat")
	defer os.Remove(volFile)
	defer os.Remove(hostFile)
	for _, j := range fio.Jobs {
		// rel is a relative to ref, higher is better (a latency inverts).
		rel := func(a, ref float64) float64 {
			if j.P50 {
				return ref / a
			}
			return a / ref
		}
		type side struct {
			name, path string
			vals, cpus []float64
			iops       []float64
		}
		sides := []*side{{name: "host", path: hostFile}, {name: "volume", path: volFile}, {name: "transport over the disk", path: overDisk}}
		var rs, rds []float64
		for p := 0; p < pairs; p++ {
			// Rotate which side goes first: the host's state (its disk cache,
			// the other jobs) drifts during a run.
			for i := range sides {
				sd := sides[(p+i)%len(sides)]
				f, u := runFio(b, sd.path, fileSize, j, runFor)
				v := j.Value(f)
				if v == 0 {
					b.Fatalf("fio %s on the %s reported nothing", j.Name, sd.name)
				}
				sd.vals, sd.cpus, sd.iops = append(sd.vals, v), append(sd.cpus, cpuPerIO(f, u)), append(sd.iops, f.IOPS)
			}
			h, v, d := sides[0].vals[p], sides[1].vals[p], sides[2].vals[p]
			rs, rds = append(rs, rel(v, h)), append(rds, rel(v, d))
			b.Logf("fio %s: volume %.1f host %.1f transport over the disk %.1f %s", j.Name, v, h, d, j.Unit())
		}
		ratio := fmt.Sprintf("%.2f", medianF(rs))
		if j.P50 {
			ratio = fmt.Sprintf("%.2f (host/volume)", medianF(rs))
		}
		hs := sides[0].vals
		mf, mu := runFio(b, overMem, fileSize, j, runFor)
		mv := j.Value(mf)
		b.Logf("fio %s: the transport over memory %.1f %s", j.Name, mv, j.Unit())
		note += fmt.Sprintf("; the transport over the disk (median of %d): %.0f %s, %.2f of the host, the volume %.2f of it",
			pairs, medianF(sides[2].vals), j.Unit(), rel(medianF(sides[2].vals), medianF(hs)), medianF(rds))
		note += fmt.Sprintf("; over memory (one run): %.0f %s, %.2f of the host", mv, j.Unit(), rel(mv, medianF(hs)))
		note += fmt.Sprintf("; CPU per I/O (whole machine, medians): host %.0f µs, volume %.0f µs, transport over the disk %.0f µs, over memory %.0f µs",
			medianF(sides[0].cpus), medianF(sides[1].cpus), medianF(sides[2].cpus), cpuPerIO(mf, mu))
		if !j.P50 {
			// The CPU budget of the goal: at fioGoal × the host's rate, every
			// core busy all the time, this much CPU per I/O is all there is.
			budget := float64(runtime.NumCPU()) * 1e6 / (fioGoal * medianF(sides[0].iops))
			note += fmt.Sprintf("; at %.1f× the host's rate the machine's %d cores allow %.0f µs per I/O", fioGoal, runtime.NumCPU(), budget)
		}
		s.add(row{"the migrated machine's volume, fio " + j.Name, fmt.Sprintf("%.0f %s", medianF(sides[1].vals), j.Unit()),
			fmt.Sprintf("file on the host disk: %.0f %s", medianF(hs), j.Unit()), ratio,
			fmt.Sprintf("median of %d alternating %v runs; %s", pairs, runFor, note)})
		note = base
	}
	// fio's files went into the machine's free space, which the migration's
	// trim left as holes: the volume file grew under fio's writes.
	after := extentsOf(destFile)
	b.Logf("%s; after the fio runs, %s", layout, after)
	s.notes = append(s.notes, "Volume (fio) layout: "+layout+"; after the fio runs, "+after+".")
	s.notes = append(s.notes, fmt.Sprintf("Volume (fio): a machine's %d MiB LUKS2 volume is migrated, hydrated and dissolved; "+
		"fio (libaio, O_DIRECT, %d MiB file) then runs on a file in the machine's ext4 (loop device with direct I/O → FUSE → "+
		"ferry's LUKS2 view → the destination file) and on a file on the host's own filesystem where the volume files live, "+
		"alternating; throughput ratios are volume over host, the QD1 latency ratio host over volume (both: higher is better). "+
		"The transport alone: a %d MiB file served raw by `ferry volume serve` (no clone, no LUKS2 view) as a FUSE file on a loop "+
		"device with direct I/O, fio on that device; over memory the file is in tmpfs (what FUSE and the loop device allow on "+
		"this kernel with nothing behind them), over the disk it is a written file on the work disk, read and written with "+
		"O_DIRECT by the serve process as a volume's destination is (the same transport and disk as the volume, without ferry's "+
		"clone and view: the ceiling of the volume's rows). The transport over the disk takes turns with the host file and "+
		"the volume. CPU per I/O is the whole machine's busy time (/proc/stat) over fio's run divided by its completed I/Os.",
		volSize>>20, fileSize>>20, fileSize>>20))
}

// extentsOf says how many extents the one file matching pattern lies in
// (a target names its copy of a volume after the migration).
func extentsOf(pattern string) string {
	paths, _ := filepath.Glob(pattern)
	if len(paths) != 1 {
		return fmt.Sprintf("extents unknown (%d files match %s)", len(paths), pattern)
	}
	f, err := blockdev.OpenFile(paths[0], true)
	if err != nil {
		return fmt.Sprintf("extents unknown (%v)", err)
	}
	defer f.Close()
	n, err := f.Extents()
	if err != nil {
		return fmt.Sprintf("extents unknown (%v)", err)
	}
	return fmt.Sprintf("%d extents in %d MiB", n, f.Size()>>20)
}

// transportFloor serves a file through the volume's transport, raw:
// `ferry volume serve` (no clone, no LUKS2 view) → its FUSE file → a loop
// device with direct I/O. With dir empty the file is in memory (tmpfs):
// what FUSE and the loop device allow on this kernel with nothing behind
// them. With dir a directory on the work disk, the file is written first
// with random bytes (a hole would read as zeros without touching the disk) and the serve
// process reads and writes it with O_DIRECT, as it does a volume's.
func transportFloor(b *testing.B, s *suite, size int64, dir string) (string, func()) {
	b.Helper()
	ctx := context.Background()
	name := "memory"
	if dir == "" {
		dir = "/dev/shm"
	} else {
		name = "disk"
	}
	dir, err := os.MkdirTemp(dir, "ferry-bench-transport-")
	if err != nil {
		b.Fatal(err)
	}
	data := filepath.Join(dir, "data")
	if name == "memory" {
		err = os.WriteFile(data, nil, 0o600)
		if err == nil {
			err = os.Truncate(data, size)
		}
		if err != nil {
			os.RemoveAll(dir)
			b.Fatal(err)
		}
	} else {
		makeDense(b, data, size)
	}
	cfg := userspace.Config{VolumeID: "transport-" + name, DataPath: data, Raw: true,
		MountDir: filepath.Join(s.dir, "transport-fuse-"+name), Socket: filepath.Join(s.dir, "transport-"+name+".sock")}
	p, err := userspace.Start(ctx, zerolog.Nop(), s.ferry(b), cfg, nil, s.dir)
	if err != nil {
		os.RemoveAll(dir)
		b.Fatal(err)
	}
	dev, err := loopdev.Attach(cfg.DevicePath(), true)
	if err != nil {
		p.Shutdown(ctx)
		os.RemoveAll(dir)
		b.Fatal(err)
	}
	return dev, func() {
		if err := loopdev.Detach(dev); err != nil {
			b.Log(err)
		}
		if err := p.Shutdown(ctx); err != nil {
			b.Log(err)
		}
		os.RemoveAll(dir)
	}
}
