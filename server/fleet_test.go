package server_test

import (
	"context"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server/servertest"
)

// Beats cost a raft write only when the lease runs short or the report
// changes meaningfully; a bad report does not cost the lease.
func TestSteadyStateWritesNothing(t *testing.T) {
	c := servertest.New(t, 1, servertest.Options{})
	ctx := context.Background()
	w := c.Client("w1", tlsutil.KindWorker)
	rep := &fsm.WorkerReport{FreeBytes: 100 << 30, TotalBytes: 200 << 30, SlotsIn: 2, SlotsOut: 2}
	if _, err := w.RegisterWorker(ctx, fsm.Worker{Name: "w1", HostID: 1, Report: rep}, time.Minute); err != nil {
		t.Fatal(err)
	}
	st := c.Servers[0].Store()
	idx := st.Index()
	for range 5 {
		small := *rep
		small.FreeBytes -= 1 << 20 // 1 MiB less: not a meaningful change
		if _, err := w.HeartbeatReport(ctx, "w1", time.Minute, &small); err != nil {
			t.Fatal(err)
		}
	}
	if got := st.Index(); got != idx {
		t.Fatalf("steady beats wrote %d entries", got-idx)
	}
	// Slots changed: written.
	changed := *rep
	changed.SlotsIn = 4
	wk, err := w.HeartbeatReport(ctx, "w1", 20*time.Second, &changed) // a short lease, so the next beat finds it short
	if err != nil || st.Index() != idx+1 || wk.LimitIn() != 4 {
		t.Fatalf("changed report: %+v %v (index +%d)", wk, err, st.Index()-idx)
	}
	// Lease short for the TTL asked for (less than half of it left):
	// written, granting 1.5 TTL up to the longest lease. The report is
	// invalid: it is dropped, the beat still counts.
	bad := &fsm.WorkerReport{FreeBytes: 300 << 30, TotalBytes: 200 << 30}
	wk, err = w.HeartbeatReport(ctx, "w1", fsm.MaxLeaseTTL, bad)
	if err != nil || wk.Report == nil || wk.Report.FreeBytes != changed.FreeBytes || wk.LimitIn() != 4 ||
		wk.LeaseExpiry.Before(time.Now().Add(fsm.MaxLeaseTTL-10*time.Second)) {
		t.Fatalf("beat with a bad report: %+v %v", wk, err)
	}
}
