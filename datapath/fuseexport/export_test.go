package fuseexport

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

func needFUSE(t *testing.T) {
	t.Helper()
	testenv.Root(t, "to mount FUSE")
	testenv.Paths(t, "modprobe fuse", "/dev/fuse")
}

func needLoop(t *testing.T) {
	t.Helper()
	needFUSE(t)
	testenv.Tools(t, "apt-get install util-linux", "losetup")
	testenv.Paths(t, "modprobe loop", "/dev/loop-control")
}

func mount(t *testing.T, dev blockdev.Device) *Export {
	t.Helper()
	e, err := Mount(zerolog.Nop(), filepath.Join(t.TempDir(), "mnt"), "disk", dev)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Errorf("close export: %v", err)
			unix.Unmount(filepath.Dir(e.Path()), unix.MNT_DETACH) // leave no mount behind
		}
	})
	return e
}

// countDev counts flushes and discards reaching the device.
type countDev struct {
	blockdev.Device
	flushes  atomic.Int64
	discards atomic.Int64
	discOff  atomic.Int64
	discLen  atomic.Int64
}

func (c *countDev) Flush() error { c.flushes.Add(1); return c.Device.Flush() }
func (c *countDev) Discard(off, n int64) error {
	c.discards.Add(1)
	c.discOff.Store(off)
	c.discLen.Store(n)
	return c.Device.Discard(off, n)
}

func TestFileOperations(t *testing.T) {
	needFUSE(t)
	const size = 4 << 20
	mem := blockdev.NewMem(size)
	init := make([]byte, size)
	rand.New(rand.NewSource(1)).Read(init)
	mem.WriteAt(init, 0)
	dev := &countDev{Device: mem}
	e := mount(t, dev)

	st, err := os.Stat(e.Path())
	if err != nil || st.Size() != size || !st.Mode().IsRegular() {
		t.Fatalf("stat %s: %v size %d", e.Path(), err, st.Size())
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(e.Path(), &sfs); err != nil || sfs.Bsize != BlockSize {
		t.Fatalf("statfs: %v bsize %d, want %d", err, sfs.Bsize, BlockSize)
	}
	f, err := os.OpenFile(e.Path(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, 1<<20)
	if _, err := f.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, init[1<<20:2<<20]) {
		t.Fatalf("read through FUSE: %v / content differs", err)
	}
	w := bytes.Repeat([]byte{0x5A}, 300<<10)
	if _, err := f.WriteAt(w, 12345); err != nil {
		t.Fatal(err)
	}
	check := make([]byte, len(w))
	mem.ReadAt(check, 12345)
	if !bytes.Equal(check, w) {
		t.Fatal("write through FUSE did not reach the device")
	}
	if err := f.Sync(); err != nil || dev.flushes.Load() == 0 {
		t.Fatalf("fsync: %v, device flushes %d", err, dev.flushes.Load())
	}
	// Writing past the end of a fixed-size device fails.
	if _, err := f.WriteAt([]byte{1}, size); err == nil {
		t.Fatal("write past the end succeeded")
	}
	// PUNCH_HOLE -> Discard with exact offsets.
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 8192, 65536); err != nil {
		t.Fatalf("punch hole: %v", err)
	}
	if dev.discards.Load() != 1 || dev.discOff.Load() != 8192 || dev.discLen.Load() != 65536 {
		t.Fatalf("discard reached the device as %d calls at %d+%d", dev.discards.Load(), dev.discOff.Load(), dev.discLen.Load())
	}
	// ZERO_RANGE -> zeroes written.
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, 2<<20, 3<<19); err != nil {
		t.Fatalf("zero range: %v", err)
	}
	z := make([]byte, 3<<19)
	mem.ReadAt(z, 2<<20)
	if !bytes.Equal(z, make([]byte, 3<<19)) {
		t.Fatal("ZERO_RANGE did not zero the device range")
	}
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_COLLAPSE_RANGE, 0, 4096); err == nil {
		t.Fatal("COLLAPSE_RANGE accepted")
	}
	if err := f.Truncate(1 << 20); err == nil {
		t.Fatal("truncate to another size accepted")
	}
}

// A close flushes the device only if its descriptor changed it since the
// last flush; fsync always does. losetup's close of the descriptor it hands
// to the loop device sits inside a migration's pause.
func TestCloseFlushesOnlyAfterAChange(t *testing.T) {
	needFUSE(t)
	dev := &countDev{Device: blockdev.NewMem(1 << 20)}
	e := mount(t, dev)
	use := func(what string, do func(f *os.File) error, want int64) {
		t.Helper()
		f, err := os.OpenFile(e.Path(), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		before := dev.flushes.Load()
		if err := do(f); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if err := f.Close(); err != nil {
			t.Fatalf("%s: close: %v", what, err)
		}
		if got := dev.flushes.Load() - before; got != want {
			t.Fatalf("%s, then close: %d device flushes, want %d", what, got, want)
		}
	}
	buf := make([]byte, 4096)
	use("nothing", func(*os.File) error { return nil }, 0)
	use("a read", func(f *os.File) error { _, err := f.ReadAt(buf, 0); return err }, 0)
	use("a write", func(f *os.File) error { _, err := f.WriteAt(buf, 4096); return err }, 1)
	use("a discard", func(f *os.File) error {
		return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096)
	}, 1)
	use("a write and an fsync", func(f *os.File) error {
		if _, err := f.WriteAt(buf, 0); err != nil {
			return err
		}
		return f.Sync()
	}, 1) // the fsync covered the write: the close has nothing to flush
	use("an fsync alone", func(f *os.File) error { return f.Sync() }, 1)
	// A second descriptor of the same open file description shares its
	// handle: what one wrote, the other's close flushes.
	use("a write through a dup, the dup closed first", func(f *os.File) error {
		fd, err := unix.Dup(int(f.Fd()))
		if err != nil {
			return err
		}
		if _, err := unix.Pwrite(fd, buf, 8192); err != nil {
			return err
		}
		return unix.Close(fd)
	}, 1)
}

// failDev fails every read, to see the error surface as EIO.
type failDev struct{ blockdev.Device }

func (failDev) ReadAt([]byte, int64) (int, error) { return 0, errors.New("source gone") }

func TestErrorsAreEIO(t *testing.T) {
	needFUSE(t)
	e := mount(t, failDev{blockdev.NewMem(1 << 20)})
	f, err := os.Open(e.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(make([]byte, 4096), 0); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read of a failing device: %v, want EIO", err)
	}
}

func TestSwapWhileAttached(t *testing.T) {
	needLoop(t)
	a, b := blockdev.NewMem(8<<20), blockdev.NewMem(8<<20)
	data := bytes.Repeat([]byte("ferry!!!"), 1<<20)
	a.WriteAt(data, 0)
	b.WriteAt(data, 0)
	e := mount(t, a)
	loop := attach(t, e.Path())
	if _, err := e.Swap(blockdev.NewMem(4 << 20)); err == nil {
		t.Fatal("swap to a device of another size accepted")
	}
	if err := e.Close(); err == nil || !strings.Contains(err.Error(), "detach") {
		t.Fatalf("close with a loop device attached: %v, want a refusal", err)
	}
	old, err := e.Swap(b)
	if err != nil || old != a {
		t.Fatalf("swap: %v", err)
	}
	f, err := os.OpenFile(loop, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := alignedBuf(1 << 20)
	copy(buf, bytes.Repeat([]byte{0xCC}, 1<<20))
	if _, err := f.WriteAt(buf, 1<<20); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	b.ReadAt(got, 1<<20)
	if !bytes.Equal(got, buf) {
		t.Fatal("write after swap did not reach the new device")
	}
	a.ReadAt(got, 1<<20)
	if !bytes.Equal(got, data[1<<20:2<<20]) {
		t.Fatal("write after swap reached the old device")
	}
}

func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	off := 4096 - int(uintptr(unsafePointer(b))&4095)
	return b[off%4096 : off%4096+n]
}

func attach(t *testing.T, path string) string {
	t.Helper()
	loop, err := loopdev.Attach(path, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := loopdev.Detach(loop); err != nil {
			t.Errorf("detach %s: %v", loop, err)
		}
	})
	return loop
}

// TestExt4OnLoop runs a real filesystem on the export: mkfs, files, fstrim
// (which must arrive as discards), e2fsck.
func TestExt4OnLoop(t *testing.T) {
	needLoop(t)
	testenv.Tools(t, "apt-get install e2fsprogs util-linux", "mkfs.ext4", "e2fsck", "fstrim", "mount")
	d, err := blockdev.CreateSparse(filepath.Join(t.TempDir(), "backing"), 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	dev := &countDev{Device: d}
	e := mount(t, dev)
	loop := attach(t, e.Path())
	run(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop)
	mnt := filepath.Join(t.TempDir(), "fs")
	os.MkdirAll(mnt, 0o700)
	run(t, "mount", "-o", "nodiscard", loop, mnt)
	mounted := true
	defer func() {
		if mounted {
			exec.Command("umount", mnt).Run()
		}
	}()
	content := bytes.Repeat([]byte("hello ext4 on ferry\n"), 100000)
	if err := os.WriteFile(filepath.Join(mnt, "f"), content, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(mnt, "f"))
	before := dev.discards.Load()
	run(t, "fstrim", mnt)
	if dev.discards.Load() == before {
		t.Fatal("fstrim sent no discard to the device")
	}
	run(t, "umount", mnt)
	mounted = false
	run(t, "e2fsck", "-f", "-n", loop)
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// TestCrashedServerGivesEIO kills the process serving the export and checks
// that I/O through the loop device fails promptly instead of hanging.
func TestCrashedServerGivesEIO(t *testing.T) {
	needLoop(t)
	dir := filepath.Join(t.TempDir(), "mnt")
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "FERRY_FUSE_HELPER_DIR="+dir)
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		unix.Unmount(dir, unix.MNT_DETACH)
	})
	ready := make([]byte, 6)
	if _, err := stdout.Read(ready); err != nil || string(ready) != "ready\n" {
		t.Fatalf("helper did not start: %v %q", err, ready)
	}
	loop := attach(t, filepath.Join(dir, "disk"))
	f, err := os.OpenFile(loop, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := alignedBuf(4096)
	if _, err := f.ReadAt(buf, 0); err != nil {
		t.Fatalf("read before crash: %v", err)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	res := make(chan error, 1)
	go func() {
		_, err := f.ReadAt(buf, 1<<20)
		res <- err
	}()
	select {
	case err := <-res:
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("read after the server died: %v, want EIO", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("read after the server died hangs")
	}
	// The dead mount refuses a new export until cleaned up; then it works.
	if _, err := Mount(zerolog.Nop(), dir, "disk", blockdev.NewMem(1<<20)); err == nil {
		t.Fatal("mounted over a dead export")
	}
	f.Close()
	detached, err := CleanupStale(dir, "disk")
	if err != nil || len(detached) != 1 || detached[0] != loop {
		t.Fatalf("CleanupStale = %v, %v; want [%s] detached", detached, err, loop)
	}
	e := mount2(t, dir)
	if _, err := os.Stat(e.Path()); err != nil {
		t.Fatalf("export after cleanup: %v", err)
	}
}

func mount2(t *testing.T, dir string) *Export {
	t.Helper()
	e, err := Mount(zerolog.Nop(), dir, "disk", blockdev.NewMem(1<<20))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// TestMain doubles as the FUSE server child of TestCrashedServerGivesEIO.
func TestMain(m *testing.M) {
	if dir := os.Getenv("FERRY_FUSE_HELPER_DIR"); dir != "" {
		if _, err := Mount(zerolog.Nop(), dir, "disk", blockdev.NewMem(4<<20)); err != nil {
			fmt.Println("fail", err)
			os.Exit(1)
		}
		fmt.Print("ready\n")
		select {}
	}
	os.Exit(m.Run())
}
