package server

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/hashicorp/raft"
)

func TestShredStore(t *testing.T) {
	dir := t.TempDir()
	inner := raft.NewInmemStore()
	// An entry from before encryption reads as it is.
	legacy := []byte(`{"v":1,"type":"heartbeat","payload":{"name":"w"}}`)
	if err := inner.StoreLog(&raft.Log{Index: 1, Type: raft.LogCommand, Data: legacy}); err != nil {
		t.Fatal(err)
	}
	s, err := openShredStore(inner, filepath.Join(dir, "logkeys.json"))
	if err != nil {
		t.Fatal(err)
	}
	secret := []byte("envelope-bytes-envelope-bytes")
	in := &raft.Log{Index: 2, Type: raft.LogCommand, Data: secret}
	if err := s.StoreLogs([]*raft.Log{in}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(in.Data, secret) {
		t.Fatal("StoreLogs changed the caller's entry (raft replicates it from memory)")
	}
	var raw raft.Log
	if err := inner.GetLog(2, &raw); err != nil || bytes.Contains(raw.Data, secret) {
		t.Fatalf("stored in the clear: %v", err)
	}
	for idx, want := range map[uint64][]byte{1: legacy, 2: secret} {
		var l raft.Log
		if err := s.GetLog(idx, &l); err != nil || !bytes.Equal(l.Data, want) {
			t.Fatalf("entry %d: %q %v", idx, l.Data, err)
		}
	}
	// An entry copied to another index does not open.
	moved := raw
	moved.Index = 3
	if err := inner.StoreLog(&moved); err != nil {
		t.Fatal(err)
	}
	if err := s.GetLog(3, &raft.Log{}); err == nil {
		t.Fatal("an entry moved to another index opened")
	}
	if err := inner.DeleteRange(3, 3); err != nil {
		t.Fatal(err)
	}
	keyFile, _ := os.ReadFile(filepath.Join(dir, "logkeys.json"))

	// Rotate, write on, compact: the old key is destroyed, the new one stays.
	if err := s.Rotate(); err != nil {
		t.Fatal(err)
	}
	if err := s.StoreLog(&raft.Log{Index: 3, Type: raft.LogCommand, Data: []byte("later")}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteRange(1, 2); err != nil {
		t.Fatal(err)
	}
	var l raft.Log
	if err := s.GetLog(3, &l); err != nil || string(l.Data) != "later" {
		t.Fatalf("entry after rotation: %v", err)
	}
	now, _ := os.ReadFile(filepath.Join(dir, "logkeys.json"))
	if bytes.Equal(now, keyFile) || len(s.ring.Epochs) != 1 {
		t.Fatalf("the compacted epoch's key was kept: %d epochs", len(s.ring.Epochs))
	}
	// The old ciphertext no longer opens, even if its bytes survive.
	if err := inner.StoreLog(&raw); err != nil {
		t.Fatal(err)
	}
	if err := s.GetLog(2, &raft.Log{}); err == nil {
		t.Fatal("an entry of a destroyed epoch opened")
	}
	if st, _ := os.Stat(filepath.Join(dir, "logkeys.json")); st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v", st.Mode())
	}
	// Reopening keeps the keys it needs.
	s2, err := openShredStore(inner, filepath.Join(dir, "logkeys.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s2.GetLog(3, &l); err != nil || string(l.Data) != "later" {
		t.Fatalf("after reopening: %v", err)
	}
}
