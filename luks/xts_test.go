package luks

import (
	"bytes"
	"crypto/aes"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	mrand "math/rand"
	"runtime"
	"testing"
	"time"

	"golang.org/x/crypto/xts"
	"golang.org/x/sys/unix"
)

// xtsVariants are the implementations this machine can run: the 256-bit
// VAES loop and the AES-NI loop (where the CPU has them) and the portable one.
func xtsVariants(t testing.TB, key []byte) map[string]*xtsCipher {
	t.Helper()
	c, err := newXTSCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	generic := *c
	generic.sched = nil
	v := map[string]*xtsCipher{"generic": &generic}
	if c.sched != nil {
		aesni := *c
		sched := *c.sched
		sched.vaes = false
		aesni.sched = &sched
		v["aes-ni"] = &aesni
		if c.sched.vaes {
			v["vaes"] = c
		} else {
			t.Logf("no VAES on this machine: checking the AES-NI loop and the portable one")
		}
	} else {
		t.Logf("no AES-NI sector loop on this machine: checking the portable one only")
	}
	return v
}

// refSectors is x/crypto/xts over n sectors with IVs iv, iv+step, ...
func refSectors(ref *xts.Cipher, dst, src []byte, sector int, iv, step uint64, encrypt bool) {
	for i := 0; i < len(src); i += sector {
		if encrypt {
			ref.Encrypt(dst[i:i+sector], src[i:i+sector], iv)
		} else {
			ref.Decrypt(dst[i:i+sector], src[i:i+sector], iv)
		}
		iv += step
	}
}

// Both implementations agree with golang.org/x/crypto/xts for both key
// sizes, every LUKS2 sector size, runs of several sectors with the IV steps
// the view uses, both directions, in place and into another buffer, and
// sector numbers near the 64-bit wrap.
func TestXTSMatchesXCrypto(t *testing.T) {
	rng := mrand.New(mrand.NewSource(3))
	for _, keyLen := range []int{32, 64} {
		key := make([]byte, keyLen)
		rand.Read(key)
		ref, err := xts.NewCipher(aes.NewCipher, key)
		if err != nil {
			t.Fatal(err)
		}
		for name, c := range xtsVariants(t, key) {
			for _, sector := range []int{512, 1024, 2048, 4096} {
				for i := 0; i < 20; i++ {
					num := rng.Uint64()
					switch i {
					case 0, 1, 2:
						num = uint64(i)
					case 3:
						num = ^uint64(0) - 1 // the IV wraps within the run
					}
					count := 1 + rng.Intn(4)
					step := uint64(sector / ivUnit)
					plain := make([]byte, count*sector)
					rand.Read(plain)
					want := make([]byte, len(plain))
					refSectors(ref, want, plain, sector, num, step, true)
					got := make([]byte, len(plain))
					c.cryptSectors(got, plain, sector, num, step, true)
					if !bytes.Equal(got, want) {
						t.Fatalf("%s key %d sector %d num %d: encryption differs from x/crypto/xts", name, keyLen, sector, num)
					}
					inPlace := bytes.Clone(plain)
					c.cryptSectors(inPlace, inPlace, sector, num, step, true)
					if !bytes.Equal(inPlace, want) {
						t.Fatalf("%s key %d sector %d num %d: in-place encryption differs", name, keyLen, sector, num)
					}
					c.cryptSectors(got, want, sector, num, step, false)
					if !bytes.Equal(got, plain) {
						t.Fatalf("%s key %d sector %d num %d: decryption does not invert", name, keyLen, sector, num)
					}
					c.cryptSectors(inPlace, inPlace, sector, num, step, false)
					if !bytes.Equal(inPlace, plain) {
						t.Fatalf("%s key %d sector %d num %d: in-place decryption does not invert", name, keyLen, sector, num)
					}
				}
			}
		}
	}
	if _, err := newXTSCipher(make([]byte, 48)); err == nil {
		t.Fatal("384-bit key accepted")
	}
}

// IEEE 1619-2007 vector 10 (AES-256 keys, data unit 0xff, 512 bytes of
// 00..ff twice): a known answer independent of any Go implementation.
func TestXTSIEEE1619Vector10(t *testing.T) {
	key, _ := hex.DecodeString("2718281828459045235360287471352662497757247093699959574966967627" +
		"3141592653589793238462643383279502884197169399375105820974944592")
	plain := make([]byte, 512)
	for i := range plain {
		plain[i] = byte(i)
	}
	wantHead, _ := hex.DecodeString("1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b")
	for name, c := range xtsVariants(t, key) {
		got := make([]byte, 512)
		c.cryptSectors(got, plain, 512, 0xff, 1, true)
		if !bytes.Equal(got[:32], wantHead) {
			t.Fatalf("%s: first 32 bytes %x, want %x", name, got[:32], wantHead)
		}
	}
}

// Misuse the view never makes panics instead of writing past a buffer.
func TestXTSRefusesPartialSectors(t *testing.T) {
	c, err := newXTSCipher(make([]byte, 64))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ dst, src, sector int }{{512, 500, 512}, {1024, 1024, 500}, {512, 1024, 512}, {8192, 8192, 8192}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("dst %d src %d sector %d: no panic", tc.dst, tc.src, tc.sector)
				}
			}()
			c.cryptSectors(make([]byte, tc.dst), make([]byte, tc.src), tc.sector, 0, 1, true)
		}()
	}
}

// FuzzXTSMatchesXCrypto checks both implementations against
// golang.org/x/crypto/xts on arbitrary keys, data, sector sizes and IVs.
func FuzzXTSMatchesXCrypto(f *testing.F) {
	f.Add(make([]byte, 64), make([]byte, 512), uint64(0), uint8(0), uint8(1))
	f.Add(bytes.Repeat([]byte{7}, 32), bytes.Repeat([]byte{1}, 4096), ^uint64(0), uint8(3), uint8(8))
	f.Fuzz(func(t *testing.T, key, data []byte, iv uint64, sectorLog, step uint8) {
		if len(key) >= 64 {
			key = key[:64]
		} else if len(key) >= 32 {
			key = key[:32]
		} else {
			return
		}
		sector := 512 << (sectorLog % 4)
		data = data[:len(data)/sector*sector]
		if len(data) == 0 {
			return
		}
		ref, err := xts.NewCipher(aes.NewCipher, key)
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, len(data))
		refSectors(ref, want, data, sector, iv, uint64(step), true)
		for name, c := range xtsVariants(t, key) {
			got := make([]byte, len(data))
			c.cryptSectors(got, data, sector, iv, uint64(step), true)
			if !bytes.Equal(got, want) {
				t.Fatalf("%s: encryption differs from x/crypto/xts", name)
			}
			c.cryptSectors(got, got, sector, iv, uint64(step), false)
			if !bytes.Equal(got, data) {
				t.Fatalf("%s: decryption does not invert", name)
			}
		}
	})
}

// The AES-NI key schedule is FIPS-197's: the last word of the appendix A
// expansions for each key size. (The XTS tests above check the whole
// schedule through the cipher.)
func TestExpandKeyFIPS197(t *testing.T) {
	for _, tc := range []struct {
		key  string
		last uint32
	}{
		{"2b7e151628aed2a6abf7158809cf4f3c", 0xb6630ca6},
		{"8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b", 0x01002202},
		{"603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4", 0x706c631e},
	} {
		key, _ := hex.DecodeString(tc.key)
		xk := expandKey(key)
		if len(xk) != 16*(len(key)/4+7) {
			t.Fatalf("%d-byte key: schedule of %d bytes", len(key), len(xk))
		}
		if !bytes.Equal(xk[:len(key)], key) {
			t.Fatalf("%d-byte key: schedule does not start with the key", len(key))
		}
		if last := binary.BigEndian.Uint32(xk[len(xk)-4:]); last != tc.last {
			t.Errorf("%d-byte key: last schedule word %08x, want %08x", len(key), last, tc.last)
		}
	}
}

// threadCPU is the CPU time the calling OS thread has used: on a shared
// machine, bytes per CPU second says what a core does whatever the wait for
// one.
func threadCPU(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkXTSSector compares the implementations on 64 KiB runs of 512-
// and 4096-byte sectors; the MB/cpu-s column is per core.
func BenchmarkXTSSector(b *testing.B) {
	key := make([]byte, 64)
	ref, _ := xts.NewCipher(aes.NewCipher, key)
	buf := make([]byte, 64<<10)
	for _, sector := range []int{512, 4096} {
		run := func(name string, crypt func(i int)) {
			b.Run(fmt.Sprintf("%s-%d", name, sector), func(b *testing.B) {
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				b.SetBytes(int64(len(buf)))
				start := threadCPU(b)
				for i := 0; i < b.N; i++ {
					crypt(i)
				}
				cpu := threadCPU(b) - start
				b.ReportMetric(float64(b.N)*float64(len(buf))/1e6/cpu.Seconds(), "MB/cpu-s")
			})
		}
		for name, c := range xtsVariants(b, key) {
			run(name, func(i int) { c.cryptSectors(buf, buf, sector, uint64(i), uint64(sector/512), true) })
		}
		run("x-crypto", func(i int) { refSectors(ref, buf, buf, sector, uint64(i), uint64(sector/512), true) })
	}
}
