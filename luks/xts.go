package luks

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/subtle"
	"encoding/binary"
	"fmt"
)

// xtsCipher is AES-XTS (IEEE 1619) over whole sectors, with the plain64 IV
// as the tweak's sector number. It does what golang.org/x/crypto/xts does
// (tests and a fuzz target check they agree). On amd64 with AES-NI the
// sectors go through an assembly loop that keeps eight blocks in flight
// (x/crypto/xts makes one cipher.Block call per 16-byte block and waits on
// each), or sixteen in 256-bit registers where the CPU has VAES; elsewhere
// a portable loop computes a sector's tweaks into a buffer so the XORs run
// in bulk. Sectors are multiples of 16 bytes, so no ciphertext stealing is
// needed. Safe for concurrent use.
type xtsCipher struct {
	k1, k2 cipher.Block
	// AES-NI key schedules, set only when an assembly path is usable.
	sched *xtsSchedule
}

// maxSector is the largest encryption sector LUKS2 allows.
const maxSector = 4096

func newXTSCipher(key []byte) (*xtsCipher, error) {
	if len(key) != 32 && len(key) != 64 {
		return nil, fmt.Errorf("aes-xts needs a 256- or 512-bit key, not %d bits", 8*len(key))
	}
	h := len(key) / 2
	k1, err := aes.NewCipher(key[:h])
	if err != nil {
		return nil, fmt.Errorf("aes-xts key setup: %w", err)
	}
	k2, err := aes.NewCipher(key[h:])
	if err != nil {
		return nil, fmt.Errorf("aes-xts key setup: %w", err)
	}
	c := &xtsCipher{k1: k1, k2: k2}
	if useAsm {
		c.sched = newSchedule(key[:h], key[h:])
	}
	return c, nil
}

// cryptSectors en- or decrypts src into dst, len(src)/sector whole sectors
// of sector bytes; the first has IV iv, each next one iv+step. dst and src
// must be the same length and either the same buffer or not overlap.
func (c *xtsCipher) cryptSectors(dst, src []byte, sector int, iv, step uint64, encrypt bool) {
	n := len(src)
	if len(dst) != n || sector <= 0 || sector > maxSector || sector%16 != 0 || n%sector != 0 {
		panic(fmt.Sprintf("luks: xts over %d bytes into %d in %d-byte sectors", n, len(dst), sector))
	}
	if n == 0 {
		return
	}
	if c.sched != nil && sector%128 == 0 {
		c.sched.cryptSectors(dst, src, sector, iv, step, encrypt)
		return
	}
	var tw [maxSector]byte
	for i := 0; i < n; i += sector {
		c.cryptGeneric(dst[i:i+sector], src[i:i+sector], iv, tw[:], encrypt)
		iv += step
	}
}

// cryptGeneric en- or decrypts one sector from src into dst. tw is scratch
// space of at least len(src) bytes.
func (c *xtsCipher) cryptGeneric(dst, src []byte, sectorNum uint64, tw []byte, encrypt bool) {
	var t [16]byte
	binary.LittleEndian.PutUint64(t[:8], sectorNum)
	c.k2.Encrypt(t[:], t[:])
	lo := binary.LittleEndian.Uint64(t[:8])
	hi := binary.LittleEndian.Uint64(t[8:])
	n := len(src)
	tw = tw[:n]
	for i := 0; i < n; i += 16 {
		binary.LittleEndian.PutUint64(tw[i:], lo)
		binary.LittleEndian.PutUint64(tw[i+8:], hi)
		// multiply the tweak by x in GF(2^128), little-endian convention
		carry := hi >> 63
		hi = hi<<1 | lo>>63
		lo = lo<<1 ^ carry*0x87
	}
	subtle.XORBytes(dst, src, tw)
	if encrypt {
		for i := 0; i < n; i += 16 {
			c.k1.Encrypt(dst[i:i+16], dst[i:i+16])
		}
	} else {
		for i := 0; i < n; i += 16 {
			c.k1.Decrypt(dst[i:i+16], dst[i:i+16])
		}
	}
	subtle.XORBytes(dst, dst, tw)
}
