package agent

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
)

// countingBackend is a data path that counts fetched bytes (the one method
// headStart asks of it); countingClone's count grows while busy is set.
type countingBackend struct {
	datapath.Backend
	counters bool
}

func (b countingBackend) Capabilities() datapath.Capabilities {
	return datapath.Capabilities{ByteCounters: b.counters}
}

type countingClone struct {
	datapath.CloneHandle
	fetched atomic.Int64
}

func (c *countingClone) Status(context.Context) (*datapath.Status, error) {
	return &datapath.Status{Progress: &datapath.Progress{FetchedBytes: c.fetched.Load()}}, nil
}

// The background copy waits while the machine fetches and starts once its
// fetches stop; without byte counters it waits the whole head start.
func TestHeadStartEndsWhenTheMachineStopsFetching(t *testing.T) {
	ctx := context.Background()
	run := func(counters bool, fetchFor time.Duration) (time.Duration, time.Time) {
		a := &Agent{Parts: Parts{Data: countingBackend{counters: counters}}}
		c := &countingClone{}
		cutover := time.Now()
		stop := make(chan struct{})
		lastFetch := make(chan time.Time, 1)
		go func() {
			t := time.NewTicker(5 * time.Millisecond)
			defer t.Stop()
			last := time.Now()
			defer func() { lastFetch <- last }()
			for time.Since(cutover) < fetchFor {
				select {
				case <-stop:
					return
				case <-t.C:
					c.fetched.Add(4096)
					last = time.Now()
				}
			}
		}()
		if err := a.headStart(ctx, zerolog.Nop(), c, cutover); err != nil {
			t.Fatal(err)
		}
		took := time.Since(cutover)
		close(stop)
		return took, <-lastFetch
	}

	took, _ := run(false, 0)
	if took < machineHeadStart {
		t.Errorf("without byte counters the copy waited %v, want the whole head start %v", took, machineHeadStart)
	}
	took, _ = run(true, time.Second)
	if took < machineHeadStart {
		t.Errorf("with the machine fetching throughout, the copy waited %v, want the whole head start %v", took, machineHeadStart)
	}
	start := time.Now()
	took, last := run(true, 100*time.Millisecond)
	if ended := start.Add(took); ended.Sub(last) < headStartQuiet {
		t.Errorf("the copy started %v after the machine's last fetch, want at least %v of quiet", ended.Sub(last), headStartQuiet)
	}
	if took >= machineHeadStart {
		t.Errorf("the machine stopped fetching after 100ms, yet the copy waited the whole head start (%v)", took)
	}
}

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
