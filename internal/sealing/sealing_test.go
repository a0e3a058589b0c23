package sealing

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferry-dev/ferry/fsm"
)

func TestSealOpenRoundTrip(t *testing.T) {
	k, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	pub := k.Public()
	if pub.KEM != 0x647a || pub.KDF != 1 || pub.AEAD != 2 || len(pub.Key) != 1216 {
		t.Fatalf("suite or key size: %+v (%d bytes)", pub, len(pub.Key))
	}
	b := Binding{Volume: "vol1", Recipient: "w1", Purpose: fsm.PurposeOwner}
	secret := []byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
	env, err := Seal(pub, b, secret, "worker w1")
	if err != nil {
		t.Fatal(err)
	}
	if env.Epoch != 1 || env.Fingerprint != pub.Fingerprint || bytes.Contains(env.Ciphertext, secret) {
		t.Fatalf("envelope: %+v", env)
	}
	got, err := Open(k, env, b)
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("open: %q %v", got, err)
	}

	// Every bound field matters: the same ciphertext under another binding fails.
	tamper := map[string]func(e *fsm.Envelope, w *Binding){
		"volume":    func(e *fsm.Envelope, w *Binding) { e.Volume, w.Volume = "vol2", "vol2" },
		"purpose":   func(e *fsm.Envelope, w *Binding) { e.Purpose, w.Purpose = fsm.PurposeRecovery, fsm.PurposeRecovery },
		"recipient": func(e *fsm.Envelope, w *Binding) { e.Recipient, w.Recipient = "w2", "w2" },
		"migration": func(e *fsm.Envelope, w *Binding) { e.Migration, w.Migration = "m1", "m1" },
		"epoch":     func(e *fsm.Envelope, w *Binding) { e.Epoch = 2 },
		"byte":      func(e *fsm.Envelope, w *Binding) { e.Ciphertext[len(e.Ciphertext)-1] ^= 1 },
	}
	for name, f := range tamper {
		e, w := env, b
		e.Ciphertext = bytes.Clone(env.Ciphertext)
		f(&e, &w)
		if _, err := Open(k, e, w); err == nil {
			t.Errorf("changed %s: opened", name)
		}
	}
	// The envelope names the volume it is for: asking for another is refused.
	if _, err := Open(k, env, Binding{Volume: "vol2", Recipient: "w1", Purpose: fsm.PurposeOwner}); err == nil {
		t.Error("opened an envelope for another volume")
	}
	// Another key does not open it.
	k2, _ := Generate()
	env2 := env
	env2.Fingerprint = k2.Public().Fingerprint
	if _, err := Open(k2, env2, b); err == nil {
		t.Error("another key opened the envelope")
	}
}

func TestInfoIsUnambiguous(t *testing.T) {
	a := Info(Binding{Volume: "ab", Recipient: "c", Purpose: fsm.PurposeOwner, Epoch: 1})
	b := Info(Binding{Volume: "a", Recipient: "bc", Purpose: fsm.PurposeOwner, Epoch: 1})
	if bytes.Equal(a, b) {
		t.Fatal("different bindings share an info encoding")
	}
	if !bytes.HasPrefix(a, append([]byte{0, 0, 0, byte(len(Scheme))}, Scheme...)) {
		t.Fatalf("info does not start with the length-prefixed scheme: %q", a)
	}
}

func TestKeyFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "kek", "worker.key")
	k, created, err := LoadOrCreate(p)
	if err != nil || !created {
		t.Fatalf("create: %v %v", created, err)
	}
	st, err := os.Stat(p)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v %v", st.Mode(), err)
	}
	k2, created, err := LoadOrCreate(p)
	if err != nil || created || k2.Public().Fingerprint != k.Public().Fingerprint {
		t.Fatalf("reload: %v %v", created, err)
	}
	// No temporary files are left behind.
	ents, _ := os.ReadDir(filepath.Dir(p))
	if len(ents) != 1 {
		t.Fatalf("files left: %v", ents)
	}
	if err := Write(p, k, true); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Fatalf("exclusive write replaced a key: %v", err)
	}
	if err := os.Chmod(p, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(p); err == nil || !strings.Contains(err.Error(), "0600") {
		t.Fatalf("a world-readable key was loaded: %v", err)
	}
	// A damaged file is refused, not half-read.
	b, _ := k.Marshal()
	if _, err := Parse(bytes.Replace(b, []byte("Fingerprint: "+k.Public().Fingerprint[:8]), []byte("Fingerprint: 00000000"), 1)); err == nil {
		t.Fatal("a key with a wrong fingerprint header parsed")
	}
}
