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
// changes meaningfully; an owner's key read costs none; a bad report does
// not cost the lease.
func TestSteadyStateWritesNothing(t *testing.T) {
	c := servertest.New(t, 1, servertest.Options{})
	ctx := context.Background()
	w := c.Client("w1", tlsutil.KindWorker)
	rep := &fsm.WorkerReport{FreeBytes: 100 << 30, TotalBytes: 200 << 30, SlotsIn: 2, SlotsOut: 2}
	if _, err := w.RegisterWorker(ctx, fsm.Worker{Name: "w1", HostID: 1, Report: rep}, time.Minute); err != nil {
		t.Fatal(err)
	}
	_, err := w.CreateVolume(ctx, fsm.Volume{ID: "v1", Worker: "w1", Size: 1 << 30, State: fsm.VolCreated})
	check(t, err)
	check(t, w.SetVolumeKey(ctx, "v1", []byte("0123456789abcdef")))
	st := c.Servers[0].Store()
	idx := st.Index()
	for range 5 {
		small := *rep
		small.FreeBytes -= 1 << 20 // 1 MiB less: not a meaningful change
		if _, err := w.HeartbeatReport(ctx, "w1", time.Minute, &small); err != nil {
			t.Fatal(err)
		}
		key, err := w.GetVolumeKey(ctx, "v1")
		if err != nil || string(key) != "0123456789abcdef" {
			t.Fatalf("owner key read: %q %v", key, err)
		}
	}
	if got := st.Index(); got != idx {
		t.Fatalf("steady beats and key reads wrote %d entries", got-idx)
	}
	// Slots changed: written.
	changed := *rep
	changed.SlotsIn = 4
	wk, err := w.HeartbeatReport(ctx, "w1", time.Minute, &changed)
	if err != nil || st.Index() != idx+1 || wk.LimitIn() != 4 {
		t.Fatalf("changed report: %+v %v (index +%d)", wk, err, st.Index()-idx)
	}
	// Lease short (the TTL asked for is long): written, granting 1.5 TTL.
	wk, err = w.HeartbeatReport(ctx, "w1", time.Hour, &changed)
	if err != nil || wk.LeaseExpiry.Before(time.Now().Add(89*time.Minute)) {
		t.Fatalf("lease extension: %+v %v", wk, err)
	}
	// An invalid report is dropped; the beat still counts.
	bad := &fsm.WorkerReport{FreeBytes: 300 << 30, TotalBytes: 200 << 30}
	wk, err = w.HeartbeatReport(ctx, "w1", 3*time.Hour, bad)
	if err != nil || wk.Report.FreeBytes != changed.FreeBytes || !wk.LeaseExpiry.After(time.Now().Add(4*time.Hour)) {
		t.Fatalf("beat with a bad report: %+v %v", wk, err)
	}
}
