package iscsi

import (
	"bytes"
	"context"
	"os"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestStoreReadsMappedVolume(t *testing.T) {
	image, want := randomImage(t, 4<<20)
	s := &roStore{}
	if err := s.Open(nil, image); err != nil {
		t.Fatal(err)
	}
	defer s.Close(nil)
	if s.mem.Load() == nil {
		t.Fatal("the volume was not mapped")
	}
	for _, c := range []struct{ off, n int64 }{{0, 512}, {4096, 1 << 20}, {3 << 20, 1 << 20}, {12345 * 256, 256 << 10}} {
		got, err := s.Read(c.off, c.n)
		if err != nil {
			t.Fatalf("Read(%d, %d): %v", c.off, c.n, err)
		}
		if !bytes.Equal(got, want[c.off:c.off+c.n]) {
			t.Fatalf("Read(%d, %d) differs from the volume", c.off, c.n)
		}
		if cap(got) != len(got) {
			t.Fatalf("Read(%d, %d) returned spare capacity into the rest of the mapping", c.off, c.n)
		}
	}
	for _, c := range []struct{ off, n int64 }{{-1, 512}, {4 << 20, 1}, {0, 4<<20 + 1}, {1 << 62, 1 << 62}} {
		if _, err := s.Read(c.off, c.n); err == nil {
			t.Errorf("Read(%d, %d) outside the volume succeeded", c.off, c.n)
		}
	}
	if err := s.Write(make([]byte, 512), 0); err == nil {
		t.Error("Write succeeded on the read-only store")
	}
}

// A volume truncated under the export (which a frozen source must never
// be) fails the command instead of killing the export with SIGBUS.
func TestStoreReadOfTruncatedVolumeFails(t *testing.T) {
	image, _ := randomImage(t, 1<<20)
	s := &roStore{}
	if err := s.Open(nil, image); err != nil {
		t.Fatal(err)
	}
	defer s.Close(nil)
	if err := os.Truncate(image, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Read(512<<10, 64<<10); err == nil {
		t.Fatal("read beyond the truncated end of the mapped volume succeeded")
	}
}

func TestInitiatorSpreadsOverSessions(t *testing.T) {
	const size = 8 << 20
	image, want := randomImage(t, size)
	e, _ := startTestExport(t, image, nil)
	if _, err := Dial(context.Background(), testLogger(t), InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Sessions: maxSessions + 1}); err == nil {
		t.Fatalf("Dial accepted %d sessions", maxSessions+1)
	}
	l, err := Dial(context.Background(), testLogger(t), InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(),
		Sessions: 3, QueueDepth: 6, MaxTransfer: 256 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make([]byte, size)
	if _, err := l.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("read over several sessions differs from the image")
	}
	conns, isids := map[string]bool{}, map[[6]byte]bool{}
	for i, p := range l.paths {
		p.mu.Lock()
		s := p.sess
		p.mu.Unlock()
		if s == nil || !s.alive() {
			t.Fatalf("session %d of 3 never carried a command", i)
		}
		conns[s.conn.LocalAddr().String()] = true
		isids[p.isid] = true
	}
	// gotgt keys sessions by ISID: distinct ISIDs are distinct sessions.
	if len(conns) != 3 || len(isids) != 3 {
		t.Fatalf("%d connections with %d ISIDs, want 3 of each", len(conns), len(isids))
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.ReadAt(got[:512], 0); err == nil {
		t.Fatal("read after Close succeeded")
	}
}

// A small read (a running machine's demand read) reads about what it asks
// from the disk: a fault in the export's mapping would read ahead of it
// (MADV_SEQUENTIAL: the disk's read-ahead, 8 MiB here) and make the
// machine wait for all of it.
func TestStoreSmallReadDoesNotReadAround(t *testing.T) {
	const size = 64 << 20
	image, want := randomImage(t, size)
	f, err := os.Open(image)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
	s := &roStore{}
	if err := s.Open(nil, image); err != nil {
		t.Fatal(err)
	}
	defer s.Close(nil)
	mem := *s.mem.Load()
	resident := func() int {
		vec := make([]byte, size/4096)
		if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&mem[0])), uintptr(len(mem)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
			t.Fatalf("mincore: %v", e)
		}
		n := 0
		for _, v := range vec {
			n += int(v & 1)
		}
		return n
	}
	if n := resident(); n > 16 {
		t.Fatalf("%d pages of the image stay cached after FADV_DONTNEED: the test needs a disk-backed TMPDIR, not tmpfs", n)
	}
	const off = 32 << 20
	got, err := s.Read(off, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want[off:off+4096]) {
		t.Fatal("the small read differs from the volume")
	}
	if n := resident(); n > 64 {
		t.Fatalf("a 4 KiB read brought %d KiB of the volume into the page cache: it read around instead of reading the block", n*4)
	}
}
