package dmclone

import (
	"math/rand/v2"
	"testing"
)

// nextSet agrees with a bit-by-bit search at every start, on sparse and
// dense bitmaps whose length is not a multiple of 64.
func TestBitmapNextSet(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, density := range []float64{0, 0.001, 0.05, 0.5, 1} {
		const n = 1000
		b := newBitmap(n)
		for i := int64(0); i < n; i++ {
			if r.Float64() < density {
				b.set(i)
			}
		}
		for from := int64(0); from <= n; from++ {
			want := int64(n)
			for i := from; i < n; i++ {
				if b.get(i) {
					want = i
					break
				}
			}
			// A limit below the bitmap's end is honoured too.
			if got := b.nextSet(from, n); got != want {
				t.Fatalf("density %v: nextSet(%d) = %d, want %d", density, from, got, want)
			}
			if lim := int64(700); from <= lim {
				if got, w := b.nextSet(from, lim), min(want, lim); got != w {
					t.Fatalf("density %v: nextSet(%d, %d) = %d, want %d", density, from, lim, got, w)
				}
			}
		}
	}
}
