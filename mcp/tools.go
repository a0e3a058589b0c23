package mcp

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"time"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

// Plan is what every *_plan tool returns.
type Plan[D any] struct {
	PlanToken string    `json:"plan_token" jsonschema:"pass it unchanged to the matching _apply tool; valid once, until expires_at"`
	ExpiresAt time.Time `json:"expires_at"`
	Changes   []string  `json:"changes" jsonschema:"exactly what applying would change"`
	Details   D         `json:"details" jsonschema:"the facts the plan rests on; applying is refused if they changed"`
}

// ApplyIn is the input of every *_apply tool.
type ApplyIn struct {
	PlanToken string `json:"plan_token" jsonschema:"the plan_token a _plan tool returned"`
}

// makePlan builds a plan from params and signs its details.
func makePlan[P, D any](ctx context.Context, s *Server, kind string, params P, mk func(context.Context, P) ([]string, D, error)) (Plan[D], error) {
	changes, d, err := mk(ctx, params)
	if err != nil {
		return Plan[D]{}, err
	}
	tok, exp, err := s.plans.issue(kind, params, signedPart(d))
	if err != nil {
		return Plan[D]{}, err
	}
	return Plan[D]{PlanToken: tok, ExpiresAt: exp, Changes: changes, Details: d}, nil
}

// partlySigned is plan details of which only a part must still hold at
// apply: the rest changes on its own while the plan waits (the migrations a
// drain still runs) and is shown, not signed.
type partlySigned interface{ signed() any }

// signedPart is what a plan's token signs of its details d.
func signedPart(d any) any {
	if p, ok := d.(partlySigned); ok {
		return p.signed()
	}
	return d
}

// checkPlan verifies a token of kind, re-plans from its parameters and
// spends it when the fresh plan equals the signed one.
func checkPlan[P, D any](ctx context.Context, s *Server, kind, token string, mk func(context.Context, P) ([]string, D, error)) (P, D, error) {
	var p P
	var d D
	t, err := s.plans.open(kind, token)
	if err != nil {
		return p, d, err
	}
	if err := json.Unmarshal(t.Params, &p); err != nil {
		return p, d, fmt.Errorf("%w: the plan's parameters are unreadable: %v", errPlan, err)
	}
	if _, d, err = mk(ctx, p); err != nil {
		return p, d, fmt.Errorf("%w: it no longer holds: %w", errPlan, err)
	}
	diff, err := staleness(t.Content, signedPart(d))
	if err != nil {
		return p, d, err
	}
	if diff != "" {
		return p, d, fmt.Errorf("%w: stale plan, the world changed since it was made (%s): call the plan tool again and review it", errPlan, diff)
	}
	if !s.plans.spend(t) {
		return p, d, fmt.Errorf("%w: this plan was already applied once: call the plan tool again", errPlan)
	}
	return p, d, nil
}

func (s *Server) register(allow Group) {
	// Read.
	tool(s, allow, Read, &sdk.Tool{Name: "worker_list", Description: "List the workers, their leases and capacity."}, s.workerList)
	tool(s, allow, Read, &sdk.Tool{Name: "volume_list", Description: "List volumes (of one worker, or all)."}, s.volumeList)
	tool(s, allow, Read, &sdk.Tool{Name: "volume_show", Description: "Show one volume (never its key)."}, s.volumeShow)
	tool(s, allow, Read, &sdk.Tool{Name: "machine_list", Description: "List machines (of one worker, or all)."}, s.machineList)
	tool(s, allow, Read, &sdk.Tool{Name: "machine_show", Description: "Show one machine."}, s.machineShow)
	tool(s, allow, Read, &sdk.Tool{Name: "migration_status", Description: "Show one migration, or list them (of one worker, or all): state, progress, downtime, why it stalled or rolled back."}, s.migrationStatus)
	tool(s, allow, Read, &sdk.Tool{Name: "drain_status", Description: "What is left on a worker being drained: the servers' drain record (what it started, why the rest wait, what was left), its machines and the migrations off it."}, s.drainStatus)
	// Write.
	tool(s, allow, Write, &sdk.Tool{Name: "volume_create_plan", Description: "Plan a new LUKS2-encrypted ext4 volume on a worker; changes nothing. Returns a plan_token for volume_create_apply."}, s.volumeCreatePlan)
	tool(s, allow, Write, &sdk.Tool{Name: "volume_create_apply", Description: "Create the volume a volume_create_plan described (its worker's agent formats it; watch volume_show until created)."}, s.volumeCreateApply)
	tool(s, allow, Write, &sdk.Tool{Name: "volume_extend_plan", Description: "Plan growing a volume and its filesystem online, under its running machine; changes nothing. Shrinking and volumes in migration are refused. Returns a plan_token for volume_extend_apply."}, s.volumeExtendPlan)
	tool(s, allow, Write, &sdk.Tool{Name: "volume_extend_apply", Description: "Extend the volume a volume_extend_plan described; its worker grows it (watch volume_show until growing_to is gone)."}, s.volumeExtendApply)
	tool(s, allow, Write, &sdk.Tool{Name: "volume_fork_plan", Description: "Plan an independent copy of a volume as it is at one instant, while its machine keeps running, under a master key of its own; changes nothing. Returns a plan_token for volume_fork_apply."}, s.volumeForkPlan)
	tool(s, allow, Write, &sdk.Tool{Name: "volume_fork_apply", Description: "Fork the volume a volume_fork_plan described; the copy appears at once (creating) and its worker makes it (watch volume_show until created)."}, s.volumeForkApply)
	tool(s, allow, Write, &sdk.Tool{Name: "migration_plan", Description: "Plan moving a machine and its volume to another worker; changes nothing. Returns a plan_token for migration_apply."}, s.migrationPlan)
	tool(s, allow, Write, &sdk.Tool{Name: "migration_apply", Description: "Start the migration a migration_plan described; follow it with migration_status."}, s.migrationApply)
	tool(s, allow, Write, &sdk.Tool{Name: "drain_plan", Description: "Plan a drain of a worker, run by the servers: where their placement puts each machine now and why, or why none fits; changes nothing. Returns a plan_token for drain_apply."}, s.drainPlan)
	tool(s, allow, Write, &sdk.Tool{Name: "drain_apply", Description: "Record the drain a drain_plan described: the worker is cordoned and the servers move its machines off within the limits, without this session (drain_status follows it)."}, s.drainApply)
	tool(s, allow, Write, &sdk.Tool{Name: "drain_cancel_plan", Description: "Plan cancelling a worker's running drain (its running migrations go on, the worker stays cordoned); changes nothing. Returns a plan_token for drain_cancel_apply."}, s.drainCancelPlan)
	tool(s, allow, Write, &sdk.Tool{Name: "drain_cancel_apply", Description: "Cancel the drain a drain_cancel_plan described."}, s.drainCancelApply)
	// Admin.
	tool(s, allow, Admin, &sdk.Tool{Name: "volume_destroy_plan", Description: "Plan destroying a volume (kept for a retention window first); changes nothing. Refused while a machine uses it. Returns a plan_token for volume_destroy_apply."}, s.volumeDestroyPlan)
	tool(s, allow, Admin, &sdk.Tool{Name: "volume_destroy_apply", Description: "Destroy the volume a volume_destroy_plan described."}, s.volumeDestroyApply)
	tool(s, allow, Admin, &sdk.Tool{Name: "migration_abort_plan", Description: "Plan rolling a migration back (only before cutover); changes nothing. Returns a plan_token for migration_abort_apply."}, s.abortPlan)
	tool(s, allow, Admin, &sdk.Tool{Name: "migration_abort_apply", Description: "Roll back the migration a migration_abort_plan described: the target tears down, the machine restarts on the source."}, s.abortApply)
}

// ---- read tools ----

type (
	// WorkerFilter selects the records of one worker.
	WorkerFilter struct {
		Worker string `json:"worker,omitempty" jsonschema:"only this worker's (all when empty)"`
	}
	// IDIn names one record.
	IDIn struct {
		ID string `json:"id"`
	}
	NoInput    struct{}
	WorkersOut struct {
		Workers []Worker `json:"workers"`
	}
	VolumesOut struct {
		Volumes []Volume `json:"volumes"`
	}
	MachinesOut struct {
		Machines []Machine `json:"machines"`
	}
	MigrationsOut struct {
		Migrations []Migration `json:"migrations"`
	}
	MigrationStatusIn struct {
		ID         string `json:"id,omitempty" jsonschema:"one migration (then worker and active_only are ignored)"`
		Worker     string `json:"worker,omitempty" jsonschema:"only migrations from or to this worker"`
		ActiveOnly bool   `json:"active_only,omitempty" jsonschema:"leave out completed and rolled back ones"`
	}
	DrainStatusIn struct {
		Worker string `json:"worker"`
	}
	DrainStatusOut struct {
		Worker       string      `json:"worker"`
		Drain        *Drain      `json:"drain,omitempty" jsonschema:"the running drain, else the newest ended one"`
		MachinesLeft []Machine   `json:"machines_left" jsonschema:"machines still on the worker"`
		Migrations   []Migration `json:"migrations" jsonschema:"migrations off the worker, newest first"`
		Active       int         `json:"active" jsonschema:"migrations off the worker still running"`
		Drained      bool        `json:"drained" jsonschema:"no machine left and nothing running"`
	}
)

func (s *Server) workerList(ctx context.Context, _ NoInput) (WorkersOut, error) {
	ws, err := s.c.ListWorkers(ctx)
	if err != nil {
		return WorkersOut{}, err
	}
	now := time.Now()
	out := WorkersOut{Workers: []Worker{}}
	for i := range ws {
		out.Workers = append(out.Workers, workerOut(&ws[i], now))
	}
	sort.Slice(out.Workers, func(i, j int) bool { return out.Workers[i].Name < out.Workers[j].Name })
	return out, nil
}

func (s *Server) volumeList(ctx context.Context, in WorkerFilter) (VolumesOut, error) {
	vs, err := s.c.ListVolumes(ctx, in.Worker)
	if err != nil {
		return VolumesOut{}, err
	}
	out := VolumesOut{Volumes: []Volume{}}
	for i := range vs {
		out.Volumes = append(out.Volumes, volumeOut(&vs[i]))
	}
	sort.Slice(out.Volumes, func(i, j int) bool { return out.Volumes[i].ID < out.Volumes[j].ID })
	return out, nil
}

func (s *Server) volumeShow(ctx context.Context, in IDIn) (Volume, error) {
	v, err := s.c.GetVolume(ctx, in.ID)
	if err != nil {
		return Volume{}, err
	}
	return volumeOut(v), nil
}

func (s *Server) machineList(ctx context.Context, in WorkerFilter) (MachinesOut, error) {
	ms, err := s.c.ListMachines(ctx, in.Worker)
	if err != nil {
		return MachinesOut{}, err
	}
	out := MachinesOut{Machines: []Machine{}}
	for i := range ms {
		out.Machines = append(out.Machines, machineOut(&ms[i]))
	}
	sort.Slice(out.Machines, func(i, j int) bool { return out.Machines[i].ID < out.Machines[j].ID })
	return out, nil
}

func (s *Server) machineShow(ctx context.Context, in IDIn) (Machine, error) {
	m, err := s.c.GetMachine(ctx, in.ID)
	if err != nil {
		return Machine{}, err
	}
	return machineOut(m), nil
}

func (s *Server) migrationStatus(ctx context.Context, in MigrationStatusIn) (MigrationsOut, error) {
	out := MigrationsOut{Migrations: []Migration{}}
	if in.ID != "" {
		m, err := s.c.GetMigration(ctx, in.ID)
		if err != nil {
			return out, err
		}
		out.Migrations = append(out.Migrations, migrationOut(m))
		return out, nil
	}
	ms, err := s.c.ListMigrations(ctx, in.Worker)
	if err != nil {
		return out, err
	}
	for _, m := range ms {
		if !in.ActiveOnly || !m.State.Terminal() {
			out.Migrations = append(out.Migrations, migrationOut(m))
		}
	}
	sortMigrations(out.Migrations)
	return out, nil
}

func sortMigrations(ms []Migration) {
	sort.Slice(ms, func(i, j int) bool {
		if !ms[i].CreatedAt.Equal(ms[j].CreatedAt) {
			return ms[i].CreatedAt.After(ms[j].CreatedAt)
		}
		return ms[i].ID < ms[j].ID
	})
}

func (s *Server) drainStatus(ctx context.Context, in DrainStatusIn) (DrainStatusOut, error) {
	out := DrainStatusOut{Worker: in.Worker, MachinesLeft: []Machine{}, Migrations: []Migration{}}
	if _, err := s.c.GetWorker(ctx, in.Worker); err != nil {
		return out, err
	}
	ms, err := s.c.ListMachines(ctx, in.Worker)
	if err != nil {
		return out, err
	}
	for i := range ms {
		if ms[i].Worker == in.Worker {
			out.MachinesLeft = append(out.MachinesLeft, machineOut(&ms[i]))
		}
	}
	sort.Slice(out.MachinesLeft, func(i, j int) bool { return out.MachinesLeft[i].ID < out.MachinesLeft[j].ID })
	migs, err := s.c.ListMigrations(ctx, in.Worker)
	if err != nil {
		return out, err
	}
	for _, m := range migs {
		if m.Source != in.Worker {
			continue
		}
		out.Migrations = append(out.Migrations, migrationOut(m))
		if !m.State.Terminal() {
			out.Active++
		}
	}
	sortMigrations(out.Migrations)
	out.Drained = len(out.MachinesLeft) == 0 && out.Active == 0
	out.Drain, err = s.drainRecord(ctx, in.Worker)
	return out, err
}

// lockHolder returns the migration holding lock name, or "".
func (s *Server) lockHolder(ctx context.Context, name string) (string, error) {
	locks, err := s.c.Locks(ctx)
	if err != nil {
		return "", err
	}
	return locks[name], nil
}

// notFound reports whether err is the servers' not_found refusal.
func notFound(err error) bool { return api.ErrorCode(err) == fsm.CodeNotFound }
