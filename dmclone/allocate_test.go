package dmclone

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// jitterSrc answers each read after a random pause of up to 2 ms, as a
// remote LUN does: copies in flight side by side finish in any order.
type jitterSrc struct {
	blockdev.Device
	mu  sync.Mutex
	rnd *rand.Rand
}

func (s *jitterSrc) ReadAt(p []byte, off int64) (int, error) {
	s.mu.Lock()
	d := time.Duration(s.rnd.Int63n(int64(2 * time.Millisecond)))
	s.mu.Unlock()
	time.Sleep(d)
	return s.Device.ReadAt(p, off)
}

// Background hydration with four copies in flight, finishing in any order,
// leaves the destination file in a few extents (ascending windows), not one
// per copy, and a range trimmed before it stays a hole.
func TestHydrationAllocatesTheDestinationInOrder(t *testing.T) {
	const size, trimOff, trimLen = 64 << 20, 20 << 20, 8 << 20
	src := randomMem(t, size, 7)
	f, err := blockdev.CreateSparse(filepath.Join(t.TempDir(), "dst"), size)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	d, err := blockdev.OpenDirect(f, false)
	testenv.Require(t, fmt.Sprintf("O_DIRECT on the test filesystem (%v)", err), err == nil)
	if err := d.AllocateAhead(256 << 10); err != nil {
		t.Fatal(err)
	}
	e := mustOpen(t, Config{Source: &jitterSrc{Device: src, rnd: rand.New(rand.NewSource(1))}, Dest: d, MetaPath: metaPath(t),
		Tunables: Tunables{BatchRegions: (1 << 20) / testRegion, InFlight: 4, MinShare: 0.25}})
	defer e.Close()
	if err := e.Discard(trimOff, trimLen); err != nil {
		t.Fatal(err)
	}
	if err := e.EnableHydration(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, e)

	want := readAll(t, src)
	clear(want[trimOff : trimOff+trimLen])
	if !bytes.Equal(readAll(t, e), want) {
		t.Fatal("hydrated content differs from the source with the trimmed range zeroed")
	}
	n, err := f.Extents()
	if err != nil {
		t.Fatal(err)
	}
	// Two data ranges, each allocated in ascending 16 MiB windows; a
	// filesystem may split them at its group boundaries (128 MiB on ext4)
	// or where another file took the next blocks.
	if n < 2 || n > 8 {
		t.Fatalf("the hydrated 64 MiB file has %d extents, want 2..8: copies allocated in the order they landed", n)
	}
	st, err := os.Stat(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	// Blocks count the filesystem's own mapping blocks too (an extent
	// tree's leaf): a few KiB over the data.
	if used := st.Sys().(*syscall.Stat_t).Blocks * 512; used > size-trimLen+64<<10 {
		t.Fatalf("the hydrated file holds %d bytes, want at most %d: the trimmed range was allocated", used, size-trimLen)
	}
}
