package fsm

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"
)

// Clone copies every field, and nothing the copy holds is shared with the
// original: a field holding a reference added without being copied in
// Clone fails here.
func TestMigrationCloneIsDeep(t *testing.T) {
	now := time.Date(2026, 12, 1, 18, 0, 0, 0, time.UTC)
	m := &Migration{ID: "m", Volume: "v", Machine: "x", Source: "a", Target: "b", Network: 7, State: Hydrating,
		EnteredAt: map[State]time.Time{Planned: now, Hydrating: now.Add(time.Second)}, CreatedAt: now, UpdatedAt: now,
		ModifyIndex: 9, Attempts: 1, LastError: "e", Stalled: true, StallCause: "c",
		Rollback: &RollbackInfo{Reason: "r", By: "op", From: Planned}, Layout: &LUKSLayout{UUID: "u", DataOffset: 1},
		KnownZero: []Range{{Off: 1, Len: 2}}, Export: &Export{Portal: "p", IQN: "i"}, Progress: &Progress{HydratedBytes: 5, TotalBytes: 10},
		TargetVol: "tv", Old6PN: "o", New6PN: "n", MaxDowntime: time.Second, KeyAccess: []KeyAccess{{Worker: "b", At: now}},
		Steps: []StepResult{{StepID: "s1", Event: EvCutover, State: Cutover, Index: 3}}}
	// Every exported field is set, so the comparisons below cover them all.
	rv := reflect.ValueOf(m).Elem()
	for i := range rv.NumField() {
		if f := rv.Type().Field(i); f.IsExported() && rv.Field(i).IsZero() {
			t.Fatalf("test migration leaves %s unset: set it", f.Name)
		}
	}
	want, _ := json.Marshal(m)
	c := m.Clone()
	if got, _ := json.Marshal(c); string(got) != string(want) {
		t.Fatalf("clone differs:\n got %s\nwant %s", got, want)
	}
	// Change everything the clone references: the original must not move.
	c.EnteredAt[Cutover] = now
	c.Rollback.Reason, c.Layout.UUID, c.Export.IQN, c.Progress.HydratedBytes = "x", "x", "x", 9
	c.KnownZero[0].Off, c.KeyAccess[0].Worker, c.Steps[0].StepID = 9, "x", "x"
	if got, _ := json.Marshal(m); string(got) != string(want) {
		t.Fatalf("changing the clone changed the original:\n got %s\nwant %s", got, want)
	}
	if _, ok := c.step("s1"); ok {
		t.Fatal("the clone's step index still finds a step ID it no longer holds")
	}
	if _, ok := m.Clone().step("s1"); !ok {
		t.Fatal("a clone does not find its step IDs")
	}
	// Fields holding references are the ones Clone copies by hand.
	copied := map[string]bool{"EnteredAt": true, "Rollback": true, "Layout": true, "KnownZero": true, "Export": true,
		"Progress": true, "KeyAccess": true, "Steps": true, "stepIndex": true}
	for i := range rv.NumField() {
		f := rv.Type().Field(i)
		switch f.Type.Kind() {
		case reflect.Map, reflect.Slice, reflect.Pointer, reflect.Interface, reflect.Chan, reflect.Func:
			if !copied[f.Name] {
				t.Errorf("Migration.%s holds a reference Clone does not copy: copy it in Clone and list it here", f.Name)
			}
		}
	}
}
