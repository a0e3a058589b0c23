package agent

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/failpoint"
	"github.com/ferry-dev/ferry/stepdriver"
	"github.com/ferry-dev/ferry/supervisor"
	"github.com/ferry-dev/ferry/volops"
)

// duty is the agent's step for one Duty row of fsm.Transitions: run does the
// work and proposes the row's event; ready, when set, says whether the record
// lets it run yet (the row alone cannot say it).
type duty struct {
	run   stepdriver.Step
	ready func(m *fsm.Migration) bool
}

// duties maps each Duty row the source or the target proposes to the step that
// does it. A test fails when a row has no step here, so a state added to the
// table breaks the agent's tests until it knows what to do there.
func (a *Agent) duties() map[fsm.Event]duty {
	tornDown := func(m *fsm.Migration) bool { return m.Rollback != nil && m.Rollback.TargetTornDown }
	return map[fsm.Event]duty{
		fsm.EvTargetPrepared:   {run: a.prepareTarget},
		fsm.EvSourceStopped:    {run: a.stopSource},
		fsm.EvExported:         {run: a.exportSource},
		fsm.EvCloneBuilt:       {run: a.buildClone},
		fsm.EvTrimmed:          {run: a.trim},
		fsm.EvCutover:          {run: a.cutover},
		fsm.EvHydrationStarted: {run: a.startHydration},
		fsm.EvHydrated:         {run: a.hydrate},
		fsm.EvSourceReleased:   {run: a.releaseSource},
		// Invariant: the source restarts the machine only after the target's teardown is committed.
		fsm.EvTargetTornDown: {run: a.tearDownTarget, ready: func(m *fsm.Migration) bool { return !tornDown(m) }},
		fsm.EvSourceRestored: {run: a.restoreSource, ready: tornDown},
	}
}

// stepFor picks this worker's step for the committed state, or nil when the
// state waits on someone else. The states come from the table in fsm; the
// source's local side effects (serve the export again after a restart, move
// the old address after cutover) come before its duty in the state.
func (a *Agent) stepFor(m *fsm.Migration) stepdriver.Step {
	var role fsm.Role
	switch a.cfg.Worker {
	case m.Source:
		role = fsm.RoleSource
	case m.Target:
		role = fsm.RoleTarget
	default:
		return nil
	}
	if role == fsm.RoleSource {
		switch {
		case m.State.ServesExport() && m.Export != nil && !a.Exports.Live(m.ID):
			// The agent restarted (its gate died with it): serve the same portal again.
			return a.reExport
		case m.State.AfterCutover() && !a.done(m, "net-source"):
			return a.forwardOld
		case m.State == fsm.Planned && !a.done(m, "early-export") && !a.Exports.Live(m.ID):
			return a.exportEarly
		}
	}
	if role == fsm.RoleTarget && a.wantsEarlyLogin(m) {
		return a.loginEarly
	}
	steps := a.duties()
	for _, row := range fsm.Duties(m.State) {
		if !slices.Contains(row.Roles, role) {
			continue
		}
		if d, ok := steps[row.Event]; ok && (d.ready == nil || d.ready(m)) {
			return d.run
		}
	}
	return nil
}

// done and markDone record local one-shot side effects that no event records.
func (a *Agent) done(m *fsm.Migration, what string) bool { return a.Marks.Done(m.ID, what) }

func (a *Agent) markDone(m *fsm.Migration, what string) error { return a.Marks.Mark(m.ID, what) }

func (a *Agent) propose(ctx context.Context, m *fsm.Migration, ev fsm.Event, p fsm.EventPayload) error {
	if d := a.cfg.PauseBefore[ev]; d != 0 {
		run := a.runCtx
		if run == nil {
			run = ctx
		}
		if err := failpoint.Pause(ctx, run, a.log.With().Str("migration", m.ID).Logger(), ev, d); err != nil {
			return err
		}
	}
	got, err := a.Control.Propose(ctx, m.ID, ev, stepdriver.StepID(m, string(ev)), p)
	if err != nil {
		return fmt.Errorf("propose %s: %w", ev, err)
	}
	if got != nil {
		// The fence judges by the newest record: a cutover committed just
		// before a partition keeps the machine running here.
		a.Lease.NoteMigrations([]*fsm.Migration{got})
		a.steps.Note(got)
	}
	return nil
}

// --- target steps ---------------------------------------------------------

// prepareTarget allocates the destination sized from the carried layout.
func (a *Agent) prepareTarget(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	if m.Layout == nil {
		return fmt.Errorf("migration carries no LUKS2 layout; the target never sizes from local defaults")
	}
	if err := m.Layout.Validate(); err != nil {
		return err
	}
	tv := a.Volumes.DestinationName(m)
	size := m.Layout.DeviceSize()
	if _, err := a.Control.CreateVolume(ctx, fsm.Volume{ID: tv, Worker: a.cfg.Worker, Size: size, State: fsm.VolHydrating, Layout: m.Layout}); err != nil {
		return fmt.Errorf("register destination volume %s: %w", tv, err)
	}
	if err := a.Volumes.Allocate(tv, size); err != nil {
		return err
	}
	if ps, ok := a.Data.(datapath.Prestarter); ok {
		ps.Prestart(ctx, tv) // the clone's process, started before the source stops
		a.loginBeforePrepared(ctx, log, m, tv, ps)
	}
	log.Info().Str("target_volume", tv).Int64("size", size).Int64("data_offset", m.Layout.DataOffset).Msg("destination prepared from the carried layout")
	return a.propose(ctx, m, fsm.EvTargetPrepared, fsm.EventPayload{TargetVolume: tv, Layout: m.Layout})
}

// earlyLoginWait bounds how long the target's prepare waits for the
// source's early export and the prestarted datapath's login to it.
const earlyLoginWait = 500 * time.Millisecond

// loginBeforePrepared has the prestarted datapath log in to the export the
// source starts at planned (export_started) and read the volume's header,
// and waits for that before target_prepared lets the source stop the
// machine: begun at target_prepared instead, beside the stop, the login
// and the header's read (40-100 ms on a busy 2-core host) were often not
// over when the clone was built inside the machine's pause. The
// migration takes that much longer; its pause does not. Bounded by
// earlyLoginWait: a source that publishes no early export only delays its
// own stop, and its target logs in at the clone as before.
func (a *Agent) loginBeforePrepared(ctx context.Context, log zerolog.Logger, m *fsm.Migration, tv string, ps datapath.Prestarter) {
	deadline := time.Now().Add(earlyLoginWait)
	t0 := time.Now()
	wctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	for m.Export == nil {
		// The source's export_started reaches this agent's watch.
		fresh, err := a.watched.next(wctx, m.ID, m.ModifyIndex)
		if err != nil {
			log.Info().Dur("waited", time.Since(t0)).Msg("the source published no early export; the clone logs in once exported")
			return
		}
		if fresh.State != fsm.Planned {
			return
		}
		m = fresh
	}
	c := *m
	c.TargetVol = tv
	a.earlyLogins.Store(m.ID, m.Export.Portal)
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-ps.PreConnect(ctx, a.cloneSpec(&c, false)):
		log.Info().Dur("took", time.Since(t0)).Msg("the prestarted datapath logged in to the source's early export")
	case <-t.C:
		log.Info().Dur("waited", time.Since(t0)).Msg("the early login is still running; the source may stop meanwhile")
	case <-ctx.Done():
	}
}

func (a *Agent) cloneSpec(m *fsm.Migration, hydrate bool) datapath.CloneSpec {
	return datapath.CloneSpec{Volume: m.TargetVol, Layout: datapath.LayoutOf(*m.Layout), Portal: m.Export.Portal, IQN: m.Export.IQN, Source: m.Source,
		KnownZero: datapath.RangesOf(m.KnownZero), Hydrate: hydrate, RateLimit: a.cfg.HydrationRate, NoIdleBatches: a.cfg.NoIdleBatches}
}

// keyedCloneMounter is a backend that fetches the key beside the datapath's
// start (datapath/userspace).
type keyedCloneMounter interface {
	MountCloneKeyed(ctx context.Context, c datapath.CloneSpec, key func(context.Context) ([]byte, error), mnt string) (string, error)
}

// buildClone connects to the export, builds the clone (hydration off), opens
// the plaintext view and mounts it.
func (a *Agent) buildClone(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	if m.Export == nil || m.TargetVol == "" || m.Layout == nil {
		return fmt.Errorf("migration record lacks export, target volume or layout")
	}
	// The destination carries the same LUKS2 keyslots: the key's fetch
	// also seals it to this worker as the destination's owner, so the
	// machine can be restarted and migrated again from here.
	// The machine's network namespace is made meanwhile (the cutover
	// step finds it ready): it holds no machine until cutover, and a
	// rollback's teardown removes it like the rest of the target. Its old
	// address is mapped to it too: the source stopped it, so nothing
	// answers there until the cutover either way, and the mapping's record
	// and netlink calls (6-13 ms, traced) leave the cutover step; a
	// rollback unmaps it (releaseTarget).
	netDone := make(chan error, 1)
	go func() {
		arr, err := a.Machines.AttachArriving(ctx, m.Machine, a.cfg.HostID)
		if err == nil {
			merr := a.Machines.MapOld(ctx, arr)
			if merr != nil {
				log.Info().Err(merr).Msg("the machine's old address was not mapped alongside the clone; the cutover step maps it")
			}
			a.arrivals.Store(m.ID, arrival{Arrival: arr, mapped: merr == nil})
		}
		netDone <- err
	}()
	defer func() {
		if err := <-netDone; err != nil {
			log.Info().Err(err).Msg("the machine's network was not made alongside the clone; the cutover step makes it")
		}
	}()
	t0 := time.Now()
	key, settle := a.Keys.CloneKey(m)
	var keyTook atomic.Int64 // set from the datapath's start
	timedKey := func(ctx context.Context) ([]byte, error) {
		defer func(t time.Time) { keyTook.Store(int64(time.Since(t))) }(time.Now())
		return key(ctx)
	}
	var dev string
	var err error
	if km, ok := a.Data.(keyedCloneMounter); ok {
		// The key (calls to the servers) is fetched while the datapath
		// process starts and logs in to the source.
		dev, err = km.MountCloneKeyed(ctx, a.cloneSpec(m, false), timedKey, a.Data.MountPoint(m.Machine))
	} else {
		var k []byte
		if k, err = timedKey(ctx); err == nil {
			dev, err = a.Data.MountClone(ctx, a.cloneSpec(m, false), k, a.Data.MountPoint(m.Machine))
			clear(k)
		}
	}
	// The seal ran beside the build (or, for an adopted datapath that took
	// no key, runs now): the steps after cutover rely on it.
	if err == nil {
		err = settle(ctx)
	}
	if err != nil {
		return err
	}
	log.Info().Str("loop", dev).Str("portal", m.Export.Portal).Dur("key", time.Duration(keyTook.Load())).Dur("mount", time.Since(t0)).Msg("clone built and mounted")
	return a.propose(ctx, m, fsm.EvCloneBuilt, fsm.EventPayload{})
}

// trim records the clone's known-zero ranges and its progress. It does not
// run fstrim: a trim of a large volume (55-65 ms at 20 GiB through the
// userspace clone) shared the two legs after it, the cutover and the
// machine's start, and lengthened the machine's pause by as much; the trim
// is a hint that only hydration needs, so startHydration runs it once the
// machine's start-up reads are over (volops.Trims says why that is safe).
func (a *Agent) trim(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	p := a.progress(ctx, m)
	return a.propose(ctx, m, fsm.EvTrimmed, fsm.EventPayload{KnownZero: m.KnownZero, Progress: p})
}

// cutover starts the machine on the target with its new 6PN address and
// keeps the old one reaching it. Point of no return. By default the machine
// starts only once cutover is committed: before that a rollback may hand it
// back to the source, and a target cut off from the servers (or whose agent
// died) could not be relied on to stop it. StartBeforeCutover starts it
// first, saving one commit of downtime, and relies on the self-fence.
func (a *Agent) cutover(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	t0 := time.Now()
	// Made while the clone was built, by this process: reading the
	// machine and checking its namespace again cost 3-10 ms of the pause.
	var arr supervisor.Arrival
	mapped := false
	if v, made := a.arrivals.LoadAndDelete(m.ID); made {
		ar := v.(arrival)
		arr, mapped = ar.Arrival, ar.mapped
	} else {
		var err error
		if arr, err = a.Machines.AttachArriving(ctx, m.Machine, a.cfg.HostID); err != nil {
			return err
		}
	}
	mach, newAddr := arr.Machine, m.New6PN
	tAttach := time.Now()
	if arr.NetNS != "" {
		newAddr = arr.New.String()
		if !mapped {
			if err := a.Machines.MapOld(ctx, arr); err != nil {
				return err
			}
		}
	}
	spec, err := a.Machines.Spec(mach, arr.NetNS)
	if err != nil {
		return err
	}
	tNet := time.Now()
	spec.Env["FERRY_6PN"] = newAddr
	if mach.Addr6PN != "" {
		spec.Env["FERRY_OLD_6PN"] = mach.Addr6PN
	}
	if a.cfg.StartBeforeCutover {
		if err := a.Machines.Start(ctx, spec); err != nil {
			return err
		}
		log.Info().Str("new_6pn", newAddr).Msg("machine started on the target (before cutover commits)")
	}
	tProp := time.Now()
	if err := a.propose(ctx, m, fsm.EvCutover, fsm.EventPayload{New6PN: newAddr}); err != nil {
		return err
	}
	if !a.cfg.StartBeforeCutover {
		tStart := time.Now()
		// A failure here is retried by the next state's step (ensureRunning).
		if err := a.Machines.Start(ctx, spec); err != nil {
			return err
		}
		log.Info().Str("new_6pn", newAddr).Dur("network", tNet.Sub(t0)).Dur("attach", tAttach.Sub(t0)).Dur("propose", tStart.Sub(tProp)).Dur("start", time.Since(tStart)).
			Msg("cutover committed; machine started on the target")
	}
	if t0, ok := m.EnteredAt[fsm.SourceStopped]; ok {
		a.met.downtime.Observe(time.Since(t0).Seconds())
	}
	return nil
}

// ensureRunning, on the target after cutover, starts the machine if it does
// not run: the start after the cutover commit failed, the fence stopped it
// while the commit's outcome was unknown here, or it crashed.
func (a *Agent) ensureRunning(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	started, err := a.Machines.EnsureRunning(ctx, m.Machine)
	if started {
		log.Warn().Msg("machine was not running after cutover; started it")
	}
	return err
}

func (a *Agent) startHydration(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	p, err := a.ensureClone(ctx, m, true)
	if err != nil {
		return err
	}
	if err := a.ensureRunning(ctx, log, m); err != nil {
		return err
	}
	if t, ok := m.EnteredAt[fsm.Cutover]; ok {
		if err := volops.HeadStart(ctx, log, p, a.Data.Capabilities().ByteCounters, t); err != nil {
			return err
		}
	}
	parent := a.runCtx
	if parent == nil {
		parent = context.Background()
	}
	mnt := a.Data.MountPoint(m.Machine)
	a.trims.Start(parent, log, m.ID, mnt)
	if err := a.trims.BeforeHydration(ctx, log, m.ID, mnt); err != nil {
		return err
	}
	if err := p.EnableHydration(ctx); err != nil {
		return err
	}
	return a.propose(ctx, m, fsm.EvHydrationStarted, fsm.EventPayload{Progress: a.progress(ctx, m)})
}

// ensureClone re-adopts the clone's datapath, or rebuilds it (after a
// reboot or a datapath crash) with hydration as committed.
func (a *Agent) ensureClone(ctx context.Context, m *fsm.Migration, hydrate bool) (datapath.CloneHandle, error) {
	if p, err := a.Data.Clone(ctx, m.TargetVol); err == nil {
		return p, nil
	}
	if m.State.AfterCutover() {
		// The clone's datapath died under the running machine: stop it,
		// release the dead mount; the machine starts again (ensureRunning)
		// once the clone is rebuilt over the same metadata.
		if _, err := a.Machines.Revive(ctx, m.TargetVol, m.Machine); err != nil {
			return nil, err
		}
	}
	key, err := a.Keys.MigrationKey(ctx, m)
	if err != nil {
		return nil, err
	}
	defer clear(key)
	if _, err := a.Data.MountClone(ctx, a.cloneSpec(m, hydrate), key, a.Data.MountPoint(m.Machine)); err != nil {
		return nil, err
	}
	return a.Data.Clone(ctx, m.TargetVol)
}

func (a *Agent) progress(ctx context.Context, m *fsm.Migration) *fsm.Progress {
	p, err := a.Data.Clone(ctx, m.TargetVol)
	if err != nil {
		return nil
	}
	st, err := p.Status(ctx)
	if err != nil || st.Progress == nil {
		return nil
	}
	return st.Progress.Replicated()
}

// hydrate waits for the background copy (volops.FollowHydration), then
// proposes hydrated; the clone is dissolved into the plain destination.
func (a *Agent) hydrate(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	p, err := a.ensureClone(ctx, m, true)
	if err != nil {
		return err
	}
	if err := a.ensureRunning(ctx, log, m); err != nil {
		return err
	}
	report := func(ev fsm.Event, pl fsm.EventPayload) *fsm.Migration {
		cur, err := a.Control.Propose(ctx, m.ID, ev, "", pl)
		if err != nil {
			return nil
		}
		return cur
	}
	stalled := true
	last, err := a.Volumes.FollowHydration(ctx, log, p, m.TargetVol, m.Export, a.cfg.StallAfter, volops.HydrationReports{
		Stalled: func(reason string) { report(fsm.EvReport, fsm.EventPayload{Error: reason, Stalled: &stalled}) },
		Progress: func(p *datapath.Progress) *fsm.Export {
			if cur := report(fsm.EvProgress, fsm.EventPayload{Progress: p.Replicated()}); cur != nil {
				return cur.Export
			}
			return nil
		},
		Polled: func(p *datapath.Progress) { a.met.hydrating(m.ID, p) },
	})
	a.met.hydrating(m.ID, nil)
	if err != nil {
		return err
	}
	// The clone's metadata goes once hydrated is committed (agent.dispatch).
	return a.propose(ctx, m, fsm.EvHydrated, fsm.EventPayload{Progress: last.Replicated()})
}

// tearDownTarget releases everything the target built; the machine never
// ran here (rollback is only possible before cutover).
func (a *Agent) tearDownTarget(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	if err := a.releaseTarget(ctx, log, m); err != nil {
		return err
	}
	log.Info().Msg("target torn down")
	if err := a.propose(ctx, m, fsm.EvTargetTornDown, fsm.EventPayload{}); err != nil {
		return err
	}
	return a.markDone(m, "reaped")
}

// releaseTarget stops the machine if the store does not assign it here and
// removes the clone, its mount and the destination volume. Idempotent.
func (a *Agent) releaseTarget(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	a.arrivals.Delete(m.ID)
	// A trim still running holds the mount: give it its bound to end; one
	// that hangs fails once the release below abandons the volume.
	if _, err := a.trims.WaitFor(ctx, m.ID); err != nil {
		return err
	}
	mnt := a.Data.MountPoint(m.Machine)
	mach, err := a.Control.GetMachine(ctx, m.Machine)
	switch {
	case err != nil && !isNotFound(err):
		return err
	case err != nil:
		// A machine this worker may no longer read is not its own: stop
		// whatever of it still runs here, by its ID and mount.
		mach = &fsm.Machine{ID: m.Machine}
	}
	if mach.Worker != a.cfg.Worker {
		spec, _ := a.Machines.Spec(mach, "")
		if err := a.Machines.Stop(ctx, spec); err != nil {
			return err
		}
		// The build mapped its old address here (buildClone).
		if err := a.Machines.UnmapArriving(ctx, mach); err != nil {
			return err
		}
	}
	if err := a.Machines.Detach(ctx, m.Machine); err != nil {
		return err
	}
	tv := m.TargetVol
	if tv == "" {
		tv = a.Volumes.DestinationName(m)
	}
	// The destination is discarded: writeback that waits on a source which
	// stopped exporting is failed, not waited on.
	if err := a.Data.Abandon(ctx, tv, mnt); err != nil {
		return err
	}
	destroyed := fsm.VolDestroyed
	if err := a.Control.UpdateVolume(ctx, fsm.UpdateVolumeCmd{ID: tv, State: &destroyed}); err != nil {
		log.Debug().Err(err).Msg("destination volume record not updated (it may never have been registered)")
	}
	return nil
}

// --- source steps ---------------------------------------------------------

// earlyExportWait bounds how long stopSource waits, once the volume is
// frozen, for the export it started alongside: a slow export must not hold
// source_stopped (from which the downtime budget runs) back for long; the
// exported step starts it again under the budget.
const earlyExportWait = time.Second

// exportEarly, on the source while the target prepares, starts the
// export's process (tens of milliseconds: a child in its own network
// namespace, gotgt), which stopSource would otherwise start beside the
// machine's stop, inside the machine's pause. The same reasons make it
// safe (stopSource): only the target's certificate from its address is
// admitted, the export reads nothing until the target asks (before
// exported, its LUKS2 header only: loginBeforePrepared), and the key is
// sealed to the target only at exported. A failure costs nothing: stopSource and the exported
// step start it again. It runs once (a step marker); the reap of an ended
// migration unexports it.
func (a *Agent) exportEarly(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	t0 := time.Now()
	portal, iqn, err := a.startExportEarly(ctx, m)
	if err != nil {
		log.Info().Err(err).Msg("the export did not start while the target prepared; the source's stop starts it")
		return a.markDone(m, "early-export")
	}
	log.Info().Dur("took", time.Since(t0)).Msg("export started while the target prepares")
	// Published so the target's datapath logs in before the machine stops
	// (it reads nothing until exported). Best effort: without it the
	// target logs in after exported.
	if _, err := a.Control.Propose(ctx, m.ID, fsm.EvExportStarted, stepdriver.StepID(m, "export-started", portal, iqn),
		fsm.EventPayload{Export: &fsm.Export{Portal: portal, IQN: iqn}}); err != nil && !stepdriver.IsRefusal(err) {
		log.Info().Err(err).Msg("publishing the early export failed; the target logs in after exported")
	}
	return a.markDone(m, "early-export")
}

// loginEarly, on the target once the source published its export (before
// exported), has the destination's prestarted datapath log in to it, so
// the clone's build inside the machine's pause skips the login. Once per
// migration and portal, in memory: a restarted agent has no prestarted
// process to connect.
func (a *Agent) loginEarly(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	a.earlyLogins.Store(m.ID, m.Export.Portal)
	if pc, ok := a.Data.(datapath.Prestarter); ok {
		pc.PreConnect(ctx, a.cloneSpec(m, false))
	}
	return nil
}

// wantsEarlyLogin: the target has a destination and the source published
// an export that exported has not recorded yet, not yet logged in to.
func (a *Agent) wantsEarlyLogin(m *fsm.Migration) bool {
	if m.Export == nil || m.TargetVol == "" || m.Layout == nil || (m.State != fsm.TargetPrepared && m.State != fsm.SourceStopped) {
		return false
	}
	if _, ok := a.Data.(datapath.Prestarter); !ok {
		return false
	}
	done, ok := a.earlyLogins.Load(m.ID)
	return !ok || done != m.Export.Portal
}

// stopSource stops the machine and freezes its volume: after this nothing
// writes the source volume unless the migration rolls back.
//
// The export's process starts meanwhile (tens of milliseconds: a child in
// its own network namespace), so the exported step finds it running. That
// is safe before the freeze: it admits only the target's certificate from
// its address, the export reads nothing of the volume until the target
// asks, and the target asks for no more than the LUKS2 header (which the
// machine never writes) before exported, committed after source_stopped.
func (a *Agent) stopSource(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	exported := make(chan error, 1)
	go func() {
		_, _, err := a.startExportEarly(ctx, m)
		exported <- err
	}()
	defer func() {
		// Never leave it running past the step: a rollback's reap could
		// otherwise unexport before it finished starting.
		if err := <-exported; err != nil {
			log.Info().Err(err).Msg("the export did not start alongside the stop; the exported step starts it")
		}
	}()
	t0 := time.Now()
	mach, err := a.Control.GetMachine(ctx, m.Machine)
	if err != nil {
		return err
	}
	spec, err := a.Machines.LocalSpec(mach)
	if err != nil {
		return err
	}
	t1 := time.Now()
	if err := a.Machines.Stop(ctx, spec); err != nil {
		return err
	}
	t2 := time.Now()
	// Frozen is enough for source_stopped: nothing can write to the volume.
	// The devices are released once exported is proposed (exportSource).
	if fz, ok := a.Data.(datapath.Freezer); ok {
		err = fz.Freeze(ctx, m.Volume, a.Data.MountPoint(mach.ID))
	} else {
		err = a.Data.Unmount(ctx, m.Volume, a.Data.MountPoint(mach.ID))
	}
	if err != nil {
		return err
	}
	t3 := time.Now()
	layout, err := a.Data.ReadLayout(m.Volume)
	if err != nil {
		return err
	}
	log.Info().Dur("lookup", t1.Sub(t0)).Dur("stop", t2.Sub(t1)).Dur("unmount", t3.Sub(t2)).Dur("layout", time.Since(t3)).Msg("machine stopped and volume frozen")
	return a.propose(ctx, m, fsm.EvSourceStopped, fsm.EventPayload{Layout: datapath.StoredLayout(layout)})
}

// startExportEarly is the export (Volumes.ExportTo) bounded by earlyExportWait, ahead of the
// step that needs the export (which starts it again if this failed).
func (a *Agent) startExportEarly(ctx context.Context, m *fsm.Migration) (string, string, error) {
	ctx, cancel := context.WithTimeout(ctx, earlyExportWait)
	defer cancel()
	return a.Volumes.ExportTo(ctx, m.ID, m.Volume, m.Target)
}

// exportSource serves the frozen volume to the target only.
func (a *Agent) exportSource(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	t1 := time.Now()
	if err := a.Keys.SealForTarget(ctx, m); err != nil {
		return err
	}
	t2 := time.Now()
	portal, iqn, err := a.Volumes.ExportTo(ctx, m.ID, m.Volume, m.Target)
	if err != nil {
		return err
	}
	t3 := time.Now()
	zeros, err := a.Volumes.KnownZero(m.Volume)
	if err != nil {
		log.Warn().Err(err).Msg("cannot list the volume's holes; the target fetches them")
		zeros = nil
	}
	// The store accepts holes of the data area only (never the header).
	lo, hi := fsm.DataArea(m, 0)
	stored := fsm.ClipRanges(zeros, lo, hi)
	log.Info().Str("portal", portal).Str("iqn", iqn).Int("known_zero_ranges", len(stored)).Dur("seal", t2.Sub(t1)).
		Dur("export", t3.Sub(t2)).Dur("holes", time.Since(t3)).Msg("volume exported")
	if err := a.propose(ctx, m, fsm.EvExported, fsm.EventPayload{Export: &fsm.Export{Portal: portal, IQN: iqn}, KnownZero: stored}); err != nil {
		return err
	}
	// The volume stopSource froze: its devices are released now, while the
	// target builds its clone (a step run again releases them again; a
	// rollback's Mount and the source's Remove take a frozen volume too).
	if _, ok := a.Data.(datapath.Freezer); !ok {
		return nil // stopSource released them
	}
	if err := a.Data.Unmount(ctx, m.Volume, a.Data.MountPoint(m.Machine)); err != nil {
		return fmt.Errorf("release the source volume's devices after export: %w", err)
	}
	return nil
}

// reExport restarts the export at the portal recorded in the migration.
func (a *Agent) reExport(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	portal, iqn, err := a.Volumes.ExportTo(ctx, m.ID, m.Volume, m.Target)
	if err != nil {
		return err
	}
	if portal != m.Export.Portal || iqn != m.Export.IQN {
		// Served elsewhere now (another address, the old port taken): tell
		// the target, which reconnects there.
		moved := *m.Export
		moved.Portal, moved.IQN = portal, iqn
		if _, err := a.Control.Propose(ctx, m.ID, fsm.EvExportMoved, stepdriver.StepID(m, "export-moved", portal, iqn), fsm.EventPayload{Export: &moved}); err != nil {
			return fmt.Errorf("export restarted at %s, not at the recorded %s, and publishing the move failed: %w", portal, m.Export.Portal, err)
		}
		log.Warn().Str("portal", portal).Str("old_portal", m.Export.Portal).Msg("export re-established at a new portal; published it")
		return nil
	}
	log.Info().Str("portal", portal).Msg("export re-established after an agent restart")
	return nil
}

// forwardOld, on the source after cutover, removes the machine's network and
// routes the old address towards the target for the grace period.
func (a *Agent) forwardOld(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	if err := a.Machines.ForwardDeparted(ctx, m.Machine, m.Old6PN, m.New6PN, m.Target); err != nil {
		return err
	}
	return a.markDone(m, "net-source")
}

// releaseSource tears the export down; the volume stays pending_destroy for
// its retention window (invariant 3).
func (a *Agent) releaseSource(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	if err := a.Exports.Unexport(ctx, m.ID); err != nil {
		return err
	}
	// A frozen volume whose release after export did not happen (the agent
	// died in between) is released here, not only when it is destroyed.
	if _, ok := a.Data.(datapath.Freezer); ok {
		if err := a.Data.Unmount(ctx, m.Volume, a.Data.MountPoint(m.Machine)); err != nil {
			return fmt.Errorf("release the source volume's devices: %w", err)
		}
	}
	return a.propose(ctx, m, fsm.EvSourceReleased, fsm.EventPayload{})
}

// restoreSource, after the target's teardown is committed, unexports and
// restarts the machine on its untouched volume (invariant 2).
func (a *Agent) restoreSource(ctx context.Context, log zerolog.Logger, m *fsm.Migration) error {
	if err := a.Exports.Unexport(ctx, m.ID); err != nil {
		return err
	}
	mach, err := a.Control.GetMachine(ctx, m.Machine)
	if err != nil {
		return err
	}
	if err := a.Machines.StartLocal(ctx, mach); err != nil {
		return err
	}
	log.Info().Msg("machine restored on the source")
	return a.propose(ctx, m, fsm.EvSourceRestored, fsm.EventPayload{})
}
