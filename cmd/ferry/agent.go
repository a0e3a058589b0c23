package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/agent"
	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/kernel"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/datapath/userspace"
	"github.com/ferry-dev/ferry/fence"
	"github.com/ferry-dev/ferry/internal/bytesize"
	"github.com/ferry-dev/ferry/internal/failpoint"
	"github.com/ferry-dev/ferry/internal/logging"
	"github.com/ferry-dev/ferry/internal/metricsserve"
	"github.com/ferry-dev/ferry/internal/stepmark"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/iscsi/exporter"
	"github.com/ferry-dev/ferry/keycustody"
	"github.com/ferry-dev/ferry/machine"
	"github.com/ferry-dev/ferry/netrewrite/netns"
	"github.com/ferry-dev/ferry/server"
	"github.com/ferry-dev/ferry/supervisor"
	"github.com/ferry-dev/ferry/volops"
)

type agentFlags struct {
	clientFlags
	worker, dataDir, address, backend, domain string
	blockExport                               string
	hostID                                    uint32
	dev, fastKDF                              bool
	grace, leaseTTL, fenceMargin              time.Duration
	startBeforeCutover, idleBatches           bool
	hydrationRate, metricsListen              string
	machineUser                               string
	devListen                                 string
}

// worker is an agent with the parts it was built from.
type worker struct {
	agent *agent.Agent
	net   *netns.Network
	mach  machine.Driver
	vols  datapath.Backend
	exp   *exporter.Exporter
}

func (f *agentFlags) build(ctx context.Context) (*worker, error) {
	log, err := newLogger(true)
	if err != nil {
		return nil, withCode(ExitUsage, err)
	}
	if f.worker == "" {
		return nil, withCode(ExitUsage, fmt.Errorf("--worker is required"))
	}
	switch f.blockExport {
	case userspace.ExportFUSE, userspace.ExportNBD, userspace.ExportAuto:
	default:
		return nil, withCode(ExitUsage, fmt.Errorf("--block-export %q: want auto, fuse or nbd", f.blockExport))
	}
	if f.name == "" {
		f.name = f.worker
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	// The revoked serials, read from the servers by the exporter's
	// WatchRevoked: its gates refuse a revoked target, the data path (the
	// kernel path's tunnel, the userspace path's initiator) a revoked source.
	deny := &iscsi.DenyList{}
	vols, err := datapath.Select(ctx, f.backend, f.backends(log, exe, deny))
	if err != nil {
		return nil, withCode(ExitUsage, fmt.Errorf("--backend: %w", err))
	}
	log.Info().Str("backend", vols.Capabilities().Name).Msg("data path")
	// The agent refuses a server whose certificate is revoked too (the list
	// it keeps for its exports, persisted across restarts).
	c, err := f.clientDenying(deny.Denied)
	if err != nil {
		return nil, err
	}
	exp := &exporter.Exporter{Log: log, StateDir: filepath.Join(f.dataDir, "exports"), Address: f.address, Domain: f.domain,
		TLSDir: f.tlsDir, Name: f.name, Revoked: c, Deny: deny}
	if err := exp.LoadDeny(); err != nil {
		return nil, err
	}
	nw := &netns.Network{Log: logging.For(log, "netrewrite"), Worker: f.worker, Dir: filepath.Join(f.dataDir, "net"), Grace: f.grace}
	mu, err := machine.ParseUser(f.machineUser)
	if err != nil {
		return nil, withCode(ExitUsage, fmt.Errorf("--machine-user: %w", err))
	}
	if mu == (machine.User{}) {
		log.Warn().Msg("--machine-user root: machines run as root and can take over this worker; use it only for trusted test workloads")
	}
	execDriver := &machine.Exec{StateDir: filepath.Join(f.dataDir, "machines"), Log: logging.For(log, "machine"), User: &mu}
	mach := machine.ByKind{Exec: execDriver, Script: machine.Script{User: &mu}}
	if sf, ok := vols.(datapath.StuckIOFailer); ok {
		// A machine killed in the middle of a read from a cut-off source
		// exits once that read fails, not minutes later when it times out.
		mlog := logging.For(log, "machine")
		execDriver.Stuck = func(ctx context.Context, mnt string) bool {
			done, err := sf.FailStuckIO(ctx, mnt)
			if err != nil {
				mlog.Warn().Err(err).Str("mount", mnt).Msg("could not fail the stuck I/O of a killed machine")
			}
			return done
		}
	}
	acfg := agent.Config{Worker: f.worker, HostID: f.hostID, Address: f.address, DataDir: f.dataDir, StartBeforeCutover: f.startBeforeCutover,
		NoIdleBatches: !f.idleBatches}
	if f.hydrationRate != "" && f.hydrationRate != "0" {
		if acfg.HydrationRate, err = bytesize.Parse(f.hydrationRate); err != nil {
			return nil, withCode(ExitUsage, fmt.Errorf("--hydration-rate: %w", err))
		}
	}
	if fp := os.Getenv(failpoint.PauseBeforeEnv); fp != "" {
		if acfg.PauseBefore, err = failpoint.ParsePauseBefore(fp); err != nil {
			return nil, withCode(ExitUsage, err)
		}
	}
	alog := logging.For(log, "agent").With().Str("worker", f.worker).Logger()
	cp := &api.AgentClient{C: c, LeaseTTL: f.leaseTTL, Report: volumeStoreReport(f.dataDir, acfg.HydrationRate)}
	lease := fence.New(alog, fence.Config{Worker: f.worker, TTL: f.leaseTTL, Margin: f.fenceMargin, MountPoint: vols.MountPoint,
		StateFile: filepath.Join(f.dataDir, "lease.json")}, mach)
	keys, err := keycustody.Load(alog, f.dataDir, f.worker, cp)
	if err != nil {
		return nil, err
	}
	sup := supervisor.New(alog, supervisor.Config{Worker: f.worker}, cp, lease.Gated(), vols, keys, nw)
	lease.OnStop(sup.Forget)
	a, err := agent.New(logging.For(log, "agent"), acfg, agent.Parts{Control: cp, Exports: exp, Data: vols, Machines: sup,
		Lease: lease, Keys: keys, Volumes: volops.New(alog, f.worker, cp, keys, vols, sup, exp), Marks: stepmark.Dir(filepath.Join(f.dataDir, "steps"))})
	if err != nil {
		return nil, err
	}
	return &worker{agent: a, net: nw, mach: mach, vols: vols, exp: exp}, nil
}

// backends are the data paths this binary has, in --backend auto's order.
func (f *agentFlags) backends(log zerolog.Logger, exe string, deny *iscsi.DenyList) []datapath.Candidate {
	return []datapath.Candidate{
		{Name: "kernel", Probe: kernel.Probe, AutoProbe: kernel.ProbeAuto, New: func() datapath.Backend {
			return &kernel.Backend{DataDir: f.dataDir, Log: logging.For(log, "kernel-datapath"), Loops: loopdev.System{},
				ISCSI: &kernel.OpenISCSI{Log: logging.For(log, "open-iscsi")}, FastKDF: f.fastKDF, TLS: f.peerTLS(deny)}
		}},
		{Name: "userspace", Probe: userspace.Probe, New: func() datapath.Backend {
			return &userspace.Backend{DataDir: f.dataDir, Exe: exe, Log: logging.For(log, "volumes"), Loops: loopdev.System{}, FastKDF: f.fastKDF,
				TLS: f.peerTLS(deny), Deny: deny, BlockExport: f.userspaceExport(log)}
		}},
	}
}

// userspaceExport is --block-export for the userspace data path. auto
// picks NBD only on kernels with the NBD client's fix of 6.13: in the test
// VM's 6.1 one request in a few thousand sat unanswered until the kernel's
// timeout (docs/clone.md), which that fix likely explains.
func (f *agentFlags) userspaceExport(log zerolog.Logger) string {
	if f.blockExport == userspace.ExportAuto {
		pick, why := userspace.PickBlockExport(context.Background())
		log.Info().Str("block_export", pick).Str("why", why).Msg("--block-export auto")
		return pick
	}
	if f.blockExport == userspace.ExportNBD {
		if err := userspace.ProbeNBD(context.Background()); err != nil {
			log.Warn().Err(err).Msg("--block-export nbd: this host lacks a part; volumes will fail to serve")
		}
	}
	return f.blockExport
}

// denyWatcher is a data path whose clones run in processes of their own
// (userspace): the agent's deny list reaches them only when sent.
type denyWatcher interface {
	WatchDenied(ctx context.Context, every time.Duration)
}

// denyPush is how often the agent checks its deny list for a change to send
// to running clones; it adds to the exporter's refresh period.
const denyPush = time.Second

// peerTLS is how this worker's data path reaches a source's export: with
// the agent's own certificate, which the source's gate admits only for the
// migration's target, and refusing a source whose certificate is revoked.
func (f *agentFlags) peerTLS(deny *iscsi.DenyList) *datapath.PeerTLS {
	return &datapath.PeerTLS{Dir: f.tlsDir, Name: f.name, Denied: deny.Denied}
}

func init() {
	var f agentFlags
	cmd := &cobra.Command{
		Use:   "agent --worker NAME --server ADDR --data-dir DIR",
		Short: "Run a worker's agent: register, heartbeat, and do this worker's step of every migration naming it",
		Long: `Run a worker's agent. It registers the worker (with its 6PN host id and fabric address),
heartbeats, watches the migrations that name it, and performs its role's step for each committed
state, then proposes the next event. After a restart it resumes every migration from the committed
state. With --dev it also runs a one-node server in the same process (development only).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			if f.dev {
				if err := devServer(ctx, &f); err != nil {
					return err
				}
			}
			w, err := f.build(ctx)
			if err != nil {
				return err
			}
			go w.net.ExpireLoop(ctx)
			go w.exp.WatchRevoked(ctx)
			if d, ok := w.vols.(denyWatcher); ok {
				go d.WatchDenied(ctx, denyPush)
			}
			if f.metricsListen != "" {
				go func() {
					if err := metricsserve.Serve(ctx, f.metricsListen, w.agent.Metrics()); err != nil {
						fmt.Fprintf(os.Stderr, "ferry agent: metrics on %s: %v\n", f.metricsListen, err)
					}
				}()
			}
			return w.agent.Run(ctx)
		},
	}
	f.clientFlags.add(cmd, "")
	fl := cmd.Flags()
	fl.StringVar(&f.worker, "worker", "", "this worker's name (also its certificate name unless --cert)")
	fl.Uint32Var(&f.hostID, "host-id", 0, "the worker's 32-bit 6PN host id")
	fl.StringVar(&f.address, "address", "127.0.0.1", "IP where other workers reach this worker's exports")
	fl.StringVar(&f.dataDir, "data-dir", "/var/lib/ferry/agent", "volumes, clone metadata and local step records")
	fl.StringVar(&f.backend, "backend", "auto", "data path: kernel (dm-clone, dm-crypt, open-iscsi), userspace (ferry volume serve + FUSE), or auto: kernel when `dmsetup targets` lists clone, iscsiadm exists and the agent runs in PID 1's network namespace (iscsid's)")
	fl.StringVar(&f.domain, "iqn-domain", "dev.ferry", "naming authority of export IQNs")
	fl.DurationVar(&f.grace, "grace", 10*time.Minute, "how long a migrated machine's old 6PN address keeps answering")
	fl.DurationVar(&f.leaseTTL, "lease-ttl", 0, "worker lease; the server rolls back pre-cutover migrations of a worker that misses it (default: the server's, 15s)")
	fl.DurationVar(&f.fenceMargin, "fence-margin", 0, "how long before its lease can end an agent that cannot renew it stops the machines not settled here (default: a quarter of the lease)")
	fl.BoolVar(&f.startBeforeCutover, "start-before-cutover", false, "start a migrating machine on the target before cutover commits (one commit less downtime; relies on the self-fence if the target is cut off)")
	fl.StringVar(&f.hydrationRate, "hydration-rate", "0", "cap on background hydration per migration, bytes/s with K/M/G suffixes (0: none)")
	fl.BoolVar(&f.idleBatches, "hydration-idle-batches", true, "let background copies grow (1 → 4 MiB) while the migrated machine does no I/O: faster hydration, but an idle machine's first read of a block not yet copied waits about three times longer (userspace data path)")
	// Volume passphrases are 256-bit random keys held by the server, so a
	// memory-hard KDF adds no security, and unlocking happens between
	// source_stopped and cutover: argon2id's ~1 s would be downtime.
	fl.StringVar(&f.blockExport, "block-export", "auto", "how the userspace data path hands a volume to the kernel: fuse (a FUSE file on a loop device, the LUKS2 view in ferry), nbd (an NBD device with kernel dm-crypt over it; needs the nbd module and device-mapper) or auto: nbd where the host has its parts and a kernel from 6.13 on, fuse otherwise")
	fl.BoolVar(&f.fastKDF, "fast-kdf", true, "format new volumes with a pbkdf2 keyslot (their passphrases are random 256-bit keys; a slow KDF only adds downtime)")
	fl.StringVar(&f.machineUser, "machine-user", "65534:65534", "UID:GID machines (and their scripts) run as, with no_new_privs and a clean environment; \"root\" only for trusted test workloads")
	fl.StringVar(&f.metricsListen, "metrics-listen", "", "serve Prometheus metrics on this address (e.g. 127.0.0.1:9410); empty: off")
	fl.BoolVar(&f.dev, "dev", false, "also run a one-node server in this process (development)")
	fl.StringVar(&f.devListen, "dev-listen", "127.0.0.1:7400", "with --dev: the server's API address")

	clean := &cobra.Command{
		Use:   "cleanup --worker NAME --data-dir DIR",
		Short: "Tear down everything an agent left running from its data dir (machines, mounts, loop devices, datapaths, exports, namespaces)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			w, err := f.build(cmd.Context())
			if err != nil {
				return err
			}
			return supervisor.Cleanup(cmd.Context(), f.dataDir, w.mach, w.net, w.vols, w.exp)
		},
	}
	f.clientFlags.add(clean, "")
	clean.Flags().StringVar(&f.worker, "worker", "", "the worker's name")
	clean.Flags().StringVar(&f.dataDir, "data-dir", "/var/lib/ferry/agent", "the agent's data dir")
	clean.Flags().StringVar(&f.backend, "backend", "auto", "the data path the agent ran: auto, userspace or kernel")
	clean.Flags().StringVar(&f.blockExport, "block-export", "auto", "the block export the agent's userspace data path ran: auto, fuse or nbd")
	cmd.AddCommand(clean)
	register(cmd)
}

// devServer starts a one-node server in this process, making a development
// CA and certificates in --tls-dir if there are none.
func devServer(ctx context.Context, f *agentFlags) error {
	log, err := newLogger(true)
	if err != nil {
		return err
	}
	// The development CA lives next to --tls-dir (tlsutil.DevCADir), never in it.
	if err := tlsutil.EnsureDev(f.tlsDir, tlsutil.Cert{Name: "server", Kind: tlsutil.KindServer}, tlsutil.Cert{Name: f.worker, Kind: tlsutil.KindWorker},
		tlsutil.Cert{Name: "operator", Kind: tlsutil.KindOperator}); err != nil {
		return err
	}
	_, err = server.StartServer(ctx, log, server.Config{ID: "server", DataDir: filepath.Join(f.dataDir, "server"),
		Listen: f.devListen, RaftAddr: "127.0.0.1:0", Bootstrap: true, TLSDir: f.tlsDir})
	if err != nil {
		return fmt.Errorf("dev server: %w", err)
	}
	f.server = f.devListen
	return nil
}
