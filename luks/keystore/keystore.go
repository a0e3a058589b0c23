// Package keystore keeps the per-volume LUKS passphrases. The server hands a
// key only to the worker that owns or targets the volume (that check lives
// with the caller); this package stores keys and never logs or prints them.
package keystore

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sync"
)

// Store holds one key per volume.
type Store interface {
	// Put stores the key of a new volume. Putting a different key for a
	// volume that has one fails with ErrExists: replacing a key would make
	// the volume unreadable. Putting the same key again is a no-op.
	Put(volumeID string, key []byte) error
	// Get returns a copy of the volume's key, or ErrNotFound.
	Get(volumeID string) ([]byte, error)
	// Delete forgets the key (the volume's data becomes unreadable);
	// deleting a missing key is not an error.
	Delete(volumeID string) error
}

var (
	ErrNotFound = errors.New("no key stored for this volume")
	ErrExists   = errors.New("volume already has a different key; delete it first if the volume was destroyed")
	ErrBadID    = errors.New("volume id must be 1-128 characters of A-Z a-z 0-9 . _ - and not start with a dot")
)

var validID = regexp.MustCompile(`^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$`)

// CheckID refuses volume ids that could escape the store's directory.
func CheckID(volumeID string) error {
	if !validID.MatchString(volumeID) {
		return fmt.Errorf("volume id %q: %w", volumeID, ErrBadID)
	}
	return nil
}

// NewPassphrase returns a fresh volume passphrase: 32 random bytes,
// hex-encoded so it can live in a cryptsetup key file as text.
func NewPassphrase() ([]byte, error) {
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return nil, fmt.Errorf("read random bytes for a volume key: %w", err)
	}
	out := make([]byte, hex.EncodedLen(len(raw)))
	hex.Encode(out, raw)
	clear(raw)
	return out, nil
}

// File is the development Store: one 0600 file per volume in a 0700
// directory, written atomically (temp file, fsync, rename, fsync dir).
type File struct {
	dir string
	mu  sync.Mutex
}

// NewFile opens (creating if needed) a key directory and tightens its mode to 0700.
func NewFile(dir string) (*File, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create key store %s: %w", dir, err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("restrict key store %s to 0700: %w", dir, err)
	}
	return &File{dir: dir}, nil
}

func (s *File) path(id string) string { return filepath.Join(s.dir, id+".key") }

func (s *File) Put(volumeID string, key []byte) error {
	if err := CheckID(volumeID); err != nil {
		return err
	}
	if len(key) == 0 {
		return fmt.Errorf("put key for volume %s: the key is empty", volumeID)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old, err := os.ReadFile(s.path(volumeID))
	switch {
	case err == nil:
		defer clear(old)
		if bytes.Equal(old, key) {
			return nil
		}
		return fmt.Errorf("put key for volume %s: %w", volumeID, ErrExists)
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("put key for volume %s: %w", volumeID, err)
	}
	tmp, err := os.CreateTemp(s.dir, ".tmp-"+volumeID+"-*")
	if err != nil {
		return fmt.Errorf("put key for volume %s: %w", volumeID, err)
	}
	defer os.Remove(tmp.Name()) // no-op after the rename
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return fmt.Errorf("put key for volume %s: %w", volumeID, err)
	}
	if _, err := tmp.Write(key); err != nil {
		tmp.Close()
		return fmt.Errorf("put key for volume %s: write: %w", volumeID, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("put key for volume %s: fsync: %w", volumeID, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("put key for volume %s: %w", volumeID, err)
	}
	if err := os.Rename(tmp.Name(), s.path(volumeID)); err != nil {
		return fmt.Errorf("put key for volume %s: %w", volumeID, err)
	}
	return syncDir(s.dir)
}

func (s *File) Get(volumeID string) ([]byte, error) {
	if err := CheckID(volumeID); err != nil {
		return nil, err
	}
	st, err := os.Stat(s.path(volumeID))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("volume %s: %w", volumeID, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get key for volume %s: %w", volumeID, err)
	}
	// A key others could read may have leaked: refuse rather than use it silently.
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("key file %s has mode %v, readable by others: check who read it, then chmod 0600", s.path(volumeID), st.Mode().Perm())
	}
	b, err := os.ReadFile(s.path(volumeID))
	if err != nil {
		return nil, fmt.Errorf("get key for volume %s: %w", volumeID, err)
	}
	return b, nil
}

func (s *File) Delete(volumeID string) error {
	if err := CheckID(volumeID); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := os.Remove(s.path(volumeID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("delete key for volume %s: %w", volumeID, err)
	}
	return syncDir(s.dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync key store %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync key store %s: %w", dir, err)
	}
	return nil
}

// Mem is an in-memory Store for tests of code that uses one.
type Mem struct {
	mu   sync.Mutex
	keys map[string][]byte
}

func NewMem() *Mem { return &Mem{keys: map[string][]byte{}} }

func (m *Mem) Put(volumeID string, key []byte) error {
	if err := CheckID(volumeID); err != nil {
		return err
	}
	if len(key) == 0 {
		return fmt.Errorf("put key for volume %s: the key is empty", volumeID)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if old, ok := m.keys[volumeID]; ok {
		if bytes.Equal(old, key) {
			return nil
		}
		return fmt.Errorf("put key for volume %s: %w", volumeID, ErrExists)
	}
	m.keys[volumeID] = bytes.Clone(key)
	return nil
}

func (m *Mem) Get(volumeID string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	k, ok := m.keys[volumeID]
	if !ok {
		return nil, fmt.Errorf("volume %s: %w", volumeID, ErrNotFound)
	}
	return bytes.Clone(k), nil
}

func (m *Mem) Delete(volumeID string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if k, ok := m.keys[volumeID]; ok {
		clear(k)
		delete(m.keys, volumeID)
	}
	return nil
}
