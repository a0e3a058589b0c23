package agent

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

func TestWatchedNext(t *testing.T) {
	w := newWatched()
	rec := func(idx uint64, st fsm.State) *fsm.Migration {
		return &fsm.Migration{ID: "mig-1", State: st, ModifyIndex: idx}
	}
	w.put([]*fsm.Migration{rec(5, fsm.Planned)})
	w.put([]*fsm.Migration{rec(3, fsm.Planned)}) // older: kept out
	if m, err := w.next(context.Background(), "mig-1", 4); err != nil || m.ModifyIndex != 5 {
		t.Fatalf("next past 4: %v, %v; want the record of index 5", m, err)
	}
	// Nothing past 5 yet: next waits for the watch.
	got := make(chan *fsm.Migration, 1)
	go func() {
		m, _ := w.next(context.Background(), "mig-1", 5)
		got <- m
	}()
	select {
	case m := <-got:
		t.Fatalf("next returned %v before anything newer arrived", m)
	case <-time.After(20 * time.Millisecond):
	}
	w.put([]*fsm.Migration{rec(7, fsm.TargetPrepared)})
	select {
	case m := <-got:
		if m == nil || m.ModifyIndex != 7 {
			t.Fatalf("next after the change: %v, want index 7", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("next did not return once a newer record arrived")
	}
	// An ended migration is forgotten; a wait for it ends with its context.
	w.put([]*fsm.Migration{rec(9, fsm.Completed)})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if m, err := w.next(ctx, "mig-1", 0); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("next of an ended migration: %v, %v; want the context's end", m, err)
	}
}
