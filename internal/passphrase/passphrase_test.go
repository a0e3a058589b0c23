package passphrase

import (
	"encoding/hex"
	"testing"
)

func TestNew(t *testing.T) {
	seen := map[string]bool{}
	for range 64 {
		p := New()
		if len(p) != 2*Bytes {
			t.Fatalf("len = %d; want %d", len(p), 2*Bytes)
		}
		if _, err := hex.DecodeString(string(p)); err != nil {
			t.Fatalf("%q is not hex: %v", p, err)
		}
		if seen[string(p)] {
			t.Fatalf("passphrase %q repeated", p)
		}
		seen[string(p)] = true
	}
}
