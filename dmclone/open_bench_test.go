package dmclone

import (
	"fmt"
	"path/filepath"
	"testing"

	"github.com/ferry-dev/ferry/blockdev"
)

// BenchmarkOpen20GiB is a migration's clone open inside its pause: a fresh
// 20 GiB clone (4 KiB regions) over a new sparse destination, its source
// listing 28 known-zero ranges as a mostly empty volume's export does. The
// variants: as before (allocating, discarding each range), with the memory
// made ahead (Prealloc), and with neither cost (DestZeroed too).
//
//	go test -run '^$' -bench Open20GiB -benchtime 20x ./dmclone/
func BenchmarkOpen20GiB(b *testing.B) {
	const size = 20 << 30
	dir := b.TempDir()
	src, err := blockdev.CreateSparse(filepath.Join(dir, "src"), size)
	if err != nil {
		b.Fatal(err)
	}
	defer src.Close()
	var kz []blockdev.Range
	for i := int64(0); i < 28; i++ {
		kz = append(kz, blockdev.Range{Off: i*(700<<20) + 8<<20, Len: 690 << 20})
	}
	for _, v := range []struct {
		name             string
		prealloc, zeroed bool
	}{{"allocate+discard", false, false}, {"prealloc+discard", true, false}, {"prealloc+zeroed", true, true}} {
		b.Run(v.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				d := filepath.Join(dir, fmt.Sprintf("%s-%d", v.name, i))
				dst, err := blockdev.CreateSparse(d, size)
				if err != nil {
					b.Fatal(err)
				}
				cfg := Config{Source: src, Dest: dst, MetaPath: d + ".meta", KnownZero: kz, DestZeroed: v.zeroed}
				if v.prealloc {
					cfg.Prealloc = Preallocate(size, 0)
				}
				b.StartTimer()
				e := mustOpen(b, cfg)
				b.StopTimer()
				e.Close()
				dst.Close()
				b.StartTimer()
			}
		})
	}
}
