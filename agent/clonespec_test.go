package agent

import (
	"testing"

	"github.com/ferry-dev/ferry/fsm"
)

// The agent's hydration settings reach the data path's clone spec, on the
// first build and on every rebuild.
func TestCloneSpecCarriesTheHydrationSettings(t *testing.T) {
	m := &fsm.Migration{TargetVol: "v2", Layout: &fsm.LUKSLayout{}, Export: &fsm.Export{Portal: "127.0.0.1:3260", IQN: "iqn.x:y"}, Source: "w-a"}
	for _, cfg := range []Config{{}, {HydrationRate: 1 << 20, NoIdleBatches: true}} {
		a := &Agent{cfg: cfg}
		spec := a.cloneSpec(m, true)
		if spec.RateLimit != cfg.HydrationRate || spec.NoIdleBatches != cfg.NoIdleBatches || !spec.Hydrate {
			t.Errorf("agent config %+v gave the clone spec rate %d, no idle batches %v, hydrate %v", cfg, spec.RateLimit, spec.NoIdleBatches, spec.Hydrate)
		}
	}
}
