package server_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/sealing"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server"
	"github.com/ferry-dev/ferry/server/servertest"
)

func layout() *fsm.LUKSLayout {
	return &fsm.LUKSLayout{UUID: "u", DataOffset: 16 << 20, MetadataSize: 16384, KeyslotsSize: 16744448,
		SectorSize: 4096, Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: 32 << 20}
}

type fleet struct {
	op, src, dst, other *api.Client
}

// setupFleet registers two workers, a volume and a machine on the source,
// and plans migration "m1".
func setupFleet(t *testing.T, c *servertest.Cluster) fleet {
	t.Helper()
	ctx := context.Background()
	f := fleet{
		op:    c.Client("operator", tlsutil.KindOperator),
		src:   c.Client("w-src", tlsutil.KindWorker),
		dst:   c.Client("w-dst", tlsutil.KindWorker),
		other: c.Client("w-other", tlsutil.KindWorker),
	}
	for i, w := range []*api.Client{f.src, f.dst, f.other} {
		name := []string{"w-src", "w-dst", "w-other"}[i]
		if _, err := w.RegisterWorker(ctx, fsm.Worker{Name: name, HostID: uint32(i + 1), Address: "127.0.0.1"}, time.Hour); err != nil {
			t.Fatalf("register %s: %v", name, err)
		}
	}
	_, err := f.src.CreateVolume(ctx, fsm.Volume{ID: "vol1", Worker: "w-src", Size: 48 << 20, State: fsm.VolCreated, Layout: layout()})
	check(t, err)
	// The target registers the volume it prepares (target_prepared names it).
	_, err = f.dst.CreateVolume(ctx, fsm.Volume{ID: "vol1-dst", Worker: "w-dst", Size: 48 << 20, State: fsm.VolHydrating})
	check(t, err)
	// Machines (their specs) are written by operators only.
	_, err = f.op.CreateMachine(ctx, fsm.Machine{ID: "mach1", Worker: "w-src", Volume: "vol1", Network: 7, MachineNo: 1, State: fsm.MachineRunning, Addr6PN: "fdaa:0:7:0:1:0:1:0"})
	check(t, err)
	m, err := f.op.CreateMigration(ctx, api.PlanRequest{ID: "m1", Machine: "mach1", Target: "w-dst"})
	check(t, err)
	if m.State != fsm.Planned || m.Source != "w-src" || m.Layout == nil {
		t.Fatalf("planned migration: %+v", m)
	}
	return f
}

// prepared is the target_prepared payload naming the target's volume.
func prepared() fsm.EventPayload { return fsm.EventPayload{TargetVolume: "vol1-dst"} }

// exported is an export at the source's registered address with the
// migration's IQN.
func exported(mig string) fsm.EventPayload {
	return fsm.EventPayload{Export: &fsm.Export{Portal: "127.0.0.1:3260", IQN: "iqn.2026-01.dev.ferry:ferry:" + mig}}
}

func check(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func propose(t *testing.T, c *api.Client, ev fsm.Event, step string, p fsm.EventPayload) *fsm.Migration {
	t.Helper()
	m, err := c.Propose(context.Background(), "m1", ev, step, p)
	if err != nil {
		t.Fatalf("%s: %v", ev, err)
	}
	return m
}

func TestAPIRolesAndRefusals(t *testing.T) {
	c := servertest.New(t, 1, servertest.Options{})
	f := setupFleet(t, c)
	ctx := context.Background()

	// A worker whose certificate names another worker is refused, with the reason.
	_, err := f.other.Propose(ctx, "m1", fsm.EvTargetPrepared, "x", fsm.EventPayload{})
	var e *api.Error
	if !errors.As(err, &e) || server.StatusOf(e.Kind) != http.StatusForbidden || e.Code != fsm.CodeForbidden || e.State != fsm.Planned {
		t.Fatalf("foreign worker: %v", err)
	}
	// The source may not propose the target's event either.
	if _, err := f.src.Propose(ctx, "m1", fsm.EvTargetPrepared, "y", fsm.EventPayload{}); !errors.As(err, &e) || server.StatusOf(e.Kind) != http.StatusForbidden {
		t.Fatalf("source proposing target event: %v", err)
	}
	// Nor heartbeat for someone else, nor plan.
	if _, err := f.other.Heartbeat(ctx, "w-src", 0); !errors.As(err, &e) || server.StatusOf(e.Kind) != http.StatusForbidden {
		t.Fatalf("foreign heartbeat: %v", err)
	}
	if _, err := f.src.CreateMigration(ctx, api.PlanRequest{Machine: "mach1", Target: "w-other"}); !errors.As(err, &e) || server.StatusOf(e.Kind) != http.StatusForbidden {
		t.Fatalf("worker plan: %v", err)
	}
	// Wrong state: 409 with the actual state.
	if _, err := f.src.Propose(ctx, "m1", fsm.EvExported, "z", fsm.EventPayload{}); !errors.As(err, &e) || server.StatusOf(e.Kind) != http.StatusConflict || e.State != fsm.Planned || e.Code != fsm.CodeWrongState {
		t.Fatalf("wrong state: %v", err)
	}
	if w, err := f.op.GetWorker(ctx, "w-dst"); err != nil || w.HostID != 2 || !w.LeaseExpiry.After(time.Now()) {
		t.Fatalf("get worker: %+v %v", w, err)
	}
	// Unknown migration: 404.
	if _, err := f.op.GetMigration(ctx, "nope"); !errors.As(err, &e) || server.StatusOf(e.Kind) != http.StatusNotFound {
		t.Fatalf("missing migration: %v", err)
	}
	// Attached volume: clear refusal.
	if _, err := f.op.DestroyVolume(ctx, "vol1", 0); !errors.As(err, &e) || e.Code != fsm.CodeAttached || !strings.Contains(e.Reason, "mach1") {
		t.Fatalf("destroy attached: %v", err)
	}
	// On the wire, the status is the kind's and the body names kind and code.
	for _, tc := range []struct {
		cert, method, path, body string
		status                   int
		kind                     fsm.RefusalKind
	}{
		{"w-other", http.MethodPost, "/v1/migrations/m1/events", `{"event":"target_prepared","step_id":"w1"}`, http.StatusForbidden, fsm.RefuseForbidden},
		{"w-src", http.MethodPost, "/v1/migrations/m1/events", `{"event":"exported","step_id":"w2"}`, http.StatusConflict, fsm.RefuseConflict},
		{"operator", http.MethodGet, "/v1/migrations/nope", "", http.StatusNotFound, fsm.RefuseNotFound},
	} {
		r := rawDo(t, c, tc.cert, tc.method, tc.path, tc.body)
		var eb api.ErrorBody
		if err := json.Unmarshal([]byte(r.body), &eb); err != nil || r.StatusCode != tc.status || eb.Error == nil || eb.Error.Kind != tc.kind {
			t.Fatalf("%s %s: %d %s (%v)", tc.method, tc.path, r.StatusCode, r.body, err)
		}
	}
	// Malformed body: 400 naming the field.
	resp := rawPost(t, c, "operator", "/v1/migrations/m1/events", `{"event":"abort","bogus":1}`)
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(resp.body, "bogus") {
		t.Fatalf("unknown field: %d %s", resp.StatusCode, resp.body)
	}

	// Forward path up to cutover, then abort is refused naming the state.
	propose(t, f.dst, fsm.EvTargetPrepared, "1", prepared())
	propose(t, f.src, fsm.EvSourceStopped, "2", fsm.EventPayload{})
	propose(t, f.src, fsm.EvExported, "3", exported("m1"))
	propose(t, f.dst, fsm.EvCloneBuilt, "4", fsm.EventPayload{})
	propose(t, f.dst, fsm.EvTrimmed, "5", fsm.EventPayload{})
	propose(t, f.dst, fsm.EvCutover, "6", fsm.EventPayload{New6PN: "fdaa:0:7:0:2:0:1:0"})
	if _, err := f.op.Abort(ctx, "m1", "too late"); !errors.As(err, &e) || e.Code != fsm.CodePastCutover || !strings.Contains(e.Reason, "cutover") {
		t.Fatalf("abort after cutover: %v", err)
	}
	m, err := f.op.GetMigration(ctx, "m1")
	check(t, err)
	if m.State != fsm.Cutover {
		t.Fatalf("state %s", m.State)
	}
}

func TestAPIEnvelopesOnlyForOwnerOrTarget(t *testing.T) {
	c := servertest.New(t, 1, servertest.Options{})
	f := setupFleet(t, c)
	ctx := context.Background()
	keys := map[string]*sealing.PrivateKey{}
	for name, cl := range map[string]*api.Client{"w-src": f.src, "w-dst": f.dst, "w-other": f.other} {
		k, err := sealing.Generate()
		check(t, err)
		keys[name] = k
		_, err = cl.SetWorkerKey(ctx, name, k.Public())
		check(t, err)
	}
	// A worker cannot register another worker's key, nor can an operator.
	for _, cl := range []*api.Client{f.other, f.op} {
		if _, err := cl.SetWorkerKey(ctx, "w-src", keys["w-other"].Public()); api.ErrorCode(err) != fsm.CodeForbidden {
			t.Fatalf("registered w-src's key: %v", err)
		}
	}
	pass := bytes.Repeat([]byte{7}, 64)
	owner, err := sealing.Seal(keys["w-src"].Public(), sealing.Binding{Volume: "vol1", Recipient: "w-src", Purpose: fsm.PurposeOwner}, pass, "test")
	check(t, err)
	rec, err := sealing.Seal(c.Recovery.Public(), sealing.Binding{Volume: "vol1", Recipient: fsm.RecoveryRecipient, Purpose: fsm.PurposeRecovery}, pass, "test")
	check(t, err)
	if _, err := f.src.PutEnvelopes(ctx, "vol1", []fsm.Envelope{owner}); api.ErrorCode(err) != fsm.CodeNoRecoveryKey {
		t.Fatalf("owner envelope without a recovery envelope: %v", err)
	}
	if _, err := f.dst.PutEnvelopes(ctx, "vol1", []fsm.Envelope{owner, rec}); api.ErrorCode(err) != fsm.CodeForbidden {
		t.Fatalf("a non-owner stored the owner envelope: %v", err)
	}
	_, err = f.src.PutEnvelopes(ctx, "vol1", []fsm.Envelope{owner, rec})
	check(t, err)

	before := c.Servers[0].Node().Store.Index()
	e, err := f.src.GetEnvelope(ctx, "vol1", fsm.PurposeOwner, 0)
	check(t, err)
	got, err := sealing.Open(keys["w-src"], *e, sealing.Binding{Volume: "vol1", Recipient: "w-src", Purpose: fsm.PurposeOwner})
	if err != nil || !bytes.Equal(got, pass) {
		t.Fatalf("owner open: %v", err)
	}
	for _, cl := range []*api.Client{f.dst, f.other, f.op} {
		if _, err := cl.GetEnvelope(ctx, "vol1", fsm.PurposeOwner, 0); api.ErrorCode(err) != fsm.CodeForbidden {
			t.Fatalf("owner envelope leaked: %v", err)
		}
	}
	if _, err := f.op.GetEnvelope(ctx, "vol1", fsm.PurposeRecovery, 0); err != nil {
		t.Fatalf("operator reads the recovery envelope: %v", err)
	}
	if after := c.Servers[0].Node().Store.Index(); after != before {
		t.Fatalf("envelope reads wrote to the log: index %d -> %d", before, after)
	}

	// The migration envelope: sealed by the source to the target only.
	propose(t, f.dst, fsm.EvTargetPrepared, "1", fsm.EventPayload{TargetVolume: "vol1-dst", Layout: layout()})
	toOther, err := sealing.Seal(keys["w-other"].Public(), sealing.Binding{Volume: "vol1", Recipient: "w-other", Purpose: fsm.PurposeMigration, Migration: "m1"}, pass, "test")
	check(t, err)
	toDst, err := sealing.Seal(keys["w-dst"].Public(), sealing.Binding{Volume: "vol1", Recipient: "w-dst", Purpose: fsm.PurposeMigration, Migration: "m1"}, pass, "test")
	check(t, err)
	if _, err := f.src.PutEnvelopes(ctx, "vol1", []fsm.Envelope{toDst}); api.ErrorCode(err) != fsm.CodeWrongState {
		t.Fatalf("migration envelope before the source stopped: %v", err)
	}
	propose(t, f.src, fsm.EvSourceStopped, "2", fsm.EventPayload{Layout: layout()})
	if _, err := f.src.PutEnvelopes(ctx, "vol1", []fsm.Envelope{toOther}); err == nil {
		t.Fatal("migration envelope to a worker that is not the target")
	}
	_, err = f.src.PutEnvelopes(ctx, "vol1", []fsm.Envelope{toDst})
	check(t, err)
	e, err = f.dst.GetEnvelope(ctx, "vol1", fsm.PurposeMigration, 0)
	check(t, err)
	if got, err := sealing.Open(keys["w-dst"], *e, sealing.Binding{Volume: "vol1", Recipient: "w-dst", Purpose: fsm.PurposeMigration, Migration: "m1"}); err != nil || !bytes.Equal(got, pass) {
		t.Fatalf("target open: %v", err)
	}
	for _, cl := range []*api.Client{f.src, f.other, f.op} {
		if _, err := cl.GetEnvelope(ctx, "vol1", fsm.PurposeMigration, 0); api.ErrorCode(err) != fsm.CodeForbidden {
			t.Fatalf("migration envelope leaked: %v", err)
		}
	}
	// No other reply carries envelope bytes.
	ct := base64.StdEncoding.EncodeToString(owner.Ciphertext[:48])
	for _, path := range []string{"/v1/volumes", "/v1/volumes/vol1", "/v1/migrations/m1", "/v1/migrations", "/v1/volumes/vol1/envelopes", "/v1/workers"} {
		r := rawGet(t, c, "operator", path)
		if strings.Contains(r.body, ct) {
			t.Fatalf("%s carries envelope bytes: %s", path, r.body)
		}
	}
}

func TestAPIVolumeNeedsRecoveryKey(t *testing.T) {
	c := servertest.New(t, 1, servertest.Options{NoRecoveryKey: true})
	ctx := context.Background()
	w := c.Client("w-src", tlsutil.KindWorker)
	_, err := w.RegisterWorker(ctx, fsm.Worker{Name: "w-src", HostID: 1}, time.Hour)
	check(t, err)
	_, err = w.CreateVolume(ctx, fsm.Volume{ID: "v", Worker: "w-src", Size: 1})
	if api.ErrorCode(err) != fsm.CodeNoRecoveryKey || !strings.Contains(err.Error(), "ferry keys recovery-init") {
		t.Fatalf("volume created without a recovery key: %v", err)
	}
}

func TestAPIBlockingQuery(t *testing.T) {
	c := servertest.New(t, 1, servertest.Options{})
	f := setupFleet(t, c)
	ctx := context.Background()
	ms, idx, err := f.dst.WatchMigrations(ctx, "w-dst", 0)
	if err != nil || len(ms) != 1 || idx == 0 {
		t.Fatalf("list: %v %d %d", err, len(ms), idx)
	}
	// Heartbeats of other workers do not wake a watcher of w-dst's migrations.
	type res struct {
		ms  []*fsm.Migration
		idx uint64
		at  time.Time
		err error
	}
	ch := make(chan res, 1)
	go func() {
		ms, i, err := f.dst.WatchMigrations(ctx, "w-dst", idx)
		ch <- res{ms, i, time.Now(), err}
	}()
	time.Sleep(300 * time.Millisecond)
	if _, err := f.other.Heartbeat(ctx, "w-other", time.Hour); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-ch:
		t.Fatalf("watch returned early: %+v", r)
	case <-time.After(300 * time.Millisecond):
	}
	proposedAt := time.Now()
	propose(t, f.dst, fsm.EvTargetPrepared, "tp", prepared())
	select {
	case r := <-ch:
		if r.err != nil || r.idx <= idx || r.ms[0].State != fsm.TargetPrepared || r.at.Before(proposedAt) {
			t.Fatalf("watch: %+v", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("watch did not return after the proposal")
	}
}

func TestAPIUnknownCARefused(t *testing.T) {
	c := servertest.New(t, 1, servertest.Options{})
	other := filepath.Join(t.TempDir(), "tls")
	if err := server.EnsureCerts(other, map[string]string{"w-src": tlsutil.KindWorker}); err != nil {
		t.Fatal(err)
	}
	tc, err := tlsutil.ClientConfig(other, "w-src")
	if err != nil {
		t.Fatal(err)
	}
	cl, err := api.NewClient(c.Addrs(), tc)
	if err != nil {
		t.Fatal(err)
	}
	cl.RetryFor = time.Second
	if _, err := cl.Status(context.Background()); err == nil {
		t.Fatal("a certificate from another CA was accepted")
	}
}

type rawResp struct {
	StatusCode int
	body       string
}

func rawDo(t *testing.T, c *servertest.Cluster, cert, method, path, body string) rawResp {
	t.Helper()
	tc, err := tlsutil.ClientConfig(c.TLSDir, cert)
	if err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tc.Clone()}, Timeout: 10 * time.Second}
	defer hc.CloseIdleConnections()
	req, _ := http.NewRequest(method, "https://"+c.Addrs()[0]+path, strings.NewReader(body))
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return rawResp{resp.StatusCode, string(b)}
}

func rawGet(t *testing.T, c *servertest.Cluster, cert, path string) rawResp {
	return rawDo(t, c, cert, http.MethodGet, path, "")
}

func rawPost(t *testing.T, c *servertest.Cluster, cert, path, body string) rawResp {
	return rawDo(t, c, cert, http.MethodPost, path, body)
}

func TestMetrics(t *testing.T) {
	c := servertest.New(t, 1, servertest.Options{})
	setupFleet(t, c)
	r := rawGet(t, c, "operator", "/metrics")
	if r.StatusCode != 200 || !strings.Contains(r.body, `ferry_migrations{state="planned"} 1`) || !strings.Contains(r.body, "ferry_raft_leader 1") {
		t.Fatalf("metrics: %d\n%s", r.StatusCode, r.body)
	}
}

// TestServerAbortsOnLeaseExpiry: before cutover the server role rolls a
// migration back when a participant's lease expires; after cutover it only
// flags it stalled, with the reason.
func TestServerAbortsOnLeaseExpiry(t *testing.T) {
	c := servertest.New(t, 1, servertest.Options{ReconcileInterval: 100 * time.Millisecond})
	f := setupFleet(t, c)
	ctx := context.Background()
	if _, err := f.dst.RegisterWorker(ctx, fsm.Worker{Name: "w-dst", HostID: 2}, 500*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	m := waitFor(t, f.op, "m1", func(m *fsm.Migration) bool { return m.State == fsm.RollingBack })
	if m.Rollback == nil || !strings.Contains(m.Rollback.Reason, "lease of worker w-dst expired") || m.Rollback.By != "s0" {
		t.Fatalf("rollback: %+v", m.Rollback)
	}
	propose(t, f.dst, fsm.EvTargetTornDown, "td", fsm.EventPayload{})
	propose(t, f.src, fsm.EvSourceRestored, "sr", fsm.EventPayload{})

	// Past cutover: stalled, never rolled back.
	if _, err := f.dst.RegisterWorker(ctx, fsm.Worker{Name: "w-dst", HostID: 2, Address: "127.0.0.1"}, time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := f.op.CreateMigration(ctx, api.PlanRequest{ID: "m2", Machine: "mach1", Target: "w-dst"}); err != nil {
		t.Fatal(err)
	}
	for i, ev := range []fsm.Event{fsm.EvTargetPrepared, fsm.EvSourceStopped, fsm.EvExported, fsm.EvCloneBuilt, fsm.EvTrimmed, fsm.EvCutover} {
		cl, p := f.dst, fsm.EventPayload{}
		if ev == fsm.EvSourceStopped || ev == fsm.EvExported {
			cl = f.src
		}
		if ev == fsm.EvExported {
			p = exported("m2")
		}
		if ev == fsm.EvTargetPrepared {
			p = prepared()
		}
		if _, err := cl.Propose(ctx, "m2", ev, fmt.Sprint("m2-", i), p); err != nil {
			t.Fatalf("%s: %v", ev, err)
		}
	}
	if _, err := f.src.RegisterWorker(ctx, fsm.Worker{Name: "w-src", HostID: 1}, 300*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	m = waitFor(t, f.op, "m2", func(m *fsm.Migration) bool { return m.Stalled })
	if m.State != fsm.Cutover || !strings.Contains(m.StallCause, "w-src") {
		t.Fatalf("after cutover: %s stalled=%v %q", m.State, m.Stalled, m.StallCause)
	}
}

func waitFor(t *testing.T, c *api.Client, id string, ok func(*fsm.Migration) bool) *fsm.Migration {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		m, err := c.GetMigration(context.Background(), id)
		if err == nil && ok(m) {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("migration %s: condition not met: %+v %v", id, m, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
