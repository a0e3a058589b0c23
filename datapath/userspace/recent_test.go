package userspace

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// The hot ranges are the newest chunks touched, merged and sorted, bounded
// by the byte cap and the device's size.
func TestRecentIOHot(t *testing.T) {
	var r recentIO
	if got := r.hot(maxHot, 1<<30); len(got) != 0 {
		t.Fatalf("nothing touched: %v", got)
	}
	r.note(0, 4096)                    // chunk 0
	r.note(10*recentChunk+100, 2*4096) // chunk 10
	r.note(11*recentChunk-10, 20)      // chunks 10 and 11
	r.note(500*recentChunk, 4096)      // chunk 500
	r.note(0, 0)                       // nothing
	want := []blockdev.Range{{Off: 0, Len: recentChunk}, {Off: 10 * recentChunk, Len: 2 * recentChunk}, {Off: 500 * recentChunk, Len: recentChunk}}
	if got := r.hot(maxHot, 1<<30); !slices.Equal(got, want) {
		t.Fatalf("hot %v, want %v", got, want)
	}
	// Two chunks' worth: the newest two (500, then 11).
	if got := r.hot(2*recentChunk, 1<<30); !slices.Equal(got, []blockdev.Range{{Off: 11 * recentChunk, Len: recentChunk}, {Off: 500 * recentChunk, Len: recentChunk}}) {
		t.Fatalf("capped hot %v", got)
	}
	// A device that shrank: nothing past its end.
	if got := r.hot(maxHot, 10*recentChunk+5); !slices.Equal(got, []blockdev.Range{{Off: 0, Len: recentChunk}, {Off: 10 * recentChunk, Len: 5}}) {
		t.Fatalf("clipped hot %v", got)
	}
	// The ring forgets the oldest touches.
	for i := 0; i < recentSlots; i++ {
		r.note(int64(1000+i%8)*recentChunk, 1)
	}
	if got := r.hot(maxHot, 1<<40); len(got) != 1 || got[0].Off != 1000*recentChunk || got[0].Len != 8*recentChunk {
		t.Fatalf("after the ring wrapped: %v", got)
	}
}

// A served volume's datapath reports where its machine wrote last: the
// ciphertext of a file just written and synced lies in its hot ranges.
func TestHotRangesCoverTheLastWrites(t *testing.T) {
	b := hostBackend(t, t.TempDir())
	t.Cleanup(func() { b.CleanupAll(context.Background()) })
	testenv.Tools(t, "e2fsprogs", "filefrag")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	pass := []byte("hot-passphrase")
	layout, err := b.Create(ctx, "hot1", 64<<20, pass)
	if err != nil {
		t.Fatal(err)
	}
	mnt := b.MountPoint("m")
	if _, err := b.MountLocal(ctx, "hot1", layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Unmount(context.Background(), "hot1", mnt) })
	path := filepath.Join(mnt, "log")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(bytes.Repeat([]byte("the log a restart reads again "), 10000)); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// Where ext4 put the file: its first physical block, in the plaintext.
	out, err := exec.Command("filefrag", "-v", "-b4096", path).CombinedOutput()
	if err != nil {
		t.Fatalf("filefrag: %v: %s", err, out)
	}
	m := regexp.MustCompile(`(?m)^\s*0:\s+0\.\.\s+\d+:\s+(\d+)\.\.`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no first extent in:\n%s", out)
	}
	block, _ := strconv.ParseInt(string(m[1]), 10, 64)
	at := layout.DataOffset + block*4096
	hot, err := b.HotRanges(ctx, "hot1")
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	covered := false
	for _, r := range hot {
		total += r.Len
		covered = covered || r.Off <= at && at < r.Off+r.Len
	}
	if !covered || total > maxHot {
		t.Fatalf("hot ranges %v (%d bytes) do not cover the file's ciphertext at %d", hot, total, at)
	}
}

// A clone reads ahead at most maxHot bytes of its hot ranges, inside the
// device: they come from the source.
func TestHotAheadBounded(t *testing.T) {
	got := hotAhead([]blockdev.Range{{Off: -1, Len: 10}, {Off: 0, Len: 0}, {Off: 4096, Len: 3 << 20}, {Off: 8 << 20, Len: 3 << 20}, {Off: 1 << 40, Len: 4096}}, 64<<20)
	want := []blockdev.Range{{Off: 4096, Len: 3 << 20}, {Off: 8 << 20, Len: 1 << 20}}
	if !slices.Equal(got, want) {
		t.Fatalf("hotAhead %v, want %v", got, want)
	}
}
