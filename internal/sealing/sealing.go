// Package sealing seals volume keys to HPKE public keys and opens them.
// Workers hold their own private key; the offline recovery key is held
// by an operator. Servers never import this package: they store envelopes
// they cannot open.
package sealing

import (
	"crypto/hpke"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// Scheme names the format of the info string; a new layout gets a new name.
const Scheme = "ferry-volume-key-v1"

const pemType = "FERRY HPKE PRIVATE KEY"

// Binding is what an envelope is bound to: every field goes into the HPKE
// info, so an envelope moved to another volume, purpose, recipient,
// migration or epoch does not open.
type Binding struct {
	Volume      string
	Epoch       uint64
	Recipient   string
	Fingerprint string
	Purpose     fsm.Purpose
	Migration   string
}

// Info encodes b length-prefixed (4-byte big-endian length per field), so no
// two bindings share an encoding.
func Info(b Binding) []byte {
	var out []byte
	for _, f := range []string{Scheme, b.Volume, strconv.FormatUint(b.Epoch, 10), b.Recipient, b.Fingerprint, string(b.Purpose), b.Migration} {
		out = binary.BigEndian.AppendUint32(out, uint32(len(f)))
		out = append(out, f...)
	}
	return out
}

func suite(kemID, kdfID, aeadID uint16) (hpke.KEM, hpke.KDF, hpke.AEAD, error) {
	if kemID != fsm.SuiteKEM || kdfID != fsm.SuiteKDF || aeadID != fsm.SuiteAEAD {
		return nil, nil, nil, fmt.Errorf("HPKE suite %#04x/%#04x/%#04x is not the one this build uses", kemID, kdfID, aeadID)
	}
	kem, err := hpke.NewKEM(kemID)
	if err != nil {
		return nil, nil, nil, err
	}
	kdf, err := hpke.NewKDF(kdfID)
	if err != nil {
		return nil, nil, nil, err
	}
	aead, err := hpke.NewAEAD(aeadID)
	if err != nil {
		return nil, nil, nil, err
	}
	return kem, kdf, aead, nil
}

// PrivateKey is a key-encryption key pair.
type PrivateKey struct {
	sk  hpke.PrivateKey
	pub fsm.PublicKey
}

// Generate makes a new key pair in this build's suite.
func Generate() (*PrivateKey, error) {
	kem, _, _, err := suite(fsm.SuiteKEM, fsm.SuiteKDF, fsm.SuiteAEAD)
	if err != nil {
		return nil, err
	}
	sk, err := kem.GenerateKey()
	if err != nil {
		return nil, fmt.Errorf("generating an HPKE key: %w", err)
	}
	return wrap(sk), nil
}

func wrap(sk hpke.PrivateKey) *PrivateKey {
	pk := sk.PublicKey().Bytes()
	return &PrivateKey{sk: sk, pub: fsm.PublicKey{KEM: fsm.SuiteKEM, KDF: fsm.SuiteKDF, AEAD: fsm.SuiteAEAD, Key: pk, Fingerprint: fsm.KeyFingerprint(pk)}}
}

// Public returns the public half, as the store records it.
func (k *PrivateKey) Public() fsm.PublicKey {
	p := k.pub
	p.Key = append([]byte(nil), k.pub.Key...)
	return p
}

// Marshal encodes the private key as PEM with its suite IDs.
func (k *PrivateKey) Marshal() ([]byte, error) {
	b, err := k.sk.Bytes()
	if err != nil {
		return nil, err
	}
	defer clear(b)
	return pem.EncodeToMemory(&pem.Block{Type: pemType, Headers: map[string]string{
		"Kem": strconv.Itoa(int(k.pub.KEM)), "Kdf": strconv.Itoa(int(k.pub.KDF)), "Aead": strconv.Itoa(int(k.pub.AEAD)),
		"Fingerprint": k.pub.Fingerprint,
	}, Bytes: b}), nil
}

// Parse reads a key written by Marshal.
func Parse(data []byte) (*PrivateKey, error) {
	blk, _ := pem.Decode(data)
	if blk == nil || blk.Type != pemType {
		return nil, fmt.Errorf("not a %s PEM file", pemType)
	}
	defer clear(blk.Bytes)
	ids := make([]uint16, 3)
	for i, h := range []string{"Kem", "Kdf", "Aead"} {
		n, err := strconv.ParseUint(blk.Headers[h], 10, 16)
		if err != nil {
			return nil, fmt.Errorf("key file header %s: %w", h, err)
		}
		ids[i] = uint16(n)
	}
	kem, _, _, err := suite(ids[0], ids[1], ids[2])
	if err != nil {
		return nil, err
	}
	sk, err := kem.NewPrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("key file: %w", err)
	}
	k := wrap(sk)
	if fp := blk.Headers["Fingerprint"]; fp != "" && fp != k.pub.Fingerprint {
		return nil, fmt.Errorf("key file says fingerprint %s but its key has %s: the file is damaged", fp, k.pub.Fingerprint)
	}
	return k, nil
}

// Load reads a private key file; it refuses one that others may read.
func Load(path string) (*PrivateKey, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("key file %s has mode %04o: make it 0600 (chmod 600 %s)", path, st.Mode().Perm(), path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	defer clear(b)
	k, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

// Write stores k at path, 0600, through a temporary file that is synced
// and renamed, so a crash leaves the old file or the new one, never half.
// With exclusive it refuses to replace an existing file.
func Write(path string, k *PrivateKey, exclusive bool) error {
	b, err := k.Marshal()
	if err != nil {
		return err
	}
	defer clear(b)
	if exclusive {
		if _, err := os.Lstat(path); err == nil {
			return fmt.Errorf("%s exists: refusing to overwrite a private key", path)
		}
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if exclusive {
		// Link fails if path appeared meanwhile; rename would replace it.
		if err := os.Link(tmp, path); err != nil {
			return fmt.Errorf("writing %s: %w", path, err)
		}
	} else if err := os.Rename(tmp, path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// LoadOrCreate returns the key at path, making and storing a new one when
// none exists (a worker's first start).
func LoadOrCreate(path string) (k *PrivateKey, created bool, err error) {
	k, err = Load(path)
	if err == nil {
		return k, false, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, false, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, false, err
	}
	if k, err = Generate(); err != nil {
		return nil, false, err
	}
	if err := Write(path, k, true); err != nil {
		return nil, false, err
	}
	return k, true, nil
}

// Seal seals key to pub for b (b.Fingerprint is taken from pub).
func Seal(pub fsm.PublicKey, b Binding, key []byte, by string) (fsm.Envelope, error) {
	kem, kdf, aead, err := suite(pub.KEM, pub.KDF, pub.AEAD)
	if err != nil {
		return fsm.Envelope{}, err
	}
	if fsm.KeyFingerprint(pub.Key) != pub.Fingerprint {
		return fsm.Envelope{}, fmt.Errorf("public key of %s does not match its fingerprint", b.Recipient)
	}
	pk, err := kem.NewPublicKey(pub.Key)
	if err != nil {
		return fsm.Envelope{}, fmt.Errorf("public key of %s: %w", b.Recipient, err)
	}
	if b.Epoch == 0 {
		b.Epoch = 1
	}
	b.Fingerprint = pub.Fingerprint
	ct, err := hpke.Seal(pk, kdf, aead, Info(b), key)
	if err != nil {
		return fsm.Envelope{}, fmt.Errorf("sealing the key of volume %s to %s: %w", b.Volume, b.Recipient, err)
	}
	return fsm.Envelope{Volume: b.Volume, Epoch: b.Epoch, Purpose: b.Purpose, Recipient: b.Recipient, Fingerprint: b.Fingerprint,
		Migration: b.Migration, KEM: pub.KEM, KDF: pub.KDF, AEAD: pub.AEAD, Ciphertext: ct, SealedBy: by,
		SealedAt: time.Now().UTC().Format(time.RFC3339)}, nil
}

// Open opens env with k. The envelope must be for want's volume, purpose,
// recipient and migration (its epoch is taken from env); the info is
// rebuilt from those and k's own fingerprint, so an envelope edited on
// the way, or sealed to another key, fails to authenticate.
func Open(k *PrivateKey, env fsm.Envelope, want Binding) ([]byte, error) {
	if env.Volume != want.Volume || env.Purpose != want.Purpose || env.Recipient != want.Recipient || env.Migration != want.Migration {
		return nil, fmt.Errorf("envelope is for %s/%s/%s/%q, wanted %s/%s/%s/%q",
			env.Volume, env.Purpose, env.Recipient, env.Migration, want.Volume, want.Purpose, want.Recipient, want.Migration)
	}
	if env.Fingerprint != k.pub.Fingerprint {
		return nil, fmt.Errorf("envelope of volume %s is sealed to key %s, this key is %s: it was sealed before this key was made (recover the volume with `ferry volume recover`)",
			env.Volume, env.Fingerprint, k.pub.Fingerprint)
	}
	_, kdf, aead, err := suite(env.KEM, env.KDF, env.AEAD)
	if err != nil {
		return nil, err
	}
	want.Epoch = env.Epoch
	want.Fingerprint = k.pub.Fingerprint
	pt, err := hpke.Open(k.sk, kdf, aead, Info(want), env.Ciphertext)
	if err != nil {
		return nil, fmt.Errorf("opening the %s envelope of volume %s: %w", env.Purpose, env.Volume, err)
	}
	return pt, nil
}
