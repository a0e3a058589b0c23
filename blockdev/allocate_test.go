package blockdev

import (
	"os"
	"testing"
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
