package fsm

import "sync"

// indexes are derived from the replicated data and rebuilt on restore; they
// keep per-worker reads and blocking queries proportional to what they
// return, not to the whole history.
type indexes struct {
	migByWorker  map[string]map[string]struct{} // worker -> IDs of migrations naming it (source or target)
	machByWorker map[string]map[string]struct{}
	volByWorker  map[string]map[string]struct{}
	// forkFrom: worker -> remote forks whose copy it makes or serves
	// (Volume.ForkServed); an entry may outlive that, readers re-check.
	forkFrom map[string]map[string]struct{}
	migIndex map[string]uint64 // worker ("" = any) -> index of the last change of a migration naming it
	active   map[string]struct{}

	touched  map[string]struct{} // watch keys changed by the apply in progress
	wmu      sync.Mutex
	watchers map[string]chan struct{}
}

func buildIndexes(d *data) *indexes {
	x := &indexes{
		migByWorker: map[string]map[string]struct{}{}, machByWorker: map[string]map[string]struct{}{},
		volByWorker: map[string]map[string]struct{}{}, forkFrom: map[string]map[string]struct{}{}, migIndex: map[string]uint64{}, active: map[string]struct{}{},
		touched: map[string]struct{}{}, watchers: map[string]chan struct{}{},
	}
	for _, m := range d.Migrations {
		x.addMigration(m)
	}
	for _, m := range d.Machines {
		add(x.machByWorker, m.Worker, m.ID)
	}
	for _, v := range d.Volumes {
		add(x.volByWorker, v.Worker, v.ID)
		if v.ForkServed() {
			add(x.forkFrom, v.ForkFrom, v.ID)
		}
	}
	return x
}

func add(set map[string]map[string]struct{}, k, id string) {
	s, ok := set[k]
	if !ok {
		s = map[string]struct{}{}
		set[k] = s
	}
	s[id] = struct{}{}
}

func remove(set map[string]map[string]struct{}, k, id string) {
	if s, ok := set[k]; ok {
		delete(s, id)
		if len(s) == 0 {
			delete(set, k)
		}
	}
}

func (x *indexes) addMigration(m *Migration) {
	add(x.migByWorker, m.Source, m.ID)
	add(x.migByWorker, m.Target, m.ID)
	x.touchMigration(m)
}

// touchMigration records that m changed at m.ModifyIndex.
func (x *indexes) touchMigration(m *Migration) {
	if m.Active() {
		x.active[m.ID] = struct{}{}
	} else {
		delete(x.active, m.ID)
	}
	x.bump(m.Source, m.ModifyIndex)
	x.bump(m.Target, m.ModifyIndex)
	x.bump("", m.ModifyIndex)
}

func (x *indexes) removeMigration(m *Migration, index uint64) {
	remove(x.migByWorker, m.Source, m.ID)
	remove(x.migByWorker, m.Target, m.ID)
	delete(x.active, m.ID)
	x.bump(m.Source, index)
	x.bump(m.Target, index)
	x.bump("", index)
}

func (x *indexes) bump(k string, index uint64) {
	if index > x.migIndex[k] {
		x.migIndex[k] = index
	}
	x.touched[k] = struct{}{}
}

func (x *indexes) moveMachine(id, from, to string) {
	if from != "" {
		remove(x.machByWorker, from, id)
	}
	add(x.machByWorker, to, id)
}

func (x *indexes) addVolume(id, worker string) { add(x.volByWorker, worker, id) }

// watch returns the channel closed at the next change of migrations naming
// worker ("" = any migration).
func (x *indexes) watch(worker string) <-chan struct{} {
	x.wmu.Lock()
	defer x.wmu.Unlock()
	ch, ok := x.watchers[worker]
	if !ok {
		ch = make(chan struct{})
		x.watchers[worker] = ch
	}
	return ch
}

// wake closes the channels of the keys the finished apply touched.
func (x *indexes) wake(uint64) {
	if len(x.touched) == 0 {
		return
	}
	x.wmu.Lock()
	for k := range x.touched {
		if ch, ok := x.watchers[k]; ok {
			close(ch)
			delete(x.watchers, k)
		}
	}
	x.wmu.Unlock()
	clear(x.touched)
}

// wakeAll releases every watcher (a restore replaced the state).
func (x *indexes) wakeAll() {
	x.wmu.Lock()
	defer x.wmu.Unlock()
	for k, ch := range x.watchers {
		close(ch)
		delete(x.watchers, k)
	}
}
