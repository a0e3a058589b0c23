package luks

import (
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"strings"

	"golang.org/x/crypto/argon2"
	"golang.org/x/crypto/pbkdf2"
)

// ErrWrongPassphrase: no keyslot of the volume opens with the given passphrase.
var ErrWrongPassphrase = errors.New("no keyslot opens with this passphrase (wrong key?)")

// cryptsetup's limits (LUKS2_KEYSLOTS_MAX and crypt_pbkdf_get_limits): a
// header outside them is one cryptsetup never writes or cannot open, so the
// parser refuses it as corrupt.
const (
	maxKeyslots        = 32
	minPBKDF2Iter      = 1000
	maxCryptsetupIter  = 1<<31 - 1 // cryptsetup reads iterations as a JSON int32
	minArgonTime       = 4
	minArgonMemoryKiB  = 32
	maxArgonMemoryKiB  = 4 << 20 // 4 GiB
	maxArgonThreads    = 4
	kdfSaltBytes       = 32 // LUKS_SALTSIZE
	maxDigestBytes     = 1024
	maxArgonMemLimited = 1 << 20 // 1 GiB: cryptsetup's default cap when it benchmarks
)

// Unlock's own work budget, below cryptsetup's limits: a hostile source
// serves a header the target unlocks, so one keyslot must not cost the
// target more than a header cryptsetup's benchmark makes on a fast machine
// (2 s of pbkdf2, or at most 1 GiB of argon2 memory). An honest header from
// a source with cryptsetup's defaults stays well inside it.
const (
	maxUnlockPBKDF2Iter = 1 << 26 // about 67 million
	maxUnlockArgonWork  = 1 << 25 // time × memory in KiB passes: 32 GiB of memory passes
)

// checkKDFLimits refuses KDF parameters outside what cryptsetup accepts.
func checkKDFLimits(k KDF) error {
	if len(k.Salt) != kdfSaltBytes {
		return fmt.Errorf("%s salt is %d bytes, cryptsetup's keyslots have %d", k.Type, len(k.Salt), kdfSaltBytes)
	}
	switch k.Type {
	case "pbkdf2":
		if k.Iterations < minPBKDF2Iter || k.Iterations > maxCryptsetupIter || k.Time != 0 || k.Memory != 0 || k.CPUs != 0 {
			return fmt.Errorf("pbkdf2 iterations %d (time %d, memory %d, cpus %d) outside cryptsetup's limits: %d to %d iterations, no argon2 fields",
				k.Iterations, k.Time, k.Memory, k.CPUs, minPBKDF2Iter, maxCryptsetupIter)
		}
	case "argon2i", "argon2id":
		if k.Time < minArgonTime || k.Time > maxCryptsetupIter || k.Memory < minArgonMemoryKiB || k.Memory > maxArgonMemoryKiB ||
			k.CPUs < 1 || k.CPUs > maxArgonThreads || k.Iterations != 0 || k.Hash != "" {
			return fmt.Errorf("%s time=%d memory=%d KiB cpus=%d outside cryptsetup's limits (time >= %d, memory %d KiB to %d KiB, 1 to %d threads, no pbkdf2 fields)",
				k.Type, k.Time, k.Memory, k.CPUs, minArgonTime, minArgonMemoryKiB, maxArgonMemoryKiB, maxArgonThreads)
		}
	default:
		return fmt.Errorf("KDF %q is not one cryptsetup knows (pbkdf2, argon2i, argon2id)", k.Type)
	}
	return nil
}

// checkUnlockCost refuses a KDF dearer than Unlock's work budget.
func checkUnlockCost(k KDF) error {
	switch k.Type {
	case "pbkdf2":
		if k.Iterations > maxUnlockPBKDF2Iter {
			return fmt.Errorf("pbkdf2 with %d iterations exceeds ferry's unlock budget of %d: re-add the keyslot with `cryptsetup luksConvertKey --pbkdf-force-iterations` below it", k.Iterations, maxUnlockPBKDF2Iter)
		}
	case "argon2i", "argon2id":
		if k.Memory > maxArgonMemLimited || int64(k.Time)*int64(k.Memory) > maxUnlockArgonWork {
			return fmt.Errorf("%s with time=%d memory=%d KiB exceeds ferry's unlock budget (memory <= %d KiB, time × memory <= %d): re-add the keyslot with `cryptsetup luksConvertKey` and smaller --pbkdf-memory/--pbkdf-force-iterations",
				k.Type, k.Time, k.Memory, maxArgonMemLimited, maxUnlockArgonWork)
		}
	}
	return nil
}

// CheckUnlockCost says whether every keyslot that could open the data
// segment stays within Unlock's work budget. The kernel path calls it
// before cryptsetup open, which has only cryptsetup's far higher limits.
func (h *Header) CheckUnlockCost() error {
	segID, _, err := h.DataSegment()
	if err != nil {
		return err
	}
	for _, dID := range sortedIDs(h.Meta.Digests) {
		d := h.Meta.Digests[dID]
		if !contains(d.Segments, segID) {
			continue
		}
		if d.Iterations > maxUnlockPBKDF2Iter {
			return fmt.Errorf("digest %s: pbkdf2 with %d iterations exceeds ferry's unlock budget of %d", dID, d.Iterations, maxUnlockPBKDF2Iter)
		}
		for _, kID := range d.Keyslots {
			if ks := h.Meta.Keyslots[kID]; ks != nil {
				if err := checkUnlockCost(ks.KDF); err != nil {
					return fmt.Errorf("keyslot %s: %w", kID, err)
				}
			}
		}
	}
	return nil
}

// VolumeKey is the key of a volume's data segment. Its bytes never appear in
// printed, logged or marshalled output; use Bytes where the key is needed.
type VolumeKey struct {
	b []byte
}

const redacted = "[REDACTED volume key]"

// NewVolumeKey copies b into a VolumeKey (tests and key import).
func NewVolumeKey(b []byte) *VolumeKey { return &VolumeKey{b: append([]byte(nil), b...)} }

// Bytes returns the key itself. The caller must not keep or print it.
func (k *VolumeKey) Bytes() []byte { return k.b }

// Len is the key size in bytes.
func (k *VolumeKey) Len() int { return len(k.b) }

// Wipe zeroes the key in memory.
func (k *VolumeKey) Wipe() {
	if k != nil {
		clear(k.b)
		k.b = nil
	}
}

func (k *VolumeKey) String() string   { return redacted }
func (k *VolumeKey) GoString() string { return redacted }

// Format makes every fmt verb (%v, %x, %s, %q, %+v …) print the redaction.
func (k *VolumeKey) Format(f fmt.State, _ rune) { io.WriteString(f, redacted) }

func (k *VolumeKey) MarshalJSON() ([]byte, error) { return []byte(`"` + redacted + `"`), nil }
func (k *VolumeKey) MarshalText() ([]byte, error) { return []byte(redacted), nil }

// Unlock reads the header of a LUKS2 device and recovers its volume key
// with passphrase, trying every keyslot bound to the data segment. The
// passphrase is the exact content of a cryptsetup --key-file.
func Unlock(r io.ReaderAt, size int64, passphrase []byte) (*VolumeKey, error) {
	h, err := ReadHeader(r, size)
	if err != nil {
		return nil, err
	}
	return h.Unlock(r, passphrase)
}

// Unlock recovers the volume key of h's data segment from the device r.
func (h *Header) Unlock(r io.ReaderAt, passphrase []byte) (*VolumeKey, error) {
	segID, _, err := h.DataSegment()
	if err != nil {
		return nil, err
	}
	var problems []string
	tried := 0
	for _, dID := range sortedIDs(h.Meta.Digests) {
		d := h.Meta.Digests[dID]
		if !contains(d.Segments, segID) {
			continue
		}
		// cryptsetup tries high-priority keyslots first and skips priority 0 ("ignore").
		ids := append([]string(nil), d.Keyslots...)
		order := func(ks *Keyslot) int {
			if ks.Priority == nil {
				return 1
			}
			return *ks.Priority
		}
		for pass := 2; pass >= 1; pass-- {
			for _, kID := range ids {
				ks := h.Meta.Keyslots[kID]
				if ks == nil || order(ks) != pass {
					continue
				}
				tried++
				vk, err := openKeyslot(r, ks, passphrase)
				if err != nil {
					problems = append(problems, fmt.Sprintf("keyslot %s: %v", kID, err))
					continue
				}
				ok, err := d.verify(vk)
				if err != nil {
					vk.Wipe()
					problems = append(problems, fmt.Sprintf("digest %s: %v", dID, err))
					continue
				}
				if ok {
					return vk, nil
				}
				vk.Wipe()
			}
		}
	}
	if tried == 0 {
		return nil, fmt.Errorf("no usable keyslot is bound to data segment %s", segID)
	}
	if len(problems) > 0 {
		return nil, fmt.Errorf("%w (also: %s)", ErrWrongPassphrase, strings.Join(problems, "; "))
	}
	return nil, ErrWrongPassphrase
}

func hashFunc(name string) (func() hash.Hash, error) {
	switch strings.ToLower(name) {
	case "sha1":
		return sha1.New, nil
	case "sha224":
		return sha256.New224, nil
	case "sha256":
		return sha256.New, nil
	case "sha384":
		return sha512.New384, nil
	case "sha512":
		return sha512.New, nil
	}
	return nil, fmt.Errorf("hash %q is not supported (use sha1, sha256, sha384 or sha512)", name)
}

// deriveKey runs the keyslot's KDF over the passphrase.
func deriveKey(k KDF, passphrase []byte, n int) ([]byte, error) {
	switch k.Type {
	case "pbkdf2":
		h, err := hashFunc(k.Hash)
		if err != nil {
			return nil, err
		}
		if err := checkKDFLimits(k); err != nil {
			return nil, err
		}
		if err := checkUnlockCost(k); err != nil {
			return nil, err
		}
		return pbkdf2.Key(passphrase, k.Salt, k.Iterations, n, h), nil
	case "argon2i", "argon2id":
		if err := checkKDFLimits(k); err != nil {
			return nil, err
		}
		if err := checkUnlockCost(k); err != nil {
			return nil, err
		}
		if k.Type == "argon2i" {
			return argon2.Key(passphrase, k.Salt, uint32(k.Time), uint32(k.Memory), uint8(k.CPUs), uint32(n)), nil
		}
		return argon2.IDKey(passphrase, k.Salt, uint32(k.Time), uint32(k.Memory), uint8(k.CPUs), uint32(n)), nil
	}
	return nil, fmt.Errorf("KDF %q is not supported (pbkdf2, argon2i, argon2id are)", k.Type)
}

// newXTS builds the AES-XTS cipher for a cipher spec like aes-xts-plain64.
func newXTS(spec string, key []byte) (*xtsCipher, error) {
	c, mode, iv := cipherParts(spec)
	if c != "aes" || mode != "xts" || iv != "plain64" {
		return nil, fmt.Errorf("cipher %q is not supported: ferry implements aes-xts-plain64 only", spec)
	}
	return newXTSCipher(key)
}

// openKeyslot derives the keyslot key, decrypts its area and merges the
// anti-forensic stripes into a candidate volume key.
func openKeyslot(r io.ReaderAt, ks *Keyslot, passphrase []byte) (*VolumeKey, error) {
	if ks.Type != "luks2" {
		return nil, fmt.Errorf("keyslot type %q is not supported", ks.Type)
	}
	if ks.AF.Type != "luks1" {
		return nil, fmt.Errorf("anti-forensic splitter %q is not supported", ks.AF.Type)
	}
	if ks.Area.Type != "raw" {
		return nil, fmt.Errorf("keyslot area type %q is not supported", ks.Area.Type)
	}
	afHash, err := hashFunc(ks.AF.Hash)
	if err != nil {
		return nil, fmt.Errorf("AF hash: %w", err)
	}
	dk, err := deriveKey(ks.KDF, passphrase, ks.Area.KeySize)
	if err != nil {
		return nil, err
	}
	defer clear(dk)
	c, err := newXTS(ks.Area.Encryption, dk)
	if err != nil {
		return nil, fmt.Errorf("keyslot area: %w", err)
	}
	afLen := ks.KeySize * ks.AF.Stripes
	readLen, err := afReadLen(ks)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, readLen)
	defer clear(buf)
	if _, err := r.ReadAt(buf, ks.Area.Offset); err != nil {
		return nil, fmt.Errorf("read keyslot area at %d: %w", ks.Area.Offset, err)
	}
	// The keyslot area is encrypted in 512-byte sectors, IV counted from the area start.
	c.cryptSectors(buf, buf, 512, 0, 1, false)
	return &VolumeKey{b: afMerge(buf[:afLen], ks.KeySize, ks.AF.Stripes, afHash)}, nil
}

// afReadLen is how many bytes of its area a keyslot's anti-forensic
// material takes, whole 512-byte sectors.
func afReadLen(ks *Keyslot) (int, error) {
	readLen := (ks.KeySize*ks.AF.Stripes + 511) &^ 511
	if int64(readLen) > ks.Area.Size {
		return 0, fmt.Errorf("AF material of %d bytes exceeds the %d-byte area", readLen, ks.Area.Size)
	}
	return readLen, nil
}

// afMerge undoes the LUKS anti-forensic split: XOR each stripe into a
// running block, diffusing the block with the hash between stripes.
func afMerge(src []byte, blockSize, stripes int, h func() hash.Hash) []byte {
	block := make([]byte, blockSize)
	for i := 0; i < stripes-1; i++ {
		subtle.XORBytes(block, block, src[i*blockSize:(i+1)*blockSize])
		diffuse(block, h)
	}
	out := make([]byte, blockSize)
	subtle.XORBytes(out, block, src[(stripes-1)*blockSize:stripes*blockSize])
	clear(block)
	return out
}

// diffuse replaces each digest-sized chunk i of b by H(be32(i) || chunk),
// the last partial chunk by the prefix of its hash.
func diffuse(b []byte, h func() hash.Hash) {
	hh := h()
	ds := hh.Size()
	var iv [4]byte
	for i := 0; i*ds < len(b); i++ {
		end := min((i+1)*ds, len(b))
		hh.Reset()
		binary.BigEndian.PutUint32(iv[:], uint32(i))
		hh.Write(iv[:])
		hh.Write(b[i*ds : end])
		sum := hh.Sum(nil)
		copy(b[i*ds:end], sum)
	}
}

// verify checks a candidate volume key against the digest.
func (d *Digest) verify(vk *VolumeKey) (bool, error) {
	if d.Type != "pbkdf2" {
		return false, fmt.Errorf("digest type %q is not supported", d.Type)
	}
	h, err := hashFunc(d.Hash)
	if err != nil {
		return false, err
	}
	if d.Iterations < minPBKDF2Iter || d.Iterations > maxUnlockPBKDF2Iter || len(d.Digest) == 0 || len(d.Digest) > maxDigestBytes {
		return false, fmt.Errorf("digest parameters out of range (pbkdf2 iterations %d, %d-byte digest)", d.Iterations, len(d.Digest))
	}
	got := pbkdf2.Key(vk.b, d.Salt, d.Iterations, len(d.Digest), h)
	return subtle.ConstantTimeCompare(got, d.Digest) == 1, nil
}
