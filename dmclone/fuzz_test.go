package dmclone

import (
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
	f.Fuzz(func(t *testing.T, b []byte) {
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
