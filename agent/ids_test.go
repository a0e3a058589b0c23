package agent

import (
	"testing"

	"github.com/ferry-dev/ferry/fsm"
)

// TestLocalID: IDs that would reach outside a data folder are refused
// before any path is built or removed.
func TestLocalID(t *testing.T) {
	for _, id := range []string{"", ".", "..", "../x", "a/b", "/etc", ".hidden", "A"} {
		if localID("volume", id) == nil {
			t.Errorf("%q accepted", id)
		}
	}
	for _, id := range []string{"v1", "vol-a_1", "mig-0123abcd"} {
		if err := localID("volume", id); err != nil {
			t.Errorf("%q refused: %v", id, err)
		}
	}
	if migrationIDsLocal(&fsm.Migration{ID: "m1", Volume: "v1", Machine: "ma", TargetVol: ".."}) == nil {
		t.Error("a migration naming target volume .. was accepted")
	}
}
