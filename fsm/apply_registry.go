package fsm

import (
	"fmt"
	"slices"
	"time"
)

// The registry commands. Workers may only touch their own records; servers
// and operators may touch anything.

func forbidden(actor Identity, what string) *Result {
	return &Result{Refusal: refuse(RefuseForbidden, CodeForbidden, "%s may not %s", actor, what)}
}

func (s *Store) applyRegisterServer(c *RegisterServerCmd) *Result {
	if c.Actor.Kind != KindServer {
		return forbidden(c.Actor, "register a server")
	}
	if c.Remove {
		delete(s.d.Servers, c.Member.ID)
		return &Result{}
	}
	if c.Member.ID == "" || c.Member.RaftAddr == "" {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "server member needs an id and a raft address")}
	}
	m := c.Member
	s.d.Servers[m.ID] = &m
	return &Result{}
}

func leaseTTL(d time.Duration) time.Duration { return ClampLeaseTTL(d) }

func (s *Store) applyRegisterWorker(c *RegisterWorkerCmd) *Result {
	w := c.Worker
	if !c.Actor.privileged() && c.Actor.Name != w.Name {
		return forbidden(c.Actor, "register worker "+w.Name)
	}
	if w.Name == "" {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "worker name is empty")}
	}
	for _, o := range s.d.Workers {
		if o.Name != w.Name && w.HostID != 0 && o.HostID == w.HostID {
			return &Result{Refusal: refuse(RefuseConflict, CodeConflict, "host id %d is already used by worker %s", w.HostID, o.Name)}
		}
	}
	// The key-encryption key is set by that worker alone (set_worker_key,
	// with its checks); a registration never carries or clears it.
	w.KEK = nil
	if old, ok := s.d.Workers[w.Name]; ok {
		w.Registered = old.Registered
		// A restarted agent re-registers: the cordon is the operator's and
		// stays; a report it did not send yet keeps the last one.
		w.Cordoned, w.CordonReason = old.Cordoned, old.CordonReason
		if w.Report == nil {
			w.Report = old.Report
		}
		w.KEK = old.KEK
	} else {
		w.Registered = c.Now
		w.Cordoned, w.CordonReason = false, ""
	}
	if err := validReport(w.Report); err != nil {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "worker %s: %v", w.Name, err)}
	}
	w.LeaseExpiry = c.Now.Add(leaseTTL(c.LeaseTTL))
	s.d.Workers[w.Name] = &w
	cp := w
	return &Result{Worker: &cp}
}

func (s *Store) applyHeartbeat(c *HeartbeatCmd) *Result {
	if !c.Actor.privileged() && c.Actor.Name != c.Name {
		return forbidden(c.Actor, "heartbeat for worker "+c.Name)
	}
	w, ok := s.d.Workers[c.Name]
	if !ok {
		return &Result{Refusal: notFound("worker", c.Name)}
	}
	if err := validReport(c.Report); err != nil {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "worker %s: %v", c.Name, err)}
	}
	if exp := c.Now.Add(leaseTTL(c.LeaseTTL)); exp.After(w.LeaseExpiry) {
		w.LeaseExpiry = exp
	}
	if c.Report != nil {
		r := *c.Report
		w.Report = &r
	}
	cp := *w
	return &Result{Worker: &cp}
}

func validID(id string) bool { return ValidID(id) }

func (s *Store) applyCreateVolume(c *CreateVolumeCmd) *Result {
	v := c.Volume
	if !c.Actor.privileged() && c.Actor.Name != v.Worker {
		return forbidden(c.Actor, "create a volume on worker "+v.Worker)
	}
	if !validID(v.ID) || v.Worker == "" || v.Size < 0 {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "volume needs an id (no spaces or slashes), a worker and a size >= 0")}
	}
	if v.Layout != nil {
		if err := v.Layout.Validate(); err != nil {
			return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "volume %s: %v", v.ID, err)}
		}
	}
	if old, ok := s.d.Volumes[v.ID]; ok {
		if old.Worker == v.Worker && old.Size == v.Size {
			cp := copyVolume(old) // a retried create: same answer
			return &Result{Volume: &cp}
		}
		return &Result{Refusal: refuse(RefuseConflict, CodeConflict, "volume %s already exists on worker %s", v.ID, old.Worker)}
	}
	if _, ok := s.d.Workers[v.Worker]; !ok {
		return &Result{Refusal: notFound("worker", v.Worker)}
	}
	if v.State == "" {
		v.State = VolCreating
	}
	if _, ok := volumeMoves[v.State]; !ok || v.State == VolDestroyed || v.State == VolPendingDelete {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "a new volume cannot start in state %q", v.State)}
	}
	v.CreatedAt = c.Now
	v.DestroyAfter = time.Time{}
	v.HasKey = false
	v.WantSize = 0 // only extend_volume asks for growth
	v.ForkOf = ""  // only fork_volume makes a fork
	s.d.Volumes[v.ID] = &v
	s.idx.addVolume(v.ID, v.Worker)
	cp := copyVolume(&v)
	return &Result{Volume: &cp}
}

func (s *Store) applyUpdateVolume(c *UpdateVolumeCmd) *Result {
	v, ok := s.d.Volumes[c.ID]
	if !ok {
		return &Result{Refusal: notFound("volume", c.ID)}
	}
	if !c.Actor.privileged() && c.Actor.Name != v.Worker {
		return forbidden(c.Actor, "update volume "+c.ID+" of worker "+v.Worker)
	}
	if c.State != nil && *c.State != v.State {
		if *c.State == VolDestroyed || *c.State == VolPendingDelete {
			return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "use destroy to destroy volume %s", c.ID)}
		}
		if !slices.Contains(volumeMoves[v.State], *c.State) {
			return &Result{Refusal: refuse(RefuseConflict, CodeWrongState, "volume %s cannot go from %s to %s", c.ID, v.State, *c.State)}
		}
	}
	if c.Layout != nil {
		if err := c.Layout.Validate(); err != nil {
			return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "volume %s: %v", c.ID, err)}
		}
	}
	if c.AttachedMachine != nil && *c.AttachedMachine != "" {
		if _, ok := s.d.Machines[*c.AttachedMachine]; !ok {
			return &Result{Refusal: notFound("machine", *c.AttachedMachine)}
		}
		if v.State == VolDestroyed || v.State == VolPendingDelete {
			return &Result{Refusal: refuse(RefuseConflict, CodeWrongState, "volume %s is %s: it cannot be attached", c.ID, v.State)}
		}
	}
	if c.State != nil {
		v.State = *c.State
		if v.State != VolPendingDelete {
			v.DestroyAfter = time.Time{}
		}
	}
	if c.Layout != nil {
		l := *c.Layout
		v.Layout = &l
	}
	if c.AttachedMachine != nil {
		v.AttachedMachine = *c.AttachedMachine
	}
	if c.Size != nil && *c.Size >= 0 {
		v.Size = *c.Size
		if v.WantSize <= v.Size {
			v.WantSize = 0 // the requested growth is done
		}
	}
	cp := copyVolume(v)
	return &Result{Volume: &cp}
}

// extendRefusal says why c cannot apply to the records, or nil. A shrink is
// refused (ext4 cannot shrink online and a LUKS2 segment would lose its
// tail); so is a volume in a migration: extending it is refused, not
// queued, because the clone on the target is sized from the source.
func (s *Store) extendRefusal(c *ExtendVolumeCmd) *Refusal {
	v, ok := s.d.Volumes[c.ID]
	if !ok {
		return notFound("volume", c.ID)
	}
	switch {
	case v.State == VolDestroyed || v.State == VolPendingDelete:
		return refuse(RefuseConflict, CodeWrongState, "volume %s is %s: it cannot be extended", v.ID, v.State)
	case v.State != VolCreated:
		return refuse(RefuseConflict, CodeWrongState, "volume %s is %s: only a created volume can be extended; retry once it is created", v.ID, v.State)
	case c.Size < v.Size:
		return refuse(RefuseInvalid, CodeInvalid, "volume %s is %d bytes: shrinking to %d is refused (an ext4 filesystem cannot shrink online and the LUKS2 segment would lose its tail); create a smaller volume and copy the data instead", v.ID, v.Size, c.Size)
	case v.Extending() && c.Size != v.WantSize:
		return refuse(RefuseConflict, CodeConflict, "volume %s is already being extended to %d bytes: wait for it (volume show), then extend again", v.ID, v.WantSize)
	}
	if f, ok := s.forking(v.ID); ok {
		return refuse(RefuseConflict, CodeWrongState, "volume %s is being forked into %s: extend it once the fork is created", v.ID, f.ID)
	}
	if id, ok := s.d.Locks["volume/"+v.ID]; ok {
		return refuse(RefuseConflict, CodeLocked, "volume %s is in migration %s: extending is refused, not queued; extend it once the migration ended (or abort it)", v.ID, id)
	}
	return nil
}

// applyExtendVolume records the requested size; the owning worker grows the
// volume and reports it. Asking again for the size it has or is growing to
// answers the same record.
func (s *Store) applyExtendVolume(c *ExtendVolumeCmd) *Result {
	if r := s.extendRefusal(c); r != nil {
		return &Result{Refusal: r}
	}
	v := s.d.Volumes[c.ID]
	if c.Size > v.Size {
		v.WantSize = c.Size
	}
	cp := copyVolume(v)
	return &Result{Volume: &cp}
}

// forkRefusal says why c cannot apply to the records, or nil. The source's
// worker makes the copy, so a fork to another worker is refused for now; a
// source in migration or growing is refused, not queued.
func (s *Store) forkRefusal(c *ForkVolumeCmd) *Refusal {
	src, ok := s.d.Volumes[c.Source]
	if !ok {
		return notFound("volume", c.Source)
	}
	if old, ok := s.d.Volumes[c.ID]; ok {
		if old.ForkOf == c.Source && old.Worker == c.Worker {
			return nil // a retried fork: same answer
		}
		return refuse(RefuseConflict, CodeConflict, "volume %s already exists on worker %s", c.ID, old.Worker)
	}
	if _, ok := s.d.Workers[c.Worker]; !ok {
		return notFound("worker", c.Worker)
	}
	switch {
	case src.State != VolCreated:
		return refuse(RefuseConflict, CodeWrongState, "volume %s is %s: only a created volume can be forked", src.ID, src.State)
	case src.Layout == nil:
		return refuse(RefuseConflict, CodeLayoutNeeded, "volume %s has no recorded layout yet: fork it once its worker formatted it", src.ID)
	case src.Extending():
		return refuse(RefuseConflict, CodeWrongState, "volume %s is being extended to %d bytes: fork it once its worker reported the new size", src.ID, src.WantSize)
	}
	if id, ok := s.d.Locks["volume/"+src.ID]; ok {
		return refuse(RefuseConflict, CodeLocked, "volume %s is in migration %s: forking is refused, not queued; fork it once the migration ended (or abort it)", src.ID, id)
	}
	if c.Worker != src.Worker {
		// Both agents act: the source's worker copies and serves, the
		// fork's worker clones and hydrates.
		dst := s.d.Workers[c.Worker]
		switch {
		case dst.Cordoned:
			return refuse(RefuseConflict, CodeCordoned, "worker %s is cordoned (%s): it takes no new volumes; uncordon it or fork elsewhere", dst.Name, dst.CordonReason)
		case !dst.Alive(c.Now):
			return refuse(RefuseConflict, CodeAdmission, "worker %s has no valid lease (last until %s): is its agent running?", dst.Name, dst.LeaseExpiry.UTC().Format(time.RFC3339))
		case dst.KEK == nil:
			return refuse(RefuseConflict, CodeConflict, "worker %s registered no key-encryption key: the fork's key cannot be sealed to it", dst.Name)
		}
		if w, ok := s.d.Workers[src.Worker]; !ok || !w.Alive(c.Now) {
			return refuse(RefuseConflict, CodeAdmission, "worker %s (volume %s's) has no valid lease: its agent must run to make the fork's copy", src.Worker, src.ID)
		}
	}
	return nil
}

// applyForkVolume registers the fork; the source's worker copies the data.
func (s *Store) applyForkVolume(c *ForkVolumeCmd) *Result {
	if r := s.forkRefusal(c); r != nil {
		return &Result{Refusal: r}
	}
	if old, ok := s.d.Volumes[c.ID]; ok {
		cp := copyVolume(old)
		return &Result{Volume: &cp}
	}
	src := s.d.Volumes[c.Source]
	v := &Volume{ID: c.ID, Worker: c.Worker, Size: src.Size, State: VolCreating, ForkOf: src.ID, CreatedAt: c.Now}
	if c.Worker != src.Worker {
		v.ForkFrom = src.Worker
	}
	s.d.Volumes[v.ID] = v
	s.idx.addVolume(v.ID, v.Worker)
	if v.RemoteFork() {
		add(s.idx.forkFrom, v.ForkFrom, v.ID)
	}
	cp := copyVolume(v)
	return &Result{Volume: &cp}
}

// forkServeRefusal says why c cannot apply to fork v, or nil. The copy is
// published once, while the fork is being made; a publication of the same
// copy at a new portal (its worker restarted) is accepted. It is released
// only once the fork's worker no longer reads it.
func (s *Store) forkServeRefusal(v *Volume, c *ForkServeCmd) *Refusal {
	if v.ForkReleased {
		if c.Released {
			return nil // a retried release: same answer
		}
		return refuse(RefuseConflict, CodeWrongState, "volume %s: its copy was released; it is served no more", v.ID)
	}
	if c.Released {
		if v.Forking() {
			return refuse(RefuseConflict, CodeWrongState, "volume %s is still being forked (its worker %s hydrates from this copy): release it once the fork is created or destroyed", v.ID, v.Worker)
		}
		return nil
	}
	if !v.Forking() {
		return refuse(RefuseConflict, CodeWrongState, "volume %s is %s: its copy is no longer served", v.ID, v.State)
	}
	if v.Layout != nil && *v.Layout != *c.Layout {
		return refuse(RefuseConflict, CodeConflict, "volume %s: the fork's copy was published with another layout; a copy is published once", v.ID)
	}
	// The copy has the source's geometry: the fork's worker sizes its
	// destination from this layout and must not be made to allocate more.
	if size := c.Layout.DeviceSize(); size != v.Size {
		return refuse(RefuseInvalid, CodeInvalid, "volume %s is %d bytes but the published copy's layout spans %d", v.ID, v.Size, size)
	}
	for _, r := range c.KnownZero {
		if r.End() > v.Size {
			return refuse(RefuseInvalid, CodeInvalid, "volume %s: known-zero range %d+%d ends past its %d bytes", v.ID, r.Off, r.Len, v.Size)
		}
	}
	if !v.HasKey {
		return refuse(RefuseConflict, CodeConflict, "volume %s: seal the fork's key to worker %s (owner envelope) before serving its copy", v.ID, v.Worker)
	}
	return nil
}

// applyForkServe records where a remote fork's copy is served, or that it
// was released.
func (s *Store) applyForkServe(c *ForkServeCmd) *Result {
	v, ok := s.d.Volumes[c.ID]
	if !ok {
		return &Result{Refusal: notFound("volume", c.ID)}
	}
	if !v.RemoteFork() || c.Actor.Kind != KindWorker || c.Actor.Name != v.ForkFrom {
		return forbidden(c.Actor, "serve the copy of volume "+c.ID)
	}
	if r := s.forkServeRefusal(v, c); r != nil {
		return &Result{Refusal: r}
	}
	if c.Released {
		v.ForkExport, v.ForkKnownZero, v.ForkReleased = nil, nil, true
		remove(s.idx.forkFrom, v.ForkFrom, v.ID)
	} else {
		l, e := *c.Layout, *c.Export
		v.Layout, v.ForkExport = &l, &e
		v.ForkKnownZero = append([]Range(nil), c.KnownZero...)
	}
	cp := copyVolume(v)
	return &Result{Volume: &cp}
}

// forking returns a fork of vol whose point-in-time copy is still being
// made, if any: until then vol must stay where it is and keep its size. A
// remote fork's copy is made (its layout recorded) before it hydrates.
func (s *Store) forking(vol string) (*Volume, bool) {
	for _, v := range s.d.Volumes {
		if v.ForkOf == vol && v.Forking() && v.Layout == nil {
			return v, true
		}
	}
	return nil, false
}

// attachedRunning returns the running machine using v, if any.
func (s *Store) attachedRunning(v *Volume) (*Machine, bool) {
	if v.AttachedMachine != "" {
		if m, ok := s.d.Machines[v.AttachedMachine]; ok {
			return m, true
		}
	}
	for _, m := range s.d.Machines {
		if m.Volume == v.ID && m.Worker == v.Worker && m.State == MachineRunning {
			return m, true
		}
	}
	return nil, false
}

func (s *Store) applyDestroyVolume(c *DestroyVolumeCmd) *Result {
	v, ok := s.d.Volumes[c.ID]
	if !ok {
		return &Result{Refusal: notFound("volume", c.ID)}
	}
	if !c.Actor.privileged() && c.Actor.Name != v.Worker {
		return forbidden(c.Actor, "destroy volume "+c.ID+" of worker "+v.Worker)
	}
	if m, ok := s.attachedRunning(v); ok {
		return &Result{Refusal: refuse(RefuseConflict, CodeAttached,
			"volume %s is attached to machine %s (%s on %s): stop the machine and detach the volume before destroying it", v.ID, m.ID, m.State, m.Worker)}
	}
	if id, ok := s.d.Locks["volume/"+v.ID]; ok {
		return &Result{Refusal: refuse(RefuseConflict, CodeLocked, "volume %s is locked by migration %s: wait for it or abort it", v.ID, id)}
	}
	switch v.State {
	case VolDestroyed:
		cp := copyVolume(v)
		return &Result{Volume: &cp}
	case VolPendingDelete:
		// Invariant 3: destroyed only once the retention deadline passed.
		if c.Now.Before(v.DestroyAfter) {
			return &Result{Refusal: refuse(RefuseConflict, CodeWrongState, "volume %s is kept until %s (retention)", v.ID, v.DestroyAfter.UTC().Format(time.RFC3339))}
		}
		v.State = VolDestroyed
		s.dropEnvelopes(v.ID)
		v.HasKey = false
	default:
		ret := c.Retention
		if ret <= 0 {
			ret = DefaultDestroyRetention
		}
		v.State = VolPendingDelete
		v.DestroyAfter = c.Now.Add(ret)
	}
	cp := copyVolume(v)
	return &Result{Volume: &cp}
}

// applyRetiredKey applies a retired plaintext-key command from an old log
// as a no-op: the key it may carry is dropped, never stored.
func (s *Store) applyRetiredKey(typ CommandType, h Header, volume string) *Result {
	s.log.Warn().Str("type", string(typ)).Str("volume", volume).Str("actor", h.Actor.String()).
		Msg("ignored a retired plaintext-key command from an old log")
	return &Result{Ignored: true}
}

func (s *Store) applyCreateMachine(c *CreateMachineCmd) *Result {
	m := c.Machine
	if !c.Actor.privileged() && c.Actor.Name != m.Worker {
		return forbidden(c.Actor, "create a machine on worker "+m.Worker)
	}
	if !validID(m.ID) || m.Worker == "" {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "machine needs an id (no spaces or slashes) and a worker")}
	}
	if old, ok := s.d.Machines[m.ID]; ok {
		if old.Worker == m.Worker && old.Volume == m.Volume {
			cp := *old
			return &Result{Machine: &cp}
		}
		return &Result{Refusal: refuse(RefuseConflict, CodeConflict, "machine %s already exists on worker %s", m.ID, old.Worker)}
	}
	if _, ok := s.d.Workers[m.Worker]; !ok {
		return &Result{Refusal: notFound("worker", m.Worker)}
	}
	if m.Volume != "" {
		v, ok := s.d.Volumes[m.Volume]
		if !ok {
			return &Result{Refusal: notFound("volume", m.Volume)}
		}
		if v.Worker != m.Worker {
			return &Result{Refusal: refuse(RefuseConflict, CodeConflict, "volume %s is on worker %s, not %s", v.ID, v.Worker, m.Worker)}
		}
		if v.AttachedMachine != "" && v.AttachedMachine != m.ID {
			return &Result{Refusal: refuse(RefuseConflict, CodeAttached, "volume %s is already attached to machine %s", v.ID, v.AttachedMachine)}
		}
		v.AttachedMachine = m.ID
	}
	if m.State == "" {
		m.State = MachineStopped
	}
	if m.State != MachineRunning && m.State != MachineStopped {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "machine state %q: use running or stopped", m.State)}
	}
	m.Migrated = false
	if len(m.Group) > 128 {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "machine group is longer than 128 bytes")}
	}
	s.d.Machines[m.ID] = &m
	s.idx.moveMachine(m.ID, "", m.Worker)
	cp := m
	return &Result{Machine: &cp}
}

func (s *Store) applyUpdateMachine(c *UpdateMachineCmd) *Result {
	m, ok := s.d.Machines[c.ID]
	if !ok {
		return &Result{Refusal: notFound("machine", c.ID)}
	}
	if !c.Actor.privileged() && c.Actor.Name != m.Worker {
		return forbidden(c.Actor, "update machine "+c.ID+" of worker "+m.Worker)
	}
	if c.State != nil && *c.State != MachineRunning && *c.State != MachineStopped && *c.State != MachineFailed {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "machine state %q: use running, stopped or failed", *c.State)}
	}
	if c.Crashes != nil && *c.Crashes < 0 {
		return &Result{Refusal: refuse(RefuseInvalid, CodeInvalid, "crashes must not be negative")}
	}
	if c.Volume != nil && *c.Volume != "" {
		v, ok := s.d.Volumes[*c.Volume]
		if !ok {
			return &Result{Refusal: notFound("volume", *c.Volume)}
		}
		if v.Worker != m.Worker {
			return &Result{Refusal: refuse(RefuseConflict, CodeConflict, "volume %s is on worker %s, not %s", v.ID, v.Worker, m.Worker)}
		}
	}
	if c.State != nil {
		m.State = *c.State
		if c.Crashes == nil {
			m.Crashes = 0
		}
	}
	if c.Crashes != nil {
		m.Crashes = *c.Crashes
	}
	if c.Volume != nil {
		if old, ok := s.d.Volumes[m.Volume]; ok && old.AttachedMachine == m.ID {
			old.AttachedMachine = ""
		}
		m.Volume = *c.Volume
		if v, ok := s.d.Volumes[m.Volume]; ok {
			v.AttachedMachine = m.ID
		}
	}
	if c.Addr6PN != nil {
		m.Addr6PN = *c.Addr6PN
	}
	if c.Spec != nil {
		m.Spec = append(m.Spec[:0:0], (*c.Spec)...)
	}
	cp := *m
	return &Result{Machine: &cp}
}

// applyGC forgets terminal migrations and destroyed volumes whose end lies
// at least Retention before Now. A destroyed volume's end is its destroy
// deadline; one still named by a machine, a migration or a lock is kept.
// Ended drains go with the same retention.
func (s *Store) applyGC(index uint64, c *GCCmd) *Result {
	migs, vols, drains := s.garbage(c.Now.Add(-c.Retention))
	for _, id := range migs {
		m := s.d.Migrations[id]
		s.releaseLocks(m)
		delete(s.d.Migrations, id)
		s.idx.removeMigration(m, index)
	}
	for _, id := range drains {
		delete(s.d.Drains, id)
	}
	for _, id := range vols {
		delete(s.d.Volumes, id)
		delete(s.d.Keys, id)
	}
	return &Result{}
}

func (s *Store) garbage(cutoff time.Time) (migs, vols, drains []string) {
	used := map[string]bool{}
	for _, m := range s.d.Machines {
		used[m.Volume] = true
	}
	for id, m := range s.d.Migrations {
		if m.State.Terminal() && !m.UpdatedAt.After(cutoff) {
			migs = append(migs, id)
			continue
		}
		used[m.Volume], used[m.TargetVol] = true, true
	}
	for _, holder := range s.d.Locks {
		if m, ok := s.d.Migrations[holder]; ok {
			used[m.Volume] = true
		}
	}
	for id, v := range s.d.Volumes {
		if v.State == VolDestroyed && !v.DestroyAfter.After(cutoff) && !used[id] {
			vols = append(vols, id)
		}
	}
	for id, d := range s.d.Drains {
		if d.State.Terminal() && !d.UpdatedAt.After(cutoff) {
			drains = append(drains, id)
		}
	}
	return migs, vols, drains
}

// Collectable reports whether a GC with retention at now would delete anything.
func (s *Store) Collectable(now time.Time, retention time.Duration) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	migs, vols, drains := s.garbage(now.Add(-retention))
	return len(migs)+len(vols)+len(drains) > 0
}

func validReport(r *WorkerReport) error { return r.Validate() }

// Validate rejects a capacity report no real worker sends; the numbers
// feed placement, so a negative or inverted one must not get in.
func (r *WorkerReport) Validate() error {
	if r == nil {
		return nil
	}
	if r.FreeBytes < 0 || r.TotalBytes < 0 || r.SlotsIn < 0 || r.SlotsOut < 0 || r.HydrateBPS < 0 || r.LinkBPS < 0 {
		return fmt.Errorf("capacity report has a negative field")
	}
	if r.TotalBytes > 0 && r.FreeBytes > r.TotalBytes {
		return fmt.Errorf("capacity report: %d bytes free of %d", r.FreeBytes, r.TotalBytes)
	}
	if r.SlotsIn > 1024 || r.SlotsOut > 1024 {
		return fmt.Errorf("capacity report: more than 1024 migration slots")
	}
	return nil
}

func (s *Store) applyCordon(c *CordonCmd) *Result {
	if !c.Actor.privileged() {
		return forbidden(c.Actor, "cordon a worker (operator or server certificate needed)")
	}
	w, ok := s.d.Workers[c.Worker]
	if !ok {
		return &Result{Refusal: notFound("worker", c.Worker)}
	}
	if !c.Cordoned {
		for _, d := range s.d.Drains {
			if d.Worker == w.Name && d.State == DrainRunning {
				return &Result{Refusal: refuse(RefuseConflict, CodeConflict, "worker %s is being drained (%s): cancel the drain first", w.Name, d.ID)}
			}
		}
	}
	w.Cordoned = c.Cordoned
	w.CordonReason = ""
	if c.Cordoned {
		w.CordonReason = truncate(firstNonEmpty(c.Reason, "cordoned by "+c.Actor.Name), 256)
	}
	cp := *w
	return &Result{Worker: &cp}
}
