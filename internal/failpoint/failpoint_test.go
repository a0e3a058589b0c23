package failpoint

import (
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

func TestParsePauseBefore(t *testing.T) {
	got, err := ParsePauseBefore("clone_built=3s, exported=1m, trimmed=hang")
	if err != nil || got[fsm.EvCloneBuilt] != 3*time.Second || got[fsm.EvExported] != time.Minute || got[fsm.EvTrimmed] != Hang {
		t.Fatalf("got %v, %v", got, err)
	}
	for _, bad := range []string{"nope=1s", "exported", "exported=soon", "exported=-5s"} {
		if _, err := ParsePauseBefore(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
