package e2e

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/machine"
	"github.com/ferry-dev/ferry/machine/workload"
)

// TestRestartedAgentCutOffFences: machines outlive their agent. An agent
// killed and restarted while its worker cannot reach the servers must
// still fence what its predecessor left running, at the deadline that
// process persisted (it cannot know whether the servers still count on the
// worker); once the link is back it registers and the machine runs again
// with every acknowledged record.
func TestRestartedAgentCutOffFences(t *testing.T) {
	e := newEnv(t, 1)
	w := e.ws[0]
	e.createVolume("vf", w, volSize)
	ack, _ := e.runMachine("mf", w, "vf", 13)
	e.waitAcked(ack, 50, time.Minute)

	e.kill9(w)
	if err := e.bed.SetLink(e.ctx, w, false); err != nil {
		t.Fatal(err)
	}
	linkUp := func() {
		if err := e.bed.SetLink(e.ctx, w, true); err != nil {
			t.Fatal(err)
		}
	}
	defer linkUp()
	cut := time.Now()
	if err := e.bed.StartAgent(w); err != nil {
		t.Fatal(err)
	}
	journal := filepath.Join(e.bed.WorkerDir(w), "machines")
	stopped := func() bool {
		ivs, err := machine.Journal(journal, "mf")
		return err == nil && len(ivs) > 0 && !ivs[len(ivs)-1].Stop.IsZero()
	}
	// The lease (10 s by default) was last renewed before the kill.
	deadline := time.Now().Add(45 * time.Second)
	for !stopped() {
		if time.Now().After(deadline) {
			t.Fatalf("the restarted agent, cut off from the servers, left machine mf running for %v", time.Since(cut).Round(time.Second))
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("machine fenced %v after the agent was restarted without a link to the servers", time.Since(cut).Round(time.Millisecond))

	linkUp()
	n, _ := workload.Acked(ack)
	e.waitAcked(ack, n+50, 2*time.Minute)
	present, acked := e.verifyRecords("mf", w, ack)
	t.Logf("after the link came back: %d records present, %d acknowledged", present, acked)
}
