package mcp

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"
	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server/servertest"
)

// fleet is a real single-server cluster with two live workers a and b, a
// running machine m1 on a using volume v1, and a free volume v2 on a.
type fleet struct {
	cl *servertest.Cluster
	op *api.Client
	wa *api.Client // worker a's own certificate
}

func newFleet(t *testing.T) *fleet {
	t.Helper()
	ctx := context.Background()
	cl := servertest.New(t, 1, servertest.Options{})
	f := &fleet{cl: cl, op: cl.Client("operator", tlsutil.KindOperator), wa: cl.Client("a", tlsutil.KindWorker)}
	wb := cl.Client("b", tlsutil.KindWorker)
	for i, w := range []*api.Client{f.wa, wb} {
		name := []string{"a", "b"}[i]
		if _, err := w.RegisterWorker(ctx, fsm.Worker{Name: name, HostID: uint32(i + 1), Address: "127.0.0.1"}, time.Hour); err != nil {
			t.Fatalf("register %s: %v", name, err)
		}
	}
	must(f.wa.CreateVolume(ctx, fsm.Volume{ID: "v1", Worker: "a", Size: 64 << 20, State: fsm.VolCreated, Layout: layout()}))(t)
	must(f.wa.CreateVolume(ctx, fsm.Volume{ID: "v2", Worker: "a", Size: 32 << 20, State: fsm.VolCreated, Layout: layout()}))(t)
	must(f.op.CreateMachine(ctx, fsm.Machine{ID: "m1", Worker: "a", Volume: "v1", Network: 7, MachineNo: 1, State: fsm.MachineRunning, Addr6PN: "fdaa:0:7:0:1:0:1:0"}))(t)
	return f
}

// must(call(...))(t) returns call's value or fails the test.
func layout() *fsm.LUKSLayout {
	return &fsm.LUKSLayout{UUID: "u", DataOffset: 16 << 20, MetadataSize: 16384, KeyslotsSize: 16744448,
		SectorSize: 4096, Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: 32 << 20}
}

func must[T any](v T, err error) func(*testing.T) T {
	return func(t *testing.T) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

// clock is a settable clock for plan expiry.
type clock struct {
	mu  sync.Mutex
	off time.Duration
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return time.Now().Add(c.off)
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	c.off += d
	c.mu.Unlock()
}

// session is an MCP client session plus every text it received, to check
// that no key ever crosses.
type session struct {
	t    *testing.T
	cs   *sdk.ClientSession
	mu   sync.Mutex
	seen strings.Builder
}

func connectInMemory(t *testing.T, s *Server) *session {
	t.Helper()
	st, ct := sdk.NewInMemoryTransports()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, st) }()
	cs, err := sdk.NewClient(&sdk.Implementation{Name: "ferry-test", Version: "1"}, nil).Connect(context.Background(), ct, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cs.Close()
		cancel()
		<-done
	})
	return &session{t: t, cs: cs}
}

// call runs a tool and returns its result, failing on protocol errors.
func (s *session) call(name string, args any) *sdk.CallToolResult {
	s.t.Helper()
	res, err := s.cs.CallTool(context.Background(), &sdk.CallToolParams{Name: name, Arguments: args})
	if err != nil {
		s.t.Fatalf("%s: protocol error: %v", name, err)
	}
	b, _ := json.Marshal(res)
	s.mu.Lock()
	s.seen.Write(b)
	s.mu.Unlock()
	return res
}

func text(res *sdk.CallToolResult) string {
	var sb strings.Builder
	for _, c := range res.Content {
		if tc, ok := c.(*sdk.TextContent); ok {
			sb.WriteString(tc.Text)
		}
	}
	return sb.String()
}

// ok calls a tool that must succeed and decodes its structured output.
func ok[T any](s *session, name string, args any) T {
	s.t.Helper()
	res := s.call(name, args)
	if res.IsError {
		s.t.Fatalf("%s(%v): %s", name, args, text(res))
	}
	var out T
	b, _ := json.Marshal(res.StructuredContent)
	if err := json.Unmarshal(b, &out); err != nil {
		s.t.Fatalf("%s: output %s: %v", name, b, err)
	}
	return out
}

// refused calls a tool that must fail and returns its message, which must contain want.
func (s *session) refused(name string, args any, want string) string {
	s.t.Helper()
	res := s.call(name, args)
	msg := text(res)
	if !res.IsError {
		s.t.Fatalf("%s(%v) succeeded, want a refusal containing %q: %s", name, args, want, msg)
	}
	if !strings.Contains(msg, want) {
		s.t.Fatalf("%s refusal %q does not say %q", name, msg, want)
	}
	return msg
}

func apply(tok string) ApplyIn { return ApplyIn{PlanToken: tok} }

var allTools = []string{
	"drain_apply", "drain_cancel_apply", "drain_cancel_plan", "drain_plan", "drain_status", "machine_list", "machine_show", "migration_abort_apply",
	"migration_abort_plan", "migration_apply", "migration_plan", "migration_status", "volume_create_apply",
	"volume_create_plan", "volume_destroy_apply", "volume_destroy_plan", "volume_extend_apply", "volume_extend_plan", "volume_fork_apply", "volume_fork_plan", "volume_list", "volume_show", "worker_list",
}

func listTools(t *testing.T, s *session) []string {
	t.Helper()
	res, err := s.cs.ListTools(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tl := range res.Tools {
		names = append(names, tl.Name)
		if tl.InputSchema == nil || tl.OutputSchema == nil {
			t.Errorf("tool %s lacks a typed schema (in %v, out %v)", tl.Name, tl.InputSchema, tl.OutputSchema)
		}
	}
	slices.Sort(names)
	return names
}

func TestMcpInMemory(t *testing.T) {
	f := newFleet(t)
	ctx := context.Background()
	clk := &clock{}
	srv, err := New(f.op, Options{Allow: Admin, PlanTTL: time.Minute, Now: clk.Now, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	s := connectInMemory(t, srv)

	if got := listTools(t, s); !slices.Equal(got, allTools) {
		t.Fatalf("admin tools = %v, want %v", got, allTools)
	}

	t.Run("reads", func(t *testing.T) {
		ws := ok[WorkersOut](s, "worker_list", NoInput{})
		if len(ws.Workers) != 2 || ws.Workers[0].Name != "a" || !ws.Workers[0].Alive {
			t.Fatalf("workers: %+v", ws)
		}
		vs := ok[VolumesOut](s, "volume_list", WorkerFilter{Worker: "a"})
		if len(vs.Volumes) != 2 || vs.Volumes[0].ID != "v1" || vs.Volumes[0].AttachedMachine != "m1" || vs.Volumes[1].SizeBytes != 32<<20 {
			t.Fatalf("volumes: %+v", vs)
		}
		m := ok[Machine](s, "machine_show", IDIn{ID: "m1"})
		if m.Worker != "a" || m.Volume != "v1" || m.State != "running" {
			t.Fatalf("machine: %+v", m)
		}
		s.refused("volume_show", IDIn{ID: "nope"}, `volume "nope" not found`)
	})

	t.Run("extend: plan, refusals, apply, stale once the worker reported", func(t *testing.T) {
		v1 := must(f.op.GetVolume(ctx, "v1"))(t)
		s.refused("volume_extend_plan", VolumeExtendIn{ID: "v1", Size: "1M"}, "shrinking to 1048576 is refused")
		p := ok[Plan[VolumeExtendDetails]](s, "volume_extend_plan", VolumeExtendIn{ID: "v1", Size: "256M"})
		if p.Details.FromBytes != v1.Size || p.Details.ToBytes != 256<<20 || p.Details.AttachedMachine != "m1" || len(p.Changes) < 3 {
			t.Fatalf("plan: %+v", p)
		}
		again := ok[Plan[VolumeExtendDetails]](s, "volume_extend_plan", VolumeExtendIn{ID: "v1", Size: "256M"})
		v := ok[Volume](s, "volume_extend_apply", apply(p.PlanToken))
		if v.GrowingTo != 256<<20 || v.SizeBytes != v1.Size {
			t.Fatalf("after apply: %+v", v)
		}
		if sv := must(f.op.GetVolume(ctx, "v1"))(t); sv.WantSize != 256<<20 {
			t.Fatalf("server after apply: %+v", sv)
		}
		s.refused("volume_extend_plan", VolumeExtendIn{ID: "v1", Size: "512M"}, "already being extended to 268435456 bytes")
		// The worker grows it and reports; the second plan no longer holds.
		n := int64(256 << 20)
		must(f.wa.UpdateVolume(ctx, "v1", api.VolumeUpdate{Size: &n}))(t)
		s.refused("volume_extend_apply", apply(again.PlanToken), "no longer holds")
		if v := ok[Volume](s, "volume_show", IDIn{ID: "v1"}); v.SizeBytes != 256<<20 || v.GrowingTo != 0 {
			t.Fatalf("after the report: %+v", v)
		}
	})

	t.Run("fork: plan, refusals, apply with a key of its own", func(t *testing.T) {
		s.refused("volume_fork_plan", VolumeForkIn{ID: "v1", NewID: "v1-copy", Worker: "zz"}, "zz")
		// To another worker: that worker clones the copy the source's serves.
		if far := ok[Plan[VolumeForkDetails]](s, "volume_fork_plan", VolumeForkIn{ID: "v1", NewID: "v1-far", Worker: "b"}); far.Details.Worker != "b" ||
			!strings.Contains(strings.Join(far.Changes, "\n"), "serves that copy over iSCSI to b alone") {
			t.Fatalf("plan of a fork to another worker: %+v", far)
		}
		s.refused("volume_fork_plan", VolumeForkIn{ID: "v1", NewID: "v2"}, "volume v2 already exists on worker a")
		p := ok[Plan[VolumeForkDetails]](s, "volume_fork_plan", VolumeForkIn{ID: "v1", NewID: "v1-copy"})
		if p.Details.Source != "v1" || p.Details.Worker != "a" || p.Details.AttachedMachine != "m1" || len(p.Changes) < 4 {
			t.Fatalf("plan: %+v", p)
		}
		v := ok[Volume](s, "volume_fork_apply", apply(p.PlanToken))
		sv := must(f.op.GetVolume(ctx, "v1-copy"))(t)
		// No key passes through the MCP server: the fork's worker seals one.
		if v.ForkOf != "v1" || v.State != "creating" || v.HasKey || sv.ForkOf != "v1" || sv.HasKey {
			t.Fatalf("after apply: tool %+v, server %+v", v, sv)
		}
		// While the copy is made, the source cannot grow (the servers say so).
		s.refused("volume_extend_plan", VolumeExtendIn{ID: "v1", Size: "512M"}, "volume v1 is being forked into v1-copy: extend it once the fork is created")
		// The worker reports the copy made, which frees v1 for migrations.
		created := fsm.VolCreated
		must(f.wa.UpdateVolume(ctx, "v1-copy", api.VolumeUpdate{State: &created, Layout: layout()}))(t)
	})

	t.Run("destroy an attached volume is refused at plan time", func(t *testing.T) {
		s.refused("volume_destroy_plan", VolumeDestroyIn{ID: "v1"},
			"volume v1 is attached to machine m1 (running on a): stop the machine and detach the volume before destroying it")
		if v := must(f.op.GetVolume(ctx, "v1"))(t); v.State != fsm.VolCreated {
			t.Fatalf("v1 changed: %s", v.State)
		}
	})

	t.Run("destroy: altered plan refused, plan applied once", func(t *testing.T) {
		p := ok[Plan[VolumeDestroyDetails]](s, "volume_destroy_plan", VolumeDestroyIn{ID: "v2", Retention: "2h"})
		if p.Details.Volume != "v2" || p.Details.Outcome != "pending_destroy" || p.Details.Retention != "2h0m0s" || len(p.Changes) == 0 {
			t.Fatalf("plan: %+v", p)
		}
		// An agent rewrites the plan to aim at v1 and keeps the signature.
		body, sig, _ := strings.Cut(p.PlanToken, ".")
		raw, err := base64.RawURLEncoding.DecodeString(body)
		if err != nil {
			t.Fatal(err)
		}
		altered := strings.Replace(string(raw), `"id":"v2"`, `"id":"v1"`, 1)
		if altered == string(raw) {
			t.Fatalf("token body has no volume id to alter: %s", raw)
		}
		s.refused("volume_destroy_apply", apply(base64.RawURLEncoding.EncodeToString([]byte(altered))+"."+sig), "does not verify")
		s.refused("volume_destroy_apply", apply(p.PlanToken[:len(p.PlanToken)-2]), "does not verify")
		s.refused("volume_create_apply", apply(p.PlanToken), "is a volume_destroy plan, not a volume_create plan")
		if v := must(f.op.GetVolume(ctx, "v2"))(t); v.State != fsm.VolCreated {
			t.Fatalf("refused applies changed v2: %s", v.State)
		}

		v := ok[Volume](s, "volume_destroy_apply", apply(p.PlanToken))
		sv := must(f.op.GetVolume(ctx, "v2"))(t)
		if v.State != "pending_destroy" || sv.State != fsm.VolPendingDelete || time.Until(sv.DestroyAfter) < time.Hour {
			t.Fatalf("after apply: tool %+v, server %+v", v, sv)
		}
		s.refused("volume_destroy_apply", apply(p.PlanToken), "already applied")
		// And a volume in retention cannot be planned for destruction again.
		s.refused("volume_destroy_plan", VolumeDestroyIn{ID: "v2"}, "volume v2 is kept until")
	})

	t.Run("expired plan refused", func(t *testing.T) {
		p := ok[Plan[VolumeCreateDetails]](s, "volume_create_plan", VolumeCreateIn{ID: "v3", Worker: "b", Size: "16M"})
		clk.advance(2 * time.Minute)
		s.refused("volume_create_apply", apply(p.PlanToken), "expired")
		if _, err := f.op.GetVolume(ctx, "v3"); api.ErrorCode(err) != fsm.CodeNotFound {
			t.Fatalf("expired plan created v3 (err %v)", err)
		}
	})

	t.Run("create: the tool never handles a key", func(t *testing.T) {
		p := ok[Plan[VolumeCreateDetails]](s, "volume_create_plan", VolumeCreateIn{ID: "v3", Worker: "a", Size: "16M"})
		if p.Details.SizeBytes != 16<<20 || p.Details.Worker != "a" || !p.Details.WorkerAlive {
			t.Fatalf("plan: %+v", p)
		}
		v := ok[Volume](s, "volume_create_apply", apply(p.PlanToken))
		sv := must(f.op.GetVolume(ctx, "v3"))(t)
		// The worker's agent makes and seals the key (there is none in this
		// test): the tool registered the volume and no key at all.
		if v.ID != "v3" || sv.Worker != "a" || sv.Size != 16<<20 || sv.State != fsm.VolCreating || sv.HasKey || v.HasKey {
			t.Fatalf("after apply: tool %+v, server %+v", v, sv)
		}
		if envs := must(f.op.ListEnvelopes(ctx, "v3"))(t); len(envs) != 0 {
			t.Fatalf("the tool stored key envelopes: %+v", envs)
		}
		ok[Volume](s, "volume_show", IDIn{ID: "v3"})
		ok[VolumesOut](s, "volume_list", WorkerFilter{})
		s.refused("volume_create_plan", VolumeCreateIn{ID: "v3", Worker: "a", Size: "16M"}, "volume v3 already exists on worker a")
		s.refused("volume_create_plan", VolumeCreateIn{ID: "v4", Worker: "zz", Size: "16M"}, `worker "zz" not found`)
		s.refused("volume_create_plan", VolumeCreateIn{ID: "v4", Worker: "a", Size: "-1"}, "positive number")
	})

	t.Run("stale plan refused", func(t *testing.T) {
		p := ok[Plan[VolumeCreateDetails]](s, "volume_create_plan", VolumeCreateIn{ID: "v5", Worker: "b", Size: "8M"})
		must(f.op.CreateVolume(ctx, fsm.Volume{ID: "v5", Worker: "a", Size: 8 << 20}))(t)
		s.refused("volume_create_apply", apply(p.PlanToken), "no longer holds: volume v5 already exists on worker a")
		if v := must(f.op.GetVolume(ctx, "v5"))(t); v.Worker != "a" {
			t.Fatalf("v5 moved to %s", v.Worker)
		}
	})

	t.Run("migration plan, apply, status, abort", func(t *testing.T) {
		s.refused("migration_plan", MigrationPlanIn{Machine: "m1", Target: "a"}, "machine m1 already runs on a")
		p := ok[Plan[MigrationDetails]](s, "migration_plan", MigrationPlanIn{Machine: "m1", Target: "b"})
		d := p.Details
		if d.Machine != "m1" || d.Volume != "v1" || d.Source != "a" || d.Target != "b" || !slices.Equal(d.Locks, []string{"volume/v1", "network/7"}) {
			t.Fatalf("plan: %+v", p)
		}
		// A second plan of the same move is fine until one is applied; then
		// the other is stale (the volume is locked).
		p2 := ok[Plan[MigrationDetails]](s, "migration_plan", MigrationPlanIn{Machine: "m1", Target: "b"})
		m := ok[Migration](s, "migration_apply", apply(p.PlanToken))
		sm := must(f.op.GetMigration(ctx, d.Migration))(t)
		if m.ID != d.Migration || sm.State != fsm.Planned || sm.Source != "a" || sm.Target != "b" || !m.CanAbort {
			t.Fatalf("after apply: tool %+v, server %+v", m, sm)
		}
		s.refused("migration_apply", apply(p2.PlanToken), "is locked by migration "+d.Migration)
		st := ok[MigrationsOut](s, "migration_status", MigrationStatusIn{ID: d.Migration})
		if len(st.Migrations) != 1 || st.Migrations[0].State != "planned" {
			t.Fatalf("status: %+v", st)
		}
		// The attached volume is also locked now: still refused, for its first reason.
		s.refused("volume_destroy_plan", VolumeDestroyIn{ID: "v1"}, "attached to machine m1")

		ap := ok[Plan[AbortDetails]](s, "migration_abort_plan", AbortPlanIn{ID: d.Migration, Reason: "test"})
		if !ap.Details.BeforeCutover || ap.Details.Source != "a" {
			t.Fatalf("abort plan: %+v", ap)
		}
		am := ok[Migration](s, "migration_abort_apply", apply(ap.PlanToken))
		if sm := must(f.op.GetMigration(ctx, d.Migration))(t); sm.State != fsm.RollingBack || am.State != "rolling_back" || sm.Rollback == nil || sm.Rollback.Reason != "test" {
			t.Fatalf("after abort: tool %+v, server %+v", am, sm)
		}
		s.refused("migration_abort_plan", AbortPlanIn{ID: d.Migration}, "already rolling back")
	})
}

func TestMcpDrainAndPastCutover(t *testing.T) {
	f := newFleet(t)
	ctx := context.Background()
	must(f.wa.CreateVolume(ctx, fsm.Volume{ID: "v6", Worker: "a", Size: 8 << 20, State: fsm.VolCreated, Layout: layout()}))(t)
	must(f.op.CreateMachine(ctx, fsm.Machine{ID: "m2", Worker: "a", Volume: "v6", Network: 8, MachineNo: 2, State: fsm.MachineRunning}))(t)
	must(f.wa.CreateVolume(ctx, fsm.Volume{ID: "v7", Worker: "a", Size: 8 << 20, State: fsm.VolCreated, Layout: layout()}))(t)
	must(f.op.CreateMachine(ctx, fsm.Machine{ID: "m3", Worker: "a", Volume: "v7", Network: 9, MachineNo: 3, State: fsm.MachineRunning}))(t)
	srv, err := New(f.op, Options{Allow: Write})
	if err != nil {
		t.Fatal(err)
	}
	s := connectInMemory(t, srv)

	p := ok[Plan[DrainDetails]](s, "drain_plan", DrainPlanIn{Worker: "a"})
	if len(p.Details.Moves) != 3 || p.Details.Moves[0].Machine != "m1" || p.Details.Moves[2].Target != "b" || !slices.Equal(p.Details.Targets, []string{"b"}) {
		t.Fatalf("drain plan: %+v", p)
	}
	// A machine appears on a after the plan: the plan no longer says what apply would do.
	must(f.wa.CreateVolume(ctx, fsm.Volume{ID: "v8", Worker: "a", Size: 8 << 20, State: fsm.VolCreated, Layout: layout()}))(t)
	must(f.op.CreateMachine(ctx, fsm.Machine{ID: "m4", Worker: "a", Volume: "v8", Network: 10, MachineNo: 4, State: fsm.MachineRunning}))(t)
	msg := s.refused("drain_apply", apply(p.PlanToken), "stale plan")
	if !strings.Contains(msg, "moves was") || !strings.Contains(msg, `"machine":"m4"`) {
		t.Fatalf("stale refusal does not say what changed: %s", msg)
	}
	if ms := must(f.op.ListMigrations(ctx, ""))(t); len(ms) != 0 {
		t.Fatalf("a stale drain started %d migrations", len(ms))
	}

	if ds := must(f.op.ListDrains(ctx, "a"))(t); len(ds) != 0 {
		t.Fatalf("a stale plan recorded a drain: %+v", ds)
	}

	p = ok[Plan[DrainDetails]](s, "drain_plan", DrainPlanIn{Worker: "a", Targets: []string{"b"}})
	out := ok[DrainApplyOut](s, "drain_apply", apply(p.PlanToken))
	if out.Drain == nil || out.Drain.ID != p.Details.Drain || out.Drain.State != "running" || !strings.Contains(out.Note, "without this session") {
		t.Fatalf("drain apply: %+v", out)
	}
	// The servers run it without this session: within the default
	// admission (two outbound migrations per worker at a time) two start
	// and two wait, with the servers' reasons.
	var ds DrainStatusOut
	deadline := time.Now().Add(20 * time.Second)
	for {
		ds = ok[DrainStatusOut](s, "drain_status", DrainStatusIn{Worker: "a"})
		if ds.Drain != nil && len(ds.Drain.Started) == 2 && len(ds.Drain.Waiting) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("drain did not start 2 and defer 2: %+v", ds.Drain)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for m, r := range ds.Drain.Waiting {
		if !strings.Contains(r, "2 of its 2 outbound slots") {
			t.Fatalf("%s waits for %q, want the source's slots", m, r)
		}
	}
	if ms := must(f.op.ListMigrations(ctx, "a"))(t); len(ms) != 2 {
		t.Fatalf("server has %d migrations, want 2", len(ms))
	}
	if ds.Active != 2 || len(ds.MachinesLeft) != 4 || ds.Drained {
		t.Fatalf("drain status: %+v", ds)
	}
	if w := must(f.op.GetWorker(ctx, "a"))(t); !w.Cordoned {
		t.Fatal("a drained worker is not cordoned")
	}
	s.refused("drain_plan", DrainPlanIn{Worker: "a"}, "already being drained by "+out.Drain.ID)
	// The target refuses a third inbound as the source refuses a third outbound.
	s.refused("migration_plan", MigrationPlanIn{Machine: "m4", Target: "b"}, "already has 2 outbound migrations (limit 2)")

	// Abort is admin: a write session does not even see it.
	if res, err := s.cs.CallTool(ctx, &sdk.CallToolParams{Name: "migration_abort_plan", Arguments: AbortPlanIn{ID: ds.Drain.Started["m1"]}}); err == nil && !res.IsError {
		t.Fatal("a write session could plan an abort")
	}

	// Past cutover an abort is refused at plan time, in the servers' words.
	admin, err := New(f.op, Options{Allow: Admin})
	if err != nil {
		t.Fatal(err)
	}
	as := connectInMemory(t, admin)
	id := ds.Drain.Started["m1"]
	wb := f.cl.Client("b", tlsutil.KindWorker)
	// target_prepared names a volume the target registered.
	must(wb.CreateVolume(ctx, fsm.Volume{ID: "v6-b", Worker: "b", Size: 8 << 20, State: fsm.VolHydrating}))(t)
	for _, step := range []struct {
		c  *api.Client
		ev fsm.Event
		p  fsm.EventPayload
	}{
		{wb, fsm.EvTargetPrepared, fsm.EventPayload{TargetVolume: "v6-b"}},
		{f.wa, fsm.EvSourceStopped, fsm.EventPayload{}},
		{f.wa, fsm.EvExported, fsm.EventPayload{Export: &fsm.Export{Portal: "127.0.0.1:3260", IQN: "iqn.2026-01.test:ferry:" + id}}},
		{wb, fsm.EvCloneBuilt, fsm.EventPayload{}},
		{wb, fsm.EvTrimmed, fsm.EventPayload{}},
		{wb, fsm.EvCutover, fsm.EventPayload{New6PN: "fdaa:0:7:0:2:0:1:0"}}, // m1 (org 7, machine 1) on b (host 2)
	} {
		if _, err := step.c.Propose(ctx, id, step.ev, "", step.p); err != nil {
			t.Fatalf("driving %s to cutover: %s: %v", id, step.ev, err)
		}
	}
	as.refused("migration_abort_plan", AbortPlanIn{ID: id}, "past cutover (the target already writes): it cannot be aborted, only driven forward")

	// Cancelling is planned and applied too; running migrations go on.
	cp := ok[Plan[DrainCancelDetails]](s, "drain_cancel_plan", DrainCancelPlanIn{Worker: "a"})
	if cp.Details.Drain != out.Drain.ID || len(cp.Details.Running) != 2 {
		t.Fatalf("drain cancel plan: %+v", cp)
	}
	if d := ok[Drain](s, "drain_cancel_apply", apply(cp.PlanToken)); d.State != "cancelled" || len(d.Left) == 0 {
		t.Fatalf("drain cancel: %+v", d)
	}
	if m := must(f.op.GetMigration(ctx, id))(t); !m.Active() {
		t.Fatalf("the drain's migration did not go on after the cancel: %+v", m)
	}
	s.refused("drain_cancel_plan", DrainCancelPlanIn{Worker: "a"}, "has no running drain")
}

func TestMcpReadGroup(t *testing.T) {
	f := newFleet(t)
	srv, err := New(f.op, Options{})
	if err != nil {
		t.Fatal(err)
	}
	s := connectInMemory(t, srv)
	want := []string{"drain_status", "machine_list", "machine_show", "migration_status", "volume_list", "volume_show", "worker_list"}
	if got := listTools(t, s); !slices.Equal(got, want) {
		t.Fatalf("read tools = %v, want %v", got, want)
	}
	if got := slices.Sorted(slices.Values(srv.Tools())); !slices.Equal(got, want) {
		t.Fatalf("Tools() = %v, want %v", got, want)
	}
	res, err := s.cs.CallTool(context.Background(), &sdk.CallToolParams{Name: "volume_create_plan", Arguments: VolumeCreateIn{ID: "x", Worker: "a", Size: "1M"}})
	if err == nil && !res.IsError {
		t.Fatal("a read session could call volume_create_plan")
	}
}

// bearerRT adds a bearer token to every request.
type bearerRT string

func (b bearerRT) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+string(b))
	return http.DefaultTransport.RoundTrip(r)
}

func TestMcpStreamableHTTP(t *testing.T) {
	f := newFleet(t)
	ctx := context.Background()
	srv, err := New(f.op, Options{Allow: Admin})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- srv.ServeHTTP(sctx, ln, "s3cret") }()
	url := "http://" + ln.Addr().String()

	// Without the bearer token, or with another one, nothing gets through.
	for _, hc := range []*http.Client{http.DefaultClient, {Transport: bearerRT("guess")}} {
		if cs, err := sdk.NewClient(&sdk.Implementation{Name: "intruder", Version: "1"}, nil).Connect(ctx, &sdk.StreamableClientTransport{Endpoint: url, HTTPClient: hc, MaxRetries: -1}, nil); err == nil {
			cs.Close()
			t.Fatal("connected without the bearer token")
		}
	}

	cs, err := sdk.NewClient(&sdk.Implementation{Name: "ferry-test", Version: "1"}, nil).Connect(ctx,
		&sdk.StreamableClientTransport{Endpoint: url, HTTPClient: &http.Client{Transport: bearerRT("s3cret")}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	s := &session{t: t, cs: cs}
	if got := listTools(t, s); !slices.Equal(got, allTools) {
		t.Fatalf("tools over HTTP = %v", got)
	}
	s.refused("volume_destroy_plan", VolumeDestroyIn{ID: "v1"}, "volume v1 is attached to machine m1")
	p := ok[Plan[MigrationDetails]](s, "migration_plan", MigrationPlanIn{Machine: "m1", Target: "b"})
	ok[Migration](s, "migration_apply", apply(p.PlanToken))
	if m := must(f.op.GetMigration(ctx, p.Details.Migration))(t); m.State != fsm.Planned || m.Machine != "m1" || m.Target != "b" {
		t.Fatalf("migration over HTTP: %+v", m)
	}
	s.refused("migration_apply", apply(p.PlanToken), "already applied")
	cs.Close()

	stop()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("ServeHTTP ended with %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ServeHTTP did not end with its context")
	}
}

func TestMcpCheckListenAddr(t *testing.T) {
	for _, a := range []string{"127.0.0.1:7480", "[::1]:7480", "localhost:0", "127.0.0.2:1"} {
		if err := CheckListenAddr(a, false); err != nil {
			t.Errorf("%s refused: %v", a, err)
		}
	}
	for _, a := range []string{":7480", "0.0.0.0:7480", "[::]:7480", "10.0.0.1:7480", "example.com:80"} {
		err := CheckListenAddr(a, false)
		if err == nil || !strings.Contains(err.Error(), "beyond loopback") {
			t.Errorf("%s: got %v, want a loopback refusal", a, err)
		}
		if err := CheckListenAddr(a, true); err != nil {
			t.Errorf("%s with allowRemote: %v", a, err)
		}
	}
	if err := CheckListenAddr("7480", false); err == nil {
		t.Error("an address without a port was accepted")
	}
}

func TestMcpParseSize(t *testing.T) {
	for in, want := range map[string]int64{"512": 512, "64M": 64 << 20, "1G": 1 << 30, "10GiB": 10 << 30, "2t": 2 << 40} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "0", "-1", "1X", "G", "99999999999T"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) accepted", in)
		}
	}
}

// A cancel plan stays valid while the drain's migrations finish (they are
// shown, not signed); another drain makes it stale.
func TestMcpDrainCancelPlanSignsTheDrainOnly(t *testing.T) {
	planned := DrainCancelDetails{Drain: "drain-1", Running: []string{"mig-a", "mig-b"}}
	b, err := json.Marshal(signedPart(planned))
	if err != nil {
		t.Fatal(err)
	}
	if diff, err := staleness(b, signedPart(DrainCancelDetails{Drain: "drain-1", Running: []string{"mig-b"}})); err != nil || diff != "" {
		t.Fatalf("a migration of the drain finished: stale %q (%v), want still valid", diff, err)
	}
	if diff, err := staleness(b, signedPart(DrainCancelDetails{Drain: "drain-2"})); err != nil || diff == "" {
		t.Fatalf("another drain runs now: stale %q (%v), want stale", diff, err)
	}
	// Other details are signed whole.
	if _, ok := any(DrainDetails{}).(partlySigned); ok {
		t.Fatal("a drain plan must be signed whole")
	}
}
