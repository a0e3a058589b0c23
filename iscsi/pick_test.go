package iscsi

import "testing"

// pick prefers a path with a session over one still logging in (its
// command would wait for the login), then the fewest commands in flight.
func TestPickPrefersPathsThatAreUp(t *testing.T) {
	l := &LUN{paths: []*path{{}, {}, {}, {}}}
	l.paths[2].up.Store(true)
	for i := 0; i < 8; i++ {
		if p := l.pick(); p != l.paths[2] {
			t.Fatalf("pick %d chose a path still logging in over the one that is up", i)
		}
	}
	l.paths[1].up.Store(true)
	l.paths[2].inflight.Store(3)
	if p := l.pick(); p != l.paths[1] {
		t.Fatal("among paths that are up, pick did not choose the least busy")
	}
	// None up: the least busy, as before.
	for _, p := range l.paths {
		p.up.Store(false)
	}
	l.paths[0].inflight.Store(2)
	l.paths[1].inflight.Store(2)
	l.paths[3].inflight.Store(1)
	if p := l.pick(); p != l.paths[3] {
		t.Fatal("with no path up, pick did not choose the least busy")
	}
}
