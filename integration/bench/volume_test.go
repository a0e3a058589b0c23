package bench

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/datapath/userspace"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/fio"
	"github.com/ferry-dev/ferry/machine/workload"
)

func runFio(b *testing.B, path string, size int64, j fio.Job, runFor time.Duration) fio.Side {
	b.Helper()
	side, err := fio.Run(context.Background(), path, size, j, runFor)
	if err != nil {
		b.Fatal(err)
	}
	return side
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
	volSize, fileSize, pairs, runFor := int64(2<<30), int64(1<<30), 3, 3*time.Second
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
	floor, stopFloor := transportFloor(b, s, fileSize)
	defer stopFloor()
	base := note
	volFile := filepath.Join(mnt, "fio.dat")
	hostFile := filepath.Join(s.dir, "fio-host.dat")
	defer os.Remove(volFile)
	defer os.Remove(hostFile)
	for _, j := range fio.Jobs {
		var hs, vs, rs []float64
		for p := 0; p < pairs; p++ {
			// Alternate which side goes first: the host's state (its disk
			// cache, the other jobs) drifts during a run.
			var h, v fio.Side
			if p%2 == 0 {
				h, v = runFio(b, hostFile, fileSize, j, runFor), runFio(b, volFile, fileSize, j, runFor)
			} else {
				v, h = runFio(b, volFile, fileSize, j, runFor), runFio(b, hostFile, fileSize, j, runFor)
			}
			hv, vv := j.Value(h), j.Value(v)
			if hv == 0 || vv == 0 {
				b.Fatalf("fio %s reported nothing (host %v, volume %v)", j.Name, hv, vv)
			}
			r := vv / hv
			if j.P50 {
				r = hv / vv // a latency: >1 would be better than the host
			}
			hs, vs, rs = append(hs, hv), append(vs, vv), append(rs, r)
			b.Logf("fio %s: volume %.1f host %.1f %s", j.Name, vv, hv, j.Unit())
		}
		ratio := fmt.Sprintf("%.2f", medianF(rs))
		if j.P50 {
			ratio = fmt.Sprintf("%.2f (host/volume)", medianF(rs))
		}
		fv := j.Value(runFio(b, floor, fileSize, j, runFor))
		fr := fv / medianF(hs)
		if j.P50 {
			fr = medianF(hs) / fv
		}
		b.Logf("fio %s: the transport alone %.1f %s", j.Name, fv, j.Unit())
		note += fmt.Sprintf("; the transport alone (FUSE and loop over memory, one run): %.0f %s, %.2f of the host", fv, j.Unit(), fr)
		s.add(row{"the migrated machine's volume, fio " + j.Name, fmt.Sprintf("%.0f %s", medianF(vs), j.Unit()),
			fmt.Sprintf("file on the host disk: %.0f %s", medianF(hs), j.Unit()), ratio,
			fmt.Sprintf("median of %d alternating %v runs; %s", pairs, runFor, note)})
		note = base
	}
	s.notes = append(s.notes, fmt.Sprintf("Volume (fio): a machine's %d MiB LUKS2 volume is migrated, hydrated and dissolved; "+
		"fio (libaio, O_DIRECT, %d MiB file) then runs on a file in the machine's ext4 (loop device with direct I/O → FUSE → "+
		"ferry's LUKS2 view → the destination file) and on a file on the host's own filesystem where the volume files live, "+
		"alternating; throughput ratios are volume over host, the QD1 latency ratio host over volume (both: higher is better). "+
		"The transport alone: a %d MiB file in memory (tmpfs) served raw by `ferry volume serve` (no clone, no LUKS2 view, no disk) "+
		"as a FUSE file on a loop device with direct I/O, fio on that device: what FUSE and the loop device allow on this kernel, "+
		"the ceiling of the volume's rows.",
		volSize>>20, fileSize>>20, fileSize>>20))
}

// transportFloor serves a file in memory through the volume's transport,
// raw: `ferry volume serve` (no clone, no LUKS2 view, no disk behind it)
// → its FUSE file → a loop device with direct I/O. fio on the device
// measures what FUSE and the loop device allow on this kernel.
func transportFloor(b *testing.B, s *suite, size int64) (string, func()) {
	b.Helper()
	ctx := context.Background()
	dir, err := os.MkdirTemp("/dev/shm", "ferry-bench-transport-")
	if err != nil {
		b.Fatal(err)
	}
	data := filepath.Join(dir, "data")
	if err := os.WriteFile(data, nil, 0o600); err != nil {
		b.Fatal(err)
	}
	if err := os.Truncate(data, size); err != nil {
		b.Fatal(err)
	}
	cfg := userspace.Config{VolumeID: "transport", DataPath: data, Raw: true,
		MountDir: filepath.Join(s.dir, "transport-fuse"), Socket: filepath.Join(s.dir, "transport.sock")}
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
