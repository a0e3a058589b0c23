package fsm

import (
	"encoding/binary"
	"fmt"
	"reflect"
	"slices"
)

// Authorization is one function over the command and the records, called
// twice: by the leader before it proposes (a refused command never enters
// the log) and by Apply on every replica (the log alone decides the state,
// so a command proposed on older records is checked again where it lands).
//
// The rules: workers act only on records that name them and write runtime
// state only (leases, volume state and layout, migration steps they hold a
// role in). Machine specs are written by operators only. Servers write what
// the leader's housekeeping needs (membership, server-role events, plans,
// destroying volumes past retention, GC) and nothing of a worker's: a
// server certificate cannot act as a worker. Every participant-written
// field is checked against the records it claims to describe.

// Authorize checks cmd (a *XxxCmd payload) against the current records
// without changing them.
func (s *Store) Authorize(cmd any) *Refusal {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.authorize(cmd)
}

func (s *Store) authorize(cmd any) *Refusal {
	if r := Validate(cmd); r != nil {
		return r
	}
	if c, ok := byPayload[reflect.TypeOf(cmd)]; ok && c.authorize != nil {
		return c.authorize(s, cmd)
	}
	return nil
}

func (s *Store) authorizeRegisterServer(c *RegisterServerCmd) *Refusal {
	if c.Actor.Kind != KindServer {
		return deny(c.Actor, "register a server")
	}
	return nil
}

func (s *Store) authorizeGC(c *GCCmd) *Refusal {
	if c.Actor.Kind != KindServer {
		return deny(c.Actor, "collect garbage (servers only)")
	}
	return nil
}

func (s *Store) authorizeRegisterWorker(c *RegisterWorkerCmd) *Refusal {
	if !c.Actor.isWorker(c.Worker.Name) && !c.Actor.operator() {
		return deny(c.Actor, "register worker "+c.Worker.Name)
	}
	for _, o := range s.d.Workers {
		if o.Name != c.Worker.Name && c.Worker.HostID != 0 && o.HostID == c.Worker.HostID {
			return refuse(RefuseConflict, CodeConflict, "host id %d is already used by worker %s", c.Worker.HostID, o.Name)
		}
	}
	return nil
}

func (s *Store) authorizeCreateMachine(c *CreateMachineCmd) *Refusal {
	if !c.Actor.operator() {
		return deny(c.Actor, "create a machine (its spec is written by operators only)")
	}
	if _, ok := s.d.Workers[c.Machine.Worker]; !ok {
		return notFound("worker", c.Machine.Worker)
	}
	return nil
}

func (s *Store) authorizeHeartbeat(c *HeartbeatCmd) *Refusal {
	if !c.Actor.isWorker(c.Name) && !c.Actor.operator() {
		return deny(c.Actor, "heartbeat for worker "+c.Name)
	}
	return nil
}

func (s *Store) authorizeCreateVolume(c *CreateVolumeCmd) *Refusal {
	if !c.Actor.isWorker(c.Volume.Worker) && !c.Actor.operator() {
		return deny(c.Actor, "create a volume on worker "+c.Volume.Worker)
	}
	if !c.Actor.operator() && c.Volume.AttachedMachine != "" {
		return deny(c.Actor, "attach a machine while creating a volume")
	}
	if _, ok := s.d.Workers[c.Volume.Worker]; !ok {
		return notFound("worker", c.Volume.Worker)
	}
	if old, ok := s.d.Volumes[c.Volume.ID]; ok && old.Worker != c.Volume.Worker {
		return refuse(RefuseConflict, CodeConflict, "volume %s already exists on worker %s", c.Volume.ID, old.Worker)
	}
	return nil
}

func (s *Store) authorizeUpdateVolume(c *UpdateVolumeCmd) *Refusal {
	v, ok := s.d.Volumes[c.ID]
	if !ok {
		return notFound("volume", c.ID)
	}
	if c.Actor.Kind == KindServer {
		return deny(c.Actor, "update volume "+c.ID+" (its worker or an operator may)")
	}
	if !c.Actor.operator() {
		if !c.Actor.isWorker(v.Worker) {
			return deny(c.Actor, "update volume "+c.ID+" of worker "+v.Worker)
		}
		// A worker reports growth an operator asked for, nothing else.
		if c.Size != nil && *c.Size != v.Size && (!v.Extending() || *c.Size != v.WantSize) {
			return deny(c.Actor, fmt.Sprintf("set the size of volume %s to %d (it may only report the size an operator's extend asked for)", c.ID, *c.Size))
		}
		if c.AttachedMachine != nil && *c.AttachedMachine != "" {
			if m, ok := s.d.Machines[*c.AttachedMachine]; ok && m.Worker != v.Worker {
				return deny(c.Actor, "attach machine "+m.ID+" of worker "+m.Worker+" to volume "+c.ID)
			}
		}
	}
	return nil
}

func (s *Store) authorizeExtendVolume(c *ExtendVolumeCmd) *Refusal {
	if !c.Actor.operator() {
		return deny(c.Actor, "extend volume "+c.ID+" (operators only)")
	}
	return s.extendRefusal(c)
}

func (s *Store) authorizeForkVolume(c *ForkVolumeCmd) *Refusal {
	if !c.Actor.operator() {
		return deny(c.Actor, "fork volume "+c.Source+" (operators only)")
	}
	return s.forkRefusal(c)
}

func (s *Store) authorizeForkServe(c *ForkServeCmd) *Refusal {
	v, ok := s.d.Volumes[c.ID]
	if !ok {
		return notFound("volume", c.ID)
	}
	if !v.RemoteFork() || !c.Actor.isWorker(v.ForkFrom) {
		return deny(c.Actor, "serve the copy of volume "+c.ID+" (only the worker making a fork to another worker may)")
	}
	return s.forkServeRefusal(v, c)
}

func (s *Store) authorizeDestroyVolume(c *DestroyVolumeCmd) *Refusal {
	if v, ok := s.d.Volumes[c.ID]; ok && !c.Actor.privileged() && !c.Actor.isWorker(v.Worker) {
		return deny(c.Actor, "destroy volume "+c.ID+" of worker "+v.Worker)
	}
	return nil
}

func (s *Store) authorizeSetVolumeKey(c *SetVolumeKeyCmd) *Refusal {
	if v, ok := s.d.Volumes[c.ID]; ok && !c.Actor.isWorker(v.Worker) && !c.Actor.operator() {
		return deny(c.Actor, "set the key of volume "+c.ID)
	}
	return nil
}

func (s *Store) authorizeKeyAccess(c *KeyAccessCmd) *Refusal {
	if c.Actor.Kind != KindWorker {
		return deny(c.Actor, "read volume keys (only the owning or target worker may)")
	}
	return nil
}

func (s *Store) authorizeRevokeCert(c *RevokeCertCmd) *Refusal {
	if c.Actor.Kind != KindOperator {
		return deny(c.Actor, "revoke certificates (operators only)")
	}
	if _, err := NormalizeSerial(c.Serial); err != nil {
		return refuse(RefuseInvalid, CodeInvalid, "serial %q: %v", c.Serial, err)
	}
	return nil
}

func (s *Store) authorizeSetWorkerKey(c *SetWorkerKeyCmd) *Refusal {
	if !c.Actor.isWorker(c.Name) {
		return deny(c.Actor, "register the key of worker "+c.Name+" (only that worker may)")
	}
	return nil
}

func (s *Store) authorizeSetRecoveryKey(c *SetRecoveryKeyCmd) *Refusal {
	if c.Actor.Kind != KindOperator {
		return deny(c.Actor, "set the recovery key (only operators may)")
	}
	return nil
}

// authorizePutEnvelopes admits, before the log, only the volume's worker,
// the source of the migration that locks it, or an operator; who may seal
// which purpose is checked envelope by envelope when applied.
func (s *Store) authorizePutEnvelopes(c *PutEnvelopesCmd) *Refusal {
	v, ok := s.d.Volumes[c.Volume]
	if !ok {
		return notFound("volume", c.Volume)
	}
	if !c.Actor.operator() && !c.Actor.isWorker(v.Worker) && !(v.makingForkKey() && c.Actor.isWorker(v.ForkFrom)) {
		return deny(c.Actor, "store key envelopes of volume "+c.Volume+" of worker "+v.Worker)
	}
	return nil
}

func (s *Store) authorizeUpdateMachine(c *UpdateMachineCmd) *Refusal {
	m, ok := s.d.Machines[c.ID]
	if !ok {
		return notFound("machine", c.ID)
	}
	if c.Actor.Kind == KindServer {
		return deny(c.Actor, "update machine "+c.ID+" (its worker or an operator may)")
	}
	if !c.Actor.operator() {
		if !c.Actor.isWorker(m.Worker) {
			return deny(c.Actor, "update machine "+c.ID+" of worker "+m.Worker)
		}
		if c.Spec != nil || c.Volume != nil || c.Addr6PN != nil {
			return deny(c.Actor, "change the spec, volume or address of machine "+c.ID+" (operators only; workers report its state)")
		}
	}
	if c.Addr6PN != nil && *c.Addr6PN != "" {
		next := *m
		next.Addr6PN = *c.Addr6PN
		if r := next.validate(); r != nil {
			return r
		}
	}
	return nil
}

func (s *Store) authorizePlan(c *PlanCmd) *Refusal {
	if !c.Actor.privileged() {
		return deny(c.Actor, "plan a migration (operator or server certificate needed)")
	}
	return nil
}

func (s *Store) authorizeCordon(c *CordonCmd) *Refusal {
	if !c.Actor.operator() {
		return deny(c.Actor, "cordon or uncordon worker "+c.Worker+" (operators only)")
	}
	return nil
}

func (s *Store) authorizeDrain(c *DrainCmd) *Refusal {
	if !c.Actor.operator() {
		return deny(c.Actor, "drain worker "+c.Worker+" (operators only)")
	}
	return nil
}

// authorizeDrainUpdate lets the leader's drainer place and finish; an
// operator only cancels.
func (s *Store) authorizeDrainUpdate(c *DrainUpdateCmd) *Refusal {
	switch {
	case c.Actor.Kind == KindServer:
	case c.Actor.operator() && len(c.Start) == 0 && c.Finish == DrainCancelled:
	default:
		return deny(c.Actor, "update drain "+c.ID+" (servers run drains; operators may only cancel one)")
	}
	return nil
}

func (id Identity) operator() bool { return id.Kind == KindOperator }

// isWorker reports whether id is the worker named name.
func (id Identity) isWorker(name string) bool { return id.Kind == KindWorker && id.Name == name }

func deny(actor Identity, what string) *Refusal {
	return refuse(RefuseForbidden, CodeForbidden, "%s may not %s", actor, what)
}

// authorizePropose checks the proposer's role and the fields it reports.
func (s *Store) authorizePropose(c *ProposeCmd) *Refusal {
	m, ok := s.d.Migrations[c.ID]
	if !ok {
		return notFound("migration", c.ID)
	}
	tr, isTr := Lookup(c.Event)
	an, isAn := lookupAnnotation(c.Event)
	if !isTr && !isAn {
		return refuse(RefuseInvalid, CodeInvalid, "unknown event %q", c.Event)
	}
	need := tr.Roles
	if isAn {
		need = an.Roles
	}
	if !allowed(RolesOf(c.Actor, m), need) {
		r := refuse(RefuseForbidden, CodeForbidden, "%s may not propose %s on migration %s (needs role %v; source is %s, target is %s)",
			c.Actor, c.Event, m.ID, need, m.Source, m.Target)
		r.State = m.State
		return r
	}
	if _, dup := m.step(c.StepID); dup {
		return nil // a retry answers with the first result, whatever changed since
	}
	if r := stateGuard(m, c.Event, tr, isAn, an); r != nil {
		r.State = m.State
		return r
	}
	if r := s.checkReported(m, c); r != nil {
		r.State = m.State
		return r
	}
	return nil
}

// stateGuard refuses an event the migration's state does not accept, with
// the same refusal Apply gives.
func stateGuard(m *Migration, ev Event, tr Transition, isAn bool, an Annotation) *Refusal {
	if isAn {
		if !slices.Contains(an.In, m.State) {
			return refuse(RefuseConflict, CodeWrongState, "event %s is not accepted in state %s", ev, m.State)
		}
		return nil
	}
	if (ev == EvAbort || ev == EvFailed) && m.State.AfterCutover() {
		return refuse(RefuseConflict, CodePastCutover,
			"migration %s is %s, past cutover (the target already writes): it cannot be aborted, only driven forward", m.ID, m.State)
	}
	if m.State == RollingBack && (ev == EvAbort || ev == EvFailed) {
		return refuse(RefuseConflict, CodeWrongState, "migration %s is already rolling back", m.ID)
	}
	if _, err := Next(m.State, ev); err != nil {
		return refuse(RefuseConflict, CodeWrongState, "migration %s is %s: %s expects %v", m.ID, m.State, ev, tr.From)
	}
	return nil
}

// checkExport accepts an export at the source worker's registered address
// naming migration m.
func (s *Store) checkExport(m *Migration, ev Event, e *Export) *Refusal {
	if e == nil || e.Portal == "" || e.IQN == "" {
		return refuse(RefuseInvalid, CodeInvalid, "%s needs export.portal and export.iqn", ev)
	}
	if r := checkPortal(s.d.Workers[m.Source], e.Portal); r != nil {
		return r
	}
	return checkIQN(m, e.IQN)
}

// checkReported holds every field a participant reports to what the records
// say it must be.
func (s *Store) checkReported(m *Migration, c *ProposeCmd) *Refusal {
	p := &c.Payload
	if p.Layout != nil {
		if err := p.Layout.Validate(); err != nil {
			return refuse(RefuseInvalid, CodeInvalid, "layout: %v", err)
		}
	}
	switch c.Event {
	case EvTargetPrepared:
		if m.Layout == nil {
			return nil // refused by the transition itself: nothing can be prepared yet
		}
		if p.TargetVolume == "" {
			return refuse(RefuseInvalid, CodeInvalid, "target_prepared needs the target_volume the target registered")
		}
		v, ok := s.d.Volumes[p.TargetVolume]
		switch {
		case !ok:
			return notFound("target volume", p.TargetVolume)
		case v.Worker != m.Target:
			return refuse(RefuseForbidden, CodeForbidden, "target volume %s is on worker %s, not on the migration's target %s", v.ID, v.Worker, m.Target)
		case v.ID == m.Volume:
			return refuse(RefuseInvalid, CodeInvalid, "the target volume cannot be the migrated volume")
		case v.AttachedMachine != "" && v.AttachedMachine != m.Machine:
			return refuse(RefuseConflict, CodeAttached, "target volume %s is attached to machine %s", v.ID, v.AttachedMachine)
		case v.State == VolPendingDelete || v.State == VolDestroyed:
			return refuse(RefuseConflict, CodeWrongState, "target volume %s is %s", v.ID, v.State)
		}
	case EvExported:
		if r := s.checkExport(m, c.Event, p.Export); r != nil {
			return r
		}
		if r := s.checkKnownZero(m, p.KnownZero); r != nil {
			return r
		}
	case EvExportStarted, EvExportMoved:
		// Held to what exported is held to: the target logs in there.
		if r := s.checkExport(m, c.Event, p.Export); r != nil {
			return r
		}
	case EvTrimmed:
		if r := s.checkKnownZero(m, p.KnownZero); r != nil {
			return r
		}
	case EvCutover:
		if p.New6PN != "" {
			if r := s.checkNew6PN(m, p.New6PN); r != nil {
				return r
			}
		}
	case EvProgress, EvHydrated:
		if pr := p.Progress; pr != nil {
			if pr.HydratedBytes < 0 || pr.TotalBytes < 0 || pr.FetchedBytes < 0 || pr.SkippedBytes < 0 ||
				pr.RateBPS < 0 || pr.ETASeconds < 0 || pr.TotalBytes > 0 && pr.HydratedBytes > pr.TotalBytes {
				return refuse(RefuseInvalid, CodeInvalid, "progress %d of %d bytes is not valid", pr.HydratedBytes, pr.TotalBytes)
			}
		}
	}
	if len(p.KnownZero) > 0 && c.Event != EvExported && c.Event != EvTrimmed {
		return refuse(RefuseInvalid, CodeInvalid, "%s carries no known_zero ranges", c.Event)
	}
	return nil
}

func (s *Store) checkKnownZero(m *Migration, rs []Range) *Refusal {
	var size int64
	if v, ok := s.d.Volumes[m.Volume]; ok {
		size = v.Size
	}
	lo, hi := DataArea(m, size)
	return checkRanges(rs, lo, hi)
}

// checkNew6PN accepts only the machine's address rebuilt on the target:
// same org network and machine number, the target's host id.
func (s *Store) checkNew6PN(m *Migration, addr string) *Refusal {
	got, err := parse6PN(addr)
	if err != nil {
		return refuse(RefuseInvalid, CodeInvalid, "new_6pn: %v", err)
	}
	mach, ok := s.d.Machines[m.Machine]
	if !ok {
		return notFound("machine", m.Machine)
	}
	dst, ok := s.d.Workers[m.Target]
	if !ok {
		return notFound("target worker", m.Target)
	}
	// The address the machine had when planned carries its org and number
	// (the store keeps it consistent with the record's numbers); a machine
	// registered without an address has only the numbers.
	org, no := mach.Network, mach.MachineNo
	if old, err := parse6PN(m.Old6PN); err == nil {
		org, no = binary.BigEndian.Uint32(old[2:6]), binary.BigEndian.Uint32(old[10:14])
	}
	want, ok := expected6PN(org, dst.HostID, no)
	if !ok || want.As16() != got {
		return refuse(RefuseInvalid, CodeInvalid, "new_6pn %s is not machine %s's address on worker %s (org %d, host %d, machine %d)",
			addr, mach.ID, dst.Name, org, dst.HostID, no)
	}
	return nil
}

// Reads. A worker sees the records that name it: itself, its volumes and
// machines, the migrations it is source or target of, and what those
// migrations name (the peer worker, both volumes, the machine). A machine's
// spec (command, environment) is shown to its owner, to the target of its
// active migration (which is about to run it) and to operators and servers.

// Scope is what one identity may read.
type Scope struct {
	all        bool
	worker     string
	workers    map[string]bool
	volumes    map[string]bool
	machines   map[string]bool
	migrations map[string]bool
	specs      map[string]bool // machines whose spec it may read
}

// ScopeOf returns the records id may read, as of now.
func (s *Store) ScopeOf(id Identity) *Scope {
	if id.privileged() {
		return &Scope{all: true}
	}
	sc := &Scope{worker: id.Name, workers: map[string]bool{}, volumes: map[string]bool{}, machines: map[string]bool{},
		migrations: map[string]bool{}, specs: map[string]bool{}}
	if id.Kind != KindWorker {
		return sc // an unknown kind reads nothing
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	sc.workers[id.Name] = true
	// The per-worker indexes hold exactly the records naming the worker:
	// every request of every agent builds a scope, so it must cost what
	// the worker owns, not the whole fleet and its history.
	for vid := range s.idx.volByWorker[id.Name] {
		sc.volumes[vid] = true
	}
	// A worker making or serving another worker's fork reads the fork and
	// that worker (its key to seal to, its address to admit).
	for vid := range s.idx.forkFrom[id.Name] {
		if v, ok := s.d.Volumes[vid]; ok && v.ForkServed() && v.ForkFrom == id.Name {
			sc.volumes[vid] = true
			sc.workers[v.Worker] = true
		}
	}
	for mid := range s.idx.machByWorker[id.Name] {
		sc.machines[mid] = true
		sc.specs[mid] = true
	}
	for mid := range s.idx.migByWorker[id.Name] {
		m := s.d.Migrations[mid]
		sc.migrations[m.ID] = true
		sc.workers[m.Source], sc.workers[m.Target] = true, true
		sc.volumes[m.Volume] = true
		if m.TargetVol != "" {
			sc.volumes[m.TargetVol] = true
		}
		sc.machines[m.Machine] = true
		if m.Target == id.Name && m.Active() {
			sc.specs[m.Machine] = true
		}
	}
	return sc
}

// All reports whether the scope is unrestricted (operators, servers).
func (sc *Scope) All() bool { return sc.all }

// Worker returns the worker the scope belongs to ("" when unrestricted).
func (sc *Scope) Worker() string { return sc.worker }

// CanReadX report whether the scope may read record X.
func (sc *Scope) CanReadWorker(name string) bool  { return sc.all || sc.workers[name] }
func (sc *Scope) CanReadVolume(id string) bool    { return sc.all || sc.volumes[id] }
func (sc *Scope) CanReadMachine(id string) bool   { return sc.all || sc.machines[id] }
func (sc *Scope) CanReadMigration(id string) bool { return sc.all || sc.migrations[id] }
func (sc *Scope) CanReadLock(holder string) bool  { return sc.all || sc.migrations[holder] }
func (sc *Scope) CanReadSpec(machine string) bool { return sc.all || sc.specs[machine] }

// Machine returns m as the scope may see it: without its spec unless the
// reader may run or manage it.
func (sc *Scope) Machine(m Machine) Machine {
	if !sc.CanReadSpec(m.ID) {
		m.Spec = nil
	}
	return m
}

// Workers keeps the workers the scope may read.
func (sc *Scope) Workers(ws []Worker) []Worker {
	return keep(ws, func(w Worker) bool { return sc.CanReadWorker(w.Name) })
}

// Volumes keeps the volumes the scope may read.
func (sc *Scope) Volumes(vs []Volume) []Volume {
	return keep(vs, func(v Volume) bool { return sc.CanReadVolume(v.ID) })
}

// Machines keeps the machines the scope may read, specs redacted.
func (sc *Scope) Machines(ms []Machine) []Machine {
	out := keep(ms, func(m Machine) bool { return sc.CanReadMachine(m.ID) })
	for i := range out {
		out[i] = sc.Machine(out[i])
	}
	return out
}

// Migrations keeps the migrations the scope may read.
func (sc *Scope) Migrations(ms []*Migration) []*Migration {
	return keep(ms, func(m *Migration) bool { return sc.CanReadMigration(m.ID) })
}

// Drains keeps the drains the scope may read: a worker sees only the
// drains of itself (a drain names other workers' placements).
func (sc *Scope) Drains(ds []*Drain) []*Drain {
	return keep(ds, func(d *Drain) bool {
		return sc.all || (sc.worker != "" && d.Worker == sc.worker && sc.workers[sc.worker])
	})
}

func keep[T any](in []T, ok func(T) bool) []T {
	out := slices.DeleteFunc(slices.Clone(in), func(x T) bool { return !ok(x) })
	if out == nil {
		out = []T{}
	}
	return out
}
