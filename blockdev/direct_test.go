package blockdev_test

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"path/filepath"
	"testing"
	"unsafe"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/blockdev/blockdevtest"
	"github.com/ferry-dev/ferry/internal/testenv"
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
