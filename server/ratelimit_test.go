package server

import (
	"testing"

	"github.com/ferry-dev/ferry/fsm"
)

func TestWriteLimitsPerIdentity(t *testing.T) {
	l := newWriteLimits(0.001, 3) // effectively no refill during the test
	a := fsm.Identity{Name: "a", Kind: fsm.KindWorker}
	b := fsm.Identity{Name: "b", Kind: fsm.KindWorker}
	for i := 0; i < 3; i++ {
		if r := l.allow(a); r != nil {
			t.Fatalf("write %d within the burst refused: %v", i, r)
		}
	}
	r := l.allow(a)
	if r == nil || r.Kind != fsm.RefuseBusy || r.Code != fsm.CodeRateLimited {
		t.Fatalf("write past the burst: %v", r)
	}
	if r := l.allow(b); r != nil {
		t.Fatalf("another identity shares the budget: %v", r)
	}
	// Same name, other kind: another identity.
	if r := l.allow(fsm.Identity{Name: "a", Kind: fsm.KindOperator}); r != nil {
		t.Fatalf("operator a shares worker a's budget: %v", r)
	}
	off := newWriteLimits(-1, 0)
	for i := 0; i < 1000; i++ {
		if r := off.allow(a); r != nil {
			t.Fatal("disabled limits refused a write")
		}
	}
}
