package netrewrite

import (
	"context"
	"fmt"
	"time"

	"github.com/rs/zerolog"
)

// The cutover and rollback steps with their local mapping record, as a
// worker runs them (the agent at cutover, `ferry net cutover|rollback` by
// hand). The record is written before the kernel state, so a crash in
// between leaves a record whose expiry removes whatever was applied; expiry
// of a mapping never applied is a no-op. A grace of zero applies the step
// without a record (a hand-run experiment that will be undone by hand).

// CutoverTarget records the mapping old -> p.Machine.Addr for grace (keeping
// the source side of an existing record) and applies CutoverTarget.
func (s Store) CutoverTarget(ctx context.Context, log zerolog.Logger, machine string, p TargetPlan, now time.Time, grace time.Duration) error {
	if grace > 0 {
		if err := s.noteTarget(machine, p, now, grace); err != nil {
			return err
		}
	}
	return CutoverTarget(ctx, log, p)
}

// CutoverSource records the source side of the mapping p.Machine.Addr ->
// newAddr (joining the target side when the record exists: one host plays
// both workers in the demo) and applies CutoverSource.
func (s Store) CutoverSource(ctx context.Context, log zerolog.Logger, machine string, p SourcePlan, newAddr Addr, now time.Time, grace time.Duration) error {
	if grace > 0 {
		if err := s.noteSource(machine, p, newAddr, now, grace); err != nil {
			return err
		}
	}
	return CutoverSource(ctx, log, p)
}

// RollbackTarget applies RollbackTarget and then forgets the target side of
// the record of p.Old.
func (s Store) RollbackTarget(ctx context.Context, log zerolog.Logger, p TargetPlan) error {
	if err := RollbackTarget(ctx, log, p); err != nil {
		return err
	}
	return s.dropSide(p.Old, true)
}

// RollbackSource applies RollbackSource and then forgets the source side of
// the record of p.Machine.Addr.
func (s Store) RollbackSource(ctx context.Context, log zerolog.Logger, p SourcePlan) error {
	if err := RollbackSource(ctx, log, p); err != nil {
		return err
	}
	return s.dropSide(p.Machine.Addr, false)
}

func (s Store) noteTarget(machine string, p TargetPlan, now time.Time, grace time.Duration) error {
	rec, err := NewMapping(machine, p, nil, now, grace)
	if err != nil {
		return err
	}
	prev, ok, err := s.Get(p.Old)
	if err != nil {
		return err
	}
	if ok && prev.New == rec.New {
		rec.Source = prev.Source
	}
	return s.Put(rec)
}

func (s Store) noteSource(machine string, p SourcePlan, newAddr Addr, now time.Time, grace time.Duration) error {
	rec, ok, err := s.Get(p.Machine.Addr)
	if err != nil {
		return err
	}
	if !ok || rec.New != newAddr && newAddr.IsValid() {
		if !newAddr.IsValid() {
			return fmt.Errorf("%w: the new address is needed to record the mapping of %s", ErrBadAddr, p.Machine.Addr)
		}
		rec = Mapping{Machine: machine, Old: p.Machine.Addr, New: newAddr, Until: now.Add(grace).UTC()}
	}
	sp := p
	rec.Source = &sp
	return s.Put(rec)
}

// dropSide forgets one side of a rolled-back mapping record, and the record
// once neither side is left.
func (s Store) dropSide(old Addr, target bool) error {
	rec, ok, err := s.Get(old)
	if err != nil || !ok {
		return err
	}
	if target {
		rec.Target = nil
	} else {
		rec.Source = nil
	}
	if rec.Target == nil && rec.Source == nil {
		return s.Delete(old)
	}
	return s.Put(rec)
}
