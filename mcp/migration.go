package mcp

import (
	"context"
	"fmt"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
)

// ---- migration plan / apply ----

// MigrationPlanIn asks for a plan of moving a machine.
type MigrationPlanIn struct {
	Machine string `json:"machine"`
	Target  string `json:"target" jsonschema:"the worker to move it to"`
}

type migrationParams struct {
	ID      string `json:"id"` // chosen at plan time, so the plan names what apply creates
	Machine string `json:"machine"`
	Target  string `json:"target"`
}

// MigrationDetails is what a migration plan rests on.
type MigrationDetails struct {
	Migration   string   `json:"migration" jsonschema:"the id the migration will have"`
	Machine     string   `json:"machine"`
	Volume      string   `json:"volume"`
	VolumeState string   `json:"volume_state"`
	SizeBytes   int64    `json:"size_bytes"`
	Source      string   `json:"source"`
	Target      string   `json:"target"`
	Old6PN      string   `json:"old_6pn,omitempty"`
	Locks       []string `json:"locks" jsonschema:"taken until the migration ends"`
}

func (s *Server) migrationPlan(ctx context.Context, in MigrationPlanIn) (Plan[MigrationDetails], error) {
	return makePlan(ctx, s, "migration", migrationParams{ID: api.NewStepID("mig-"), Machine: in.Machine, Target: in.Target}, s.planMigration)
}

// planMigration checks what the servers check when a migration is proposed,
// and refuses in their words.
func (s *Server) planMigration(ctx context.Context, p migrationParams) ([]string, MigrationDetails, error) {
	var d MigrationDetails
	m, err := s.c.GetMachine(ctx, p.Machine)
	if err != nil {
		return nil, d, err
	}
	if m.Volume == "" {
		return nil, d, fmt.Errorf("machine %s has no volume to migrate", m.ID)
	}
	v, err := s.c.GetVolume(ctx, m.Volume)
	if err != nil {
		return nil, d, err
	}
	if v.State != fsm.VolCreated && v.State != fsm.VolHydrating {
		return nil, d, fmt.Errorf("volume %s is %s: only a created volume can be migrated", v.ID, v.State)
	}
	src, err := s.c.GetWorker(ctx, m.Worker)
	if err != nil {
		return nil, d, err
	}
	dst, err := s.c.GetWorker(ctx, p.Target)
	if err != nil {
		return nil, d, err
	}
	if src.Name == dst.Name {
		return nil, d, fmt.Errorf("machine %s already runs on %s", m.ID, dst.Name)
	}
	now := time.Now()
	if !dst.Alive(now) {
		return nil, d, fmt.Errorf("target worker %s has no valid lease (last until %s): is its agent running?", dst.Name, dst.LeaseExpiry.UTC().Format(time.RFC3339))
	}
	if !src.Alive(now) {
		return nil, d, fmt.Errorf("source worker %s has no valid lease: its agent must run to stop and export the machine", src.Name)
	}
	locks := []string{"volume/" + v.ID}
	if m.Network != 0 {
		locks = append(locks, fmt.Sprintf("network/%d", m.Network))
	}
	held, err := s.c.Locks(ctx)
	if err != nil {
		return nil, d, err
	}
	for _, l := range locks {
		if h, ok := held[l]; ok && h != p.ID {
			return nil, d, fmt.Errorf("%s is locked by migration %s (one migration per volume and per private network)", l, h)
		}
	}
	if err := s.admission(ctx, p.ID, src, dst); err != nil {
		return nil, d, err
	}
	d = MigrationDetails{Migration: p.ID, Machine: m.ID, Volume: v.ID, VolumeState: string(v.State), SizeBytes: v.Size,
		Source: src.Name, Target: dst.Name, Old6PN: m.Addr6PN, Locks: locks}
	changes := []string{
		fmt.Sprintf("start migration %s: machine %s and volume %s (%s) from %s to %s", p.ID, m.ID, v.ID, humanBytes(v.Size), src.Name, dst.Name),
		fmt.Sprintf("take the locks %v until it ends", locks),
		fmt.Sprintf("%s stops machine %s (downtime starts) and exports the volume to %s only", src.Name, m.ID, dst.Name),
		fmt.Sprintf("%s builds a clone, trims, boots the machine with a new 6PN address (downtime ends); the old address %q keeps answering for a grace period", dst.Name, m.Addr6PN),
		fmt.Sprintf("the rest of the volume hydrates in the background: at most %s, holes and trimmed ranges skipped; the source copy is kept for its retention", humanBytes(v.Size)),
		"abort (migration_abort_plan) is possible until cutover; after it the migration only goes forward",
	}
	return changes, d, nil
}

// admission applies the servers' per-worker limits (a full worker refuses).
func (s *Server) admission(ctx context.Context, id string, src, dst *fsm.Worker) error {
	migs, err := s.c.ListMigrations(ctx, "")
	if err != nil {
		return err
	}
	out, in := 0, 0
	for _, o := range migs {
		if o.State.Terminal() || o.ID == id {
			continue
		}
		if o.Source == src.Name {
			out++
		}
		if o.Target == dst.Name {
			in++
		}
	}
	limit := func(w *fsm.Worker) int {
		if w.Capacity > 0 {
			return w.Capacity
		}
		return fsm.DefaultMigrationsPerWorker
	}
	if lim := limit(src); out >= lim {
		return fmt.Errorf("worker %s already has %d outbound migrations (limit %d)", src.Name, out, lim)
	}
	if lim := limit(dst); in >= lim {
		return fmt.Errorf("worker %s already has %d inbound migrations (limit %d)", dst.Name, in, lim)
	}
	return nil
}

func (s *Server) migrationApply(ctx context.Context, in ApplyIn) (Migration, error) {
	p, _, err := checkPlan(ctx, s, "migration", in.PlanToken, s.planMigration)
	if err != nil {
		return Migration{}, err
	}
	m, err := s.c.CreateMigration(ctx, api.PlanRequest{ID: p.ID, Machine: p.Machine, Target: p.Target})
	if err != nil {
		return Migration{}, err
	}
	return migrationOut(m), nil
}

// ---- abort ----

// AbortPlanIn asks for a plan of rolling a migration back.
type AbortPlanIn struct {
	ID     string `json:"id" jsonschema:"the migration"`
	Reason string `json:"reason,omitempty" jsonschema:"why (recorded in the migration)"`
}

type abortParams struct {
	ID     string `json:"id"`
	Reason string `json:"reason"`
}

// AbortDetails is what an abort plan rests on. The exact state is left out
// on purpose: a migration moves between pre-cutover states within seconds,
// and an abort means the same in each of them.
type AbortDetails struct {
	Migration     string `json:"migration"`
	Machine       string `json:"machine"`
	Source        string `json:"source"`
	Target        string `json:"target"`
	BeforeCutover bool   `json:"before_cutover"`
	Reason        string `json:"reason"`
}

func (s *Server) abortPlan(ctx context.Context, in AbortPlanIn) (Plan[AbortDetails], error) {
	if in.Reason == "" {
		in.Reason = "operator abort (via MCP)"
	}
	if len(in.Reason) > 500 {
		return Plan[AbortDetails]{}, fmt.Errorf("reason: at most 500 characters")
	}
	return makePlan(ctx, s, "migration_abort", abortParams(in), s.planAbort)
}

func (s *Server) planAbort(ctx context.Context, p abortParams) ([]string, AbortDetails, error) {
	var d AbortDetails
	m, err := s.c.GetMigration(ctx, p.ID)
	if err != nil {
		return nil, d, err
	}
	switch {
	case m.State.Terminal():
		return nil, d, fmt.Errorf("migration %s is already %s: nothing to abort", m.ID, m.State)
	case m.State.AfterCutover():
		return nil, d, fmt.Errorf("migration %s is %s, past cutover (the target already writes): it cannot be aborted, only driven forward", m.ID, m.State)
	case m.State == fsm.RollingBack:
		return nil, d, fmt.Errorf("migration %s is already rolling back", m.ID)
	}
	d = AbortDetails{Migration: m.ID, Machine: m.Machine, Source: m.Source, Target: m.Target, BeforeCutover: true, Reason: p.Reason}
	changes := []string{
		fmt.Sprintf("roll back migration %s (now %s): reason %q", m.ID, m.State, p.Reason),
		fmt.Sprintf("%s tears down its clone of volume %s; then machine %s restarts on %s with its old address", m.Target, m.Volume, m.Machine, m.Source),
		"refused by the servers instead if the migration reaches cutover first",
	}
	return changes, d, nil
}

func (s *Server) abortApply(ctx context.Context, in ApplyIn) (Migration, error) {
	p, _, err := checkPlan(ctx, s, "migration_abort", in.PlanToken, s.planAbort)
	if err != nil {
		return Migration{}, err
	}
	m, err := s.c.Abort(ctx, p.ID, p.Reason)
	if err != nil {
		return Migration{}, err
	}
	return migrationOut(m), nil
}
