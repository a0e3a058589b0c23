package blockdev_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/blockdev/blockdevtest"
)

func TestFileConformance(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T, size int64) blockdev.Device {
		d, err := blockdev.CreateSparse(filepath.Join(t.TempDir(), "dev"), size)
		if err != nil {
			t.Fatal(err)
		}
		return d
	}, blockdevtest.Options{DiscardZeroes: true})
}

func TestMemConformance(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T, size int64) blockdev.Device { return blockdev.NewMem(size) },
		blockdevtest.Options{DiscardZeroes: true})
}

func TestReadOnlyConformance(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T, size int64) blockdev.Device {
		return blockdev.ReadOnly(blockdev.NewMem(size))
	}, blockdevtest.Options{ReadOnly: true, Initial: make([]byte, 1<<20)})
}

func TestHolesOfSparseFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sparse")
	d, err := blockdev.CreateSparse(path, 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.WriteAt(make([]byte, 4096), 1<<20); err != nil {
		t.Fatal(err)
	}
	// Non-zero data so no filesystem can elide it.
	if _, err := d.WriteAt([]byte{1}, 4<<20); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	holes, err := blockdev.Holes(f)
	if err != nil {
		t.Fatal(err)
	}
	var holeBytes int64
	for _, h := range holes {
		holeBytes += h.Len
		if h.Off <= 4<<20 && h.End() > 4<<20 {
			t.Fatalf("hole %+v covers written byte at 4 MiB", h)
		}
	}
	if holeBytes < 6<<20 || holeBytes > 8<<20-4096 {
		t.Fatalf("holes cover %d bytes, want most of the 8 MiB file but not the written blocks", holeBytes)
	}
}

func TestCreateSparseRefusesShrink(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v")
	d, err := blockdev.CreateSparse(path, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	if _, err := blockdev.CreateSparse(path, 4096); err == nil {
		t.Fatal("shrinking an existing volume file was allowed")
	}
}

func TestCheckRangeOverflow(t *testing.T) {
	if err := blockdev.CheckRange(1<<62, 1<<30, 1<<20); err == nil {
		t.Fatal("a huge offset passed the range check")
	}
	if err := blockdev.CheckRange(9223372036854775000, 4096, 1<<20); err == nil {
		t.Fatal("an offset near MaxInt64 passed the range check")
	}
	m := blockdev.NewMem(4096)
	if _, err := m.ReadAt(make([]byte, 4096), 9223372036854775000); err == nil {
		t.Fatal("read near MaxInt64 succeeded")
	}
}
