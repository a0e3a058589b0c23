package luks

import (
	"encoding/binary"

	"golang.org/x/sys/cpu"
)

// useAsm says whether the AES-NI sector loop can run here.
var useAsm = cpu.X86.HasAES && cpu.X86.HasSSE41

// useVAES says whether the 256-bit loop can run here: AVX2 (which also means
// the OS saves the YMM registers), VAES and VPCLMULQDQ. x/sys/cpu reports
// the last two only on AVX-512 machines, so CPUID is read here.
var useVAES = useAsm && cpu.X86.HasAVX && cpu.X86.HasAVX2 && cpuid7ecx()&(1<<9|1<<10) == 1<<9|1<<10

//go:noescape
func xtsEncryptSectors(k1, k2 *byte, nr int, dst, src *byte, n, sector int, iv, step uint64)

//go:noescape
func xtsDecryptSectors(k1, k2 *byte, nr int, dst, src *byte, n, sector int, iv, step uint64)

//go:noescape
func xtsEncryptSectorsVAES(k1, k2 *byte, nr int, dst, src *byte, n, sector int, iv, step uint64)

//go:noescape
func xtsDecryptSectorsVAES(k1, k2 *byte, nr int, dst, src *byte, n, sector int, iv, step uint64)

//go:noescape
func aesInvMixColumns(dst, src *byte)

func cpuid7ecx() uint32

// xtsSchedule holds the round keys in the byte order AES-NI takes: k1's for
// encryption and for the equivalent inverse cipher, k2's for the tweak.
// crypto/aes keeps its own schedule unexported, hence this copy.
type xtsSchedule struct {
	nr             int
	enc1, dec1, k2 []byte
	// vaes: sectors of a multiple of 256 bytes take the 256-bit loop.
	vaes bool
}

func newSchedule(key1, key2 []byte) *xtsSchedule {
	s := &xtsSchedule{enc1: expandKey(key1), k2: expandKey(key2), vaes: useVAES}
	s.nr = len(s.enc1)/16 - 1
	s.dec1 = make([]byte, len(s.enc1))
	// dec round i is enc round nr-i, through InvMixColumns for the inner ones.
	copy(s.dec1, s.enc1[16*s.nr:])
	copy(s.dec1[16*s.nr:], s.enc1[:16])
	for i := 1; i < s.nr; i++ {
		aesInvMixColumns(&s.dec1[16*i], &s.enc1[16*(s.nr-i)])
	}
	return s
}

func (s *xtsSchedule) cryptSectors(dst, src []byte, sector int, iv, step uint64, encrypt bool) {
	if s.vaes && sector%256 == 0 {
		if encrypt {
			xtsEncryptSectorsVAES(&s.enc1[0], &s.k2[0], s.nr, &dst[0], &src[0], len(src), sector, iv, step)
		} else {
			xtsDecryptSectorsVAES(&s.dec1[0], &s.k2[0], s.nr, &dst[0], &src[0], len(src), sector, iv, step)
		}
		return
	}
	if encrypt {
		xtsEncryptSectors(&s.enc1[0], &s.k2[0], s.nr, &dst[0], &src[0], len(src), sector, iv, step)
	} else {
		xtsDecryptSectors(&s.dec1[0], &s.k2[0], s.nr, &dst[0], &src[0], len(src), sector, iv, step)
	}
}

// sbox is the AES S-box, computed rather than tabled: the multiplicative
// inverse in GF(2^8) walked with generator 3, then the affine map.
var sbox = func() (s [256]byte) {
	p, q := byte(1), byte(1)
	for {
		p ^= p<<1 ^ (p>>7)*0x1b // p *= 3
		q ^= q << 1             // q /= 3
		q ^= q << 2
		q ^= q << 4
		if q&0x80 != 0 {
			q ^= 0x09
		}
		x := q ^ (q<<1 | q>>7) ^ (q<<2 | q>>6) ^ (q<<3 | q>>5) ^ (q<<4 | q>>4)
		s[p] = x ^ 0x63
		if p == 1 {
			break
		}
	}
	s[0] = 0x63
	return s
}()

func subWord(w uint32) uint32 {
	return uint32(sbox[w>>24])<<24 | uint32(sbox[w>>16&0xff])<<16 | uint32(sbox[w>>8&0xff])<<8 | uint32(sbox[w&0xff])
}

// expandKey is the FIPS-197 key expansion of a 128-, 192- or 256-bit key,
// returned as the round keys' bytes in order.
func expandKey(key []byte) []byte {
	nk := len(key) / 4
	nr := nk + 6
	w := make([]uint32, 4*(nr+1))
	for i := range nk {
		w[i] = binary.BigEndian.Uint32(key[4*i:])
	}
	rcon := uint32(1)
	for i := nk; i < len(w); i++ {
		t := w[i-1]
		switch {
		case i%nk == 0:
			t = subWord(t<<8|t>>24) ^ rcon<<24
			rcon <<= 1
			if rcon&0x100 != 0 {
				rcon ^= 0x11b
			}
		case nk > 6 && i%nk == 4:
			t = subWord(t)
		}
		w[i] = w[i-nk] ^ t
	}
	out := make([]byte, 4*len(w))
	for i, v := range w {
		binary.BigEndian.PutUint32(out[4*i:], v)
	}
	clear(w)
	return out
}
