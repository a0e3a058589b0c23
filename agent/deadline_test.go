package agent

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// sealedKeys seals every migrating key at once, so a step before the export
// never fails first (the fake control plane holds no worker keys).
type sealedKeys struct{ Keys }

func (sealedKeys) SealForTarget(context.Context, *fsm.Migration) error { return nil }

// A step between source_stopped and cutover that hangs is cut at the end of
// the downtime budget and the migration fails (rollback) with a reason that
// names the budget, the state and the underlying error.
func TestDowntimeBudgetRollsBack(t *testing.T) {
	stopped := time.Now()
	cp := &fakeCP{m: &fsm.Migration{ID: "mig-b", Source: "src", Target: "dst", State: fsm.SourceStopped, Volume: "v",
		MaxDowntime: 300 * time.Millisecond, EnteredAt: map[fsm.State]time.Time{fsm.SourceStopped: stopped}}}
	a := newTestAgent(t, cp, "src", func(c *Config) { c.MaxPreCutoverAttempts = 1000 }) // only the budget may fail it
	// The exporter volops exports with is this one too.
	a.Exports.(*fakeExporter).hang = true
	a.Keys = sealedKeys{a.Keys}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	a.dispatch(ctx, cp.m.Clone())
	for time.Now().Before(stopped.Add(5 * time.Second)) {
		cp.mu.Lock()
		for i, ev := range cp.proposed {
			if ev != fsm.EvFailed {
				continue
			}
			p := cp.payloads[i]
			cp.mu.Unlock()
			if el := time.Since(stopped); el < 300*time.Millisecond {
				t.Fatalf("rolled back %v after source_stopped, before the 300ms budget was spent", el)
			}
			if !strings.Contains(p.Reason, "downtime budget 300ms") || !strings.Contains(p.Reason, string(fsm.SourceStopped)) ||
				!strings.Contains(p.Error, "downtime budget is spent") || !strings.Contains(p.Error, "deadline exceeded") {
				t.Fatalf("failure payload %+v: want the budget, the state and the cause", p)
			}
			cancel()
			a.steps.Wait()
			return
		}
		cp.mu.Unlock()
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("a hung step never failed the migration; proposals: %v", cp.events())
}
