package server

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/hashicorp/raft"
)

// shredStore encrypts every raft log entry at rest under an epoch key kept
// in a small file beside the log, and destroys an epoch's key once the
// log no longer holds any entry of it. The log's database frees deleted
// pages without overwriting them, so compaction alone would leave a
// destroyed volume's envelopes readable in raft.db; with their key gone
// those pages are noise. Purge rotates the epoch before compacting.
//
// Entries written before this layer existed (plain JSON) are read as they
// are; they leave with the next compaction.
type shredStore struct {
	inner raft.LogStore
	path  string // key file

	mu   sync.Mutex
	ring keyring
	aead map[uint32]cipher.AEAD
}

// keyring is the key file's content.
type keyring struct {
	Current uint32     `json:"current"`
	Epochs  []epochKey `json:"epochs"`
}

type epochKey struct {
	ID  uint32 `json:"id"`
	Key []byte `json:"key"`
	// Last is the highest log index written under the key, once it is no
	// longer current (0 while current).
	Last uint64 `json:"last,omitempty"`
}

var shredMagic = []byte{0, 'f', 'l', 'e', '1'}

// openShredStore wraps inner with the keys in path (created if missing),
// and starts a new epoch: entries of the previous run are bounded by the
// log's last index, so their keys can be dropped once compacted.
func openShredStore(inner raft.LogStore, path string) (*shredStore, error) {
	s := &shredStore{inner: inner, path: path, aead: map[uint32]cipher.AEAD{}}
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		if err := json.Unmarshal(b, &s.ring); err != nil {
			return nil, fmt.Errorf("raft log key file %s is damaged (%v): the log cannot be read without it", path, err)
		}
		clear(b)
	case errors.Is(err, os.ErrNotExist):
		// A new log, or one written before encryption (read as it is).
	default:
		return nil, err
	}
	for _, e := range s.ring.Epochs {
		if err := s.addAEAD(e); err != nil {
			return nil, err
		}
	}
	if err := s.rotateLocked(); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *shredStore) addAEAD(e epochKey) error {
	blk, err := aes.NewCipher(e.Key)
	if err != nil {
		return fmt.Errorf("raft log key %d: %w", e.ID, err)
	}
	g, err := cipher.NewGCM(blk)
	if err != nil {
		return err
	}
	s.aead[e.ID] = g
	return nil
}

// Rotate starts a new epoch: later entries use a new key.
func (s *shredStore) Rotate() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.rotateLocked()
}

func (s *shredStore) rotateLocked() error {
	last, err := s.inner.LastIndex()
	if err != nil {
		return err
	}
	// The new key is on disk before any entry is sealed under it: a failed
	// save puts the old ring back, or a restart would find entries whose
	// key is gone.
	oldEpochs, oldCurrent := append([]epochKey(nil), s.ring.Epochs...), s.ring.Current
	for i := range s.ring.Epochs {
		if s.ring.Epochs[i].Last == 0 || s.ring.Epochs[i].ID == s.ring.Current {
			s.ring.Epochs[i].Last = max(last, 1)
		}
	}
	key := make([]byte, 32)
	_, _ = rand.Read(key)
	e := epochKey{ID: s.ring.Current + 1, Key: key}
	if err := s.addAEAD(e); err != nil {
		s.ring.Epochs = oldEpochs
		return err
	}
	s.ring.Epochs = append(s.ring.Epochs, e)
	s.ring.Current = e.ID
	if err := s.saveLocked(); err != nil {
		s.ring.Epochs, s.ring.Current = oldEpochs, oldCurrent
		delete(s.aead, e.ID)
		return err
	}
	s.dropLocked()
	return s.saveLocked()
}

// dropLocked forgets the keys of epochs whose entries are all compacted.
func (s *shredStore) dropLocked() {
	first, err := s.inner.FirstIndex()
	if err != nil {
		return
	}
	last, _ := s.inner.LastIndex()
	kept := s.ring.Epochs[:0]
	for _, e := range s.ring.Epochs {
		gone := e.ID != s.ring.Current && e.Last > 0 && (last == 0 || e.Last < first)
		if gone {
			clear(e.Key)
			delete(s.aead, e.ID)
			continue
		}
		kept = append(kept, e)
	}
	s.ring.Epochs = kept
}

func (s *shredStore) saveLocked() error {
	b, err := json.Marshal(&s.ring)
	if err != nil {
		return err
	}
	defer clear(b)
	tmp, err := os.CreateTemp(filepath.Dir(s.path), ".logkeys.tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), s.path); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(s.path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func (s *shredStore) seal(l *raft.Log) *raft.Log {
	c := *l
	g := s.aead[s.ring.Current]
	out := make([]byte, 0, len(shredMagic)+4+g.NonceSize()+len(l.Data)+g.Overhead())
	out = append(out, shredMagic...)
	out = binary.BigEndian.AppendUint32(out, s.ring.Current)
	nonce := make([]byte, g.NonceSize())
	_, _ = rand.Read(nonce)
	out = append(out, nonce...)
	var ad [8]byte
	binary.BigEndian.PutUint64(ad[:], l.Index) // an entry cannot be moved to another index
	c.Data = g.Seal(out, nonce, l.Data, ad[:])
	return &c
}

func (s *shredStore) open(l *raft.Log) error {
	if !bytes.HasPrefix(l.Data, shredMagic) {
		return nil // written before encryption
	}
	rest := l.Data[len(shredMagic):]
	if len(rest) < 4 {
		return fmt.Errorf("raft log entry %d: truncated", l.Index)
	}
	id := binary.BigEndian.Uint32(rest)
	s.mu.Lock()
	g, ok := s.aead[id]
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("raft log entry %d: its key (epoch %d) is gone", l.Index, id)
	}
	rest = rest[4:]
	if len(rest) < g.NonceSize() {
		return fmt.Errorf("raft log entry %d: truncated", l.Index)
	}
	var ad [8]byte
	binary.BigEndian.PutUint64(ad[:], l.Index)
	pt, err := g.Open(nil, rest[:g.NonceSize()], rest[g.NonceSize():], ad[:])
	if err != nil {
		return fmt.Errorf("raft log entry %d: %w", l.Index, err)
	}
	l.Data = pt
	return nil
}

func (s *shredStore) FirstIndex() (uint64, error) { return s.inner.FirstIndex() }
func (s *shredStore) LastIndex() (uint64, error)  { return s.inner.LastIndex() }

func (s *shredStore) GetLog(index uint64, l *raft.Log) error {
	if err := s.inner.GetLog(index, l); err != nil {
		return err
	}
	return s.open(l)
}

func (s *shredStore) StoreLog(l *raft.Log) error { return s.StoreLogs([]*raft.Log{l}) }

// StoreLogs encrypts copies: raft keeps the given entries in memory to
// replicate and apply them.
func (s *shredStore) StoreLogs(logs []*raft.Log) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	enc := make([]*raft.Log, len(logs))
	for i, l := range logs {
		enc[i] = s.seal(l)
	}
	return s.inner.StoreLogs(enc)
}

func (s *shredStore) DeleteRange(min, max uint64) error {
	if err := s.inner.DeleteRange(min, max); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(s.ring.Epochs)
	s.dropLocked()
	if len(s.ring.Epochs) != n {
		return s.saveLocked()
	}
	return nil
}
