package blockdev_test

import (
	"bytes"
	"crypto/rand"
	"fmt"
	mrand "math/rand"
	"os"
	"path/filepath"
	"testing"
	"unsafe"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/blockdev/blockdevtest"
	"github.com/ferry-dev/ferry/internal/testenv"
	"golang.org/x/sys/unix"
)

// newDirect opens a fresh sparse file of size bytes through Direct, or
// skips where the test directory's filesystem refuses O_DIRECT.
func newDirect(t *testing.T, size int64) (*blockdev.Direct, *blockdev.File) {
	t.Helper()
	f, err := blockdev.CreateSparse(filepath.Join(t.TempDir(), "vol.img"), size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	d, err := blockdev.OpenDirect(f, false)
	testenv.Require(t, fmt.Sprintf("O_DIRECT on the test filesystem (%v)", err), err == nil)
	return d, f
}

func TestDirectConformance(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T, size int64) blockdev.Device {
		d, _ := newDirect(t, size)
		return d
	}, blockdevtest.Options{DiscardZeroes: true})
}

// pageBuf is an n-byte buffer at a page boundary, as the view hands down.
func pageBuf(n int) []byte {
	b := make([]byte, n+blockdev.DirectAlign)
	off := (blockdev.DirectAlign - int(uintptr(unsafe.Pointer(unsafe.SliceData(b)))%blockdev.DirectAlign)) % blockdev.DirectAlign
	return b[off : off+n]
}

// Aligned direct writes and unaligned buffered ones see each other's data in
// both orders, through either handle.
func TestDirectCoherentWithBuffered(t *testing.T) {
	d, f := newDirect(t, 1<<20)
	a := pageBuf(8192)
	rand.Read(a)
	if _, err := d.WriteAt(a, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 100) // unaligned: the buffered handle
	if _, err := d.ReadAt(got, 4096+17); err != nil || !bytes.Equal(got, a[17:117]) {
		t.Fatalf("buffered read after a direct write: %v", err)
	}
	patch := []byte("unaligned patch")
	if _, err := f.WriteAt(patch, 8192+5); err != nil { // dirty in the page cache
		t.Fatal(err)
	}
	back := pageBuf(8192)
	if _, err := d.ReadAt(back, 4096); err != nil {
		t.Fatal(err)
	}
	copy(a[4096+5:], patch)
	if !bytes.Equal(back, a) {
		t.Fatal("direct read misses a buffered write still in the page cache")
	}
}

func TestDirectAllocateAheadConformance(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T, size int64) blockdev.Device {
		d, _ := newDirect(t, size)
		if err := d.AllocateAhead(64 << 10); err != nil {
			t.Fatal(err)
		}
		return d
	}, blockdevtest.Options{DiscardZeroes: true})
}

// allocated is the bytes of path's file the filesystem has allocated.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// The first direct write into a chunk allocates the whole chunk, which
// reads as zeros around the write and still counts as a hole for the
// export's known-zero list; a discard forgets it, so the next write there
// allocates again.
func TestDirectAllocateAhead(t *testing.T) {
	const chunk = 64 << 10
	d, f := newDirect(t, 1<<20)
	if err := d.AllocateAhead(chunk); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []int64{0, -4096, 1000} {
		if err := d.AllocateAhead(bad); err == nil {
			t.Fatalf("AllocateAhead(%d) accepted", bad)
		}
	}
	d.AllocateAhead(chunk)
	a := pageBuf(4096)
	rand.Read(a)
	if _, err := d.WriteAt(a, 3*chunk+8192); err != nil {
		t.Fatal(err)
	}
	if got := allocated(t, f.Name()); got < chunk || got > 2*chunk {
		t.Fatalf("after one 4 KiB write, %d bytes allocated, want the %d-byte chunk", got, chunk)
	}
	back := pageBuf(chunk)
	if _, err := d.ReadAt(back, 3*chunk); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, chunk)
	copy(want[8192:], a)
	if !bytes.Equal(back, want) {
		t.Fatal("the chunk around the write does not read as zeros, or the write is lost")
	}
	osf, err := os.Open(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	defer osf.Close()
	data, err := blockdev.DataRanges(osf)
	if err != nil {
		t.Fatal(err)
	}
	var dataBytes int64
	for _, r := range data {
		dataBytes += r.Len
	}
	if dataBytes >= chunk {
		t.Fatalf("data ranges %+v: the chunk's allocated, unwritten blocks count as data", data)
	}
	// A discard of the chunk punches it out and forgets it: the next write
	// there allocates the chunk again.
	if err := d.Discard(3*chunk, chunk); err != nil {
		t.Fatal(err)
	}
	if got := allocated(t, f.Name()); got != 0 {
		t.Fatalf("after discarding the chunk, %d bytes allocated", got)
	}
	if _, err := d.WriteAt(a, 3*chunk); err != nil {
		t.Fatal(err)
	}
	if got := allocated(t, f.Name()); got < chunk {
		t.Fatalf("a write after the discard allocated %d bytes, want the chunk again", got)
	}
}

// A write across chunk boundaries allocates every chunk it touches, and
// only those, wherever they lie in the file (the chunk map grows to fit).
func TestDirectAllocateAheadSpansChunks(t *testing.T) {
	const chunk = 16 << 10
	d, f := newDirect(t, 64<<20)
	if err := d.AllocateAhead(chunk); err != nil {
		t.Fatal(err)
	}
	a := pageBuf(2 * chunk)
	rand.Read(a)
	off := int64(3000*chunk - 4096) // chunk 2999's last page through chunk 3001
	if _, err := d.WriteAt(a, off); err != nil {
		t.Fatal(err)
	}
	if got := allocated(t, f.Name()); got < 3*chunk || got > 4*chunk {
		t.Fatalf("a write over three chunks allocated %d bytes, want %d", got, 3*chunk)
	}
	back := pageBuf(2 * chunk)
	if _, err := d.ReadAt(back, off); err != nil || !bytes.Equal(back, a) {
		t.Fatalf("read back: %v", err)
	}
}

// Allocate reserves the chunks of a range ahead of its writes, one window
// after another, so writes landing in any order leave the file in few
// extents; it does nothing without AllocateAhead, past the end, or on a
// read-only handle.
func TestDirectAllocate(t *testing.T) {
	const chunk, window, size = 64 << 10, 4 << 20, 16 << 20
	d, f := newDirect(t, size)
	d.Allocate(0, window) // no AllocateAhead: the writes allocate as they go
	if got := allocated(t, f.Name()); got != 0 {
		t.Fatalf("Allocate without AllocateAhead allocated %d bytes", got)
	}
	if err := d.AllocateAhead(chunk); err != nil {
		t.Fatal(err)
	}
	d.Allocate(size, window) // past the end
	d.Allocate(-4096, 8192)  // before the start
	if got := allocated(t, f.Name()); got != 0 {
		t.Fatalf("Allocate out of range allocated %d bytes", got)
	}
	ro, err := blockdev.OpenDirect(f, true)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if err := ro.AllocateAhead(chunk); err != nil {
		t.Fatal(err)
	}
	ro.Allocate(0, window)
	if got := allocated(t, f.Name()); got != 0 {
		t.Fatalf("Allocate on a read-only handle allocated %d bytes", got)
	}

	// Each window reserved first, then written a page-aligned 256 KiB
	// piece at a time in a shuffled order.
	a := pageBuf(256 << 10)
	rand.Read(a)
	for w := int64(0); w < size; w += window {
		d.Allocate(w, window)
		offs := make([]int64, 0, window/int64(len(a)))
		for o := w; o < w+window; o += int64(len(a)) {
			offs = append(offs, o)
		}
		mrand.Shuffle(len(offs), func(i, j int) { offs[i], offs[j] = offs[j], offs[i] })
		for _, o := range offs {
			if _, err := d.WriteAt(a, o); err != nil {
				t.Fatal(err)
			}
		}
	}
	if got := allocated(t, f.Name()); got < size || got > size+64<<10 {
		t.Fatalf("%d bytes allocated after writing all %d", got, size)
	}
	n, err := f.Extents()
	if err != nil {
		t.Fatal(err)
	}
	if n < 1 || n > 4 {
		t.Fatalf("the file written in shuffled pieces has %d extents, want 1..4: its windows were not reserved ahead", n)
	}
}

// Extents counts a sparse file's separate pieces: none in an empty one,
// two for two writes far apart.
func TestExtents(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(64 << 20); err != nil {
		t.Fatal(err)
	}
	n, err := blockdev.Extents(f)
	testenv.Require(t, fmt.Sprintf("FIEMAP on the test filesystem (%v)", err), err == nil)
	if n != 0 {
		t.Fatalf("an empty sparse file has %d extents, want 0", n)
	}
	for _, off := range []int64{0, 32 << 20} {
		if _, err := f.WriteAt(bytes.Repeat([]byte{1}, 8192), off); err != nil {
			t.Fatal(err)
		}
	}
	if n, err = blockdev.Extents(f); err != nil || n != 2 {
		t.Fatalf("two writes 32 MiB apart: %d extents (%v), want 2", n, err)
	}
}
