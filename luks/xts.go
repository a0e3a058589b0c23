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
// (a test checks they agree) about 3x faster: the tweaks of a sector are
// computed into a buffer first, so the whole sector is XORed in two bulk
// passes and the AES loop does nothing else. Sectors are multiples of 16
// bytes, so no ciphertext stealing is needed. Safe for concurrent use.
type xtsCipher struct {
	k1, k2 cipher.Block
}

// maxSector bounds the tweak buffer a caller must provide.
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
	return &xtsCipher{k1: k1, k2: k2}, nil
}

// crypt en- or decrypts one sector in place. tw is scratch space of at
// least len(sector) bytes.
func (c *xtsCipher) crypt(sector []byte, sectorNum uint64, tw []byte, encrypt bool) {
	var t [16]byte
	binary.LittleEndian.PutUint64(t[:8], sectorNum)
	c.k2.Encrypt(t[:], t[:])
	lo := binary.LittleEndian.Uint64(t[:8])
	hi := binary.LittleEndian.Uint64(t[8:])
	n := len(sector)
	tw = tw[:n]
	for i := 0; i < n; i += 16 {
		binary.LittleEndian.PutUint64(tw[i:], lo)
		binary.LittleEndian.PutUint64(tw[i+8:], hi)
		// multiply the tweak by x in GF(2^128), little-endian convention
		carry := hi >> 63
		hi = hi<<1 | lo>>63
		lo = lo<<1 ^ carry*0x87
	}
	subtle.XORBytes(sector, sector, tw)
	if encrypt {
		for i := 0; i < n; i += 16 {
			c.k1.Encrypt(sector[i:i+16], sector[i:i+16])
		}
	} else {
		for i := 0; i < n; i += 16 {
			c.k1.Decrypt(sector[i:i+16], sector[i:i+16])
		}
	}
	subtle.XORBytes(sector, sector, tw)
}
