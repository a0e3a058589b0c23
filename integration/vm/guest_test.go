package vm

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/dmclone"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/luks"
)

// TestMain lets this test binary double as ferry's iSCSI export child: the
// host side of TestKernelPathInVM exports a volume with iscsi.StartExport,
// which re-executes the running binary.
func TestMain(m *testing.M) {
	maybeExecInNetNS()
	if iscsi.IsExportChild() {
		iscsi.ServeChild()
	}
	os.Exit(m.Run())
}

// guestISCSI is what the host tells the guest about the export it runs.
type guestISCSI struct {
	Portal  string      `json:"portal"` // as the guest reaches it: 10.0.2.2:<port>
	IQN     string      `json:"iqn"`
	Layout  luks.Layout `json:"layout"` // carried from the "source"
	KeyFile string      `json:"key_file"`
	Plain   string      `json:"plain"`  // the expected plaintext, over 9p
	Cipher  string      `json:"cipher"` // the exported image itself, over 9p
}

const guestISCSIFile = "iscsi.json"

// These phases run inside the VM only (FERRY_IN_VM=1), started by
// TestKernelPathInVM, which checks they passed.
func inGuest(t *testing.T) guestISCSI {
	t.Helper()
	testenv.Guest(t, "the test VM: TestKernelPathInVM boots it and runs this phase there", testenv.InGuest())
	b, err := os.ReadFile(filepath.Join("/host", guestISCSIFile))
	if err != nil {
		t.Fatalf("the host left no %s: %v", guestISCSIFile, err)
	}
	var g guestISCSI
	if err := json.Unmarshal(b, &g); err != nil {
		t.Fatal(err)
	}
	return g
}

func guestRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// sessionDisk finds the block device of the iSCSI session logged into iqn,
// through sysfs rather than by guessing /dev/sdX.
func sessionDisk(iqn string) (string, error) {
	sessions, _ := filepath.Glob("/sys/class/iscsi_session/session*")
	for _, s := range sessions {
		name, err := os.ReadFile(filepath.Join(s, "targetname"))
		if err != nil || strings.TrimSpace(string(name)) != iqn {
			continue
		}
		blocks, _ := filepath.Glob(filepath.Join(s, "device", "target*", "*", "block", "*"))
		if len(blocks) == 1 {
			return "/dev/" + filepath.Base(blocks[0]), nil
		}
		return "", fmt.Errorf("session %s has %d disks so far", filepath.Base(s), len(blocks))
	}
	return "", fmt.Errorf("no iSCSI session for %s", iqn)
}

func TestGuestISCSIKernelChain(t *testing.T) {
	g := inGuest(t)
	ctx := context.Background()
	log := zerolog.New(zerolog.NewTestWriter(t))
	node := []string{"-m", "node", "-T", g.IQN, "-p", g.Portal}

	// Discovery would return the target's own bind address, which the
	// guest cannot reach: create the node record by hand.
	guestRun(t, "iscsiadm", append(node, "-o", "new")...)
	// NOP-Outs every second: they must not stall ferry's export.
	guestRun(t, "iscsiadm", append(node, "-o", "update", "-n", "node.conn[0].timeo.noop_out_interval", "-v", "1")...)
	guestRun(t, "iscsiadm", append(node, "-o", "update", "-n", "node.conn[0].timeo.noop_out_timeout", "-v", "3")...)
	// The kernel log is shared by every guest test (an earlier test's
	// session may have ended with a connection error): judge only what is
	// logged from this login on (read and clear it now).
	guestRun(t, "dmesg", "-c")
	start := time.Now()
	guestRun(t, "iscsiadm", append(node, "--login")...)
	loggedIn := true
	t.Cleanup(func() {
		if loggedIn {
			_ = exec.Command("iscsiadm", append(node, "--logout")...).Run()
		}
	})
	var disk string
	for {
		d, err := sessionDisk(g.IQN)
		if err == nil {
			if _, serr := os.Stat(d); serr == nil {
				disk = d
				break
			}
		}
		if time.Since(start) > 20*time.Second {
			t.Fatalf("no disk for the session: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("logged in, %s after %s", disk, time.Since(start).Round(time.Millisecond))

	want, err := os.ReadFile(g.Cipher)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("the LUN (%d bytes) differs from the exported image (%d bytes)", len(got), len(want))
	}

	// Idle for a few NOP-Out intervals, then the session must still be up
	// and answer, with no connection error logged by the kernel.
	time.Sleep(2500 * time.Millisecond)
	st := guestRun(t, "iscsiadm", "-m", "session", "-P", "1")
	if !strings.Contains(st, "iSCSI Session State: LOGGED_IN") {
		t.Fatalf("session after NOP-Outs:\n%s", st)
	}
	if dm := guestRun(t, "dmesg"); strings.Contains(dm, "ping timeout") || strings.Contains(dm, "detected conn error") {
		t.Fatalf("the kernel initiator lost the connection:\n%s", dm)
	}

	// The kernel chain: dm-clone over the LUN, dm-crypt over the clone with
	// the carried layout.
	dir := t.TempDir()
	size := g.Layout.DeviceSize()
	dest := loopOf(t, filepath.Join(dir, "dest"), size)
	meta := loopOf(t, filepath.Join(dir, "meta"), dmclone.KernelMetadataSize(size, 4096))
	k, err := dmclone.CreateKernel(ctx, log, dmclone.KernelConfig{
		Name: "ferry-vm-clone", Source: disk, Dest: dest, Meta: meta, Size: size, RegionSize: 4096,
		Tunables: dmclone.Tunables{BatchRegions: 64, InFlight: 4}, PollInterval: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = luks.CloseKernel(context.Background(), "ferry-vm-plain")
		k.Close()
		_ = dmclone.RemoveKernel(context.Background(), "", "ferry-vm-clone")
	})
	mapper, err := luks.OpenKernel(ctx, k.Path(), "ferry-vm-plain", g.Layout, g.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := os.ReadFile(g.Plain)
	if err != nil {
		t.Fatal(err)
	}
	got, err = os.ReadFile(mapper)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, plain) {
		t.Fatal("plaintext through iSCSI -> dm-clone -> dm-crypt differs from what was written on the source")
	}
	before := k.Progress().HydratedRegions

	// A trim through dm-crypt reaches dm-clone: regions hydrated, nothing fetched.
	guestRun(t, "blkdiscard", "-o", fmt.Sprint(4<<20), "-l", fmt.Sprint(1<<20), mapper)
	waitUntil(t, "discard hydrates 256 regions", func() bool { return k.Progress().HydratedRegions >= before+256 })
	// The machine writes on the target.
	w := bytes.Repeat([]byte("ferry-vm"), 8<<10)
	f, err := os.OpenFile(mapper, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(w, 8<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	copy(plain[8<<20:], w)

	if err := k.EnableHydration(); err != nil {
		t.Fatal(err)
	}
	hstart := time.Now()
	select {
	case <-k.Done():
	case <-time.After(3 * time.Minute):
		t.Fatalf("hydration over iSCSI did not finish: %+v", k.Progress())
	}
	p := k.Progress()
	t.Logf("hydrated %d regions over iSCSI in %s (%.1f MB/s)", p.TotalRegions-before-256, time.Since(hstart).Round(time.Millisecond), p.RateBPS/1e6)
	// Dissolve under the open dm-crypt mapping: its users never notice.
	if _, err := k.Dissolve(); err != nil {
		t.Fatal(err)
	}
	if table := guestRun(t, "dmsetup", "table", "ferry-vm-clone"); !strings.Contains(table, " linear ") {
		t.Fatalf("after dissolve: %s", table)
	}
	got, err = os.ReadFile(mapper)
	if err != nil {
		t.Fatal(err)
	}
	clear(got[4<<20 : 5<<20]) // trimmed: its content is undefined
	clear(plain[4<<20 : 5<<20])
	if !bytes.Equal(got, plain) {
		t.Fatal("plaintext after hydration and dissolve differs")
	}
	if err := luks.CloseKernel(ctx, "ferry-vm-plain"); err != nil {
		t.Fatal(err)
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if err := dmclone.RemoveKernel(ctx, "", "ferry-vm-clone"); err != nil {
		t.Fatal(err)
	}

	// Log out cleanly: the session and its disk go away.
	guestRun(t, "iscsiadm", append(node, "--logout")...)
	loggedIn = false
	waitUntil(t, "the session and its disk are gone", func() bool {
		_, err := sessionDisk(g.IQN)
		_, serr := os.Stat(disk)
		return err != nil && serr != nil
	})
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func loopOf(t *testing.T, path string, size int64) string {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	dev := guestRun(t, "losetup", "-f", "--show", path)
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	return dev
}

// TestGuestKernelMigration walks one migration's data path on the kernel
// backends, step by step as the agent would drive it, inside the guest: a
// LUKS2+ext4 volume with a record-appending workload on the "source", ferry's
// iSCSI export of it, open-iscsi + dm-clone + dm-crypt on the "target",
// fstrim, cutover, hydration to linear under the mounted filesystem, release.
// It checks no record is lost and reports the downtime (source unmounted to
// target mounted) and each step's time. Both sides share the guest's network
// (loopback); the agent-driven version with workers in namespaces needs
// the agent's kernel backend.
func TestGuestKernelMigration(t *testing.T) {
	inGuest(t)
	ctx := context.Background()
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
	dir := t.TempDir()
	const size = 32 << 20
	steps := []string{}
	mark := time.Now()
	step := func(name string) {
		steps = append(steps, fmt.Sprintf("%s %s", name, time.Since(mark).Round(time.Millisecond)))
		mark = time.Now()
	}

	// Source worker: the volume, formatted with a 4 MiB header, ext4 inside.
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, []byte("migration-test-passphrase"), 0o600); err != nil {
		t.Fatal(err)
	}
	image := filepath.Join(dir, "source.img")
	srcLoop := loopOf(t, image, size)
	if err := luks.Format(ctx, srcLoop, keyFile, luks.FormatOptions{MetadataSize: 16 << 10, KeyslotsSize: 4<<20 - 32<<10, FastKDF: true}); err != nil {
		t.Fatal(err)
	}
	carried := headerLayoutOf(t, srcLoop)
	srcPlain, err := luks.OpenKernel(ctx, srcLoop, "mig-src", carried, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = luks.CloseKernel(context.Background(), "mig-src") })
	guestRun(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", srcPlain)
	srcMnt, dstMnt := filepath.Join(dir, "src-mnt"), filepath.Join(dir, "dst-mnt")
	for _, d := range []string{srcMnt, dstMnt} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	guestRun(t, "mount", "-t", "ext4", srcPlain, srcMnt)
	t.Cleanup(func() { _ = exec.Command("umount", srcMnt).Run() })
	// Data the target must fetch, and freed space fstrim must skip.
	keep := bytes.Repeat([]byte("0123456789abcdef"), 4<<20/16)
	if err := os.WriteFile(filepath.Join(srcMnt, "keep"), keep, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(srcMnt, "gone"), make([]byte, 8<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	guestRun(t, "sync")
	if err := os.Remove(filepath.Join(srcMnt, "gone")); err != nil {
		t.Fatal(err)
	}
	const perSide = 100
	appendRecords(t, filepath.Join(srcMnt, "records"), 0, perSide)
	step("source prepared")

	// source_stopped: the machine stops; the volume is flushed and closed.
	down := time.Now()
	guestRun(t, "umount", srcMnt)
	if err := luks.CloseKernel(ctx, "mig-src"); err != nil {
		t.Fatal(err)
	}
	step("source_stopped")

	// exported: ferry's iSCSI export of the frozen volume.
	e, err := iscsi.StartExport(ctx, log, iscsi.ExportConfig{
		Path: srcLoop, Listen: "127.0.0.1:0", Allow: []string{"127.0.0.1"},
		IQN:      iscsi.MigrationIQN("dev.ferry.vm", "mig", time.Now()),
		StateDir: filepath.Join(dir, "export"), LogLevel: "warn",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Stop() })
	step("exported")

	// clone_built: open-iscsi session, dm-clone (hydration off), dm-crypt.
	node := []string{"-m", "node", "-T", e.IQN(), "-p", e.Portal()}
	guestRun(t, "iscsiadm", append(node, "-o", "new")...)
	guestRun(t, "iscsiadm", append(node, "--login")...)
	loggedIn := true
	t.Cleanup(func() {
		if loggedIn {
			_ = exec.Command("iscsiadm", append(node, "--logout")...).Run()
		}
	})
	var disk string
	waitUntil(t, "the session's disk", func() bool {
		d, err := sessionDisk(e.IQN())
		if err != nil {
			return false
		}
		_, serr := os.Stat(d)
		disk = d
		return serr == nil
	})
	dest := loopOf(t, filepath.Join(dir, "dest.img"), carried.DeviceSize())
	meta := loopOf(t, filepath.Join(dir, "meta.img"), dmclone.KernelMetadataSize(carried.DeviceSize(), 4096))
	k, err := dmclone.CreateKernel(ctx, log, dmclone.KernelConfig{
		Name: "mig-clone", Source: disk, Dest: dest, Meta: meta, Size: carried.DeviceSize(), RegionSize: 4096,
		PollInterval: 100 * time.Millisecond, StallAfter: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = exec.Command("umount", dstMnt).Run()
		_ = luks.CloseKernel(context.Background(), "mig-dst")
		k.Close()
		_ = dmclone.RemoveKernel(context.Background(), "", "mig-clone")
	})
	dstPlain, err := luks.OpenKernel(ctx, k.Path(), "mig-dst", carried, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	step("clone_built")

	// trimmed: the filesystem's free space is marked hydrated, nothing fetched.
	guestRun(t, "mount", "-t", "ext4", dstPlain, dstMnt)
	hydrated := func() int64 {
		st, err := k.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return st.HydratedRegions
	}
	before := hydrated()
	guestRun(t, "fstrim", dstMnt)
	trimmedRegions := hydrated() - before
	if total := k.Progress().TotalRegions; trimmedRegions < total/4 {
		t.Fatalf("fstrim hydrated only %d of %d regions", trimmedRegions, total)
	}
	step("trimmed")

	// cutover: the machine runs on the target and writes.
	downtime := time.Since(down)
	appendRecords(t, filepath.Join(dstMnt, "records"), perSide, perSide)
	step("cutover + workload")

	// hydrating, with the source's export gone: dm-clone waits forever,
	// ferry reports the stall; the export comes back on the same portal,
	// open-iscsi reconnects and hydration finishes.
	exportCfg := iscsi.ExportConfig{
		Path: srcLoop, Listen: e.Portal(), Allow: []string{"127.0.0.1"},
		IQN: e.IQN(), StateDir: filepath.Join(dir, "export"), LogLevel: "warn",
	}
	if err := e.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := k.EnableHydration(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the stall is reported", func() bool { return k.Progress().Stalled })
	stalled := k.Progress()
	if e, err = iscsi.StartExport(ctx, log, exportCfg); err != nil {
		t.Fatal(err)
	}
	step(fmt.Sprintf("stall reported at %d/%d, export back", stalled.HydratedRegions, stalled.TotalRegions))
	back := time.Now()

	// hydrating -> hydrated: background copy, then linear under the mount.
	select {
	case <-k.Done():
	case <-time.After(3 * time.Minute):
		t.Fatalf("hydration did not finish: %+v", k.Progress())
	}
	p := k.Progress()
	afterBack := time.Since(back)
	if p.Stalled {
		t.Fatalf("still stalled after completion: %+v", p)
	}
	if _, err := k.Dissolve(); err != nil {
		t.Fatal(err)
	}
	step("hydrated (linear)")

	// source_released: the target no longer needs the source.
	guestRun(t, "iscsiadm", append(node, "--logout")...)
	loggedIn = false
	if err := e.Stop(); err != nil {
		t.Fatal(err)
	}
	step("source_released")

	// Zero records lost; the data the target fetched is intact; fsck clean.
	appendRecords(t, filepath.Join(dstMnt, "records"), 2*perSide, 10) // still writable on linear
	checkRecords(t, filepath.Join(dstMnt, "records"), 2*perSide+10)
	got, err := os.ReadFile(filepath.Join(dstMnt, "keep"))
	if err != nil || !bytes.Equal(got, keep) {
		t.Fatalf("file copied through the clone differs (%v)", err)
	}
	guestRun(t, "umount", dstMnt)
	guestRun(t, "e2fsck", "-fn", dstPlain)
	rest := (p.TotalRegions - stalled.HydratedRegions) * p.RegionSize
	t.Logf("kernel-path migration: downtime %s (source unmounted -> target mounted and trimmed); fstrim marked %d of %d regions (%.0f%%) hydrated without a fetch; after the export came back, reconnect + %d KiB hydrated in %s",
		downtime.Round(time.Millisecond), trimmedRegions, p.TotalRegions, 100*float64(trimmedRegions)/float64(p.TotalRegions), rest>>10, afterBack.Round(time.Millisecond))
	t.Logf("steps: %s", strings.Join(steps, ", "))
}

func headerLayoutOf(t *testing.T, dev string) luks.Layout {
	t.Helper()
	d, err := blockdev.OpenFile(dev, true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	h, err := luks.ReadHeader(d, d.Size())
	if err != nil {
		t.Fatal(err)
	}
	l, err := h.Layout(d.Size())
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// appendRecords appends records from..from+n-1, each made durable before
// the next, like a database's log.
func appendRecords(t *testing.T, path string, from, n int) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i := from; i < from+n; i++ {
		if _, err := fmt.Fprintf(f, "record %06d\n", i); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
	}
}

func checkRecords(t *testing.T, path string, n int) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	if len(lines) != n {
		t.Fatalf("%d records, want %d", len(lines), n)
	}
	for i, l := range lines {
		if l != fmt.Sprintf("record %06d", i) {
			t.Fatalf("record %d is %q", i, l)
		}
	}
}
