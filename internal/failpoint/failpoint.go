// Package failpoint reads the failpoints chaos and crash tests set on
// servers and agents through the environment.
package failpoint

import (
	"fmt"
	"strings"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// PauseBeforeEnv names the variable holding ParsePauseBefore's syntax.
const PauseBeforeEnv = "FERRY_FAILPOINT_PAUSE_BEFORE"

// Hang, as a pause, holds the step until its own context ends (its
// timeout, or the downtime budget), as a tool that hangs would when run
// with the step's context: "trimmed=hang".
const Hang time.Duration = -1

// ParsePauseBefore reads the FERRY_FAILPOINT_PAUSE_BEFORE syntax
// ("clone_built=30s,exported=5s,trimmed=hang"): how long to hold before
// each event (Hang: until the step's context ends).
func ParsePauseBefore(s string) (map[fsm.Event]time.Duration, error) {
	out := map[fsm.Event]time.Duration{}
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		ev, d, ok := strings.Cut(part, "=")
		dur, err := time.ParseDuration(d)
		if d == "hang" {
			dur, err = Hang, nil
		}
		if !ok || err != nil || dur < Hang || !fsm.KnownEvent(fsm.Event(ev)) {
			return nil, fmt.Errorf("failpoint %q: use EVENT=DURATION or EVENT=hang with a known event", part)
		}
		out[fsm.Event(ev)] = dur
	}
	return out, nil
}
