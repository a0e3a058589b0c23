package server

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
)

// fakeView is a fixed store view; recorder keeps what was proposed.
type fakeView struct {
	servers    []fsm.ServerMember
	workers    map[string]fsm.Worker
	migrations []*fsm.Migration
	volumes    []fsm.Volume
	garbage    bool // what Collectable answers
}

func (v *fakeView) Servers() []fsm.ServerMember { return v.servers }
func (v *fakeView) Worker(n string) (fsm.Worker, bool) {
	w, ok := v.workers[n]
	return w, ok
}
func (v *fakeView) ActiveMigrations() []*fsm.Migration        { return v.migrations }
func (v *fakeView) Volumes(string) []fsm.Volume               { return v.volumes }
func (v *fakeView) Collectable(time.Time, time.Duration) bool { return v.garbage }

type recorder struct{ cmds []any }

func (r *recorder) Propose(_ context.Context, _ fsm.CommandType, payload any) error {
	r.cmds = append(r.cmds, payload)
	return nil
}

func TestHousekeeperReconcile(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	alive := fsm.Worker{LeaseExpiry: now.Add(time.Minute)}
	self := fsm.ServerMember{ID: "s0", RaftAddr: "127.0.0.1:1", APIAddr: "127.0.0.1:2"}
	view := &fakeView{
		servers: []fsm.ServerMember{{ID: "s0", RaftAddr: "127.0.0.1:1", APIAddr: "old:2"}}, // stale address
		workers: map[string]fsm.Worker{"a": alive, "b": alive},                             // "gone" has no lease
		migrations: []*fsm.Migration{
			{ID: "released", State: fsm.SourceReleased, Source: "a", Target: "b"},
			{ID: "early", State: fsm.Planned, Source: "a", Target: "gone"},
			{ID: "healthy", State: fsm.Planned, Source: "a", Target: "b"},
		},
		volumes: []fsm.Volume{
			{ID: "due", State: fsm.VolPendingDelete, DestroyAfter: now.Add(-time.Second)},
			{ID: "kept", State: fsm.VolPendingDelete, DestroyAfter: now.Add(time.Hour)},
		},
	}
	rec := &recorder{}
	h := &housekeeper{self: self, propose: rec, store: view, now: func() time.Time { return now }, log: zerolog.Nop()}
	h.reconcile(context.Background())

	var got []string
	for _, c := range rec.cmds {
		switch c := c.(type) {
		case *fsm.RegisterServerCmd:
			if c.Member != self || c.Actor.Kind != fsm.KindServer {
				t.Errorf("registered %+v by %+v", c.Member, c.Actor)
			}
			got = append(got, "register")
		case *fsm.ProposeCmd:
			got = append(got, c.ID+":"+string(c.Event))
		case *fsm.DestroyVolumeCmd:
			got = append(got, "destroy:"+c.ID)
		default:
			t.Errorf("unexpected command %T", c)
		}
	}
	want := []string{"register", "released:" + string(fsm.EvCompleted), "early:" + string(fsm.EvAbort), "destroy:due"}
	if len(got) != len(want) {
		t.Fatalf("proposed %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("proposed %v, want %v", got, want)
		}
	}

	// Registered with the right addresses and nothing due: nothing proposed.
	view.servers = []fsm.ServerMember{self}
	view.migrations, view.volumes = view.migrations[2:], view.volumes[1:]
	rec.cmds = nil
	h.reconcile(context.Background())
	if len(rec.cmds) != 0 {
		t.Fatalf("idle reconcile proposed %d commands", len(rec.cmds))
	}

	// Ended records past the retention: one GC command, by this server.
	view.garbage = true
	h.gc = time.Hour
	h.reconcile(context.Background())
	if len(rec.cmds) != 1 {
		t.Fatalf("gc reconcile proposed %d commands", len(rec.cmds))
	}
	if c, ok := rec.cmds[0].(*fsm.GCCmd); !ok || c.Retention != time.Hour || c.Actor.Kind != fsm.KindServer {
		t.Fatalf("gc reconcile proposed %+v", rec.cmds[0])
	}
}

func TestStatusOf(t *testing.T) {
	for kind, want := range map[fsm.RefusalKind]int{
		fsm.RefuseInvalid:         http.StatusBadRequest,
		fsm.RefuseUnauthenticated: http.StatusUnauthorized,
		fsm.RefuseForbidden:       http.StatusForbidden,
		fsm.RefuseNotFound:        http.StatusNotFound,
		fsm.RefuseConflict:        http.StatusConflict,
		fsm.RefuseGone:            http.StatusGone,
		fsm.RefuseBusy:            http.StatusTooManyRequests,
		fsm.RefuseNotLeader:       http.StatusServiceUnavailable,
		fsm.RefuseInternal:        http.StatusInternalServerError,
		"something-new":           http.StatusInternalServerError,
	} {
		got := StatusOf(kind)
		if got != want {
			t.Errorf("StatusOf(%s) = %d, want %d", kind, got, want)
		}
		// The store's refusals are the caller's to fix: always 4xx.
		if kind.ClientSide() != (got/100 == 4) {
			t.Errorf("%s: ClientSide %v but status %d", kind, kind.ClientSide(), got)
		}
	}
}

// The completed failpoint holds a released migration for its duration,
// counted from the committed EnteredAt (so a new leader keeps the deadline).
func TestHousekeeperPauseBeforeCompleted(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	self := fsm.ServerMember{ID: "s0"}
	m := &fsm.Migration{ID: "released", State: fsm.SourceReleased, Source: "a", Target: "b",
		EnteredAt: map[fsm.State]time.Time{fsm.SourceReleased: now.Add(-3 * time.Second)}}
	view := &fakeView{servers: []fsm.ServerMember{self}, migrations: []*fsm.Migration{m}}
	rec := &recorder{}
	h := &housekeeper{self: self, propose: rec, store: view, now: func() time.Time { return now }, log: zerolog.Nop(),
		pause: map[fsm.Event]time.Duration{fsm.EvCompleted: 4 * time.Second}}
	h.reconcile(context.Background())
	if len(rec.cmds) != 0 {
		t.Fatalf("proposed %d commands 3s into a 4s hold", len(rec.cmds))
	}
	now = now.Add(time.Second)
	h.reconcile(context.Background())
	if len(rec.cmds) != 1 || rec.cmds[0].(*fsm.ProposeCmd).Event != fsm.EvCompleted {
		t.Fatalf("after the hold: proposed %+v, want one completed", rec.cmds)
	}
}

// A change of any migration wakes the housekeeper, which completes a
// released migration then and there: not at its next tick (an hour here).
func TestHousekeeperCompletesOnChange(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	self := fsm.ServerMember{ID: "s0"}
	view := &fakeView{servers: []fsm.ServerMember{self}, migrations: []*fsm.Migration{
		{ID: "released", State: fsm.SourceReleased, Source: "a", Target: "b"},
		{ID: "running", State: fsm.Hydrating, Source: "a", Target: "b"},
	}}
	proposed := make(chan *fsm.ProposeCmd, 4)
	change := make(chan struct{})
	h := &housekeeper{self: self, propose: proposerFunc(func(c any) { proposed <- c.(*fsm.ProposeCmd) }), store: view,
		now: func() time.Time { return now }, interval: time.Hour, log: zerolog.Nop(),
		changes: func() <-chan struct{} { return change }}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go h.run(ctx)
	select {
	case c := <-proposed:
		t.Fatalf("proposed %s for %s before any change", c.Event, c.ID)
	case <-time.After(50 * time.Millisecond):
	}
	close(change)
	select {
	case c := <-proposed:
		if c.ID != "released" || c.Event != fsm.EvCompleted {
			t.Fatalf("on a change: proposed %s for %s, want completed for released", c.Event, c.ID)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a change did not complete the released migration")
	}
}

type proposerFunc func(payload any)

func (f proposerFunc) Propose(_ context.Context, _ fsm.CommandType, payload any) error {
	f(payload)
	return nil
}
