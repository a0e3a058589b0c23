package bench

import (
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath/userspace"
	"github.com/ferry-dev/ferry/dmclone"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/iscsi"
)

// The region size and tunables the agent uses (agent.cloneConfig).
const agentRegion = 4096

func denseSize() int64 {
	if quick {
		return 128 << 20
	}
	return 1 << 30
}

// makeDense writes a file of random bytes (incompressible, no holes).
func makeDense(b *testing.B, path string, size int64) {
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if _, err := io.CopyN(f, rand.Reader, size); err != nil {
		b.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
}

// hydrate runs ferry's clone engine with lun as the source into a fresh
// sparse file until every region is hydrated, sampling progress. fg, if
// set, runs against the engine while it hydrates and is stopped at the end.
// openEngine opens a clone of lun into dst with the agent's region size
// and tunables.
func openEngine(b *testing.B, lun, dst blockdev.Device, meta string) *dmclone.Engine {
	return openEngineWith(b, lun, dst, meta, dmclone.DefaultTunables(agentRegion))
}

func openEngineWith(b *testing.B, lun, dst blockdev.Device, meta string, tun dmclone.Tunables) *dmclone.Engine {
	eng, err := dmclone.Open(zerolog.Nop(), dmclone.Config{Source: lun, Dest: dst, MetaPath: meta,
		RegionSize: agentRegion, Tunables: tun})
	if err != nil {
		b.Fatal(err)
	}
	return eng
}

// hydrateInto hydrates dst from lun with the agent's tunables and returns
// when the engine is done.
func hydrateInto(b *testing.B, lun, dst blockdev.Device, meta string) (time.Duration, dmclone.Progress) {
	eng := openEngine(b, lun, dst, meta)
	defer eng.Close()
	start := time.Now()
	if err := eng.EnableHydration(); err != nil {
		b.Fatal(err)
	}
	select {
	case <-eng.Done():
	case <-time.After(30 * time.Minute):
		b.Fatalf("hydration did not finish in 30 minutes: %+v", eng.Progress())
	}
	return time.Since(start), eng.Progress()
}

// discardDevice is a destination that throws writes away and reads zeros.
type discardDevice struct{ size int64 }

func (d discardDevice) ReadAt(p []byte, off int64) (int, error) {
	if err := blockdev.CheckRange(off, len(p), d.size); err != nil {
		return 0, err
	}
	clear(p)
	return len(p), nil
}

func (d discardDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := blockdev.CheckRange(off, len(p), d.size); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (d discardDevice) Size() int64                { return d.size }
func (d discardDevice) Discard(off, n int64) error { return nil }
func (d discardDevice) Flush() error               { return nil }
func (d discardDevice) Close() error               { return nil }

// directDest creates a sparse destination file of size at path and opens
// it as the volume server gives it to its engine (O_DIRECT, allocated
// ahead in chunks), where the work directory's filesystem takes O_DIRECT.
// close releases both handles.
func directDest(b *testing.B, path string, size int64) (dst blockdev.Device, close func()) {
	file, err := blockdev.CreateSparse(path, size)
	if err != nil {
		b.Fatal(err)
	}
	d, err := blockdev.OpenDirect(file, false)
	if err != nil {
		b.Logf("the destination is written through the page cache: %v", err)
		return file, func() { file.Close() }
	}
	if err := d.AllocateAhead(userspace.AllocateChunk); err != nil {
		b.Fatal(err)
	}
	return d, func() { d.Close(); file.Close() }
}

// copyToDirect hydrates a dense src into a fresh O_DIRECT destination at
// base+".dest" (meta at base+".meta") as the volume server would, timed
// until the bytes are on the disk, with the CPU it kept busy; both files
// are removed after.
func copyToDirect(b *testing.B, name string, src blockdev.Device, base string) (float64, cpuUse) {
	c0 := readCPU(b)
	dst, closeDst := directDest(b, base+".dest", src.Size())
	took, p := hydrateInto(b, src, dst, base+".meta")
	took += timeSync()
	u := readCPU(b).since(c0)
	closeDst()
	os.Remove(base + ".dest")
	os.Remove(base + ".meta")
	if p.FetchedBytes < src.Size()*9/10 {
		b.Fatalf("%s fetched %d of %d dense bytes", name, p.FetchedBytes, src.Size())
	}
	return mibps(p.FetchedBytes, took), u
}

func hydrate(b *testing.B, lun blockdev.Device, dest string, fg func(eng *dmclone.Engine, stop <-chan struct{})) (time.Duration, dmclone.Progress, []point) {
	dst, closeDst := directDest(b, dest, lun.Size())
	defer closeDst()
	eng := openEngine(b, lun, dst, dest+".meta")
	defer eng.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	if fg != nil {
		fg(eng, nil) // prepare (nil stop): e.g. hydrate its hot set by writing it
		wg.Add(1)
		go func() { defer wg.Done(); fg(eng, stop) }()
	}
	start := time.Now()
	if err := eng.EnableHydration(); err != nil {
		b.Fatal(err)
	}
	var pts []point
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	timeout := time.After(30 * time.Minute)
loop:
	for {
		p := eng.Progress()
		pts = append(pts, point{time.Since(start).Seconds(), float64(p.HydratedRegions * p.RegionSize)})
		select {
		case <-eng.Done():
			break loop
		case <-tick.C:
		case <-timeout:
			b.Fatalf("hydration did not finish in 30 minutes: %+v", eng.Progress())
		}
	}
	took := time.Since(start)
	close(stop)
	wg.Wait()
	p := eng.Progress()
	pts = append(pts, point{took.Seconds(), float64(p.HydratedRegions * p.RegionSize)})
	return took, p, pts
}

func exportFerry(b *testing.B, dir, path string) (*iscsi.Export, *iscsi.LUN) {
	return exportFerryTLS(b, dir, path, nil)
}

// benchPKI is a cluster CA with two workers' certificates, as the agents
// hold them: the source's export admits only the target's certificate.
type benchPKI struct {
	gate   *iscsi.GateTLS
	client *tls.Config
}

func newBenchPKI(b *testing.B, dir string) *benchPKI {
	ca, tlsDir := filepath.Join(dir, "ca"), filepath.Join(dir, "tls")
	if err := tlsutil.InitCA(ca); err != nil {
		b.Fatal(err)
	}
	for _, n := range []string{"source", "target"} {
		if _, err := tlsutil.Issue(ca, tlsDir, n, tlsutil.KindWorker, []string{"127.0.0.1"}, tlsutil.IssueOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	gate, err := iscsi.GateTLSFromDir(tlsDir, "source", "target")
	if err != nil {
		b.Fatal(err)
	}
	client, err := tlsutil.PeerClientConfig(tlsDir, "target", tlsutil.Identity{Name: "source", Kind: tlsutil.KindWorker})
	if err != nil {
		b.Fatal(err)
	}
	return &benchPKI{gate: gate, client: client}
}

// exportFerryTLS is exportFerry with the gate speaking mutual TLS when pki
// is set, as between two agents.
func exportFerryTLS(b *testing.B, dir, path string, pki *benchPKI) (*iscsi.Export, *iscsi.LUN) {
	ecfg := iscsi.ExportConfig{Path: path, Listen: "127.0.0.1:0",
		Allow: []string{"127.0.0.1"}, IQN: fmt.Sprintf("iqn.2026-11.dev.ferry:bench-%d", time.Now().UnixNano()), StateDir: filepath.Join(dir, "export-"+filepath.Base(path))}
	icfg := iscsi.InitiatorConfig{}
	if pki != nil {
		ecfg.TLS, icfg.TLS = pki.gate, pki.client
	}
	exp, err := iscsi.StartExport(b.Context(), zerolog.Nop(), ecfg)
	if err != nil {
		b.Fatalf("ferry export: %v", err)
	}
	icfg.Portal, icfg.IQN = exp.Portal(), exp.IQN()
	lun, err := iscsi.Dial(b.Context(), zerolog.Nop(), icfg)
	if err != nil {
		exp.Stop()
		b.Fatalf("dial ferry export: %v", err)
	}
	return exp, lun
}

func freePort(b *testing.B) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startTgtd serves path as LUN 1 with Debian's tgt; stop() ends it.
func startTgtd(b *testing.B, dir, path string) (portal, iqn string, stop func()) {
	port := freePort(b)
	n, _ := rand.Int(rand.Reader, big.NewInt(30000))
	ctl := strconv.Itoa(1000 + int(n.Int64()))
	portal = fmt.Sprintf("127.0.0.1:%d", port)
	iqn = fmt.Sprintf("iqn.2026-11.dev.ferry.bench:tgtd%d", port)
	logf, err := os.Create(filepath.Join(dir, "tgtd.log"))
	if err != nil {
		b.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command("tgtd", "-f", "--control-port", ctl, "--iscsi", "portal="+portal)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		b.Fatalf("tgtd: %v", err)
	}
	stop = func() {
		exec.Command("tgtadm", "-C", ctl, "--op", "delete", "--mode", "system").Run()
		cmd.Process.Kill()
		cmd.Wait()
	}
	adm := func(args ...string) {
		var out []byte
		var err error
		for i := 0; i < 50; i++ {
			out, err = exec.Command("tgtadm", append([]string{"-C", ctl, "--lld", "iscsi"}, args...)...).CombinedOutput()
			if err == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		stop()
		b.Fatalf("tgtadm %v: %v: %s", args, err, out)
	}
	adm("--op", "new", "--mode", "target", "--tid", "1", "-T", iqn)
	adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", path)
	adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
	return portal, iqn, stop
}

// hydrationGoal is dense hydration's goal, a fraction of cp's rate.
const hydrationGoal = 0.9

// benchHydration: a dense volume hydrated by ferry (export -> initiator ->
// clone engine, over loopback TCP), next to the raw file copy on the same
// disk (the limit) and to peers doing the same job: ferry's engine reading
// it through Debian's tgt, and qemu-img convert reading the file through
// qemu-nbd. ferry, cp and tgt run in turns, the order rotating every round,
// so all see the same load on a shared machine; each ratio is the median
// of its per-round ratios.
func benchHydration(b *testing.B, s *suite) {
	size := denseSize()
	dir := b.TempDir()
	src := filepath.Join(dir, "dense")
	makeDense(b, src, size)
	label := fmt.Sprintf("%d MiB", size>>20)
	if size >= 1<<30 {
		label = fmt.Sprintf("%d GiB", size>>30)
	}

	// The limit: a raw copy of the same file on the same disk.
	runCp := func() (float64, cpuUse) {
		dropCaches()
		c0 := readCPU(b)
		t0 := time.Now()
		if out, err := exec.Command("cp", "--sparse=never", src, filepath.Join(dir, "raw.copy")).CombinedOutput(); err != nil {
			b.Fatalf("cp: %v %s", err, out)
		}
		exec.Command("sync").Run()
		raw := time.Since(t0)
		u := readCPU(b).since(c0)
		os.Remove(filepath.Join(dir, "raw.copy"))
		return mibps(size, raw), u
	}
	// ferry: its export, its initiator, its engine.
	var ferryPts []point
	runFerry := func() (float64, cpuUse) {
		dropCaches()
		exp, lun := exportFerry(b, dir, src)
		c0 := readCPU(b)
		took, p, pts := hydrate(b, lun, filepath.Join(dir, "ferry.dest"), nil)
		took += timeSync() // as for cp: until the bytes are on the disk
		u := readCPU(b).since(c0)
		lun.Close()
		exp.Stop()
		os.Remove(filepath.Join(dir, "ferry.dest"))
		os.Remove(filepath.Join(dir, "ferry.dest.meta")) // or the next round finds it all hydrated
		if p.FetchedBytes < size*9/10 {
			b.Fatalf("ferry fetched %d of %d dense bytes", p.FetchedBytes, size)
		}
		ferryPts = pts
		return mibps(p.FetchedBytes, took), u
	}
	// ferry as two agents run it: the gate speaks mutual TLS (the source
	// admits only the target's certificate), so the gate reads, encrypts
	// and writes every byte instead of splicing it, and the initiator
	// decrypts it.
	pki := newBenchPKI(b, dir)
	runTLS := func() (float64, cpuUse) {
		dropCaches()
		exp, lun := exportFerryTLS(b, dir, src, pki)
		defer exp.Stop()
		defer lun.Close()
		return copyToDirect(b, "ferry over TLS", lun, filepath.Join(dir, "tls"))
	}
	// ferry's network leg alone: the same export, initiator and engine, with
	// a destination that throws the bytes away. What moving the source
	// through gotgt, the gate and loopback TCP allows, with no copy into the
	// destination's page cache: the ceiling of ferry's hydration here.
	runNet := func() (float64, cpuUse) {
		dropCaches()
		exp, lun := exportFerry(b, dir, src)
		c0 := readCPU(b)
		took, p := hydrateInto(b, lun, discardDevice{lun.Size()}, filepath.Join(dir, "net.meta"))
		u := readCPU(b).since(c0)
		lun.Close()
		exp.Stop()
		os.Remove(filepath.Join(dir, "net.meta"))
		if p.FetchedBytes < size*9/10 {
			b.Fatalf("ferry's network leg fetched %d of %d dense bytes", p.FetchedBytes, size)
		}
		return mibps(p.FetchedBytes, took), u
	}
	// ferry's disk leg alone: the same engine and destination, the source
	// file read in place (through the page cache, read ahead sequentially
	// as the export does) with no export or network between. What this
	// disk gives a copy of ferry's shape (parallel batches, each read then
	// written with O_DIRECT) where cp streams one buffered copy.
	runDisk := func() (float64, cpuUse) {
		dropCaches()
		f, err := blockdev.OpenFile(src, true)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		_ = unix.Fadvise(int(f.Fd()), 0, size, unix.FADV_SEQUENTIAL)
		// Hidden behind the Device interface, or the engine would copy
		// file to file in the kernel (copy_file_range), not as it does
		// from an export.
		return copyToDirect(b, "ferry's disk leg", struct{ blockdev.Device }{f}, filepath.Join(dir, "disk"))
	}
	// Peer 1: Debian's tgt serving the file, read by ferry's initiator into the same engine.
	_, tgtErr := exec.LookPath("tgtd")
	var tgtPts []point
	runTgt := func() (float64, cpuUse) {
		dropCaches()
		portal, iqn, stop := startTgtd(b, dir, src)
		defer stop()
		tl, err := iscsi.Dial(b.Context(), zerolog.Nop(), iscsi.InitiatorConfig{Portal: portal, IQN: iqn, LUN: 1})
		if err != nil {
			b.Fatalf("dial tgtd: %v", err)
		}
		c0 := readCPU(b)
		ttook, tp, pts := hydrate(b, tl, filepath.Join(dir, "tgt.dest"), nil)
		ttook += timeSync()
		u := readCPU(b).since(c0)
		tl.Close()
		os.Remove(filepath.Join(dir, "tgt.dest"))
		os.Remove(filepath.Join(dir, "tgt.dest.meta"))
		tgtPts = pts
		return mibps(tp.FetchedBytes, ttook), u
	}
	type contender struct {
		name string
		run  func() (float64, cpuUse)
		got  []float64
		cpu  []cpuUse
	}
	cs := []*contender{{name: "ferry", run: runFerry}, {name: "cp", run: runCp}, {name: "ferry's network leg", run: runNet},
		{name: "ferry over mutual TLS", run: runTLS}, {name: "ferry's disk leg", run: runDisk}}
	if tgtErr == nil {
		cs = append(cs, &contender{name: "tgtd", run: runTgt})
	}
	rounds := 5
	if quick {
		rounds = 3
	}
	for r := 0; r < rounds; r++ {
		for i := range cs {
			c := cs[(r+i)%len(cs)]
			rate, u := c.run()
			c.got, c.cpu = append(c.got, rate), append(c.cpu, u)
			b.Logf("round %d: %s %.0f MiB/s, %.2f cores busy, %.2f core-s per GiB", r, c.name, c.got[len(c.got)-1], u.cores, u.coreSec/(float64(size)/(1<<30)))
		}
	}
	ferry, cp, net := cs[0].got, cs[1].got, cs[2].got
	ratioOf := func(num, ref []float64) float64 {
		rs := make([]float64, len(num))
		for i := range num {
			rs[i] = num[i] / ref[i]
		}
		return medianF(rs)
	}
	ratio := func(ref []float64) float64 { return ratioOf(ferry, ref) }
	ferryRate := medianF(ferry)
	// What bounds each copy: the cores it kept busy (the whole machine's,
	// from /proc/stat) and the CPU time it spent per GiB.
	cpuNote := func(c *contender) string {
		var cores, perGiB []float64
		for _, u := range c.cpu {
			cores, perGiB = append(cores, u.cores), append(perGiB, u.coreSec/(float64(size)/(1<<30)))
		}
		return fmt.Sprintf("%s %.2f of %d cores busy, %.2f core-s per GiB", c.name, medianF(cores), runtime.NumCPU(), medianF(perGiB))
	}
	cpuNotes := []string{}
	for _, c := range cs {
		cpuNotes = append(cpuNotes, cpuNote(c))
	}
	s.plot("dense.svg", series{"ferry: export + initiator + clone engine", ferryPts})
	s.plot("contended.svg", series{"ferry, idle machine", ferryPts})
	s.add(row{"hydration, dense " + label + ": ferry vs raw copy (limit)", fmt.Sprintf("%.0f MiB/s", ferryRate),
		fmt.Sprintf("cp: %.0f MiB/s", medianF(cp)), fmt.Sprintf("%.2f", ratio(cp)),
		fmt.Sprintf("loopback iSCSI, 4 KiB regions, page cache dropped; median of %d alternating rounds; CPU (whole machine, medians): %s", rounds, strings.Join(cpuNotes, "; "))})
	s.add(row{"hydration, dense " + label + ": ferry's network leg alone (no destination) vs raw copy", fmt.Sprintf("%.0f MiB/s", medianF(net)),
		fmt.Sprintf("cp: %.0f MiB/s", medianF(cp)), fmt.Sprintf("%.2f", ratioOf(net, cp)),
		fmt.Sprintf("the ceiling of the row above: export, gate, loopback TCP, initiator and engine, the bytes thrown away; %s; ferry with its destination reached %.2f of it; "+
			"at %.1f× cp's rate the machine's %d cores allow %.2f core-s per GiB", cpuNote(cs[2]), ratioOf(ferry, net),
			hydrationGoal, runtime.NumCPU(), float64(runtime.NumCPU())*1024/(hydrationGoal*medianF(cp)))})
	s.add(row{"hydration, dense " + label + ": ferry's disk leg alone (no network) vs raw copy", fmt.Sprintf("%.0f MiB/s", medianF(cs[4].got)),
		fmt.Sprintf("cp: %.0f MiB/s", medianF(cp)), fmt.Sprintf("%.2f", ratioOf(cs[4].got, cp)),
		fmt.Sprintf("the other ceiling of ferry's row: the same engine and O_DIRECT destination, the source file read in place (page cache, sequential read-ahead) with no export or network; ferry reached %.2f of it; %s", ratioOf(ferry, cs[4].got), cpuNote(cs[4]))})
	s.add(row{"hydration, dense " + label + ": ferry over mutual TLS (as between agents) vs raw copy", fmt.Sprintf("%.0f MiB/s", medianF(cs[3].got)),
		fmt.Sprintf("cp: %.0f MiB/s", medianF(cp)), fmt.Sprintf("%.2f", ratioOf(cs[3].got, cp)),
		fmt.Sprintf("the first row with the gate and the initiator speaking TLS 1.3, as the agents do (the rows above splice plain TCP); %.2f of plain ferry; %s", ratioOf(cs[3].got, ferry), cpuNote(cs[3]))})
	if tgtErr == nil {
		tgt := cs[5].got
		s.plot("dense.svg", series{"tgt export + ferry initiator + engine", tgtPts})
		s.add(row{"hydration, dense " + label + ": ferry vs tgt + ferry's initiator", fmt.Sprintf("%.0f MiB/s", ferryRate),
			fmt.Sprintf("tgtd: %.0f MiB/s", medianF(tgt)), fmt.Sprintf("%.2f", ratio(tgt)),
			fmt.Sprintf("same initiator and engine; only the target differs; median of %d alternating rounds", rounds)})
	} else {
		s.add(row{"hydration, dense: tgt peer", "", "skipped", "", "needs tgtd (apt-get install tgt)"})
	}

	// Peer 2: qemu-img convert reading through qemu-nbd over TCP (this
	// kernel has no NBD module, so the client side is qemu's own).
	if _, err := exec.LookPath("qemu-nbd"); err == nil {
		dropCaches()
		port := freePort(b)
		pidf := filepath.Join(dir, "qemu-nbd.pid")
		if out, err := exec.Command("qemu-nbd", "--fork", "--persistent", "--read-only", "--format=raw", "--bind=127.0.0.1",
			"--port="+strconv.Itoa(port), "--pid-file="+pidf, src).CombinedOutput(); err != nil {
			b.Fatalf("qemu-nbd: %v %s", err, out)
		}
		killNBD := func() {
			if pb, err := os.ReadFile(pidf); err == nil {
				if pid, err := strconv.Atoi(strings.TrimSpace(string(pb))); err == nil {
					if pr, err := os.FindProcess(pid); err == nil {
						pr.Kill()
					}
				}
			}
		}
		t0 := time.Now()
		out, err := exec.Command("qemu-img", "convert", "-f", "raw", "-O", "raw", fmt.Sprintf("nbd://127.0.0.1:%d", port), filepath.Join(dir, "qemu.dest")).CombinedOutput()
		exec.Command("sync").Run()
		qtook := time.Since(t0)
		killNBD()
		if err != nil {
			b.Fatalf("qemu-img convert: %v %s", err, out)
		}
		os.Remove(filepath.Join(dir, "qemu.dest"))
		qRate := mibps(size, qtook)
		s.add(row{"hydration, dense " + label + ": ferry vs qemu-img over qemu-nbd (one run)", fmt.Sprintf("%.0f MiB/s", ferryRate),
			fmt.Sprintf("qemu-img: %.0f MiB/s", qRate), fmt.Sprintf("%.2f", ferryRate/qRate), "a full copy job (no clone: nothing usable before it ends)"})
	} else {
		s.add(row{"hydration, dense: qemu-nbd peer", "", "skipped", "", "needs qemu-nbd (apt-get install qemu-utils)"})
	}
	s.notes = append(s.notes, "Hydration: a file of random bytes on the work disk is the source; each contender copies it to a fresh file on the same disk (ferry's engine writes it with O_DIRECT, as the volume server does; cp through the page cache), page cache dropped before each, ferry, cp and tgt taking turns; rate = bytes / time until the last byte is on the destination (engine Done, or the copy command's exit, then sync).")
	s.notes = append(s.notes, "Hydration ratios depend on what bounds the machine during the run (the cores, the disk or the network): the rows for ferry's network leg and disk leg, measured in the same rounds, show which side held it back in this run. The per-round figures are in the -v output. The CPU figures are the whole machine's (/proc/stat) over each copy's timed part: the cores kept busy on average and the busy core-seconds per GiB copied (ferry's include its export child, the kernel's TCP on both ends and the page cache; cp's copy stays in the kernel). ferry's network leg alone is ferry's hydration into a destination that throws the bytes away (no write, no page cache): what the source's read, the export, the gate, loopback TCP twice, the initiator and the engine's bookkeeping allow; with its CPU per GiB next to the budget the goal leaves (every core busy at the goal's rate), it shows whether the cores are the wall. ferry's disk leg alone is the same engine copying the source file in place into the same O_DIRECT destination, with no export and no network: where ferry comes near it, moving the bytes costs little and what remains is how the disk takes ferry's copy (parallel batches, each read then written with O_DIRECT) against cp's single buffered stream, written back at its end.")
}

// cpuUse is the machine's CPU use over an interval.
type cpuUse struct {
	cores   float64 // busy cores on average (of runtime.NumCPU())
	coreSec float64 // busy core-seconds
}

// cpuStat is /proc/stat's first line: busy and all jiffies of every core.
type cpuStat struct{ busy, total float64 }

func readCPU(b *testing.B) cpuStat {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		b.Fatal(err)
	}
	line, _, _ := strings.Cut(string(raw), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		b.Fatalf("/proc/stat: unexpected first line %q", line)
	}
	var st cpuStat
	for i, v := range f[1:8] { // user nice system idle iowait irq softirq
		n, err := strconv.ParseFloat(v, 64)
		if err != nil {
			b.Fatalf("/proc/stat: %q: %v", line, err)
		}
		st.total += n
		if i != 3 && i != 4 {
			st.busy += n
		}
	}
	return st
}

// since is the use from c0 to st; jiffies are 1/100 s (USER_HZ).
func (st cpuStat) since(c0 cpuStat) cpuUse {
	dt := st.total - c0.total
	if dt <= 0 {
		return cpuUse{}
	}
	busy := st.busy - c0.busy
	return cpuUse{cores: busy / dt * float64(runtime.NumCPU()), coreSec: busy / 100}
}

// benchContended: the same ferry hydration while a saturating foreground
// workload (4 threads of random 4 KiB reads and writes, as fast as they go)
// runs on the clone. dm-clone documents that it pauses background
// hydration while user I/O is in flight; ferry reserves a share for it.
func benchContended(b *testing.B, s *suite) {
	size := denseSize()
	dir := b.TempDir()
	src := filepath.Join(dir, "dense")
	makeDense(b, src, size)
	const hot = 64 << 20
	var ops atomic.Int64
	fg := func(eng *dmclone.Engine, stop <-chan struct{}) {
		if stop == nil {
			// Hydrate the hot set by writing it whole: the workload then never
			// touches the source, it only competes for the clone.
			buf := make([]byte, 1<<20)
			for off := int64(0); off < hot; off += int64(len(buf)) {
				if _, err := eng.WriteAt(buf, off); err != nil {
					b.Error(err)
				}
			}
			return
		}
		var wg sync.WaitGroup
		for g := 0; g < 4; g++ {
			wg.Add(1)
			go func(seed int64) {
				defer wg.Done()
				rng := mrand.New(mrand.NewSource(seed))
				buf := make([]byte, 4096)
				for {
					select {
					case <-stop:
						return
					default:
					}
					off := rng.Int63n(hot/4096) * 4096
					if rng.Intn(2) == 0 {
						eng.ReadAt(buf, off)
					} else {
						eng.WriteAt(buf, off)
					}
					ops.Add(1)
				}
			}(int64(g))
		}
		wg.Wait()
	}
	dropCaches()
	exp, lun := exportFerry(b, dir, src)
	took, p, pts := hydrate(b, lun, filepath.Join(dir, "contended.dest"), fg)
	lun.Close()
	exp.Stop()
	bg := p.FetchedBytes
	rate := mibps(bg, took)
	s.plot("contended.svg", series{fmt.Sprintf("ferry, saturating foreground (%.0f k IOPS)", float64(ops.Load())/took.Seconds()/1000), pts})
	// The idle figure is the dense case's (same path, same size): plain
	// ferry's row, not the network leg's or the TLS one's.
	idle := 0.0
	for _, r := range s.rows {
		if strings.HasPrefix(r.Bench, "hydration, dense") && strings.Contains(r.Bench, ": ferry vs raw copy") {
			fmt.Sscanf(r.Ferry, "%f", &idle)
		}
	}
	ratio := ""
	if idle > 0 {
		ratio = fmt.Sprintf("%.2f", rate/idle)
	}
	s.add(row{"background hydration under a saturating workload", fmt.Sprintf("%.0f MiB/s (%.0f k fg IOPS)", rate, float64(ops.Load())/took.Seconds()/1000),
		fmt.Sprintf("idle: %.0f MiB/s; dm-clone: pauses (quoted, not measured)", idle), ratio + " of idle", "dm-clone's figure is a quote from its documentation, not a measurement: it pauses background hydration while user I/O is in flight"})
	benchDemandReads(b, s, dir, src, size)
	s.notes = append(s.notes, "Contended: 4 threads of random 4 KiB reads and writes on an already-hydrated 64 MiB hot set of the clone, as fast as they go, for the whole hydration; ferry's background copy keeps its reserved share of the source slots (MinShare). Quoted, not measured (dm-clone needs a kernel module the suite's host lacks), from the Linux kernel's dm-clone documentation: it \"takes into account user I/O traffic going to the devices and pauses the background hydration when there is I/O in-flight\".")
}

// demandReads is what a running machine waits for when it reads a block
// not hydrated yet: one 4 KiB read of a random block of a fresh clone of
// src every 2 ms, for up to 1.5 s, with the background hydration on (until
// it ends) or off. It returns the latencies, sorted.
func demandReads(b *testing.B, dir, src string, size int64, hydrating bool, seed int64) []time.Duration {
	return demandReadsEvery(b, dir, src, size, hydrating, seed, 2*time.Millisecond, 1500*time.Millisecond, dmclone.DefaultTunables(agentRegion))
}

// demandReadsEvery is demandReads with one read every interval, for up to
// span, with the engine's tunables tun.
func demandReadsEvery(b *testing.B, dir, src string, size int64, hydrating bool, seed int64, interval, span time.Duration, tun dmclone.Tunables) []time.Duration {
	dropCaches()
	exp, lun := exportFerry(b, dir, src)
	defer exp.Stop()
	defer lun.Close()
	dst, closeDst := directDest(b, filepath.Join(dir, "demand.dest"), size)
	defer os.Remove(filepath.Join(dir, "demand.dest.meta"))
	defer os.Remove(filepath.Join(dir, "demand.dest"))
	defer closeDst()
	eng := openEngineWith(b, lun, dst, filepath.Join(dir, "demand.dest.meta"), tun)
	defer eng.Close()
	if hydrating {
		if err := eng.EnableHydration(); err != nil {
			b.Fatal(err)
		}
	}
	rng := mrand.New(mrand.NewSource(seed))
	buf := make([]byte, 4096)
	var lat []time.Duration
	end := time.After(span)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-end:
			slices.Sort(lat)
			return lat
		case <-eng.Done():
			if hydrating {
				slices.Sort(lat)
				return lat
			}
		case <-tick.C:
		}
		off := rng.Int63n(size/4096) * 4096
		t := time.Now()
		if _, err := eng.ReadAt(buf, off); err != nil {
			b.Fatalf("demand read at %d: %v", off, err)
		}
		lat = append(lat, time.Since(t))
	}
}

// benchDemandReads: a running machine's reads of blocks not hydrated yet,
// during the background hydration against with it off, three rounds each.
func benchDemandReads(b *testing.B, s *suite, dir, src string, size int64) {
	var idle, busy []time.Duration
	for r := int64(0); r < 3; r++ {
		idle = append(idle, demandReads(b, dir, src, size, false, r)...)
		busy = append(busy, demandReads(b, dir, src, size, true, r)...)
	}
	slices.Sort(idle)
	slices.Sort(busy)
	q := func(v []time.Duration, f float64) time.Duration {
		return v[min(len(v)-1, int(f*float64(len(v))))].Round(10 * time.Microsecond)
	}
	if len(idle) == 0 || len(busy) == 0 {
		b.Fatalf("no demand reads sampled (%d idle, %d during hydration)", len(idle), len(busy))
	}
	s.add(row{"a running machine's 4 KiB read of a block not yet hydrated, during hydration (p50 / p99)",
		fmt.Sprintf("%v / %v", q(busy, 0.5), q(busy, 0.99)), fmt.Sprintf("hydration off: %v / %v", q(idle, 0.5), q(idle, 0.99)),
		fmt.Sprintf("%.1f× (p50)", float64(q(busy, 0.5))/float64(q(idle, 0.5))),
		fmt.Sprintf("a fresh clone of the dense source, page cache dropped; one read of a random block every 2 ms, %d during hydration and %d with it off, in 3 alternating rounds; during hydration the background copy shares the source's disk, the sessions and the two cores", len(busy), len(idle))})

	// What the idle batches cost: a machine that reads a cold block only
	// now and then (each read after more than IdleAfter without I/O) finds
	// the idle batches' copies in flight; the same reads with them off.
	interval := dmclone.IdleAfter + 50*time.Millisecond
	on, off := dmclone.DefaultTunables(agentRegion), dmclone.DefaultTunables(agentRegion)
	off.IdleBatchRegions = 0
	var withIdle, without []time.Duration
	for r := int64(0); r < 4; r++ {
		withIdle = append(withIdle, demandReadsEvery(b, dir, src, size, true, 10+r, interval, 3*time.Second, on)...)
		without = append(without, demandReadsEvery(b, dir, src, size, true, 10+r, interval, 3*time.Second, off)...)
	}
	slices.Sort(withIdle)
	slices.Sort(without)
	if len(withIdle) == 0 || len(without) == 0 {
		b.Fatalf("no sparse demand reads sampled (%d with idle batches, %d without)", len(withIdle), len(without))
	}
	s.add(row{"a machine's occasional 4 KiB read of a block not yet hydrated, during hydration (p50 / max)",
		fmt.Sprintf("%v / %v", q(withIdle, 0.5), withIdle[len(withIdle)-1].Round(10*time.Microsecond)),
		fmt.Sprintf("idle batches off: %v / %v", q(without, 0.5), without[len(without)-1].Round(10*time.Microsecond)),
		fmt.Sprintf("%.1f× (p50)", float64(q(withIdle, 0.5))/float64(q(without, 0.5))),
		fmt.Sprintf("the cost of the idle batches: one read every %v (longer than IdleAfter, so the background copies have grown to %d MiB when it comes), %d with idle batches and %d without, in 4 alternating rounds, until hydration ends",
			interval, on.IdleBatchRegions*agentRegion>>20, len(withIdle), len(without))})
}

// timeSync runs sync(1) and returns how long it took.
func timeSync() time.Duration {
	t0 := time.Now()
	exec.Command("sync").Run()
	return time.Since(t0)
}

func medianF(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// benchExport: libiscsi's iscsi-perf (one session, 32 commands of 1 MiB in
// flight, sequential) reading ferry's export and Debian's tgtd serving the
// same file, in turns, order swapped every round; the ratio is the median
// of the per-round ratios. The file is page-cached: this measures the
// targets, not the disk.
func benchExport(b *testing.B, s *suite) {
	if _, err := exec.LookPath("iscsi-perf"); err != nil {
		s.add(row{"export, iscsi-perf QD32 1 MiB", "", "skipped", "", "needs iscsi-perf (apt-get install libiscsi-bin)"})
		return
	}
	if _, err := exec.LookPath("tgtd"); err != nil {
		s.add(row{"export, iscsi-perf QD32 1 MiB", "", "skipped", "", "needs tgtd (apt-get install tgt)"})
		return
	}
	dir := b.TempDir()
	src := filepath.Join(dir, "lun")
	makeDense(b, src, 512<<20)
	exp, lun := exportFerry(b, dir, src)
	lun.Close()
	defer exp.Stop()
	portal, iqn, stop := startTgtd(b, dir, src)
	defer stop()
	ferryURL := fmt.Sprintf("iscsi://%s/%s/0", exp.Portal(), exp.IQN())
	tgtURL := fmt.Sprintf("iscsi://%s/%s/1", portal, iqn)
	// gotgt alone: iscsi-perf inside the export child's network namespace,
	// straight to gotgt's port, without the gate.
	gotgtURL := fmt.Sprintf("iscsi://127.0.0.1:%d/%s/0", iscsi.GotgtPort, exp.IQN())
	perf := func(url string, inChild bool) float64 {
		args := []string{"iscsi-perf", "-t", "3", "-m", "32", "-b", "2048", url}
		if inChild {
			args = append([]string{"nsenter", "-t", strconv.Itoa(exp.PID()), "-n"}, args...)
		}
		out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
		m := perfAverage.FindSubmatch(out)
		if err != nil || m == nil {
			b.Fatalf("%v: %v\n%s", args, err, out)
		}
		v, _ := strconv.ParseFloat(string(m[1]), 64)
		return v * (1 << 20) / 1e6
	}
	rounds := 8
	if quick {
		rounds = 4
	}
	type side struct {
		url     string
		inChild bool
		got     []float64
	}
	sides := []*side{{url: ferryURL}, {url: tgtURL}, {url: gotgtURL, inChild: true}}
	var rs, gs, gates []float64
	for r := 0; r < rounds; r++ {
		for i := range sides {
			sd := sides[(r+i)%len(sides)]
			sd.got = append(sd.got, perf(sd.url, sd.inChild))
		}
		f, t, g := sides[0].got[r], sides[1].got[r], sides[2].got[r]
		rs, gs, gates = append(rs, f/t), append(gs, g/t), append(gates, f/g)
		b.Logf("round %d: ferry %.0f MB/s, tgtd %.0f MB/s, gotgt without the gate %.0f MB/s", r, f, t, g)
	}
	s.add(row{"export, iscsi-perf QD32 1 MiB: ferry vs tgtd", fmt.Sprintf("%.0f MB/s", medianF(sides[0].got)),
		fmt.Sprintf("tgtd: %.0f MB/s", medianF(sides[1].got)), fmt.Sprintf("%.2f", medianF(rs)),
		fmt.Sprintf("libiscsi, one session, page-cached 512 MiB file; median of %d rotating 3 s runs; gotgt alone "+
			"(iscsi-perf inside the export's namespace, no gate): %.0f MB/s, %.2f of tgtd; ferry through its gate %.2f of gotgt alone",
			rounds, medianF(sides[2].got), medianF(gs), medianF(gates))})
}

var perfAverage = regexp.MustCompile(`\riops average \d+ \((\d+) MB/s\)`) // its "MB" is MiB

// BenchmarkHydrateFerry runs ferry's dense hydration alone, b.N times, for
// profiling (go test -cpuprofile profiles the initiator and the engine; the
// export child is a separate process: perf record -p).
//
//	go test -run '^$' -bench HydrateFerry -benchtime 3x ./integration/bench
func BenchmarkHydrateFerry(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root (the export's network namespace)")
	}
	size := denseSize()
	dir := b.TempDir()
	src := filepath.Join(dir, "dense")
	makeDense(b, src, size)
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		dropCaches()
		exp, lun := exportFerry(b, dir, src)
		took, p, _ := hydrate(b, lun, filepath.Join(dir, "ferry.dest"), nil)
		took += timeSync()
		lun.Close()
		exp.Stop()
		os.Remove(filepath.Join(dir, "ferry.dest"))
		os.Remove(filepath.Join(dir, "ferry.dest.meta"))
		b.Logf("run %d: %.0f MiB/s", i, mibps(p.FetchedBytes, took))
	}
}
