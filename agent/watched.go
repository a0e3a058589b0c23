package agent

import (
	"context"
	"sync"

	"github.com/ferry-dev/ferry/fsm"
)

// watched keeps the newest record of each migration the agent's watch
// delivered, for a step that waits on another worker's event (the target's
// prepare waits for the source's early export) without asking the servers
// again and again.
type watched struct {
	mu      sync.Mutex
	newest  map[string]*fsm.Migration
	changed chan struct{} // closed, and replaced, on every change
}

func newWatched() *watched {
	return &watched{newest: map[string]*fsm.Migration{}, changed: make(chan struct{})}
}

// put records ms, each if newer than what is kept; ended migrations are
// forgotten.
func (w *watched) put(ms []*fsm.Migration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, m := range ms {
		if m.State.Terminal() {
			delete(w.newest, m.ID)
			continue
		}
		if old := w.newest[m.ID]; old == nil || m.ModifyIndex > old.ModifyIndex {
			w.newest[m.ID] = m
		}
	}
	close(w.changed)
	w.changed = make(chan struct{})
}

// next returns migration id's newest record past index, waiting for one
// until ctx ends.
func (w *watched) next(ctx context.Context, id string, index uint64) (*fsm.Migration, error) {
	for {
		w.mu.Lock()
		m, changed := w.newest[id], w.changed
		w.mu.Unlock()
		if m != nil && m.ModifyIndex > index {
			return m, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
