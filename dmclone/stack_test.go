package dmclone_test

import (
	"bytes"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath/fuseexport"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/dmclone"
	"github.com/ferry-dev/ferry/internal/testenv"
)

func needStack(t testing.TB) {
	t.Helper()
	testenv.Root(t, "FUSE, loop devices and mount")
	testenv.Paths(t, "modprobe fuse loop", "/dev/fuse", "/dev/loop-control")
	testenv.Tools(t, "apt-get install e2fsprogs util-linux", "losetup", "mkfs.ext4", "e2fsck", "fstrim", "mount", "umount")
}

func sh(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// mountFS mounts dev at a fresh directory and returns it; unmounted at cleanup
// unless the caller unmounts first.
func mountFS(t testing.TB, dev string, opts ...string) string {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "fs")
	os.MkdirAll(mnt, 0o700)
	sh(t, "mount", append(append([]string{}, opts...), dev, mnt)...)
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })
	return mnt
}

func attachLoop(t testing.TB, path string, dio bool) string {
	t.Helper()
	dev, err := loopdev.Attach(path, dio)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { loopdev.Detach(dev) })
	return dev
}

// usedBytes is what e2fsck counts as allocated on a 4 KiB-block image (the
// superblock's free count can lag behind the group descriptors).
func usedBytes(t testing.TB, image string) int64 {
	out := sh(t, "e2fsck", "-f", "-n", image)
	m := regexp.MustCompile(`(\d+)/(\d+) blocks`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("e2fsck output lacks the block count:\n%s", out)
	}
	v, _ := strconv.ParseInt(m[1], 10, 64)
	return v * 4096
}

// makeSourceImage builds a sparse ext4 image with some files and returns
// their contents by name.
func makeSourceImage(t testing.TB, path string, size int64, files map[string]int) map[string][]byte {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	sh(t, "mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "nodiscard", path)
	loop := attachLoop(t, path, false)
	mnt := mountFS(t, loop)
	rng := rand.New(rand.NewSource(42))
	contents := map[string][]byte{}
	for name, n := range files {
		b := make([]byte, n)
		rng.Read(b)
		if err := os.WriteFile(filepath.Join(mnt, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
		contents[name] = b
	}
	sh(t, "umount", mnt)
	if err := loopdev.Detach(loop); err != nil {
		t.Fatal(err)
	}
	return contents
}

// recorder applies the workload's writes to a model of the expected device
// and remembers discarded sectors, whose contents are unspecified.
type recorder struct {
	blockdev.Device
	mu      sync.Mutex
	model   []byte
	discard []bool // per 512-byte sector: discarded and not rewritten
}

func (r *recorder) WriteAt(p []byte, off int64) (int, error) {
	n, err := r.Device.WriteAt(p, off)
	if err == nil {
		r.mu.Lock()
		copy(r.model[off:], p)
		for s := off / 512; s < (off+int64(len(p))+511)/512; s++ {
			if s*512 >= off && (s+1)*512 <= off+int64(len(p)) {
				r.discard[s] = false
			}
		}
		r.mu.Unlock()
	}
	return n, err
}

func (r *recorder) Discard(off, n int64) error {
	err := r.Device.Discard(off, n)
	if err == nil {
		r.mu.Lock()
		for s := (off + 511) / 512; (s+1)*512 <= off+n; s++ {
			r.discard[s] = true
		}
		r.mu.Unlock()
	}
	return err
}

// TestRealStack: ext4 image with files -> engine -> FUSE -> loop -> mount ->
// read, write, delete, fstrim; fetched bytes track the filesystem's used
// blocks, not the device size; after hydration the destination equals the
// source plus the workload's writes and e2fsck is clean; then the engine is
// dissolved and the export swapped to the destination under the mounted
// filesystem.
func TestRealStack(t *testing.T) {
	needStack(t)
	const size = 128 << 20
	dir := t.TempDir()
	srcPath, dstPath := filepath.Join(dir, "src.img"), filepath.Join(dir, "dst.img")
	files := makeSourceImage(t, srcPath, size, map[string]int{"a": 3 << 20, "b": 1 << 20, "c": 200 << 10})
	used := usedBytes(t, srcPath)
	srcImage, err := os.ReadFile(srcPath)
	if err != nil {
		t.Fatal(err)
	}

	src, err := blockdev.OpenFile(srcPath, true)
	if err != nil {
		t.Fatal(err)
	}
	dst, err := blockdev.CreateSparse(dstPath, size)
	if err != nil {
		t.Fatal(err)
	}
	eng, err := dmclone.Open(zerolog.Nop(), dmclone.Config{Source: src, Dest: dst, MetaPath: filepath.Join(dir, "meta")})
	if err != nil {
		t.Fatal(err)
	}
	defer eng.Close()
	rec := &recorder{Device: eng, model: srcImage, discard: make([]bool, size/512)}
	exp, err := fuseexport.Mount(zerolog.Nop(), filepath.Join(dir, "export"), "disk", rec)
	if err != nil {
		t.Fatal(err)
	}
	loop := attachLoop(t, exp.Path(), true)
	t.Cleanup(func() {
		loopdev.Detach(loop)
		if err := exp.Close(); err != nil {
			t.Errorf("close export: %v", err)
			unix.Unmount(filepath.Dir(exp.Path()), unix.MNT_DETACH) // leave no mount behind
		}
	})
	mnt := mountFS(t, loop, "-o", "nodiscard")
	for name, want := range files {
		got, err := os.ReadFile(filepath.Join(mnt, name))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("file %s through the clone: %v / content differs", name, err)
		}
	}
	newData := bytes.Repeat([]byte("written on the target\n"), 50000)
	if err := os.WriteFile(filepath.Join(mnt, "new"), newData, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(mnt, "b"))
	sh(t, "sync")
	sh(t, "fstrim", mnt)
	p := eng.Progress()
	t.Logf("after mount, reads, writes and fstrim: fetched %d KiB, filesystem used %d KiB, device %d KiB; skipped by discard %d KiB",
		p.FetchedBytes>>10, used>>10, size>>10, p.SkippedDiscardBytes>>10)
	if p.FetchedBytes > used+size/100 {
		t.Fatalf("fetched %d bytes, more than the %d the filesystem uses (+1%% of the device)", p.FetchedBytes, used)
	}
	if p.SkippedDiscardBytes < size/2 {
		t.Fatalf("fstrim skipped only %d bytes of a mostly empty %d-byte filesystem", p.SkippedDiscardBytes, size)
	}

	if err := eng.EnableHydration(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-eng.Done():
	case <-time.After(60 * time.Second):
		t.Fatalf("not hydrated after 60 s: %+v", eng.Progress())
	}
	p = eng.Progress()
	t.Logf("hydrated: fetched %d KiB in total", p.FetchedBytes>>10)
	if p.FetchedBytes > used+size/100 {
		t.Fatalf("full hydration fetched %d bytes, more than the %d the filesystem used (+1%%)", p.FetchedBytes, used)
	}
	sh(t, "sync")
	if err := eng.Flush(); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(dstPath)
	if err != nil {
		t.Fatal(err)
	}
	rec.mu.Lock()
	for s := int64(0); s < size/512; s++ {
		if rec.discard[s] {
			continue
		}
		if !bytes.Equal(got[s*512:(s+1)*512], rec.model[s*512:(s+1)*512]) {
			rec.mu.Unlock()
			t.Fatalf("destination sector %d differs from source + writes", s)
		}
	}
	rec.mu.Unlock()

	// Dissolve and swap under the mounted filesystem, then keep using it.
	d, err := eng.Dissolve()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exp.Swap(d); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "after"), newData[:100000], 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, "a")); err != nil || !bytes.Equal(b, files["a"]) {
		t.Fatalf("file a after the swap: %v", err)
	}
	sh(t, "umount", mnt)
	out, err := exec.Command("e2fsck", "-f", "-n", loop).CombinedOutput()
	if err != nil {
		t.Fatalf("e2fsck after hydration: %v\n%s", err, out)
	}
}
