package dmclone

import (
	"bytes"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/ferry-dev/ferry/blockdev"
)

// discardCounter is a destination that counts the discards reaching it.
type discardCounter struct {
	blockdev.Device
	discards atomic.Int64
}

func (d *discardCounter) Discard(off, n int64) error {
	d.discards.Add(1)
	return d.Device.Discard(off, n)
}

// A clone opened with memory made ahead uses it, once, and only for its
// own shape; a resumed clone encodes its loaded bitmap into it, so what it
// commits keeps the regions hydrated before.
func TestOpenUsesPreallocOnce(t *testing.T) {
	dir := t.TempDir()
	// Three pages of bitmap (32768 regions each): the resumed write below
	// changes only the last, so the first reaches the next commit only
	// through the image encoded at the open.
	const size = 80000 * testRegion
	srcPath, dstPath, meta := filepath.Join(dir, "src"), filepath.Join(dir, "dst"), filepath.Join(dir, "meta")
	pattern := bytes.Repeat([]byte{0x5a}, testRegion)
	writeSrc := func(p []byte) {
		src, err := blockdev.CreateSparse(srcPath, size)
		if err != nil {
			t.Fatal(err)
		}
		defer src.Close()
		if _, err := src.WriteAt(p, 7*testRegion); err != nil {
			t.Fatal(err)
		}
	}
	writeSrc(pattern)
	// open opens the clone over fresh handles (Close closes them).
	open := func(p *Prealloc) *Engine {
		src, err := blockdev.OpenFile(srcPath, true)
		if err != nil {
			t.Fatal(err)
		}
		dst, err := blockdev.CreateSparse(dstPath, size)
		if err != nil {
			t.Fatal(err)
		}
		return mustOpen(t, Config{Source: src, Dest: dst, MetaPath: meta, Prealloc: p})
	}

	if Preallocate(size*2, 0).take(size, testRegion) != nil {
		t.Fatal("memory for another device size was taken")
	}
	if Preallocate(size, 3000) != nil || Preallocate(0, 0) != nil {
		t.Fatal("memory was made for a shape Open refuses")
	}

	p := Preallocate(size, 0)
	e := open(p)
	if &e.hyd[0] != &p.hyd[0] || &e.busy[0] != &p.busy[0] || &e.meta.img[0] != &p.img[0] {
		t.Fatal("a fresh clone allocated its own bitmaps beside the memory made for it")
	}
	buf := make([]byte, testRegion)
	if _, err := e.ReadAt(buf, 7*testRegion); err != nil { // hydrates region 7
		t.Fatal(err)
	}
	if _, err := e.WriteAt(bytes.Repeat([]byte{1}, testRegion), 200*testRegion); err != nil {
		t.Fatal(err)
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}

	// The same memory again: taken, so the engine allocates.
	e = open(p)
	if &e.hyd[0] == &p.hyd[0] || &e.busy[0] == &p.busy[0] {
		t.Fatal("memory made for one open was used by a second")
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}

	// Resumed with fresh memory: the loaded bitmap is encoded into it.
	p = Preallocate(size, 0)
	e = open(p)
	if got := e.Progress().HydratedRegions; got != 2 {
		t.Fatalf("resumed with %d regions hydrated, want 2", got)
	}
	if &e.meta.img[0] != &p.img[0] {
		t.Fatal("a resumed clone did not encode into the memory made for it")
	}
	if _, err := e.WriteAt(bytes.Repeat([]byte{2}, testRegion), 70000*testRegion); err != nil {
		t.Fatal(err)
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	writeSrc(make([]byte, testRegion)) // a fetch of region 7 would now read zeros
	e = open(nil)
	defer e.Close()
	if got := e.Progress().HydratedRegions; got != 3 {
		t.Fatalf("after a commit from the preallocated image: %d regions hydrated, want 3", got)
	}
	if _, err := e.ReadAt(buf, 7*testRegion); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf, pattern) {
		t.Fatal("region 7, hydrated before the resume, was fetched again")
	}
}

// On a destination that reads as zeros, known-zero ranges are marked
// hydrated with no discard; on any other, each is discarded.
func TestKnownZeroOnAZeroedDestination(t *testing.T) {
	for _, zeroed := range []bool{false, true} {
		dir := t.TempDir()
		const size = 64 * testRegion
		src, err := blockdev.CreateSparse(filepath.Join(dir, "src"), size)
		if err != nil {
			t.Fatal(err)
		}
		f, err := blockdev.CreateSparse(filepath.Join(dir, "dst"), size)
		if err != nil {
			t.Fatal(err)
		}
		dst := &discardCounter{Device: f}
		kz := []blockdev.Range{{Off: 0, Len: 16 * testRegion}, {Off: 32 * testRegion, Len: 8 * testRegion}}
		e := mustOpen(t, Config{Source: src, Dest: dst, MetaPath: filepath.Join(dir, "meta"), KnownZero: kz, DestZeroed: zeroed})
		pr := e.Progress()
		if pr.HydratedRegions != 24 || pr.SkippedKnownZeroBytes != 24*testRegion {
			t.Fatalf("zeroed=%v: progress %+v, want the 24 known-zero regions hydrated", zeroed, pr)
		}
		want := int64(2)
		if zeroed {
			want = 0
		}
		if got := dst.discards.Load(); got != want {
			t.Fatalf("zeroed=%v: %d discards reached the destination, want %d", zeroed, got, want)
		}
		if !bytes.Equal(readAll(t, e), make([]byte, size)) {
			t.Fatalf("zeroed=%v: the clone does not read as its all-zero source", zeroed)
		}
		e.Close()
		f.Close()
		src.Close()
	}
}
