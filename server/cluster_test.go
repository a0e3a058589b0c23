package server_test

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/sealing"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server"
	"github.com/ferry-dev/ferry/server/servertest"
)

// TestClusterSurvivesLeaderLoss runs three servers in this process, kills
// the leader mid-migration, and checks that a new leader takes over, that
// the migration continues from exactly where it was, and that a retried
// proposal applies once.
func TestClusterSurvivesLeaderLoss(t *testing.T) {
	c := servertest.New(t, 3, servertest.Options{})
	f := setupFleet(t, c)
	ctx := context.Background()
	propose(t, f.dst, fsm.EvTargetPrepared, "tp", prepared())
	propose(t, f.src, fsm.EvSourceStopped, "ss", fsm.EventPayload{})
	before := propose(t, f.src, fsm.EvExported, "ex", exported("m1"))
	c.WaitConverged(10 * time.Second)

	old := c.Leader()
	start := time.Now()
	c.Stop(old)
	// The client was given every server; it finds the new leader by itself.
	m, err := f.dst.Propose(ctx, "m1", fsm.EvCloneBuilt, "cb-1", fsm.EventPayload{})
	if err != nil {
		t.Fatalf("proposal after leader loss: %v", err)
	}
	newLeader := c.WaitLeader(10 * time.Second)
	t.Logf("leader s%d killed; s%d leads; first proposal committed %s after the kill", old, newLeader, time.Since(start))
	if newLeader == old {
		t.Fatal("the dead server still leads")
	}
	if m.State != fsm.CloneBuilt || !m.EnteredAt[fsm.Exported].Equal(before.EnteredAt[fsm.Exported]) || m.Export.IQN != exported("m1").Export.IQN {
		t.Fatalf("migration did not continue from where it was: %+v", m)
	}
	// The same step again (a client that never saw the reply): applied once.
	m2, err := f.dst.Propose(ctx, "m1", fsm.EvCloneBuilt, "cb-1", fsm.EventPayload{})
	if err != nil || m2.State != fsm.CloneBuilt || m2.ModifyIndex != m.ModifyIndex {
		t.Fatalf("retry: %v %+v", err, m2)
	}
	steps := 0
	for _, s := range m2.Steps {
		if s.StepID == "cb-1" {
			steps++
		}
	}
	if steps != 1 {
		t.Fatalf("step cb-1 recorded %d times", steps)
	}
	// A proposal committed by the leader whose reply was lost, retried
	// through a follower after the leader changes: still once.
	leader := c.Servers[newLeader]
	b, _ := fsm.Encode(fsm.CmdPropose, &fsm.ProposeCmd{Header: fsm.Header{Actor: fsm.Identity{Name: "w-dst", Kind: fsm.KindWorker}, Now: time.Now().UTC()},
		ID: "m1", Event: fsm.EvTrimmed, StepID: "tr-1"})
	if res, err := leader.Node().Apply(b, 5*time.Second); err != nil || res.Err() != nil {
		t.Fatalf("direct apply: %v %v", err, res.Err())
	}
	c.Restart(old)
	c.WaitConverged(15 * time.Second)
	m3, err := f.dst.Propose(ctx, "m1", fsm.EvTrimmed, "tr-1", fsm.EventPayload{})
	if err != nil || m3.State != fsm.Trimmed {
		t.Fatalf("retried trimmed: %v %+v", err, m3)
	}
	// The restarted old leader caught up and agrees with the others.
	c.WaitConverged(15 * time.Second)
	ref := c.Servers[newLeader].Store().Dump()
	for i, s := range c.Servers {
		if !bytes.Equal(s.Store().Dump(), ref) {
			t.Fatalf("server %d differs from the leader", i)
		}
	}
	// And the migration goes on to the end through the new cluster.
	propose(t, f.dst, fsm.EvCutover, "co", fsm.EventPayload{})
	propose(t, f.dst, fsm.EvHydrationStarted, "hs", fsm.EventPayload{})
	propose(t, f.dst, fsm.EvHydrated, "hy", fsm.EventPayload{})
	propose(t, f.src, fsm.EvSourceReleased, "sr", fsm.EventPayload{})
	// The leader's housekeeping (server role) completes it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		m, err := f.op.GetMigration(ctx, "m1")
		if err == nil && m.State == fsm.Completed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not completed by the server: %+v %v", m, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestClusterRestartFromDisk stops every server and starts them again from
// their data directories (snapshot + log replay): the state is identical.
func TestClusterRestartFromDisk(t *testing.T) {
	c := servertest.New(t, 3, servertest.Options{SnapshotThreshold: 8})
	f := setupFleet(t, c)
	ctx := context.Background()
	propose(t, f.dst, fsm.EvTargetPrepared, "tp", prepared())
	for i := 0; i < 20; i++ { // enough entries for snapshots with threshold 8
		if _, err := f.src.Heartbeat(ctx, "w-src", time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	// Force a snapshot on every server, then add entries after it (log replay).
	c.WaitConverged(10 * time.Second)
	for i, s := range c.Servers {
		if err := s.Node().Raft.Snapshot().Error(); err != nil {
			t.Fatalf("snapshot on s%d: %v", i, err)
		}
	}
	propose(t, f.src, fsm.EvSourceStopped, "ss", fsm.EventPayload{})
	propose(t, f.op, fsm.EvAbort, "ab", fsm.EventPayload{Reason: "restart test"})
	c.WaitConverged(10 * time.Second)
	want := c.Servers[c.Leader()].Store().Dump()
	wantIdx := c.Servers[0].Store().Index()
	for i := range c.Servers {
		c.Stop(i)
	}
	for i := range c.Servers {
		c.Restart(i)
	}
	c.WaitLeader(20 * time.Second)
	deadline := time.Now().Add(20 * time.Second)
	for i, s := range c.Servers {
		for s.Store().Index() < wantIdx && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if got := s.Store().Dump(); !bytes.Equal(got, want) {
			t.Fatalf("server %d after restart:\n%s\nwant:\n%s", i, got, want)
		}
	}
	m, err := f.op.GetMigration(ctx, "m1")
	if err != nil || m.State != fsm.RollingBack || m.Rollback.Reason != "restart test" {
		t.Fatalf("after restart: %v %+v", err, m)
	}
}

// TestFollowerForwardsWrites sends every write to a follower only: it is
// forwarded to the leader, including a key request (whose key comes back).
func TestFollowerForwardsWrites(t *testing.T) {
	c := servertest.New(t, 3, servertest.Options{})
	follower := (c.Leader() + 1) % 3
	only := func(name, kind string) *api.Client {
		if err := server.EnsureCerts(c.TLSDir, map[string]string{name: kind}); err != nil {
			t.Fatal(err)
		}
		tc, err := tlsutil.ClientConfig(c.TLSDir, name)
		if err != nil {
			t.Fatal(err)
		}
		f, err := api.NewClient([]string{c.Servers[follower].Addr()}, tc)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(f.Close)
		return f
	}
	ctx := context.Background()
	w := only("w-src", tlsutil.KindWorker)
	if _, err := w.RegisterWorker(ctx, fsm.Worker{Name: "w-src", HostID: 1}, time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := w.CreateVolume(ctx, fsm.Volume{ID: "v", Worker: "w-src", Size: 1, State: fsm.VolCreated}); err != nil {
		t.Fatal(err)
	}
	wk, err := sealing.Generate()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.SetWorkerKey(ctx, "w-src", wk.Public()); err != nil {
		t.Fatal(err)
	}
	key := bytes.Repeat([]byte{9}, 32)
	owner, _ := sealing.Seal(wk.Public(), sealing.Binding{Volume: "v", Recipient: "w-src", Purpose: fsm.PurposeOwner}, key, "test")
	rec, _ := sealing.Seal(c.Recovery.Public(), sealing.Binding{Volume: "v", Recipient: fsm.RecoveryRecipient, Purpose: fsm.PurposeRecovery}, key, "test")
	if _, err := w.PutEnvelopes(ctx, "v", []fsm.Envelope{owner, rec}); err != nil {
		t.Fatal(err)
	}
	// A follower serves an envelope only for a read naming an index it applied.
	idx := c.Servers[follower].Node().Store.Index()
	e, err := w.GetEnvelope(ctx, "v", fsm.PurposeOwner, idx)
	if err != nil {
		t.Fatalf("envelope read on a follower: %v", err)
	}
	if got, err := sealing.Open(wk, *e, sealing.Binding{Volume: "v", Recipient: "w-src", Purpose: fsm.PurposeOwner}); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("open: %v", err)
	}
	if _, err := only("w-other", tlsutil.KindWorker).GetEnvelope(ctx, "v", fsm.PurposeOwner, idx); api.ErrorCode(err) != fsm.CodeForbidden {
		t.Fatalf("foreign envelope request through a follower: %v", err)
	}
	if c.Servers[follower].Node().IsLeader() {
		t.Log("leadership moved to the chosen follower during the test: part of it was not forwarded")
	}
	// Removing a server: operators only, forwarded to the leader.
	victim := 3 - follower - c.Leader()
	if err := w.RemoveServer(ctx, fmt.Sprintf("s%d", victim)); api.ErrorCode(err) != fsm.CodeForbidden {
		t.Fatalf("worker removed a server: %v", err)
	}
	c.Stop(victim)
	if err := only("operator", tlsutil.KindOperator).RemoveServer(ctx, fmt.Sprintf("s%d", victim)); err != nil {
		t.Fatalf("remove: %v", err)
	}
	c.WaitMembers(2, 10*time.Second)
}
