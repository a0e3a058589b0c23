package fsm

import (
	"reflect"
	"testing"
)

// Every type this build lists has one row, and no row is unlisted: a type
// missing either way would decode without applying, or apply unlisted in
// the golden files.
func TestCommandRowsMatchCommandTypes(t *testing.T) {
	seen := map[reflect.Type]CommandType{}
	for _, ct := range CommandTypes {
		row, ok := commands[ct]
		if !ok {
			t.Errorf("command type %s has no row in commands", ct)
			continue
		}
		pt := reflect.TypeOf(row.payload())
		if prev, dup := seen[pt]; dup {
			t.Errorf("command types %s and %s share payload type %s: Authorize could not tell them apart", prev, ct, pt)
		}
		seen[pt] = ct
		if byPayload[pt].payload == nil {
			t.Errorf("payload type %s of %s is missing from byPayload", pt, ct)
		}
	}
	if len(commands) != len(CommandTypes) {
		t.Errorf("commands has %d rows, CommandTypes lists %d types", len(commands), len(CommandTypes))
	}
}

// TestEveryCommandValidates: each command type's payload checks its own
// fields; Validate refuses anything else.
func TestEveryCommandValidates(t *testing.T) {
	for typ, row := range commands {
		if _, ok := row.payload().(interface{ validate() *Refusal }); !ok {
			t.Errorf("command %s: payload %T has no validate method", typ, row.payload())
		}
	}
	if r := Validate(struct{}{}); r == nil || r.Kind != RefuseInvalid {
		t.Fatalf("Validate of a non-command: %+v", r)
	}
}
