// Package passphrase makes the volume passphrases ferry generates: the CLI's
// `volume create`, the demo and the test bed all take them from here.
package passphrase

import (
	"crypto/rand"
	"encoding/hex"
)

// Bytes is the entropy of a passphrase: 256 bits, the size of an
// AES-256 key, so the passphrase is never the weakest part.
const Bytes = 32

// New returns a fresh passphrase: Bytes random bytes, hex encoded (64 ASCII
// characters, safe in a key file or on stdin). The caller clears it after use.
func New() []byte {
	key := make([]byte, Bytes)
	// crypto/rand.Read never fails (it crashes the program if the kernel's
	// generator is broken), so there is no error to return.
	_, _ = rand.Read(key)
	out := make([]byte, hex.EncodedLen(len(key)))
	hex.Encode(out, key)
	clear(key)
	return out
}
