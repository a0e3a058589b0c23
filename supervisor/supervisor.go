// Package supervisor runs a worker's machines: it builds a machine's spec,
// mounts its volume and starts it, keeps the machines no migration owns in
// their recorded state with a restart policy, revives a datapath that died
// under a mounted volume, and ends machine processes no driver recorded.
package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/machine"
	"github.com/ferry-dev/ferry/netrewrite"
)

// Store is what the supervisor needs from the replicated store.
type Store interface {
	GetVolume(ctx context.Context, id string) (*fsm.Volume, error)
	GetMachine(ctx context.Context, id string) (*fsm.Machine, error)
	UpdateMachine(ctx context.Context, cmd fsm.UpdateMachineCmd) error
	GetWorker(ctx context.Context, name string) (*fsm.Worker, error)
}

// Driver runs the machines (behind the worker's fence).
type Driver interface {
	machine.Driver
	// StopSpec is how machine id is stopped in a hurry: its last known
	// spec with SIGKILL.
	StopSpec(id string) machine.Spec
}

// Keys opens the owner envelope of a volume this worker holds.
type Keys interface {
	OwnerKey(ctx context.Context, vol string) ([]byte, error)
}

// Network places a machine on the 6PN in its network namespace and moves
// its addresses at cutover (netns.Network).
type Network interface {
	Attach(ctx context.Context, machine string, addr netrewrite.Addr) (string, error)
	Namespace(machine string) string
	// Detach removes the machine's namespace; idempotent.
	Detach(ctx context.Context, machine string) error
	// MapOld keeps old reaching the machine (now at new here) for the grace period.
	MapOld(ctx context.Context, machine string, old, new netrewrite.Addr) error
	// UnmapOld undoes MapOld before a cutover that will not come; idempotent.
	UnmapOld(ctx context.Context, machine string, old netrewrite.Addr) error
	// ForwardOld routes old towards via (the target worker's fabric
	// address) for the grace period.
	ForwardOld(ctx context.Context, machine string, old, new netrewrite.Addr, via string) error
}

// Config of the supervisor.
type Config struct {
	Worker string
	// RestartBackoff is the first delay before restarting a crashed
	// machine; it doubles (jittered) up to RestartBackoffMax.
	RestartBackoff, RestartBackoffMax time.Duration
	// MaxCrashes crashes within RestartWindow mark a machine failed.
	MaxCrashes    int
	RestartWindow time.Duration
}

// Supervisor runs this worker's machines.
type Supervisor struct {
	cfg      Config
	log      zerolog.Logger
	store    Store
	mach     Driver
	vols     datapath.Backend
	keys     Keys
	net      Network // nil: machines share the host's network
	restarts *restarts

	crashes, failed, datapathRestarts prometheus.Counter
}

// New makes a supervisor; net may be nil.
func New(log zerolog.Logger, cfg Config, store Store, mach Driver, vols datapath.Backend, keys Keys, net Network) *Supervisor {
	if cfg.RestartBackoff == 0 {
		cfg.RestartBackoff = time.Second
	}
	if cfg.RestartBackoffMax == 0 {
		cfg.RestartBackoffMax = time.Minute
	}
	if cfg.MaxCrashes == 0 {
		cfg.MaxCrashes = 5
	}
	if cfg.RestartWindow == 0 {
		cfg.RestartWindow = 10 * time.Minute
	}
	return &Supervisor{cfg: cfg, log: log, store: store, mach: mach, vols: vols, keys: keys, net: net,
		restarts: newRestarts(cfg.RestartBackoff, cfg.RestartBackoffMax, cfg.RestartWindow, cfg.MaxCrashes),
		crashes: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_agent_machine_crashes_total",
			Help: "Machines found dead while recorded running on this worker."}),
		failed: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_agent_machines_failed_total",
			Help: "Machines marked failed after crashing too often within the restart window."}),
		datapathRestarts: prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_agent_datapath_restarts_total",
			Help: "Volume datapaths found dead under a mounted filesystem and restarted."}),
	}
}

// Describe and Collect make the supervisor's metrics a prometheus.Collector.
func (s *Supervisor) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range []prometheus.Counter{s.crashes, s.failed, s.datapathRestarts} {
		c.Describe(ch)
	}
}

func (s *Supervisor) Collect(ch chan<- prometheus.Metric) {
	for _, c := range []prometheus.Counter{s.crashes, s.failed, s.datapathRestarts} {
		c.Collect(ch)
	}
}

// Spec decodes the driver spec stored with the machine and points it at
// this worker's mount and network namespace.
func (s *Supervisor) Spec(mach *fsm.Machine, netns string) (machine.Spec, error) {
	var sp machine.Spec
	if len(mach.Spec) > 0 {
		if err := json.Unmarshal(mach.Spec, &sp); err != nil {
			return sp, fmt.Errorf("machine %s has an unreadable spec: %w", mach.ID, err)
		}
	}
	sp.ID = mach.ID
	sp.MountDir = s.vols.MountPoint(mach.ID)
	sp.NetNS = netns
	if sp.Env == nil {
		sp.Env = map[string]string{}
	}
	sp.Env["FERRY_WORKER"] = s.cfg.Worker
	sp.Env["FERRY_6PN"] = mach.Addr6PN
	return sp, nil
}

// namespace names the machine's network namespace here ("" without one).
func (s *Supervisor) namespace(id string) string {
	if s.net == nil {
		return ""
	}
	return s.net.Namespace(id)
}

// LocalSpec is Spec in the machine's network namespace on this worker.
func (s *Supervisor) LocalSpec(mach *fsm.Machine) (machine.Spec, error) {
	return s.Spec(mach, s.namespace(mach.ID))
}

// Start starts a machine (unless the worker is fenced).
func (s *Supervisor) Start(ctx context.Context, spec machine.Spec) error {
	return s.mach.Start(ctx, spec)
}

// Running reports whether the machine runs.
func (s *Supervisor) Running(ctx context.Context, spec machine.Spec) bool {
	st, err := s.mach.Status(ctx, spec)
	return err == nil && st == machine.Running
}

// Stop stops a machine, then ends its processes the driver has no record
// of: an agent killed between starting the machine and recording its pid
// leaves one behind, holding the mount.
func (s *Supervisor) Stop(ctx context.Context, spec machine.Spec) error {
	if err := s.mach.Stop(ctx, spec); err != nil {
		return err
	}
	if n := killStrayMachines(spec.ID, spec.MountDir); n > 0 {
		s.log.Warn().Str("machine", spec.ID).Int("processes", n).Msg("killed machine processes running here but never recorded (agent crash while starting it)")
	}
	return nil
}

// Forget drops the restart policy's memory of a machine that stopped on
// purpose (a migration or the fence stopped it, or it is no longer ours).
func (s *Supervisor) Forget(id string) { s.restarts.forget(id) }

// StartLocal mounts a machine's volume on this worker and runs it. Idempotent.
func (s *Supervisor) StartLocal(ctx context.Context, mach *fsm.Machine) error {
	vol, err := s.store.GetVolume(ctx, mach.Volume)
	if err != nil {
		return err
	}
	if vol.Layout == nil {
		return fmt.Errorf("volume %s has no recorded layout yet", vol.ID)
	}
	key, err := s.keys.OwnerKey(ctx, vol.ID)
	if err != nil {
		return err
	}
	defer clear(key)
	if _, err := s.vols.MountLocal(ctx, vol.ID, datapath.LayoutOf(*vol.Layout), key, s.vols.MountPoint(mach.ID)); err != nil {
		return err
	}
	spec, err := s.attached(ctx, mach)
	if err != nil {
		return err
	}
	return s.mach.Start(ctx, spec)
}

// attached places the machine in its network namespace here, at its
// recorded 6PN address, and returns its spec there.
func (s *Supervisor) attached(ctx context.Context, mach *fsm.Machine) (machine.Spec, error) {
	netns := ""
	if s.net != nil && mach.Addr6PN != "" {
		addr, err := netrewrite.Parse(mach.Addr6PN)
		if err != nil {
			return machine.Spec{}, fmt.Errorf("machine %s 6PN address: %w", mach.ID, err)
		}
		if netns, err = s.net.Attach(ctx, mach.ID, addr); err != nil {
			return machine.Spec{}, err
		}
	}
	return s.Spec(mach, netns)
}

// Arrival is where a machine migrating to this worker runs here.
type Arrival struct {
	Machine *fsm.Machine
	// NetNS is its network namespace here; empty when machines share the
	// host's network (then Old and New are zero).
	NetNS string
	// Old is its recorded 6PN address, New the same with this worker's
	// host part.
	Old, New netrewrite.Addr
}

// AttachArriving reads machine id and makes its network namespace on this
// worker at its address with host (this worker's 6PN host id) as the host
// part. Idempotent: the target calls it while it builds the clone and again
// at cutover.
func (s *Supervisor) AttachArriving(ctx context.Context, id string, host uint32) (Arrival, error) {
	mach, err := s.store.GetMachine(ctx, id)
	if err != nil {
		return Arrival{}, err
	}
	if s.net == nil || mach.Addr6PN == "" {
		return Arrival{Machine: mach}, nil
	}
	old, err := netrewrite.Parse(mach.Addr6PN)
	if err != nil {
		return Arrival{}, fmt.Errorf("machine %s 6PN address: %w", mach.ID, err)
	}
	nw, err := old.WithHost(host)
	if err != nil {
		return Arrival{}, err
	}
	netns, err := s.net.Attach(ctx, mach.ID, nw)
	if err != nil {
		return Arrival{}, err
	}
	return Arrival{Machine: mach, NetNS: netns, Old: old, New: nw}, nil
}

// MapOld, on a migration's target once the source stopped the machine,
// keeps the arriving machine's old address reaching it at its new one for
// the grace period; nothing when it has no network namespace.
func (s *Supervisor) MapOld(ctx context.Context, arr Arrival) error {
	if s.net == nil || arr.NetNS == "" {
		return nil
	}
	return s.net.MapOld(ctx, arr.Machine.ID, arr.Old, arr.New)
}

// UnmapArriving undoes MapOld for machine m, whose migration here rolled
// back before cutover; nothing without a network or a 6PN address.
// Idempotent.
func (s *Supervisor) UnmapArriving(ctx context.Context, m *fsm.Machine) error {
	if s.net == nil || m.Addr6PN == "" {
		return nil
	}
	old, err := netrewrite.Parse(m.Addr6PN)
	if err != nil {
		return fmt.Errorf("machine %s 6PN address: %w", m.ID, err)
	}
	return s.net.UnmapOld(ctx, m.ID, old)
}

// Detach removes machine id's network namespace here; idempotent.
func (s *Supervisor) Detach(ctx context.Context, id string) error {
	if s.net == nil {
		return nil
	}
	return s.net.Detach(ctx, id)
}

// ForwardDeparted, on a migration's source after cutover, removes machine
// id's network here and routes its old 6PN address towards the target
// worker, where it now runs at new, for the grace period.
func (s *Supervisor) ForwardDeparted(ctx context.Context, id, old, new, target string) error {
	if s.net == nil || old == "" {
		return nil
	}
	if err := s.net.Detach(ctx, id); err != nil {
		return err
	}
	oldAddr, err := netrewrite.Parse(old)
	if err != nil {
		return err
	}
	tw, err := s.store.GetWorker(ctx, target)
	if err != nil {
		return err
	}
	newAddr, err := netrewrite.Parse(new)
	if err != nil {
		return fmt.Errorf("migration records no valid new 6PN address: %w", err)
	}
	return s.net.ForwardOld(ctx, id, oldAddr, newAddr, tw.Address)
}

// EnsureRunning starts machine id, whose volume is mounted here, if the
// store assigns it to this worker recorded running and it does not run (a
// migration's target after cutover: the start after the commit failed, the
// fence stopped it, or it crashed); it reports whether it started it.
func (s *Supervisor) EnsureRunning(ctx context.Context, id string) (bool, error) {
	mach, err := s.store.GetMachine(ctx, id)
	if err != nil {
		return false, err
	}
	if mach.Worker != s.cfg.Worker || mach.State != fsm.MachineRunning {
		return false, nil
	}
	spec, err := s.attached(ctx, mach)
	if err != nil {
		return false, err
	}
	if s.Running(ctx, spec) {
		return false, nil
	}
	if err := s.mach.Start(ctx, spec); err != nil {
		return false, err
	}
	return true, nil
}

// Reconcile starts or stops one machine that no migration owns and that
// the store assigns to this worker, after reviving its datapath if that
// died, under the restart policy. The caller makes sure no migration can
// take the machine over meanwhile.
func (s *Supervisor) Reconcile(ctx context.Context, m *fsm.Machine) {
	spec, err := s.LocalSpec(m)
	if err != nil {
		return
	}
	if m.State == fsm.MachineRunning {
		s.superviseLocal(ctx, m, spec)
	}
	st, _ := s.mach.Status(ctx, spec)
	switch {
	case m.State == fsm.MachineRunning && st == machine.Running:
		s.restarts.sawRunning(m.ID)
		// Already here: a dead datapath was revived above; only a volume
		// no longer mounted under it is mounted again (idempotent). Not
		// mounting again every reconcile: that cost two reads of the store
		// and the opening of an envelope per machine per second.
		if mnt := spec.MountDir; !isMountPoint(mnt) {
			s.log.Warn().Str("machine", m.ID).Str("mount", mnt).Msg("a running machine's volume is not mounted: mounting it again")
			if err := s.StartLocal(ctx, m); err != nil {
				s.log.Warn().Err(err).Str("machine", m.ID).Msg("cannot start machine")
			}
		}
		return
	case m.State != fsm.MachineRunning && st != machine.Running:
		s.restarts.forget(m.ID)
		return
	case m.State == fsm.MachineRunning:
		// Recorded running, not running: a crash (or a first start).
		if !s.restartPolicy(ctx, m) {
			return
		}
	}
	// The record was listed before the caller's lock and may be stale (a
	// migration may have moved the machine meanwhile): act on a fresh one.
	fresh, err := s.store.GetMachine(ctx, m.ID)
	if err != nil || fresh.Worker != s.cfg.Worker {
		return
	}
	switch fresh.State {
	case fsm.MachineRunning:
		if err := s.StartLocal(ctx, fresh); err != nil {
			s.log.Warn().Err(err).Str("machine", m.ID).Msg("cannot start machine")
		} else {
			s.restarts.sawRunning(m.ID)
		}
	case fsm.MachineStopped, fsm.MachineFailed:
		s.restarts.forget(m.ID)
		if st == machine.Running {
			if err := s.mach.Stop(ctx, spec); err != nil {
				s.log.Warn().Err(err).Str("machine", m.ID).Msg("cannot stop machine")
			}
		}
	}
}

// restartPolicy applies the restart policy to a machine recorded running
// that does not run; it reports whether to start it now.
func (s *Supervisor) restartPolicy(ctx context.Context, m *fsm.Machine) bool {
	v := s.restarts.stopped(m.ID, time.Now())
	log := s.log.With().Str("machine", m.ID).Logger()
	if v.Crashed {
		s.crashes.Inc()
		n := v.Crashes
		cmd := fsm.UpdateMachineCmd{ID: m.ID, Crashes: &n}
		if v.Failed {
			failed := fsm.MachineFailed
			cmd.State = &failed
			s.failed.Inc()
			log.Error().Int("crashes", n).Dur("window", s.cfg.RestartWindow).
				Msg("machine crashed too often: marked failed, not restarted (fix it, then `ferry machine start`)")
		} else {
			log.Warn().Int("crashes", n).Dur("restart_in", v.Wait).Msg("machine crashed; restarting after a backoff")
		}
		if err := s.store.UpdateMachine(ctx, cmd); err != nil {
			log.Warn().Err(err).Msg("could not record the crash")
		}
		if v.Failed {
			return false
		}
	}
	return v.Wait == 0
}

// Reattacher is a data path that can start a new datapath for a volume
// under the filesystem still mounted on the dead one (its FUSE connection
// kept open by a holder that outlived the datapath, as rbd-nbd attach
// does), so the machine on it only waits, paused, instead of restarting.
type Reattacher interface {
	// ReattachDead serves vol's kept mount from a new datapath; an error
	// means the filesystem could not be kept (release and remount it).
	ReattachDead(ctx context.Context, vol string) error
}

// errMountNotKept says why the fallback restarts the machine when the data
// path cannot reattach a datapath under a kept mount.
var errMountNotKept = errors.New("this data path cannot restart a datapath under the kept filesystem (the FUSE connection dies with the datapath), so the mount is dropped lazily")

// Revive repairs vol when its datapath died under the mounted filesystem
// of machine id. Where the data path can keep the filesystem, the machine
// is paused while a new datapath takes the mount over, then resumed: it
// keeps running and sees its disk wait, not fail. Otherwise (the mount had
// to be lazily dropped, or the machine cannot pause) the machine is
// stopped (its disk fails every I/O; what it saw acknowledged is in the
// volume's files), the dead chain released, and the caller mounts the
// volume and starts the machine again, which is idempotent after a
// reattach too. It reports whether it did anything.
func (s *Supervisor) Revive(ctx context.Context, vol, id string) (bool, error) {
	return s.reviveDatapath(ctx, s.log.With().Str("machine", id).Logger(), vol, s.mach.StopSpec(id))
}

func (s *Supervisor) reviveDatapath(ctx context.Context, log zerolog.Logger, vol string, spec machine.Spec) (bool, error) {
	rv, ok := s.vols.(datapath.Reviver)
	if !ok || !rv.DatapathDead(ctx, vol) {
		return false, nil
	}
	s.datapathRestarts.Inc()
	why := s.reattachPaused(ctx, log, vol, spec)
	if why == nil {
		log.Warn().Str("volume", vol).Msg("the volume's datapath died under its mount: a new one took the kept filesystem over while the machine was paused; the machine resumed")
		return true, nil
	}
	log.Error().Str("volume", vol).Str("why_restart", why.Error()).Msg("the volume's datapath died under its mount: stopping the machine, restarting the datapath, remounting")
	spec.KillSignal = "SIGKILL" // its disk is gone: nothing to flush
	if err := s.mach.Stop(ctx, spec); err != nil {
		return true, fmt.Errorf("stop machine %s over the dead datapath of volume %s: %w", spec.ID, vol, err)
	}
	if err := rv.ReleaseDead(ctx, vol, s.vols.MountPoint(spec.ID)); err != nil {
		return true, err
	}
	return true, nil
}

// reattachPaused pauses the machine, has the data path serve the kept
// mount from a new datapath and resumes the machine. An error says why the
// filesystem could not be kept; the machine then runs (or never paused)
// and the caller stops it.
func (s *Supervisor) reattachPaused(ctx context.Context, log zerolog.Logger, vol string, spec machine.Spec) error {
	ra, ok := s.vols.(Reattacher)
	if !ok {
		return errMountNotKept
	}
	p, ok := s.mach.(machine.Pauser)
	if !ok {
		return machine.ErrCannotPause
	}
	if err := p.Pause(ctx, spec); err != nil {
		return fmt.Errorf("pause machine %s: %w", spec.ID, err)
	}
	if err := ra.ReattachDead(ctx, vol); err != nil {
		// Thawed before the stop, so no child of it stays frozen.
		if rerr := p.Resume(ctx, spec); rerr != nil {
			log.Warn().Err(rerr).Msg("resume the machine before stopping it")
		}
		return fmt.Errorf("the filesystem could not be kept: %w", err)
	}
	if err := p.Resume(ctx, spec); err != nil {
		// The disk is back; a machine that cannot resume is started again
		// by the caller (it exited, or its driver lost it).
		log.Warn().Err(err).Msg("the datapath is back but the machine did not resume")
	}
	return nil
}

// superviseLocal revives the datapath of a machine that runs here outside
// any migration, then starts it again.
func (s *Supervisor) superviseLocal(ctx context.Context, m *fsm.Machine, spec machine.Spec) {
	log := s.log.With().Str("machine", m.ID).Logger()
	revived, err := s.reviveDatapath(ctx, log, m.Volume, spec)
	if err != nil {
		log.Error().Err(err).Msg("cannot revive the datapath yet")
		return
	}
	if !revived {
		return
	}
	if err := s.StartLocal(ctx, m); err != nil {
		log.Error().Err(err).Msg("datapath revived but the machine did not start; retrying")
		return
	}
	log.Warn().Msg("datapath restarted and the machine started again")
}

// isMountPoint reports whether dir is the root of a mount other than its
// parent's (a volume's filesystem mounted there).
func isMountPoint(dir string) bool {
	var st, parent unix.Stat_t
	if unix.Stat(dir, &st) != nil || unix.Stat(filepath.Dir(dir), &parent) != nil {
		return false
	}
	return st.Dev != parent.Dev
}
