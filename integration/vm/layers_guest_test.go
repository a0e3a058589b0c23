package vm

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath/fuseexport"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/datapath/nbdexport"
	"github.com/ferry-dev/ferry/dmclone"
	"github.com/ferry-dev/ferry/internal/fio"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/luks"
)

// layersReport is where the guest leaves the table of TestGuestLayers for
// the host side to print (the share is /host in the guest).
const layersReport = "layers.md"

// TestGuestLayers proves the per-layer data path a kernel with dm-crypt and
// NBD but no dm-clone (Debian 12's) allows — ferry's userspace clone engine
// served to the kernel over NBD, kernel dm-crypt over it with the carried
// layout, ext4 on top — and measures it with fio beside the pure kernel
// path (loop → dm-crypt) and the all-userspace one (clone → LUKS view →
// FUSE → loop). The clone's source is the "source worker's" volume file;
// the machine reads its files through the clone, fstrim reaches the clone
// through dm-crypt and NBD as discards, hydration completes under the
// mount, and after the clone is dissolved the destination alone, opened by
// the kernel path, holds everything written through NBD.
func TestGuestLayers(t *testing.T) {
	testenv.Guest(t, "the test VM with dm-crypt and nbd (TestKernelPathInVM boots it)", testenv.InGuest() && nbdexport.Available())
	ctx := context.Background()
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
	dir := t.TempDir()
	const size = 96 << 20
	const fioSize = 24 << 20
	runFor := 2 * time.Second

	pass := []byte("layers-test-passphrase")
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, pass, 0o600); err != nil {
		t.Fatal(err)
	}
	image := filepath.Join(dir, "source.img")
	srcLoop := loopOf(t, image, size)
	if err := luks.Format(ctx, srcLoop, keyFile, luks.FormatOptions{MetadataSize: 16 << 10, KeyslotsSize: 4<<20 - 32<<10, FastKDF: true, SectorSize: 4096}); err != nil {
		t.Fatal(err)
	}
	carried := headerLayoutOf(t, srcLoop)
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	keep := bytes.Repeat([]byte("kept through every layer\n"), 200_000)

	// mountKernel opens dev with dm-crypt and mounts it; the returned
	// function unmounts and closes.
	mountKernel := func(dev, name string) func() {
		t.Helper()
		plain, err := luks.OpenKernel(ctx, dev, name, carried, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		guestRun(t, "mount", "-t", "ext4", plain, mnt)
		return func() {
			guestRun(t, "umount", mnt)
			guestRun(t, "e2fsck", "-fn", plain)
			if err := luks.CloseKernel(ctx, name); err != nil {
				t.Fatal(err)
			}
		}
	}
	checkKeep := func(where string) {
		t.Helper()
		got, err := os.ReadFile(filepath.Join(mnt, "keep"))
		if err != nil || !bytes.Equal(got, keep) {
			t.Fatalf("%s: the kept file reads back wrong (%v)", where, err)
		}
	}
	type result struct{ values []float64 }
	results := map[string]*result{}
	runJobs := func(path string) {
		t.Helper()
		r := &result{}
		for _, j := range fio.Jobs {
			s, err := fio.Run(ctx, filepath.Join(mnt, "fio.dat"), fioSize, j, runFor)
			if err != nil {
				t.Fatal(err)
			}
			r.values = append(r.values, j.Value(s))
		}
		results[path] = r
	}

	// The source volume: ext4 with a file, made through the kernel path,
	// and the fio file laid out, so every path reads the same blocks.
	plain, err := luks.OpenKernel(ctx, srcLoop, "layers-src", carried, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	guestRun(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", plain)
	if err := luks.CloseKernel(ctx, "layers-src"); err != nil {
		t.Fatal(err)
	}
	unmount := mountKernel(srcLoop, "layers-src")
	if err := os.WriteFile(filepath.Join(mnt, "keep"), keep, 0o644); err != nil {
		t.Fatal(err)
	}
	runJobs("kernel") // loop → dm-crypt → ext4: the reference
	unmount()
	guestRun(t, "losetup", "-d", srcLoop)

	// clone opens a userspace clone of the source volume into a new file.
	clone := func(name string) (*dmclone.Engine, *blockdev.File) {
		t.Helper()
		src, err := blockdev.OpenFile(image, true)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { src.Close() })
		dst, err := blockdev.CreateSparse(filepath.Join(dir, name+".img"), size)
		if err != nil {
			t.Fatal(err)
		}
		e, err := dmclone.Open(log, dmclone.Config{Source: src, Dest: dst, MetaPath: filepath.Join(dir, name+".meta"), RegionSize: 64 << 10})
		if err != nil {
			t.Fatal(err)
		}
		return e, dst
	}
	hydrate := func(e *dmclone.Engine) {
		t.Helper()
		if err := e.EnableHydration(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-e.Done():
		case <-time.After(3 * time.Minute):
			t.Fatalf("hydration did not end: %+v", e.Progress())
		}
	}

	// Per layer: the clone served over NBD, kernel dm-crypt over it.
	eng, dst := clone("nbd")
	nbd, err := nbdexport.Attach(ctx, log, eng, nbdexport.Options{})
	if err != nil {
		t.Fatal(err)
	}
	unmount = mountKernel(nbd.Path(), "layers-nbd")
	checkKeep("dm-crypt over the clone over NBD")
	before := eng.Progress()
	guestRun(t, "fstrim", mnt)
	after := eng.Progress()
	if after.HydratedRegions <= before.HydratedRegions {
		t.Fatalf("fstrim through dm-crypt and NBD hydrated no region without a fetch: %+v → %+v", before, after)
	}
	t.Logf("fstrim over NBD: hydrated regions %d → %d of %d", before.HydratedRegions, after.HydratedRegions, after.TotalRegions)
	hydrate(eng)
	runJobs("nbd")
	written := bytes.Repeat([]byte("written through NBD\n"), 10_000)
	if err := os.WriteFile(filepath.Join(mnt, "written"), written, 0o644); err != nil {
		t.Fatal(err)
	}
	unmount()
	if err := nbd.Close(); err != nil {
		t.Fatalf("detaching NBD: %v", err)
	}
	dissolved, err := eng.Dissolve()
	if err != nil {
		t.Fatal(err)
	}
	if err := dissolved.Close(); err != nil {
		t.Fatal(err)
	}
	_ = dst.Close()
	if err := eng.Close(); err != nil { // its metadata file; the destination is ours
		t.Fatal(err)
	}
	// The destination alone holds the volume now: the kernel path opens it.
	dstLoop := guestRun(t, "losetup", "-f", "--show", filepath.Join(dir, "nbd.img"))
	unmount = mountKernel(dstLoop, "layers-dst")
	checkKeep("the dissolved destination")
	if got, err := os.ReadFile(filepath.Join(mnt, "written")); err != nil || !bytes.Equal(got, written) {
		t.Fatalf("what was written through NBD is not in the destination: %v", err)
	}
	unmount()
	guestRun(t, "losetup", "-d", dstLoop)

	// All userspace: clone → LUKS view → FUSE → loop (direct I/O).
	eng2, _ := clone("fuse")
	view, err := luks.OpenCarriedView(eng2, carried, pass)
	if err != nil {
		t.Fatal(err)
	}
	exp, err := fuseexport.Mount(log, filepath.Join(dir, "fuse"), "disk", view)
	if err != nil {
		t.Fatal(err)
	}
	loop, err := loopdev.Attach(exp.Path(), true)
	if err != nil {
		t.Fatal(err)
	}
	guestRun(t, "mount", "-t", "ext4", loop, mnt)
	checkKeep("the userspace path")
	hydrate(eng2)
	runJobs("fuse")
	guestRun(t, "umount", mnt)
	if err := loopdev.Detach(loop); err != nil {
		t.Fatal(err)
	}
	if err := exp.Close(); err != nil {
		t.Fatal(err)
	}
	view.Close()
	eng2.Close()

	var b strings.Builder
	fmt.Fprintf(&b, "| fio (file in ext4, %d MiB, %s per run, under TCG) | kernel: loop → dm-crypt | clone → NBD → dm-crypt | ratio | clone → LUKS view → FUSE → loop | ratio |\n|---|---|---|---|---|---|\n", fioSize>>20, runFor)
	for i, j := range fio.Jobs {
		k, n, f := results["kernel"].values[i], results["nbd"].values[i], results["fuse"].values[i]
		rn, rf := n/k, f/k
		if j.P50 { // latency: lower is better; the ratio is reference over path
			rn, rf = k/n, k/f
		}
		fmt.Fprintf(&b, "| %s | %.0f %s | %.0f | %.2f | %.0f | %.2f |\n", j.Name, k, j.Unit(), n, rn, f, rf)
	}
	t.Log("\n" + b.String())
	if err := os.WriteFile(filepath.Join("/host", layersReport), []byte(b.String()), 0o644); err != nil {
		t.Logf("leaving the table for the host: %v", err)
	}
	_ = exec.Command("sync").Run()
}
