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

// ParsePauseBefore reads the FERRY_FAILPOINT_PAUSE_BEFORE syntax
// ("clone_built=30s,exported=5s"): how long to hold before each event.
func ParsePauseBefore(s string) (map[fsm.Event]time.Duration, error) {
	out := map[fsm.Event]time.Duration{}
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		ev, d, ok := strings.Cut(part, "=")
		dur, err := time.ParseDuration(d)
		if !ok || err != nil || !fsm.KnownEvent(fsm.Event(ev)) {
			return nil, fmt.Errorf("failpoint %q: use EVENT=DURATION with a known event", part)
		}
		out[fsm.Event(ev)] = dur
	}
	return out, nil
}
