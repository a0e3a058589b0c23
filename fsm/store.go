package fsm

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"sort"
	"sync"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/logging"
)

// Result is what applying one command produced.
type Result struct {
	Index     uint64     `json:"index"`
	Migration *Migration `json:"migration,omitempty"`
	Volume    *Volume    `json:"volume,omitempty"`
	Machine   *Machine   `json:"machine,omitempty"`
	Worker    *Worker    `json:"worker,omitempty"`
	Drain     *Drain     `json:"drain,omitempty"`
	Duplicate bool       `json:"duplicate,omitempty"` // the step ID was applied before; nothing changed
	Ignored   bool       `json:"ignored,omitempty"`   // a rate-limited progress update; nothing changed
	Refusal   *Refusal   `json:"refusal,omitempty"`
}

// Err returns the refusal as an error, or nil.
func (r *Result) Err() error {
	if r == nil || r.Refusal == nil {
		return nil
	}
	return r.Refusal
}

// data is the whole replicated state; it is what a snapshot holds.
type data struct {
	Format     int                      `json:"format,omitempty"` // FormatVersion of the writer; 0 in snapshots written before it was recorded (format 1)
	Index      uint64                   `json:"index"`
	Migrations map[string]*Migration    `json:"migrations"`
	Workers    map[string]*Worker       `json:"workers"`
	Volumes    map[string]*Volume       `json:"volumes"`
	Machines   map[string]*Machine      `json:"machines"`
	Locks      map[string]string        `json:"locks"` // "volume/ID" or "network/N" -> migration ID
	Servers    map[string]*ServerMember `json:"servers"`
	Drains     map[string]*Drain        `json:"drains,omitempty"`
	Revoked    map[string]*RevokedCert  `json:"revoked,omitempty"` // certificate serial -> revocation
	// Envelopes holds sealed volume keys by volume/purpose[/migration].
	Envelopes   map[string]*Envelope `json:"envelopes,omitempty"`
	RecoveryKey *PublicKey           `json:"recovery_key,omitempty"`
	// Keys held plaintext volume keys before keys were sealed. Old
	// snapshots still carry it: Restore reads and drops it.
	Keys map[string][]byte `json:"keys,omitempty"`
}

func newData() *data {
	return &data{
		Migrations: map[string]*Migration{},
		Workers:    map[string]*Worker{},
		Volumes:    map[string]*Volume{},
		Machines:   map[string]*Machine{},
		Locks:      map[string]string{},
		Servers:    map[string]*ServerMember{},
		Drains:     map[string]*Drain{},
		Revoked:    map[string]*RevokedCert{},
		Envelopes:  map[string]*Envelope{},
	}
}

// Store is the replicated state machine. It knows nothing of raft: the
// server feeds it committed entries through ApplyCommand and persists its
// Snapshot; tests call ApplyCommand directly.
type Store struct {
	log zerolog.Logger

	mu     sync.RWMutex
	d      *data
	idx    *indexes      // derived from d, never replicated
	notify chan struct{} // closed and replaced on every apply (blocking queries)
}

// NewStore returns an empty store.
func NewStore(log zerolog.Logger) *Store {
	d := newData()
	return &Store{log: logging.For(log, "fsm"), d: d, idx: buildIndexes(d), notify: make(chan struct{})}
}

// ApplyCommand applies one encoded command at a log index. It is
// deterministic: the same (index, data) sequence gives the same state.
func (s *Store) ApplyCommand(index uint64, raw []byte) *Result {
	typ, p, err := Decode(raw)
	s.mu.Lock()
	defer func() {
		if index > s.d.Index {
			s.d.Index = index
		}
		close(s.notify)
		s.notify = make(chan struct{})
		s.idx.wake(index)
		s.mu.Unlock()
	}()
	if err != nil {
		s.log.Warn().Err(err).Uint64("index", index).Str("type", string(typ)).Msg("refused a malformed command")
		return &Result{Index: index, Refusal: refuse(RefuseInvalid, CodeBadCommand, "%v", err)}
	}
	if ref := s.authorize(p); ref != nil {
		return &Result{Index: index, Refusal: ref}
	}
	var res *Result
	if c, ok := commands[typ]; ok {
		res = c.apply(s, index, p)
	} else {
		res = &Result{Refusal: refuse(RefuseInvalid, CodeBadCommand, "command %q has no apply function", typ)}
	}
	res.Index = index
	return res
}

// Index is the last applied raft index.
func (s *Store) Index() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.d.Index
}

// Changed returns a channel closed at the next apply.
func (s *Store) Changed() <-chan struct{} {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.notify
}

// Migration returns a copy of one migration.
func (s *Store) Migration(id string) (*Migration, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	m, ok := s.d.Migrations[id]
	return m.Clone(), ok
}

// Migrations returns copies of the migrations naming worker as source or
// target (all when worker is empty), oldest first.
func (s *Store) Migrations(worker string) []*Migration {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := []*Migration{}
	if worker == "" {
		for _, m := range s.d.Migrations {
			out = append(out, m.Clone())
		}
	} else {
		for id := range s.idx.migByWorker[worker] {
			out = append(out, s.d.Migrations[id].Clone())
		}
	}
	sortMigrations(out)
	return out
}

func sortMigrations(out []*Migration) {
	sort.Slice(out, func(i, j int) bool {
		if !out[i].CreatedAt.Equal(out[j].CreatedAt) {
			return out[i].CreatedAt.Before(out[j].CreatedAt)
		}
		return out[i].ID < out[j].ID
	})
}

// Workers returns copies of every worker, by name.
func (s *Store) Workers() []Worker {
	return list(s, s.d.Workers, func(*Worker) bool { return true }, derefWorker)
}

// Worker returns one worker.
func (s *Store) Worker(name string) (Worker, bool) { return get(s, s.d.Workers, name, derefWorker) }

// Volumes returns copies of the volumes on worker (all when empty), by ID.
func (s *Store) Volumes(worker string) []Volume {
	if worker != "" {
		return listSet(s, s.d.Volumes, func() map[string]struct{} { return s.idx.volByWorker[worker] }, copyVolume)
	}
	return list(s, s.d.Volumes, func(*Volume) bool { return true }, copyVolume)
}

// ForksFrom returns copies of the remote forks whose copy worker makes or
// still serves (Volume.ForkServed), by ID.
func (s *Store) ForksFrom(worker string) []Volume {
	vs := listSet(s, s.d.Volumes, func() map[string]struct{} { return s.idx.forkFrom[worker] }, copyVolume)
	return slices.DeleteFunc(vs, func(v Volume) bool { return !v.ForkServed() || v.ForkFrom != worker })
}

// Volume returns one volume.
func (s *Store) Volume(id string) (Volume, bool) { return get(s, s.d.Volumes, id, copyVolume) }

// Machines returns copies of the machines on worker (all when empty), by ID.
func (s *Store) Machines(worker string) []Machine {
	if worker != "" {
		return listSet(s, s.d.Machines, func() map[string]struct{} { return s.idx.machByWorker[worker] }, derefMachine)
	}
	return list(s, s.d.Machines, func(*Machine) bool { return true }, derefMachine)
}

// Machine returns one machine.
func (s *Store) Machine(id string) (Machine, bool) { return get(s, s.d.Machines, id, derefMachine) }

func derefWorker(w *Worker) Worker    { return *w }
func derefMachine(m *Machine) Machine { return *m }

// list copies the registry entries keep accepts, sorted by key (their name or ID).
func list[T any](s *Store, reg map[string]*T, keep func(*T) bool, cp func(*T) T) []T {
	s.mu.RLock()
	defer s.mu.RUnlock()
	keys := make([]string, 0, len(reg))
	for k, v := range reg {
		if keep(v) {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	out := make([]T, 0, len(keys))
	for _, k := range keys {
		out = append(out, cp(reg[k]))
	}
	return out
}

// listSet copies the registry entries whose keys set returns (read under
// the lock), sorted by key: the per-worker lists cost what they return.
func listSet[T any](s *Store, reg map[string]*T, set func() map[string]struct{}, cp func(*T) T) []T {
	s.mu.RLock()
	defer s.mu.RUnlock()
	ids := set()
	keys := make([]string, 0, len(ids))
	for k := range ids {
		if _, ok := reg[k]; ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	out := make([]T, 0, len(keys))
	for _, k := range keys {
		out = append(out, cp(reg[k]))
	}
	return out
}

// get copies one registry entry.
func get[T any](s *Store, reg map[string]*T, key string, cp func(*T) T) (T, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	v, ok := reg[key]
	if !ok {
		var zero T
		return zero, false
	}
	return cp(v), true
}

// Locks returns a copy of the lock table (lock name -> migration ID).
func (s *Store) Locks() map[string]string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make(map[string]string, len(s.d.Locks))
	for k, v := range s.d.Locks {
		out[k] = v
	}
	return out
}

// Servers returns the known raft members and their API addresses.
func (s *Store) Servers() []ServerMember {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]ServerMember, 0, len(s.d.Servers))
	for _, m := range s.d.Servers {
		out = append(out, *m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Dump returns the whole state as canonical JSON, for comparing replicas
// in tests.
func (s *Store) Dump() []byte {
	s.mu.RLock()
	defer s.mu.RUnlock()
	c := *s.d
	c.Format = 0
	b, _ := json.Marshal(&c)
	return b
}

func copyVolume(v *Volume) Volume {
	c := *v
	if v.Layout != nil {
		l := *v.Layout
		c.Layout = &l
	}
	if v.ForkExport != nil {
		e := *v.ForkExport
		c.ForkExport = &e
	}
	c.ForkKnownZero = slices.Clone(v.ForkKnownZero)
	return c
}

// Snapshot returns the whole state as JSON, to be persisted by the
// replication layer (the server adapts it to raft's snapshot interface).
func (s *Store) Snapshot() (*Snapshot, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	c := *s.d
	c.Format = FormatVersion
	b, err := json.Marshal(&c)
	if err != nil {
		return nil, fmt.Errorf("encoding snapshot: %w", err)
	}
	return &Snapshot{b: b}, nil
}

// Restore replaces the state with a snapshot's. It is strict like Decode: a
// field this build does not know would be lost here and make this replica
// disagree with the others, so it is an error.
func (s *Store) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	d := newData()
	dec := json.NewDecoder(rc)
	dec.DisallowUnknownFields()
	if err := dec.Decode(d); err != nil {
		return fmt.Errorf("decoding snapshot (format %d build): %w: if a newer server wrote it, upgrade this server", FormatVersion, err)
	}
	if d.Format > FormatVersion {
		return fmt.Errorf("snapshot is format %d, this server reads up to format %d: upgrade this server", d.Format, FormatVersion)
	}
	d.Format = 0
	if len(d.Keys) > 0 {
		// Plaintext keys from before sealing: never kept, never re-snapshotted.
		s.log.Warn().Int("volumes", len(d.Keys)).Msg("dropped plaintext volume keys from an old snapshot; their volumes need `ferry volume recover` or a re-seal by their worker")
	}
	clear(d.Keys)
	d.Keys = nil
	if d.Envelopes == nil {
		d.Envelopes = map[string]*Envelope{}
	}
	for _, m := range d.Migrations {
		m.reindex()
	}
	if d.Drains == nil {
		d.Drains = map[string]*Drain{}
	}
	s.mu.Lock()
	s.d = d
	old := s.idx
	s.idx = buildIndexes(d)
	old.wakeAll()
	close(s.notify)
	s.notify = make(chan struct{})
	s.mu.Unlock()
	s.log.Info().Uint64("index", d.Index).Int("migrations", len(d.Migrations)).Msg("restored state from snapshot")
	return nil
}

// Snapshot is an encoded copy of the state taken under the store's lock.
type Snapshot struct{ b []byte }

// SnapshotSink receives a snapshot; Cancel discards what was written.
type SnapshotSink interface {
	io.WriteCloser
	Cancel() error
}

// Persist writes the snapshot to sink and closes it (cancels it on error).
func (sn *Snapshot) Persist(sink SnapshotSink) error {
	if _, err := sink.Write(sn.b); err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("writing snapshot: %w", err)
	}
	return sink.Close()
}

// Release is a no-op: the snapshot holds no resources.
func (*Snapshot) Release() {}

// MigrationsIndex is the highest ModifyIndex among the migrations naming
// worker (all when empty), at least 1 so a watcher never spins on 0. It
// also moves when such a migration is collected. O(1): kept per worker.
func (s *Store) MigrationsIndex(worker string) uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return max(s.idx.migIndex[worker], 1)
}

// MigrationsChanged returns a channel closed when MigrationsIndex(worker)
// may have moved: a blocking query on one worker wakes only for changes
// naming it, not on every apply.
func (s *Store) MigrationsChanged(worker string) <-chan struct{} {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.idx.watch(worker)
}

// MigrationIndex is one migration's ModifyIndex (at least 1).
func (s *Store) MigrationIndex(id string) uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if m, ok := s.d.Migrations[id]; ok && m.ModifyIndex > 1 {
		return m.ModifyIndex
	}
	return 1
}
