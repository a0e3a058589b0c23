package dmclone

import (
	"encoding/binary"
	"hash/crc32"
	"testing"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"4096": 4096, "4k": 4096, "4KiB": 4096, "1M": 1 << 20, "1g": 1 << 30, " 8K ": 8192, "2kb": 2048} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "k", "-4k", "4x", "99999999999999999999", "9t9", "8000000000000g"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) accepted", in)
		}
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"4k", "1M", "4096", "1GiB", "-1", "kk"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err == nil && n < 0 {
			t.Fatalf("ParseSize(%q) = %d", s, n)
		}
	})
}

// FuzzDecodeSlot feeds arbitrary bytes to the metadata parser: it must
// reject or accept, never panic, and what it accepts must re-encode to the
// same state.
func FuzzDecodeSlot(f *testing.F) {
	good := encodeSlot(&metaState{seq: 3, regionSize: 4096, size: 100 * 4096, regions: 100, bits: newBitmap(100)})
	f.Add(good)
	f.Add(good[:100])
	f.Add([]byte("FERRYCLN"))
	odd := encodeSlot(&metaState{seq: 9, regionSize: 8192, size: 70*8192 - 512, regions: 70, bits: newBitmap(70)})
	f.Add(odd)
	f.Fuzz(func(t *testing.T, b []byte) {
		decodeSlot(b)
		// Also with a valid checksum, so the fuzzer gets past it to the
		// fields behind it.
		if len(b) >= metaHeaderLen {
			regions := int64(binary.LittleEndian.Uint64(b[offRegions:]))
			if regions > 0 && regions <= maxRegions && int64(len(b)) >= metaHeaderLen+bitmapBytes(regions) {
				bm := b[metaHeaderLen : metaHeaderLen+bitmapBytes(regions)]
				binary.LittleEndian.PutUint32(b[offCRC:], crc32.Update(crc32.Checksum(b[:offCRC], crcTable), crcTable, bm))
			}
		}
		s, err := decodeSlot(b)
		if err != nil {
			return
		}
		if s.bits.count(s.regions) > s.regions {
			t.Fatal("more hydrated regions than regions")
		}
		again, err := decodeSlot(encodeSlot(s))
		if err != nil || again.seq != s.seq || again.regions != s.regions {
			t.Fatalf("re-encoding an accepted slot: %v", err)
		}
	})
}
