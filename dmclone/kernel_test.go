package dmclone

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// --- host tests: the status parser, the table, and the poller against a fake dmsetup ---

func TestParseKernelStatus(t *testing.T) {
	s, err := ParseKernelStatus("0 32768 clone 8 6/1024 8 256/4096 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw")
	if err != nil {
		t.Fatal(err)
	}
	want := KernelStatus{8, 6, 1024, 8, 256, 4096, 0, []string{"no_hydration"}, 1, 1, "rw"}
	if fmt.Sprint(s) != fmt.Sprint(want) {
		t.Fatalf("got %+v\nwant %+v", s, want)
	}
	p := s.Progress()
	if p.RegionSize != 4096 || p.TotalRegions != 4096 || p.HydratedRegions != 256 || p.HydrationEnabled || p.Complete {
		t.Fatalf("progress %+v", p)
	}

	// Fields alone, hydration on, complete, two features, tunables mapped back.
	s, err = ParseKernelStatus("8 10/2048 16 100/100 3 1 no_discard_passdown 4 hydration_threshold 64 hydration_batch_size 16 ro")
	if err != nil {
		t.Fatal(err)
	}
	p = s.Progress()
	if !p.HydrationEnabled || !p.Complete || p.RegionSize != 8192 || p.HydratingRegions != 3 ||
		p.Tunables.BatchRegions != 16 || p.Tunables.InFlight != 4 || s.Mode != "ro" {
		t.Fatalf("progress %+v status %+v", p, s)
	}

	for _, line := range []string{"Fail", "0 32768 clone Fail", "0 8 clone Error",
		"8 6/1024 8 1/2 0 0 4 hydration_threshold 1 hydration_batch_size 1 Fail"} {
		if _, err := ParseKernelStatus(line); !errors.Is(err, ErrKernelFailed) {
			t.Errorf("%q: want ErrKernelFailed, got %v", line, err)
		}
	}
	for _, line := range []string{
		"", "0 32768 linear", "0 32768 linear 7:0 0",
		"8 6/1024 8 256/4096 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1", // no mode
		"8 6/1024 8 257/256 0 0 0 rw",   // more hydrated than total
		"8 6-1024 8 1/2 0 0 0 rw",       // not a ratio
		"8 6/1024 0 1/2 0 0 0 rw",       // zero region size
		"8 6/1024 8 1/2 0 5 x 0 rw",     // feature count past the end
		"8 6/1024 8 1/2 0 0 3 a 1 b rw", // odd core args
		"8 6/1024 8 1/2 -1 0 0 rw",      // negative
		"8 6/1024 8 1/2 0 0 2 hydration_threshold x rw",
		"8 6/1024 8 1/2 0 0 0 rw extra",
		"8 6/1024 8 1/2 0 0 0 weird",
	} {
		if s, err := ParseKernelStatus(line); err == nil {
			t.Errorf("%q: parsed as %+v, want an error", line, s)
		}
	}
}

func FuzzParseKernelStatus(f *testing.F) {
	f.Add("0 32768 clone 8 6/1024 8 256/4096 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw")
	f.Add("8 10/2048 16 100/100 3 2 no_hydration no_discard_passdown 4 hydration_threshold 64 hydration_batch_size 16 ro")
	f.Add("Fail")
	f.Add("0 1 clone 8 1/1 8 0/0 0 0 0 rw")
	f.Fuzz(func(t *testing.T, line string) {
		s, err := ParseKernelStatus(line)
		if err != nil {
			return
		}
		if s.HydratedRegions > s.TotalRegions || s.RegionSectors <= 0 || (s.Mode != "rw" && s.Mode != "ro") {
			t.Fatalf("%q accepted as inconsistent %+v", line, s)
		}
		p := s.Progress()
		if p.HydratedRegions < 0 || p.RegionSize != s.RegionSectors*512 {
			t.Fatalf("%q: progress %+v", line, p)
		}
	})
}

func TestKernelTableLine(t *testing.T) {
	cfg := KernelConfig{Name: "c1", Source: "/dev/sda", Dest: "/dev/nvme0n1p2", Meta: "/dev/loop9",
		Size: 64 << 20, RegionSize: 4096, Tunables: Tunables{BatchRegions: 256, InFlight: 4}}
	got, err := KernelTable(cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := "0 131072 clone /dev/loop9 /dev/nvme0n1p2 /dev/sda 8 1 no_hydration 4 hydration_threshold 1024 hydration_batch_size 256"
	if got != want {
		t.Fatalf("table\n got %s\nwant %s", got, want)
	}
	// Zero tunables take ferry's defaults, never dm-clone's 1/1.
	cfg.Tunables = Tunables{}
	got, _ = KernelTable(cfg)
	if !strings.HasSuffix(got, "hydration_threshold 1024 hydration_batch_size 256") {
		t.Fatalf("default tunables: %s", got)
	}
	cfg.Tunables = Tunables{InFlight: 2}
	got, _ = KernelTable(cfg)
	if !strings.HasSuffix(got, "hydration_threshold 512 hydration_batch_size 256") {
		t.Fatalf("default batch size: %s", got)
	}
	for _, bad := range []func(*KernelConfig){
		func(c *KernelConfig) { c.Size = 1000 },
		func(c *KernelConfig) { c.Size = 0 },
		func(c *KernelConfig) { c.RegionSize = 3000 },
		func(c *KernelConfig) { c.RegionSize = 2 << 30 },
		func(c *KernelConfig) { c.Name = "a b" },
		func(c *KernelConfig) { c.Name = "" },
		func(c *KernelConfig) { c.Source = "" },
		func(c *KernelConfig) { c.Dest = "/dev/x y" },
		func(c *KernelConfig) { c.Tunables = Tunables{BatchRegions: -1, InFlight: 3} },
		func(c *KernelConfig) { c.Size = 1 << 50; c.RegionSize = 4096 },
	} {
		c := cfg
		bad(&c)
		if line, err := KernelTable(c); err == nil {
			t.Errorf("%+v: got table %q, want an error", c, line)
		}
	}
}

func TestKernelMetadataSize(t *testing.T) {
	if got := KernelMetadataSize(64<<20, 4096); got != 4<<20+4096 {
		t.Fatalf("64 MiB clone: %d", got)
	}
	// 100 GiB in 4 KiB regions: 26M regions, a 3.2 MiB bitmap, twice, + 4 MiB.
	if got := KernelMetadataSize(100<<30, 4096); got < 10<<20 || got > 11<<20 || got%4096 != 0 {
		t.Fatalf("100 GiB clone: %d", got)
	}
}

// fakeDM plays dmsetup for one dm-clone device.
type fakeDM struct {
	mu       sync.Mutex
	exists   bool
	table    string
	enabled  bool
	hydrated int64
	total    int64
	thr, bat int64
	stuck    bool // hydration makes no progress (a hung source)
	step     int64
	calls    []string
}

func (f *fakeDM) run(_ context.Context, args ...string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, strings.Join(args, " "))
	switch args[0] {
	case "table", "info":
		if !f.exists {
			return "", errors.New("no such device")
		}
		return f.table + "\n", nil
	case "create":
		f.exists, f.table = true, args[3]
		fmt.Sscanf(args[3][strings.Index(args[3], "hydration_threshold"):], "hydration_threshold %d hydration_batch_size %d", &f.thr, &f.bat)
		return "", nil
	case "message":
		switch args[3] {
		case "enable_hydration":
			f.enabled = true
		case "disable_hydration":
			f.enabled = false
		case "hydration_threshold":
			fmt.Sscan(args[4], &f.thr)
		case "hydration_batch_size":
			fmt.Sscan(args[4], &f.bat)
		}
		return "", nil
	case "status":
		if !f.exists {
			return "", errors.New("no such device")
		}
		if f.enabled && !f.stuck {
			f.hydrated = min(f.total, f.hydrated+f.step)
		}
		feat := "0"
		if !f.enabled {
			feat = "1 no_hydration"
		}
		return fmt.Sprintf("0 %d clone 8 6/1024 8 %d/%d 0 %s 4 hydration_threshold %d hydration_batch_size %d rw\n",
			f.total*8, f.hydrated, f.total, feat, f.thr, f.bat), nil
	case "suspend", "resume":
		return "", nil
	case "load":
		f.table = args[3]
		return "", nil
	case "remove":
		f.exists = false
		return "", nil
	}
	return "", fmt.Errorf("fake dmsetup: unexpected %v", args)
}

func (f *fakeDM) set(fn func(*fakeDM)) { f.mu.Lock(); fn(f); f.mu.Unlock() }

func TestKernelClonePollerFake(t *testing.T) {
	f := &fakeDM{total: 1000, step: 50}
	cfg := KernelConfig{Name: "c1", Source: "/dev/sda", Dest: "/dev/loop1", Meta: "/dev/loop2", Size: 1000 * 4096,
		Tunables: Tunables{BatchRegions: 8, InFlight: 2}, PollInterval: 5 * time.Millisecond, StallAfter: 50 * time.Millisecond}
	if err := cfg.normalize(); err != nil {
		t.Fatal(err)
	}
	k, err := createKernel(context.Background(), zerolog.Nop(), cfg, f.run)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	var table string
	f.set(func(f *fakeDM) { table = f.table })
	if !strings.Contains(table, " no_hydration 4 hydration_threshold 16 hydration_batch_size 8") {
		t.Fatalf("table %q", table)
	}
	// Hydration off: no progress is not a stall.
	time.Sleep(100 * time.Millisecond)
	if p := k.Progress(); p.HydrationEnabled || p.Stalled || p.HydratedRegions != 0 || p.Tunables.InFlight != 2 {
		t.Fatalf("before enable: %+v", p)
	}
	f.set(func(f *fakeDM) { f.stuck = true })
	if err := k.EnableHydration(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "stall reported", func() bool { return k.Progress().Stalled })
	if ok, why := k.Stalled(); !ok || !strings.Contains(why, "no region hydrated") {
		t.Fatalf("stall reason %q", why)
	}
	if _, err := k.Dissolve(); !errors.Is(err, ErrNotHydrated) {
		t.Fatalf("dissolve before done: %v", err)
	}
	f.set(func(f *fakeDM) { f.stuck = false })
	select {
	case <-k.Done():
	case <-time.After(5 * time.Second):
		t.Fatalf("not done: %+v", k.Progress())
	}
	if p := k.Progress(); p.Stalled || !p.Complete || p.RateBPS <= 0 {
		t.Fatalf("after done: %+v", p)
	}
	if err := k.SetTunables(Tunables{BatchRegions: 4, InFlight: 8}); err != nil {
		t.Fatal(err)
	}
	// The poller keeps calling the fake: read it under its lock.
	var thr, bat int64
	f.set(func(f *fakeDM) { thr, bat = f.thr, f.bat })
	if thr != 32 || bat != 4 {
		t.Fatalf("tunables sent: threshold %d batch %d", thr, bat)
	}
	// Dissolve: suspend, load linear, resume (OpenFile of /dev/mapper fails on the host).
	_, _ = k.Dissolve()
	// The poller's status calls may fall between the three (a slow guest
	// under TCG did so): the order of the others is what counts.
	var joined string
	f.set(func(f *fakeDM) {
		joined = strings.Join(slices.DeleteFunc(slices.Clone(f.calls), func(c string) bool { return strings.HasPrefix(c, "status ") }), "\n")
	})
	if !strings.Contains(joined, "suspend c1\nload c1 --table 0 8000 linear /dev/loop1 0\nresume c1") {
		t.Fatalf("dissolve calls:\n%s", joined)
	}
	err = k.Close()
	var exists bool
	f.set(func(f *fakeDM) { exists = f.exists })
	if err != nil || !exists {
		t.Fatalf("close after dissolve must keep the linear device: %v exists=%v", err, exists)
	}
}

func TestKernelCloneCloseRemovesFake(t *testing.T) {
	f := &fakeDM{total: 10, step: 1}
	cfg := KernelConfig{Name: "c2", Source: "/dev/a", Dest: "/dev/b", Meta: "/dev/c", Size: 10 * 4096}
	if err := cfg.normalize(); err != nil {
		t.Fatal(err)
	}
	k, err := createKernel(context.Background(), zerolog.Nop(), cfg, f.run)
	if err != nil {
		t.Fatal(err)
	}
	// A second create adopts the device instead of failing.
	k2, err := createKernel(context.Background(), zerolog.Nop(), cfg, f.run)
	if err != nil {
		t.Fatal(err)
	}
	k2.stopOnly()
	err = k.Close()
	var exists bool
	f.set(func(f *fakeDM) { exists = f.exists })
	if err != nil || exists {
		t.Fatalf("close before dissolve must remove the clone: %v exists=%v", err, exists)
	}
	// A device of the same name but another size is refused.
	f.set(func(f *fakeDM) { f.exists, f.table = true, "0 99 linear /dev/x 0" })
	if _, err := createKernel(context.Background(), zerolog.Nop(), cfg, f.run); err == nil {
		t.Fatal("adopted a foreign device")
	}
}

// stopOnly stops the poller without removing the device (test helper).
func (k *KernelClone) stopOnly() {
	k.mu.Lock()
	k.closed, k.dissolved = true, true
	k.mu.Unlock()
	close(k.stop)
	k.wg.Wait()
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// --- guest tests: the real dm-clone target (run inside integration/vm) ---

// needKernelClone skips on hosts without device-mapper's clone target. Inside
// the test VM (FERRY_IN_VM=1) a missing target is a failure, not a skip.
func needKernelClone(t *testing.T) {
	t.Helper()
	out, err := exec.Command("dmsetup", "targets").CombinedOutput()
	testenv.Guest(t, fmt.Sprintf("device-mapper with the dm-clone target (dmsetup targets: %v %s)", err, bytes.TrimSpace(out)),
		err == nil && bytes.Contains(out, []byte("clone ")))
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

func suffix() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// loopFile makes a file of size bytes (random content when random) and
// attaches it to a loop device, detached at cleanup.
func loopFile(t *testing.T, dir, name string, size int64, random bool) (dev string, data []byte) {
	t.Helper()
	path := filepath.Join(dir, name)
	if random {
		data = make([]byte, size)
		_, _ = rand.Read(data)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	} else {
		if err := os.WriteFile(path, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, size); err != nil {
			t.Fatal(err)
		}
	}
	dev = sh(t, "losetup", "-f", "--show", path)
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	return dev, data
}

func TestKernelCloneHydratesDissolves(t *testing.T) {
	needKernelClone(t)
	const size = 16 << 20
	dir := t.TempDir()
	srcLoop, src := loopFile(t, dir, "src", size, true)
	dst, _ := loopFile(t, dir, "dst", size, false)
	meta, _ := loopFile(t, dir, "meta", KernelMetadataSize(size, 4096), false)

	// The source is a linear mapping of its loop device, so the test can
	// suspend it: dm-clone then waits on it forever, like on a dead iSCSI link.
	srcName := "ferry-src-" + suffix()
	sh(t, "dmsetup", "create", srcName, "--table", fmt.Sprintf("0 %d linear %s 0", size/512, srcLoop))
	t.Cleanup(func() {
		_ = exec.Command("dmsetup", "resume", srcName).Run()
		_ = exec.Command("dmsetup", "remove", "--retry", srcName).Run()
	})
	name := "ferry-clone-" + suffix()
	ctx := context.Background()
	k, err := CreateKernel(ctx, zerolog.New(zerolog.NewTestWriter(t)), KernelConfig{
		Name: name, Source: "/dev/mapper/" + srcName, Dest: dst, Meta: meta, Size: size,
		RegionSize: 4096, Tunables: Tunables{BatchRegions: 16, InFlight: 4},
		PollInterval: 50 * time.Millisecond, StallAfter: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		k.Close()
		_ = RemoveKernel(context.Background(), "", name)
	})
	table := sh(t, "dmsetup", "table", name)
	if !strings.Contains(table, " no_hydration") || !strings.Contains(table, "hydration_threshold 64 hydration_batch_size 16") {
		t.Fatalf("table: %s", table)
	}
	p := k.Progress()
	if p.HydrationEnabled || p.HydratedRegions != 0 || p.TotalRegions != size/4096 || p.RegionSize != 4096 {
		t.Fatalf("fresh clone: %+v", p)
	}

	// Discarding 1 MiB marks 256 regions hydrated without a copy.
	sh(t, "blkdiscard", "-o", "0", "-l", fmt.Sprint(1<<20), k.Path())
	waitFor(t, "discard hydrated 256 regions", func() bool { return k.Progress().HydratedRegions == 256 })
	// A whole-region write through the clone lands on the destination.
	want := append([]byte(nil), src...)
	clear(want[:1<<20])
	w := make([]byte, 64<<10)
	_, _ = rand.Read(w)
	copy(want[4<<20:], w)
	f, err := os.OpenFile(k.Path(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(w, 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()

	// Hung source: hydration is enabled but nothing moves: reported stalled.
	sh(t, "dmsetup", "suspend", srcName)
	if err := k.EnableHydration(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "stall reported", func() bool { return k.Progress().Stalled })
	t.Logf("stalled: %s", k.Progress().StalledReason)
	sh(t, "dmsetup", "resume", srcName)
	select {
	case <-k.Done():
	case <-time.After(2 * time.Minute):
		t.Fatalf("hydration did not complete: %+v", k.Progress())
	}
	if p := k.Progress(); !p.Complete || p.Stalled || !p.HydrationEnabled {
		t.Fatalf("done: %+v", p)
	}

	dev, err := k.Dissolve()
	if err != nil {
		t.Fatal(err)
	}
	if table := sh(t, "dmsetup", "table", name); !strings.Contains(table, " linear ") {
		t.Fatalf("after dissolve: %s", table)
	}
	got := make([]byte, size)
	if _, err := dev.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	dev.Close()
	if !bytes.Equal(got, want) {
		t.Fatalf("linear device differs from source+discard+write at byte %d", firstDiff(got, want))
	}
	// The destination alone holds the same bytes.
	raw, err := os.ReadFile(filepath.Join(dir, "dst"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw, want) {
		t.Fatalf("destination differs at byte %d", firstDiff(raw, want))
	}
	// The userspace engine, given the same source, discard and write, ends
	// with the same destination as dm-clone.
	if eng := engineDest(t, filepath.Join(dir, "src"), size, w); !bytes.Equal(eng, raw) {
		t.Fatalf("userspace engine's destination differs from dm-clone's at byte %d", firstDiff(eng, raw))
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if err := RemoveKernel(ctx, "", name); err != nil {
		t.Fatal(err)
	}
	if err := exec.Command("dmsetup", "info", name).Run(); err == nil {
		t.Fatalf("%s still exists after RemoveKernel", name)
	}
}

// engineDest runs the userspace engine over src with the discard and write
// the kernel test does, hydrates it and returns its destination's bytes.
func engineDest(t *testing.T, src string, size int64, w []byte) []byte {
	t.Helper()
	sd, err := blockdev.OpenFile(src, true)
	if err != nil {
		t.Fatal(err)
	}
	dstPath := filepath.Join(t.TempDir(), "engine-dst")
	dd, err := blockdev.CreateSparse(dstPath, size)
	if err != nil {
		t.Fatal(err)
	}
	e, err := Open(zerolog.Nop(), Config{Source: sd, Dest: dd, MetaPath: filepath.Join(t.TempDir(), "meta"), RegionSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := e.Discard(0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := e.WriteAt(w, 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := e.EnableHydration(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.Done():
	case <-time.After(2 * time.Minute):
		t.Fatalf("engine did not hydrate: %+v", e.Progress())
	}
	d, err := e.Dissolve()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	out, err := os.ReadFile(dstPath)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

func TestKernelCloneCloseRemoves(t *testing.T) {
	needKernelClone(t)
	dir := t.TempDir()
	src, _ := loopFile(t, dir, "src", 4<<20, true)
	dst, _ := loopFile(t, dir, "dst", 4<<20, false)
	meta, _ := loopFile(t, dir, "meta", KernelMetadataSize(4<<20, 8192), false)
	name := "ferry-clone-" + suffix()
	cfg := KernelConfig{Name: name, Source: src, Dest: dst, Meta: meta, Size: 4 << 20, RegionSize: 8192}
	k, err := CreateKernel(context.Background(), zerolog.Nop(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = RemoveKernel(context.Background(), "", name) })
	// An agent restart adopts the same device.
	k2, err := CreateKernel(context.Background(), zerolog.Nop(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	k2.stopOnly()
	if _, err := k.Dissolve(); !errors.Is(err, ErrNotHydrated) {
		t.Fatalf("dissolve of an unhydrated clone: %v", err)
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if err := exec.Command("dmsetup", "info", name).Run(); err == nil {
		t.Fatalf("%s still exists after Close", name)
	}
	// Bad sizes are refused by the kernel too, with an error, not a panic.
	cfg.Name = name + "-big"
	cfg.Size = 64 << 20
	if _, err := CreateKernel(context.Background(), zerolog.Nop(), cfg); err == nil {
		_ = RemoveKernel(context.Background(), "", cfg.Name)
		t.Fatal("a clone larger than its source was created")
	}
}

// TestKernelCloneFailingSourceStalls: dm-clone retries a failing source
// read forever; ferry must report the stall, and hydration must finish once
// the source heals.
func TestKernelCloneFailingSourceStalls(t *testing.T) {
	needKernelClone(t)
	const size = 8 << 20
	dir := t.TempDir()
	srcLoop, src := loopFile(t, dir, "src", size, true)
	dst, _ := loopFile(t, dir, "dst", size, false)
	meta, _ := loopFile(t, dir, "meta", KernelMetadataSize(size, 4096), false)
	srcName := "ferry-src-" + suffix()
	half := size / 512 / 2
	// The second half of the source returns I/O errors.
	sh(t, "dmsetup", "create", srcName, "--table",
		fmt.Sprintf("0 %d linear %s 0\n%d %d error", half, srcLoop, half, half))
	t.Cleanup(func() { _ = exec.Command("dmsetup", "remove", "--retry", srcName).Run() })
	name := "ferry-clone-" + suffix()
	k, err := CreateKernel(context.Background(), zerolog.New(zerolog.NewTestWriter(t)), KernelConfig{
		Name: name, Source: "/dev/mapper/" + srcName, Dest: dst, Meta: meta, Size: size,
		Tunables: Tunables{BatchRegions: 8, InFlight: 2}, PollInterval: 50 * time.Millisecond, StallAfter: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		k.Close()
		_ = RemoveKernel(context.Background(), "", name)
	})
	if err := k.EnableHydration(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "stall on the failing half", func() bool { return k.Progress().Stalled })
	p := k.Progress()
	if p.Complete || p.HydratedRegions > p.TotalRegions/2 {
		t.Fatalf("hydrated past the failing half: %+v", p)
	}
	t.Logf("stalled at %d/%d: %s", p.HydratedRegions, p.TotalRegions, p.StalledReason)
	// Heal the source: dm-clone's retries then get through.
	sh(t, "dmsetup", "load", srcName, "--table", fmt.Sprintf("0 %d linear %s 0", size/512, srcLoop))
	sh(t, "dmsetup", "resume", srcName)
	select {
	case <-k.Done():
	case <-time.After(2 * time.Minute):
		t.Fatalf("no recovery after the source healed: %+v", k.Progress())
	}
	if p := k.Progress(); p.Stalled {
		t.Fatalf("still stalled after completion: %+v", p)
	}
	dev, err := k.Dissolve()
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	got := make([]byte, size)
	if _, err := dev.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, src) {
		t.Fatalf("clone differs from the healed source at byte %d", firstDiff(got, src))
	}
}
