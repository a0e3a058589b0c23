package console

import (
	"context"
	"fmt"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/sealing"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server/servertest"
)

// testFleet is a real in-process server with two workers, two machines and
// two migrations: "m1" planned and "m2" driven past cutover.
type testFleet struct {
	cluster      *servertest.Cluster
	op, src, dst *api.Client
	console      *Console
	secretKey    []byte
}

func layout() *fsm.LUKSLayout {
	return &fsm.LUKSLayout{UUID: "u", DataOffset: 16 << 20, MetadataSize: 16384, KeyslotsSize: 16744448,
		SectorSize: 4096, Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: 32 << 20}
}

func newFleet(t *testing.T) *testFleet {
	t.Helper()
	c := servertest.New(t, 1, servertest.Options{})
	ctx := context.Background()
	must := func(_ any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	f := &testFleet{cluster: c,
		op:        c.Client("operator", tlsutil.KindOperator),
		src:       c.Client("w-src", tlsutil.KindWorker),
		dst:       c.Client("w-dst", tlsutil.KindWorker),
		secretKey: []byte("kkkkTOP-SECRET-VOLUME-KEY-0123456789kkkk"),
	}
	for i, w := range []*api.Client{f.src, f.dst} {
		name := []string{"w-src", "w-dst"}[i]
		must(w.RegisterWorker(ctx, fsm.Worker{Name: name, HostID: uint32(i + 1), Address: "127.0.0.1"}, time.Hour))
	}
	for i, id := range []string{"1", "2"} {
		must(f.src.CreateVolume(ctx, fsm.Volume{ID: "vol" + id, Worker: "w-src", Size: 48 << 20, State: fsm.VolCreated, Layout: layout()}))
		must(f.op.CreateMachine(ctx, fsm.Machine{ID: "mach" + id, Worker: "w-src", Volume: "vol" + id, Network: uint32(7 + i),
			MachineNo: 1, State: fsm.MachineRunning, Addr6PN: fmt.Sprintf("fdaa:0:%x:0:1:0:1:0", 7+i)}))
	}
	// vol1's key, sealed as a worker's agent seals it (the console must
	// show neither it nor its envelopes).
	wk, err := sealing.Generate()
	if err != nil {
		t.Fatal(err)
	}
	must(f.src.SetWorkerKey(ctx, "w-src", wk.Public()))
	owner, _ := sealing.Seal(wk.Public(), sealing.Binding{Volume: "vol1", Recipient: "w-src", Purpose: fsm.PurposeOwner}, f.secretKey, "test")
	rec, _ := sealing.Seal(c.Recovery.Public(), sealing.Binding{Volume: "vol1", Recipient: fsm.RecoveryRecipient, Purpose: fsm.PurposeRecovery}, f.secretKey, "test")
	must(f.src.PutEnvelopes(ctx, "vol1", []fsm.Envelope{owner, rec}))
	must(f.op.CreateMigration(ctx, api.PlanRequest{ID: "m1", Machine: "mach1", Target: "w-dst"}))
	must(f.op.CreateMigration(ctx, api.PlanRequest{ID: "m2", Machine: "mach2", Target: "w-dst"}))
	f.propose(t, "m2", f.dst, fsm.EvTargetPrepared, f.targetPrepared(t, "m2"))
	f.propose(t, "m2", f.src, fsm.EvSourceStopped, fsm.EventPayload{})
	f.propose(t, "m2", f.src, fsm.EvExported, fsm.EventPayload{Export: &fsm.Export{Portal: "127.0.0.1:3260", IQN: "iqn.2026-01.test:ferry:m2"}})
	f.propose(t, "m2", f.dst, fsm.EvCloneBuilt, fsm.EventPayload{})
	f.propose(t, "m2", f.dst, fsm.EvTrimmed, fsm.EventPayload{})
	f.propose(t, "m2", f.dst, fsm.EvCutover, fsm.EventPayload{New6PN: "fdaa:0:8:0:2:0:1:0"})

	tc, err := tlsutil.ClientConfig(c.TLSDir, "operator")
	if err != nil {
		t.Fatal(err)
	}
	f.console, err = New(Config{Servers: c.Addrs(), TLS: tc, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.console.Close)
	return f
}

// targetPrepared registers the target's volume for migration id (the store
// accepts target_prepared only naming a volume the target registered) and
// returns the event's payload.
func (f *testFleet) targetPrepared(t *testing.T, id string) fsm.EventPayload {
	t.Helper()
	tv := id + "-dst"
	if _, err := f.dst.CreateVolume(context.Background(), fsm.Volume{ID: tv, Worker: "w-dst", Size: 48 << 20, State: fsm.VolHydrating}); err != nil {
		t.Fatalf("target volume %s: %v", tv, err)
	}
	return fsm.EventPayload{TargetVolume: tv}
}

func (f *testFleet) propose(t *testing.T, id string, c *api.Client, ev fsm.Event, p fsm.EventPayload) {
	t.Helper()
	if _, err := c.Propose(context.Background(), id, ev, "", p); err != nil {
		t.Fatalf("%s %s: %v", id, ev, err)
	}
}

// serve starts the console's handler on a loopback httptest server.
func (f *testFleet) serve(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(nil)
	srv.Config.Handler = f.console.Handler(srv.Listener.Addr())
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// proposer is the worker client whose role may propose ev.
func (f *testFleet) proposer(ev fsm.Event) *api.Client {
	t, _ := fsm.Lookup(ev)
	if slices.Contains(t.Roles, fsm.RoleSource) {
		return f.src
	}
	return f.dst
}
