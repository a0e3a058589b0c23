package userspace

import (
	"bytes"
	"crypto/rand"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
)

// gatedDev holds every read until open is closed: the copier is held
// mid-copy.
type gatedDev struct {
	blockdev.Device
	open chan struct{}
}

func (g *gatedDev) ReadAt(p []byte, off int64) (int, error) {
	<-g.open
	return g.Device.ReadAt(p, off)
}

// TestCowSnapshotRequests: asking again for the running copy answers it;
// another copy is refused while one runs and accepted once it ended; a
// write while the copy runs waits for its region to be preserved.
func TestCowSnapshotRequests(t *testing.T) {
	mem := blockdev.NewMem(1 << 20)
	mem.WriteAt(bytes.Repeat([]byte{1}, 1<<20), 0)
	g := &gatedDev{Device: mem, open: make(chan struct{})}
	c := newCow(zerolog.Nop(), g)
	dir := t.TempDir()
	all := func() ([]blockdev.Range, error) { return []blockdev.Range{{Off: 0, Len: 1 << 20}}, nil }
	a, b := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	if st, err := c.Snapshot(a, all); err != nil || st.Done {
		t.Fatalf("start: %+v %v", st, err)
	}
	if st, err := c.Snapshot(a, all); err != nil || st.Path != a {
		t.Fatalf("the same copy again: %+v %v", st, err)
	}
	if _, err := c.Snapshot(b, all); err == nil {
		t.Fatal("a second copy started while one runs")
	}
	wrote := make(chan struct{})
	go func() {
		c.WriteAt(bytes.Repeat([]byte{2}, 4096), 0)
		close(wrote)
	}()
	select {
	case <-wrote:
		t.Fatal("a write into a region not preserved yet went through")
	case <-time.After(50 * time.Millisecond):
	}
	close(g.open)
	<-wrote
	for st := c.SnapshotStatus(); !st.Done; st = c.SnapshotStatus() {
		time.Sleep(time.Millisecond)
	}
	got, _ := os.ReadFile(a)
	if !bytes.Equal(got, bytes.Repeat([]byte{1}, 1<<20)) {
		t.Fatal("the copy holds the write made after its instant")
	}
	if _, err := c.Snapshot(b, all); err != nil {
		t.Fatalf("a new copy once the first ended: %v", err)
	}
}

// TestCowSnapshotEqualsTheInstant checks the copy byte for byte against a
// copy taken under a lock at the instant, with writes racing the copier
// before and after it.
func TestCowSnapshotEqualsTheInstant(t *testing.T) {
	const size = 4 << 20
	mem := blockdev.NewMem(size)
	init := make([]byte, size)
	rand.Read(init[:3<<20])
	mem.WriteAt(init, 0)
	// Reads of the device are slowed, so the copy lasts long enough for the
	// writers to reach regions it has not copied yet (without it, a copier
	// scheduled ahead of them on a busy machine could finish first).
	c := newCow(zerolog.Nop(), slowReads{mem, 200 * time.Microsecond})

	// Writers hold a shared lock around each write; the test takes it
	// exclusively to start the snapshot and read the instant's content
	// in one step, so the expected image is exact.
	var pause sync.RWMutex
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := mrand.New(mrand.NewPCG(uint64(w), 7))
			buf := make([]byte, 8192)
			for {
				select {
				case <-stop:
					return
				default:
				}
				off := r.Int64N(size/4096-1) * 4096
				rand.Read(buf)
				pause.RLock()
				var err error
				if r.IntN(6) == 0 {
					err = c.Discard(off, 8192)
				} else {
					_, err = c.WriteAt(buf, off)
				}
				pause.RUnlock()
				if err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	time.Sleep(10 * time.Millisecond)
	path := filepath.Join(t.TempDir(), "snap")
	want := make([]byte, size)
	pause.Lock()
	if _, err := mem.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	// The whole device may hold data by now: list it all.
	if _, err := c.Snapshot(path, func() ([]blockdev.Range, error) { return []blockdev.Range{{Off: 0, Len: size}}, nil }); err != nil {
		t.Fatal(err)
	}
	pause.Unlock()
	deadline := time.Now().Add(30 * time.Second)
	var st *SnapshotStatus
	for {
		if st = c.SnapshotStatus(); st.Done {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("snapshot not done: %+v", st)
		}
		time.Sleep(2 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if st.Error != "" {
		t.Fatal(st.Error)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != size {
		t.Fatalf("copy is %d bytes, want %d", len(got), size)
	}
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("copy differs from the instant at byte %d (region %d)", i, i/snapRegion)
			}
		}
	}
	now := make([]byte, size)
	mem.ReadAt(now, 0)
	if bytes.Equal(now, want) {
		t.Fatal("the writers changed nothing: the test proves nothing")
	}
	t.Logf("copied %d, preserved %d bytes ahead of writes", st.CopiedBytes, st.PreservedBytes)
	if st.PreservedBytes == 0 {
		t.Error("no region was preserved ahead of a write: the race the layer exists for was not exercised")
	}
}

// TestCowZeroRegionsStayHoles: a region reading as zeros is not written to
// the copy, so a sparse volume's copy is sparse.
func TestCowZeroRegionsStayHoles(t *testing.T) {
	const size = 16 << 20
	mem := blockdev.NewMem(size)
	mem.WriteAt(bytes.Repeat([]byte{7}, 1<<20), 0)
	c := newCow(zerolog.Nop(), mem)
	path := filepath.Join(t.TempDir(), "snap")
	if _, err := c.Snapshot(path, func() ([]blockdev.Range, error) { return []blockdev.Range{{Off: 0, Len: size}}, nil }); err != nil {
		t.Fatal(err)
	}
	for st := c.SnapshotStatus(); !st.Done; st = c.SnapshotStatus() {
		time.Sleep(time.Millisecond)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rs, err := blockdev.DataRanges(f)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, r := range rs {
		n += r.Len
	}
	if n > 2<<20 {
		t.Fatalf("copy of a volume with 1 MiB of data allocates %d bytes", n)
	}
}

// slowReads delays every read of its device.
type slowReads struct {
	blockdev.Device
	delay time.Duration
}

func (d slowReads) ReadAt(p []byte, off int64) (int, error) {
	time.Sleep(d.delay)
	return d.Device.ReadAt(p, off)
}
