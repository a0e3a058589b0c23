package keystore

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func runStoreSuite(t *testing.T, s Store) {
	k1, err := NewPassphrase()
	if err != nil {
		t.Fatal(err)
	}
	if len(k1) != 64 {
		t.Fatalf("passphrase is %d bytes, want 64 hex characters", len(k1))
	}
	if _, err := s.Get("vol-1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get missing: %v", err)
	}
	if err := s.Put("vol-1", k1); err != nil {
		t.Fatal(err)
	}
	if err := s.Put("vol-1", k1); err != nil {
		t.Fatalf("idempotent put: %v", err)
	}
	k2, _ := NewPassphrase()
	err = s.Put("vol-1", k2)
	if !errors.Is(err, ErrExists) {
		t.Fatalf("overwrite with a different key: %v", err)
	}
	if strings.Contains(err.Error(), string(k1)) || strings.Contains(err.Error(), string(k2)) {
		t.Fatal("error message contains key material")
	}
	got, err := s.Get("vol-1")
	if err != nil || !bytes.Equal(got, k1) {
		t.Fatalf("get = %v", err)
	}
	got[0] ^= 1 // the caller's copy, not the stored key
	if again, _ := s.Get("vol-1"); !bytes.Equal(again, k1) {
		t.Fatal("Get returned the store's own buffer")
	}
	for _, bad := range []string{"", "../etc/passwd", ".hidden", "a/b", strings.Repeat("x", 129), "vol 1"} {
		if err := s.Put(bad, k1); !errors.Is(err, ErrBadID) {
			t.Fatalf("put %q: %v, want ErrBadID", bad, err)
		}
	}
	if err := s.Put("empty", nil); err == nil {
		t.Fatal("empty key accepted")
	}
	if err := s.Delete("vol-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get("vol-1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
	if err := s.Delete("vol-1"); err != nil {
		t.Fatalf("second delete: %v", err)
	}
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.Put("race", k2); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
}

func TestMem(t *testing.T) { runStoreSuite(t, NewMem()) }

func TestFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "keys")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	s, err := NewFile(dir)
	if err != nil {
		t.Fatal(err)
	}
	runStoreSuite(t, s)
	st, err := os.Stat(dir)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o700 {
		t.Fatalf("dir mode %v, want 0700", st.Mode().Perm())
	}
	k, _ := NewPassphrase()
	if err := s.Put("v2", k); err != nil {
		t.Fatal(err)
	}
	fst, err := os.Stat(filepath.Join(dir, "v2.key"))
	if err != nil {
		t.Fatal(err)
	}
	if fst.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v, want 0600", fst.Mode().Perm())
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".tmp") {
			t.Fatalf("temp file %s left behind", e.Name())
		}
	}
	if err := os.Chmod(filepath.Join(dir, "v2.key"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get("v2"); err == nil || !strings.Contains(err.Error(), "readable by others") {
		t.Fatalf("world-readable key file: %v", err)
	}
	os.Chmod(filepath.Join(dir, "v2.key"), 0o600)
	// A second store over the same directory sees the key (it is on disk).
	s2, err := NewFile(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := s2.Get("v2"); err != nil || !bytes.Equal(got, k) {
		t.Fatalf("reopened store: %v", err)
	}
}
