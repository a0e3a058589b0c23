package luks

import (
	"bytes"
	"crypto/aes"
	"crypto/rand"
	mrand "math/rand"
	"testing"

	"golang.org/x/crypto/xts"
)

// The fast XTS agrees with golang.org/x/crypto/xts for both key sizes,
// every sector size, both directions and arbitrary sector numbers.
func TestXTSMatchesXCrypto(t *testing.T) {
	rng := mrand.New(mrand.NewSource(3))
	for _, keyLen := range []int{32, 64} {
		key := make([]byte, keyLen)
		rand.Read(key)
		ref, err := xts.NewCipher(aes.NewCipher, key)
		if err != nil {
			t.Fatal(err)
		}
		mine, err := newXTSCipher(key)
		if err != nil {
			t.Fatal(err)
		}
		tw := make([]byte, maxSector)
		for _, sector := range []int{512, 1024, 2048, 4096} {
			for i := 0; i < 20; i++ {
				num := rng.Uint64()
				if i < 3 {
					num = uint64(i)
				}
				plain := make([]byte, sector)
				rand.Read(plain)
				want := make([]byte, sector)
				ref.Encrypt(want, plain, num)
				got := bytes.Clone(plain)
				mine.crypt(got, num, tw, true)
				if !bytes.Equal(got, want) {
					t.Fatalf("key %d sector %d num %d: encryption differs", keyLen, sector, num)
				}
				mine.crypt(got, num, tw, false)
				if !bytes.Equal(got, plain) {
					t.Fatalf("key %d sector %d num %d: decryption does not invert", keyLen, sector, num)
				}
			}
		}
	}
	if _, err := newXTSCipher(make([]byte, 48)); err == nil {
		t.Fatal("384-bit key accepted")
	}
}

func BenchmarkXTSSector(b *testing.B) {
	key := make([]byte, 64)
	c, _ := newXTSCipher(key)
	ref, _ := xts.NewCipher(aes.NewCipher, key)
	buf := make([]byte, 4096)
	tw := make([]byte, 4096)
	b.Run("ferry", func(b *testing.B) {
		b.SetBytes(4096)
		for i := 0; i < b.N; i++ {
			c.crypt(buf, uint64(i), tw, true)
		}
	})
	b.Run("x-crypto", func(b *testing.B) {
		b.SetBytes(4096)
		for i := 0; i < b.N; i++ {
			ref.Encrypt(buf, buf, uint64(i))
		}
	})
}
