package luks

import (
	"bytes"
	"crypto/aes"
	"crypto/rand"
	"errors"
	mrand "math/rand"
	"strconv"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/crypto/xts"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/blockdev/blockdevtest"
)

func testLayout(sector int, payload int64) Layout {
	return Layout{UUID: "test", DataOffset: 32 << 10, MetadataSize: 16384, KeyslotsSize: 0, SectorSize: sector,
		Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: payload}
}

func randomKey() *VolumeKey {
	b := make([]byte, 64)
	rand.Read(b)
	return NewVolumeKey(b)
}

func TestViewConformance(t *testing.T) {
	for _, sector := range []int{512, 4096} {
		t.Run(strconv.Itoa(sector), func(t *testing.T) {
			blockdevtest.Run(t, func(t *testing.T, size int64) blockdev.Device {
				l := testLayout(sector, size)
				v, err := OpenView(blockdev.NewMem(l.DeviceSize()), l, randomKey())
				if err != nil {
					t.Fatal(err)
				}
				return v
			}, blockdevtest.Options{}) // a discarded range reads as decrypted zeros, not zeros
		})
	}
}

// Unaligned reads and writes of any size behave like a byte array, and the
// ciphertext below really is not the plaintext.
func TestViewUnalignedModel(t *testing.T) {
	for _, sector := range []int{512, 4096} {
		t.Run(strconv.Itoa(sector), func(t *testing.T) {
			const size = 256 << 10
			l := testLayout(sector, size)
			mem := blockdev.NewMem(l.DeviceSize())
			v, err := OpenView(mem, l, randomKey())
			if err != nil {
				t.Fatal(err)
			}
			model := make([]byte, size)
			if _, err := v.WriteAt(model, 0); err != nil {
				t.Fatal(err)
			}
			rng := mrand.New(mrand.NewSource(7))
			for i := 0; i < 300; i++ {
				off := rng.Int63n(size - 1)
				n := 1 + rng.Intn(min(int(size-off), 3*sector))
				if rng.Intn(2) == 0 {
					p := make([]byte, n)
					rng.Read(p)
					if _, err := v.WriteAt(p, off); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], p)
				} else {
					got := make([]byte, n)
					if _, err := v.ReadAt(got, off); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, model[off:off+int64(n)]) {
						t.Fatalf("read %d at %d differs from the model", n, off)
					}
				}
			}
			all := make([]byte, size)
			if _, err := v.ReadAt(all, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(all, model) {
				t.Fatal("final content differs from the model")
			}
			cipher := make([]byte, size)
			mem.ReadAt(cipher, l.DataOffset)
			if bytes.Equal(cipher, model) || bytes.Contains(cipher, model[:64]) {
				t.Fatal("ciphertext below the view contains the plaintext")
			}
		})
	}
}

// Unaligned writers to disjoint bytes of the same sectors never lose each
// other's bytes (run with -race).
func TestViewConcurrentUnalignedWriters(t *testing.T) {
	l := testLayout(4096, 64<<10)
	v, err := OpenView(blockdev.NewMem(l.DeviceSize()), l, randomKey())
	if err != nil {
		t.Fatal(err)
	}
	const writers, stride = 8, 100
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 40; i++ {
				off := int64((i*writers + w) * stride)
				if _, err := v.WriteAt(bytes.Repeat([]byte{byte(w + 1)}, stride), off); err != nil {
					t.Error(err)
					return
				}
				if _, err := v.ReadAt(make([]byte, 4096), 0); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	got := make([]byte, writers*40*stride)
	if _, err := v.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for i := range got {
		if want := byte((i/stride)%writers + 1); got[i] != want {
			t.Fatalf("byte %d = %d, want %d: a concurrent read-modify-write lost it", i, got[i], want)
		}
	}
}

type discardRecorder struct {
	blockdev.Device
	discards []blockdev.Range
}

func (d *discardRecorder) Discard(off, n int64) error {
	d.discards = append(d.discards, blockdev.Range{Off: off, Len: n})
	return d.Device.Discard(off, n)
}

func TestViewDiscardMapsToWholeCiphertextSectors(t *testing.T) {
	for _, tc := range []struct {
		sector    int
		off, n    int64
		wantOff   int64
		wantLen   int64
		wantCalls int
	}{
		{512, 100, 10000, 512, 9728 - 512, 1},
		{4096, 100, 10000, 4096, 4096, 1},
		{4096, 4096, 8192, 4096, 8192, 1},
		{4096, 100, 3000, 0, 0, 0}, // inside one sector: nothing to discard
	} {
		l := testLayout(tc.sector, 64<<10)
		rec := &discardRecorder{Device: blockdev.NewMem(l.DeviceSize())}
		v, err := OpenView(rec, l, randomKey())
		if err != nil {
			t.Fatal(err)
		}
		if err := v.Discard(tc.off, tc.n); err != nil {
			t.Fatal(err)
		}
		if len(rec.discards) != tc.wantCalls {
			t.Fatalf("%+v: discards below = %v", tc, rec.discards)
		}
		if tc.wantCalls == 1 {
			if want := (blockdev.Range{Off: l.DataOffset + tc.wantOff, Len: tc.wantLen}); rec.discards[0] != want {
				t.Fatalf("%+v: discard below = %+v, want %+v", tc, rec.discards[0], want)
			}
		}
		if err := v.Discard(60<<10, 8<<10); !errors.Is(err, blockdev.ErrOutOfRange) {
			t.Fatalf("discard past end: %v", err)
		}
		const huge = int64(^uint64(0) >> 1)
		if err := v.Discard(huge-10, 100); !errors.Is(err, blockdev.ErrOutOfRange) {
			t.Fatalf("discard at an overflowing offset: %v", err)
		}
		if _, err := v.ReadAt(make([]byte, 4096), huge-10); !errors.Is(err, blockdev.ErrOutOfRange) {
			t.Fatalf("read at an overflowing offset: %v", err)
		}
		if _, err := v.WriteAt(make([]byte, 100), huge-10); !errors.Is(err, blockdev.ErrOutOfRange) {
			t.Fatalf("write at an overflowing offset: %v", err)
		}
	}
}

func TestOpenViewRefuses(t *testing.T) {
	l := testLayout(512, 1<<20)
	small := blockdev.NewMem(l.DeviceSize() - 512)
	if _, err := OpenView(small, l, randomKey()); err == nil {
		t.Fatal("a device smaller than the layout was accepted")
	}
	dev := blockdev.NewMem(l.DeviceSize())
	if _, err := OpenView(dev, l, NewVolumeKey(make([]byte, 32))); err == nil {
		t.Fatal("a 32-byte key for a 64-byte layout was accepted")
	}
	bad := l
	bad.Cipher = "serpent-cbc-essiv:sha256"
	if _, err := OpenView(dev, bad, randomKey()); err == nil {
		t.Fatal("an unsupported cipher was accepted")
	}
	// Dynamic payload: sized from the device, rounded down to whole sectors.
	dyn := testLayout(4096, 0)
	v, err := OpenView(blockdev.NewMem(dyn.DataOffset+3*4096+100), dyn, randomKey())
	if err != nil {
		t.Fatal(err)
	}
	if v.Size() != 3*4096 {
		t.Fatalf("dynamic view size %d, want %d", v.Size(), 3*4096)
	}
}

func TestCheckCompatible(t *testing.T) {
	l := testLayout(4096, 1<<20)
	if n, err := CheckCompatible(l, l.DeviceSize()); err != nil || n != 1<<20 {
		t.Fatalf("exact size: %d, %v", n, err)
	}
	if _, err := CheckCompatible(l, l.DeviceSize()-4096); err == nil {
		t.Fatal("smaller device accepted")
	}
	if _, err := CheckCompatible(l, l.DeviceSize()+4096); err == nil {
		t.Fatal("larger device accepted: dm-crypt would see a different plaintext size")
	}
	bad := l
	bad.Cipher = "aes-cbc-essiv:sha256"
	if _, err := CheckCompatible(bad, l.DeviceSize()); err == nil {
		t.Fatal("aes-cbc accepted")
	}
	bad = l
	bad.KeyBytes = 48
	if _, err := CheckCompatible(bad, l.DeviceSize()); err == nil {
		t.Fatal("384-bit xts key accepted")
	}
	bad = l
	bad.SectorSize = 3000
	if _, err := CheckCompatible(bad, l.DeviceSize()); err == nil {
		t.Fatal("sector size 3000 accepted")
	}
}

// A view over a read-only device refuses writes and discards with
// blockdev.ErrReadOnly and reads the plaintext written before.
func TestViewReadOnlyConformance(t *testing.T) {
	blockdevtest.Run(t, func(t *testing.T, size int64) blockdev.Device {
		l := testLayout(4096, size)
		mem := blockdev.NewMem(l.DeviceSize())
		key := NewVolumeKey(bytes.Repeat([]byte{0x5a}, 64))
		rw, err := OpenView(mem, l, key)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := rw.WriteAt(readOnlyContent, 0); err != nil {
			t.Fatal(err)
		}
		rw.Close()
		v, err := OpenView(blockdev.ReadOnly(mem), l, key)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}, blockdevtest.Options{ReadOnly: true, Initial: readOnlyContent})
}

var readOnlyContent = func() []byte {
	b := make([]byte, 1<<20)
	mrand.New(mrand.NewSource(9)).Read(b)
	return b
}()

// Writes encrypt from the caller's buffer without touching it, and the
// ciphertext on the device is x/crypto/xts's with the plain64 IVs, for a
// large (split across cores) and a small aligned write.
func TestViewWriteCiphertextAndCallerBuffer(t *testing.T) {
	for _, sector := range []int{512, 4096} {
		for _, n := range []int{sector, 1 << 20} {
			l := testLayout(sector, 4<<20)
			dev := blockdev.NewMem(l.DeviceSize())
			key := randomKey()
			ref, err := xts.NewCipher(aes.NewCipher, key.Bytes())
			if err != nil {
				t.Fatal(err)
			}
			v, err := OpenView(dev, l, key)
			if err != nil {
				t.Fatal(err)
			}
			p := make([]byte, n)
			rand.Read(p)
			orig := bytes.Clone(p)
			off := int64(3 * sector)
			if _, err := v.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, orig) {
				t.Fatalf("sector %d, %d bytes: WriteAt changed the caller's buffer", sector, n)
			}
			got := make([]byte, n)
			if _, err := dev.ReadAt(got, l.DataOffset+off); err != nil {
				t.Fatal(err)
			}
			want := make([]byte, n)
			refSectors(ref, want, p, sector, uint64(off/ivUnit), uint64(sector/ivUnit), true)
			if !bytes.Equal(got, want) {
				t.Fatalf("sector %d, %d bytes: ciphertext differs from x/crypto/xts", sector, n)
			}
			back := make([]byte, n)
			if _, err := v.ReadAt(back, off); err != nil || !bytes.Equal(back, p) {
				t.Fatalf("sector %d, %d bytes: read back differs (%v)", sector, n, err)
			}
		}
	}
}

// Pooled buffers are page-aligned (an O_DIRECT device below takes them
// as they are) and exactly as long as asked.
func TestViewBuffersAligned(t *testing.T) {
	for _, n := range []int{512, 4096, 5120, 12288, 1 << 20} {
		b := alignedBuf(n)
		if len(b) != n || cap(b) != n {
			t.Fatalf("alignedBuf(%d): len %d cap %d", n, len(b), cap(b))
		}
		if addr := uintptr(unsafe.Pointer(unsafe.SliceData(b))); addr%bufAlign != 0 {
			t.Fatalf("alignedBuf(%d) at %#x: not %d-aligned", n, addr, bufAlign)
		}
	}
}

// A large request split over the idle cores en- and decrypts exactly as one
// run over all its sectors does, alone or beside other requests (which
// leave fewer cores to split over).
func TestCryptSplitMatchesOneRun(t *testing.T) {
	for _, sector := range []int64{512, 4096} {
		l := testLayout(int(sector), 8<<20)
		v, err := openView(blockdev.NewMem(l.DeviceSize()), l, randomKey())
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range []int64{parallelMin, parallelMin + sector, 1<<20 + 3*sector} {
			src := make([]byte, n)
			rand.Read(src)
			pos := 7 * sector
			for _, encrypt := range []bool{true, false} {
				want := make([]byte, n)
				v.c.cryptSectors(want, src, int(sector), v.iv(pos), uint64(sector/ivUnit), encrypt)
				var wg sync.WaitGroup
				for g := 0; g < 3; g++ { // alone first, then three at once
					wg.Add(1)
					go func() {
						defer wg.Done()
						got := make([]byte, n)
						v.crypt(got, src, pos, encrypt)
						if !bytes.Equal(got, want) {
							t.Errorf("sector %d, %d bytes, encrypt %v: the split result differs from one run", sector, n, encrypt)
						}
					}()
					if g == 0 {
						wg.Wait()
					}
				}
				wg.Wait()
			}
		}
	}
}
