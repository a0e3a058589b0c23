package blockdev

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/internal/testenv"
)

// A file that cannot be allocated (here a character device; a block device
// or a filesystem without fallocate refuses the same way) turns the
// allocator off after its first refusal instead of asking on every write.
func TestAllocatorStopsWhereRefused(t *testing.T) {
	f, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	a := &allocator{chunk: 4096}
	a.before(int(f.Fd()), 0, 8192, 1<<20)
	if !a.off.Load() {
		t.Fatal("the allocator kept going on a file that refused fallocate")
	}
	if a.has(0) || a.has(1) {
		t.Fatal("chunks marked allocated on a file that refused them")
	}
}

// Opening a file with data already in it marks the chunks the data fills
// from end to end, and only those, so their first writes do not allocate
// (ext4 drains every direct I/O in flight for each fallocate).
func TestAllocateAheadMarksChunksWithData(t *testing.T) {
	const chunk = 16 << 10
	size := int64(5*chunk + 4096) // a last chunk of one page
	f, err := CreateSparse(filepath.Join(t.TempDir(), "vol.img"), size)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	write := func(off, n int64) {
		t.Helper()
		if _, err := f.WriteAt(bytes.Repeat([]byte{0xa5}, int(n)), off); err != nil {
			t.Fatal(err)
		}
	}
	write(0, chunk)              // chunk 0: full
	write(chunk, chunk/2)        // chunk 1: half
	write(3*chunk-4096, 2*chunk) // chunk 2's last page, chunk 3, chunk 4 but its last page
	write(5*chunk, 4096)         // the last, short chunk: full to the file's end
	if err := f.Flush(); err != nil {
		t.Fatal(err)
	}
	d, err := OpenDirect(f, false)
	testenv.Require(t, fmt.Sprintf("O_DIRECT on the test filesystem (%v)", err), err == nil)
	defer d.Close()
	if err := d.AllocateAhead(chunk); err != nil {
		t.Fatal(err)
	}
	data, err := DataRanges(d.direct)
	if err != nil {
		t.Fatal(err)
	}
	for c, want := range []bool{true, false, false, true, false, true} {
		if got := d.alloc.has(int64(c)); got != want {
			t.Errorf("chunk %d marked %v, want %v (the file's data ranges: %+v)", c, got, want, data)
		}
	}
}

// The search for chunks with data stops at its deadline: a file of many
// small extents is left partly unmarked rather than holding up its open.
func TestAllocatorMarkDataStopsAtDeadline(t *testing.T) {
	const chunk = 4096
	f, err := CreateSparse(filepath.Join(t.TempDir(), "vol.img"), 4*chunk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(bytes.Repeat([]byte{1}, 4*chunk), 0); err != nil {
		t.Fatal(err)
	}
	late := &allocator{chunk: chunk}
	late.markData(int(f.Fd()), 4*chunk, time.Now().Add(-time.Second))
	inTime := &allocator{chunk: chunk}
	inTime.markData(int(f.Fd()), 4*chunk, time.Now().Add(time.Minute))
	for c := int64(0); c < 4; c++ {
		if late.has(c) {
			t.Errorf("chunk %d marked after the deadline", c)
		}
		if !inTime.has(c) {
			t.Errorf("chunk %d of a written file left unmarked", c)
		}
	}
}

// A sparse file nothing was written to is all zero; one written byte, or
// a device SEEK_DATA does not describe, is not.
func TestAllZero(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	f, err := CreateSparse(p, 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !f.AllZero() {
		t.Fatal("a new sparse file does not read as all zero")
	}
	if _, err := f.WriteAt([]byte{1}, 40<<20); err != nil {
		t.Fatal(err)
	}
	if f.AllZero() {
		t.Fatal("a file with a byte written reads as all zero")
	}
	null, err := OpenFile("/dev/null", true)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	if null.AllZero() {
		t.Fatal("a character device was taken for an empty file")
	}
}
