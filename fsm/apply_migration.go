package fsm

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"time"
)

func volumeLock(id string) string { return "volume/" + id }
func networkLock(n uint32) string { return "network/" + strconv.FormatUint(uint64(n), 10) }
func (m *Migration) lockNames() []string {
	l := []string{volumeLock(m.Volume)}
	if m.Network != 0 {
		l = append(l, networkLock(m.Network))
	}
	return l
}

// applyPlan validates and admits a new migration, taking its locks.
func (s *Store) applyPlan(index uint64, c *PlanCmd) *Result {
	if !c.Actor.privileged() {
		return forbidden(c.Actor, "plan a migration (operator or server certificate needed)")
	}
	if old, ok := s.d.Migrations[c.ID]; ok {
		if old.Machine == c.Machine && old.Target == c.Target {
			return &Result{Migration: old.Clone(), Duplicate: true}
		}
		return &Result{Refusal: refuse(RefuseConflict, CodeConflict, "migration %s already exists", c.ID)}
	}
	if !validID(c.ID) {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "migration id %q is not valid", c.ID)}
	}
	if c.MaxDowntime < 0 || (c.MaxDowntime > 0 && c.MaxDowntime < 100*time.Millisecond) {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "max downtime %v: give at least 100ms (0 for the default %v)", c.MaxDowntime, DefaultMaxDowntime)}
	}
	mach, ok := s.d.Machines[c.Machine]
	if !ok {
		return &Result{Refusal: notFound("machine", c.Machine)}
	}
	if mach.Volume == "" {
		return &Result{Refusal: refuse(RefuseConflict, CodeInvalid, "machine %s has no volume to migrate", mach.ID)}
	}
	vol, ok := s.d.Volumes[mach.Volume]
	if !ok {
		return &Result{Refusal: notFound("volume", mach.Volume)}
	}
	if vol.State != VolCreated && vol.State != VolHydrating {
		return &Result{Refusal: refuse(RefuseConflict, CodeWrongState, "volume %s is %s: only a created volume can be migrated", vol.ID, vol.State)}
	}
	if f, ok := s.forking(vol.ID); ok {
		return &Result{Refusal: refuse(RefuseConflict, CodeWrongState, "volume %s is being forked into %s: migrate it once the fork is created", vol.ID, f.ID)}
	}
	if vol.Extending() {
		return &Result{Refusal: refuse(RefuseConflict, CodeWrongState, "volume %s is being extended from %d to %d bytes: migrate it once its worker reported the new size", vol.ID, vol.Size, vol.WantSize)}
	}
	src, ok := s.d.Workers[mach.Worker]
	if !ok {
		return &Result{Refusal: notFound("worker", mach.Worker)}
	}
	dst, ok := s.d.Workers[c.Target]
	if !ok {
		return &Result{Refusal: notFound("target worker", c.Target)}
	}
	if src.Name == dst.Name {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "machine %s already runs on %s", mach.ID, dst.Name)}
	}
	if !dst.Alive(c.Now) {
		return &Result{Refusal: refuse(RefuseConflict, CodeAdmission, "target worker %s has no valid lease (last until %s): is its agent running?", dst.Name, dst.LeaseExpiry.UTC().Format(time.RFC3339))}
	}
	if !src.Alive(c.Now) {
		return &Result{Refusal: refuse(RefuseConflict, CodeAdmission, "source worker %s has no valid lease: its agent must run to stop and export the machine", src.Name)}
	}
	m := &Migration{ID: c.ID, Volume: vol.ID, Machine: mach.ID, Source: src.Name, Target: dst.Name, Network: mach.Network, MaxDowntime: c.MaxDowntime}
	for _, l := range m.lockNames() {
		if holder, ok := s.d.Locks[l]; ok {
			return &Result{Refusal: refuse(RefuseConflict, CodeLocked, "%s is locked by migration %s (one migration per volume and per private network)", l, holder)}
		}
	}
	out, in := 0, 0
	for _, o := range s.d.Migrations {
		if !o.Active() {
			continue
		}
		if o.Source == src.Name {
			out++
		}
		if o.Target == dst.Name {
			in++
		}
	}
	if dst.Cordoned {
		return &Result{Refusal: refuse(RefuseConflict, CodeCordoned, "target worker %s is cordoned (%s): it takes no new migrations; uncordon it first", dst.Name, dst.CordonReason)}
	}
	if lim := src.LimitOut(); out >= lim {
		return &Result{Refusal: refuse(RefuseBusy, CodeAdmission, "worker %s already has %d outbound migrations (limit %d)", src.Name, out, lim)}
	}
	if lim := dst.LimitIn(); in >= lim {
		return &Result{Refusal: refuse(RefuseBusy, CodeAdmission, "worker %s already has %d inbound migrations (limit %d)", dst.Name, in, lim)}
	}
	m.State = Planned
	m.EnteredAt = map[State]time.Time{Planned: c.Now}
	m.CreatedAt, m.UpdatedAt = c.Now, c.Now
	m.Old6PN = mach.Addr6PN
	if vol.Layout != nil {
		l := *vol.Layout
		m.Layout = &l
	}
	m.ModifyIndex = index
	m.rememberStep(StepResult{StepID: c.StepID, Event: "plan", State: Planned, Index: index})
	for _, l := range m.lockNames() {
		s.d.Locks[l] = m.ID
	}
	s.d.Migrations[m.ID] = m
	s.idx.addMigration(m)
	return &Result{Migration: m.Clone()}
}

func limit(w *Worker) int {
	if w.Capacity > 0 {
		return w.Capacity
	}
	return DefaultMigrationsPerWorker
}

// RolesOf returns the roles id holds in migration m.
func RolesOf(id Identity, m *Migration) []Role {
	switch id.Kind {
	case KindServer:
		return []Role{RoleServer}
	case KindOperator:
		return []Role{RoleOperator}
	case KindWorker:
		var r []Role
		if id.Name == m.Source {
			r = append(r, RoleSource)
		}
		if id.Name == m.Target {
			r = append(r, RoleTarget)
		}
		return r
	}
	return nil
}

func allowed(have, need []Role) bool {
	for _, r := range have {
		if slices.Contains(need, r) {
			return true
		}
	}
	return false
}

// applyPropose runs the guards, then the event's own apply function.
func (s *Store) applyPropose(index uint64, c *ProposeCmd) *Result {
	m, ok := s.d.Migrations[c.ID]
	if !ok {
		return &Result{Refusal: notFound("migration", c.ID)}
	}
	tr, isTr := Lookup(c.Event)
	an, isAn := lookupAnnotation(c.Event)
	if !isTr && !isAn {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "unknown event %q", c.Event)}
	}
	roles := RolesOf(c.Actor, m)
	need := tr.Roles
	if isAn {
		need = an.Roles
	}
	if !allowed(roles, need) {
		r := refuse(RefuseForbidden, CodeForbidden, "%s may not propose %s on migration %s (needs role %v; source is %s, target is %s)",
			c.Actor, c.Event, m.ID, need, m.Source, m.Target)
		r.State = m.State
		return &Result{Refusal: r}
	}
	if prev, ok := m.step(c.StepID); ok {
		// A retried proposal: the first result, nothing changes.
		r := &Result{Migration: m.Clone(), Duplicate: true}
		if prev.Event != c.Event {
			r.Refusal = refuse(RefuseConflict, CodeConflict, "step %s was already used for event %s", c.StepID, prev.Event)
			r.Refusal.State = m.State
		}
		return r
	}
	before := m.State
	var ref *Refusal
	ignored := false
	if isAn {
		if !slices.Contains(an.In, m.State) {
			ref = refuse(RefuseConflict, CodeWrongState, "event %s is not accepted in state %s", c.Event, m.State)
		} else if c.Event == EvProgress {
			ignored, ref = applyProgress(m, c)
		} else if c.Event == EvExportMoved || c.Event == EvExportStarted {
			ref = applyExportMoved(m, c)
		} else {
			ref = applyReport(m, c)
		}
	} else {
		ref = s.applyTransition(m, tr, c)
	}
	if ref != nil {
		ref.State = m.State
		return &Result{Refusal: ref, Migration: m.Clone()}
	}
	if ignored {
		return &Result{Migration: m.Clone(), Ignored: true}
	}
	m.UpdatedAt = c.Now
	m.ModifyIndex = index
	s.idx.touchMigration(m)
	if m.State != before {
		m.EnteredAt[m.State] = c.Now
		if m.State.Terminal() {
			s.dropMigrationEnvelopes(m)
		}
	}
	if c.Event != EvProgress { // progress is idempotent; keep the bounded step memory for real steps
		m.rememberStep(StepResult{StepID: c.StepID, Event: c.Event, State: m.State, Index: index})
	}
	return &Result{Migration: m.Clone()}
}

// applyTransition checks the state with the table and runs the event's effects.
func (s *Store) applyTransition(m *Migration, tr Transition, c *ProposeCmd) *Refusal {
	if r := stateGuard(m, c.Event, tr, false, Annotation{}); r != nil {
		return r
	}
	to, _ := Next(m.State, c.Event)
	p := c.Payload
	switch c.Event {
	case EvTargetPrepared:
		if m.Layout == nil {
			return refuse(RefuseConflict, CodeLayoutNeeded,
				"migration %s carries no LUKS2 layout: register the source volume's layout (volume update) first; the target must never size from local defaults", m.ID)
		}
		if p.Layout != nil && *p.Layout != *m.Layout {
			return refuse(RefuseConflict, CodeConflict, "target prepared with a layout that differs from the carried one")
		}
		m.TargetVol = p.TargetVolume
	case EvSourceStopped:
		if p.Layout != nil && m.Layout != nil && *p.Layout != *m.Layout {
			return refuse(RefuseConflict, CodeConflict,
				"the source header's layout differs from the one the target prepared with: fail the migration")
		}
		if mach, ok := s.d.Machines[m.Machine]; ok {
			mach.State = MachineStopped
		}
	case EvExported:
		if p.Export == nil || p.Export.Portal == "" || p.Export.IQN == "" {
			return refuse(RefuseInvalid, CodeInvalid, "exported needs export.portal and export.iqn")
		}
		// The source's holes travel with the export: the target builds the
		// clone with them, so they are never fetched. Checked before any
		// change: a refusal changes nothing.
		if err := validRanges(p.KnownZero); err != nil {
			return refuse(RefuseInvalid, CodeInvalid, "known_zero: %v", err)
		}
		if len(p.KnownZero) > 4096 {
			return refuse(RefuseInvalid, CodeInvalid, "known_zero has %d ranges; coalesce to at most 4096", len(p.KnownZero))
		}
		e := *p.Export
		m.Export = &e
		if p.KnownZero != nil {
			m.KnownZero = append([]Range(nil), p.KnownZero...)
		}
	case EvTrimmed:
		if err := validRanges(p.KnownZero); err != nil {
			return refuse(RefuseInvalid, CodeInvalid, "known_zero: %v", err)
		}
		if len(p.KnownZero) > 4096 {
			return refuse(RefuseInvalid, CodeInvalid, "known_zero has %d ranges; coalesce to at most 4096", len(p.KnownZero))
		}
		if p.KnownZero != nil {
			m.KnownZero = append([]Range(nil), p.KnownZero...)
		}
	case EvCutover:
		if _, ok := m.EnteredAt[SourceStopped]; !ok {
			return refuse(RefuseConflict, CodeWrongState, "source_stopped was never committed") // invariant 2
		}
		m.New6PN = p.New6PN
		if mach, ok := s.d.Machines[m.Machine]; ok {
			s.idx.moveMachine(mach.ID, mach.Worker, m.Target)
			mach.Worker = m.Target
			mach.State = MachineRunning
			mach.Migrated = true
			if p.New6PN != "" {
				mach.Addr6PN = p.New6PN
			}
			if v, ok := s.d.Volumes[m.Volume]; ok && v.AttachedMachine == mach.ID {
				v.AttachedMachine = ""
			}
			if m.TargetVol != "" {
				mach.Volume = m.TargetVol
				if v, ok := s.d.Volumes[m.TargetVol]; ok {
					v.AttachedMachine = mach.ID
				}
			}
		}
	case EvHydrated:
		if p.Progress != nil {
			pr := *p.Progress.Replicated()
			pr.UpdatedAt = c.Now
			m.Progress = &pr
		} else if m.Progress != nil {
			m.Progress.HydratedBytes = m.Progress.TotalBytes
			m.Progress.UpdatedAt = c.Now
		}
		m.Stalled, m.StallCause = false, ""
	case EvSourceReleased:
		if v, ok := s.d.Volumes[m.Volume]; ok {
			// Invariant 3: kept for the retention window, destroyed later by the server.
			v.State = VolPendingDelete
			v.DestroyAfter = c.Now.Add(DefaultMigratedRetention)
			v.AttachedMachine = ""
		}
	case EvCompleted:
		s.releaseLocks(m)
		if v, ok := s.d.Volumes[m.TargetVol]; ok && v.State == VolHydrating {
			v.State = VolCreated
		}
		m.Stalled, m.StallCause = false, ""
	case EvAbort, EvFailed:
		reason := p.Reason
		if reason == "" {
			reason = p.Error
		}
		if reason == "" {
			reason = string(c.Event) + " by " + c.Actor.Name
		}
		_, stopped := m.EnteredAt[SourceStopped]
		m.Rollback = &RollbackInfo{Reason: reason, By: c.Actor.Name, From: m.State, SourceStopped: stopped}
		if p.Error != "" {
			m.LastError = p.Error
		}
	case EvTargetTornDown:
		// Only the target itself knows it released everything. An operator
		// vouching for a silent target is believed only once the target's
		// agent must have fenced itself: its lease expired plus FenceMargin
		// (clock drift and the time to stop a machine).
		if c.Actor.Kind == KindOperator {
			if w, ok := s.d.Workers[m.Target]; ok {
				if after := w.LeaseExpiry.Add(FenceMargin); c.Now.Before(after) {
					return refuse(RefuseConflict, CodeTargetMayRun,
						"target worker %s may still run the machine: its lease is valid until %s and its agent fences itself by then; confirm target_torn_down after %s (in %s)",
						m.Target, w.LeaseExpiry.UTC().Format(time.RFC3339), after.UTC().Format(time.RFC3339), after.Sub(c.Now).Round(time.Second))
				}
			}
		}
		m.Rollback.TargetTornDown = true
	case EvSourceRestored:
		// Invariant 2: the source restarts only after the target's teardown is committed.
		if m.Rollback == nil || !m.Rollback.TargetTornDown {
			return refuse(RefuseConflict, CodeNotTornDown,
				"migration %s: the target has not committed its teardown yet; the source must not restart the machine before it", m.ID)
		}
		m.Rollback.SourceRestored = true
		s.releaseLocks(m)
		if mach, ok := s.d.Machines[m.Machine]; ok {
			mach.State = MachineRunning
		}
		m.Stalled, m.StallCause = false, ""
	}
	m.State = to
	return nil
}

func (s *Store) releaseLocks(m *Migration) {
	for _, l := range m.lockNames() {
		if s.d.Locks[l] == m.ID {
			delete(s.d.Locks, l)
		}
	}
}

func validRanges(rs []Range) error {
	for _, r := range rs {
		if r.Off < 0 || r.Len <= 0 || r.End() < r.Off {
			return fmt.Errorf("range %d+%d is not valid", r.Off, r.Len)
		}
	}
	return nil
}

// ProgressDue reports whether a progress update would be applied; servers
// check it before proposing so rate-limited updates never reach the log.
// The limit is the store's alone: no client flag bypasses it.
func ProgressDue(m *Migration, p *Progress, now time.Time) bool {
	if p == nil {
		return false
	}
	if m.Progress == nil {
		return true
	}
	if p.TotalBytes > 0 && p.HydratedBytes >= p.TotalBytes {
		return true
	}
	if m.Progress.TotalBytes > 0 && p.TotalBytes > 0 &&
		int(m.Progress.Percent()/10) != int(100*float64(p.HydratedBytes)/float64(p.TotalBytes)/10) {
		return true // a new decile is a milestone
	}
	return now.Sub(m.Progress.UpdatedAt) >= ProgressInterval
}

func applyProgress(m *Migration, c *ProposeCmd) (ignored bool, ref *Refusal) {
	p := c.Payload.Progress
	if p == nil {
		return false, refuse(RefuseInvalid, CodeInvalid, "progress event without progress")
	}
	if p.HydratedBytes < 0 || p.TotalBytes < 0 || p.HydratedBytes > p.TotalBytes && p.TotalBytes > 0 {
		return false, refuse(RefuseInvalid, CodeInvalid, "progress %d of %d bytes is not valid", p.HydratedBytes, p.TotalBytes)
	}
	if !ProgressDue(m, p, c.Now) {
		return true, nil
	}
	pr := *p.Replicated()
	pr.UpdatedAt = c.Now
	m.Progress = &pr
	m.Stalled, m.StallCause = false, ""
	return false, nil
}

// applyExportMoved records the export's new portal and IQN.
func applyExportMoved(m *Migration, c *ProposeCmd) *Refusal {
	e := c.Payload.Export
	if e == nil || e.Portal == "" || e.IQN == "" {
		return refuse(RefuseInvalid, CodeInvalid, "export_moved needs export.portal and export.iqn")
	}
	if _, _, err := net.SplitHostPort(e.Portal); err != nil {
		return refuse(RefuseInvalid, CodeInvalid, "export.portal %q: want host:port", e.Portal)
	}
	cp := *e
	m.Export = &cp
	return nil
}

func applyReport(m *Migration, c *ProposeCmd) *Refusal {
	p := c.Payload
	if p.Error == "" && p.Stalled == nil {
		return refuse(RefuseInvalid, CodeInvalid, "report needs an error or a stalled flag")
	}
	if p.Error != "" {
		m.Attempts++
		m.LastError = truncate(p.Error, 1024)
	}
	if p.Stalled != nil {
		m.Stalled = *p.Stalled
		m.StallCause = ""
		if m.Stalled {
			m.StallCause = truncate(firstNonEmpty(p.Reason, p.Error), 1024)
		}
	}
	return nil
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

func firstNonEmpty(s ...string) string {
	for _, x := range s {
		if x != "" {
			return x
		}
	}
	return ""
}
