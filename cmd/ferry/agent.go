package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/ferry-dev/ferry/agent"
	"github.com/ferry-dev/ferry/internal/logging"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/machine"
	"github.com/ferry-dev/ferry/server"
)

type agentFlags struct {
	clientFlags
	worker, dataDir, address, backend, domain string
	hostID                                    uint32
	dev, fastKDF                              bool
	grace, leaseTTL                           time.Duration
	hydrationRate, metricsListen              string
	devListen                                 string
}

func (f *agentFlags) build(ctx context.Context) (*agent.Agent, *agent.NetNetwork, error) {
	log, err := newLogger(true)
	if err != nil {
		return nil, nil, withCode(ExitUsage, err)
	}
	if f.worker == "" {
		return nil, nil, withCode(ExitUsage, fmt.Errorf("--worker is required"))
	}
	kernel := false
	switch f.backend {
	case "userspace":
	case "auto":
		kernel = agent.KernelPathAvailable(ctx)
	case "kernel":
		if err := agent.CheckKernelPath(ctx); err != nil {
			return nil, nil, withCode(ExitUsage, fmt.Errorf("--backend kernel: %w; or use --backend userspace", err))
		}
		kernel = true
	default:
		return nil, nil, withCode(ExitUsage, fmt.Errorf("--backend %q: use auto, userspace or kernel", f.backend))
	}
	if f.name == "" {
		f.name = f.worker
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, nil, err
	}
	c, err := f.client()
	if err != nil {
		return nil, nil, err
	}
	alog := logging.For(log, "agent")
	var vols agent.Backend = &agent.Volumes{DataDir: f.dataDir, Exe: exe, Log: logging.For(log, "volumes"), Loops: agent.LoopDevs{}, FastKDF: f.fastKDF}
	if kernel {
		vols = &agent.KernelVolumes{DataDir: f.dataDir, Log: logging.For(log, "kernel-volumes"), Loops: agent.LoopDevs{},
			ISCSI: &agent.OpenISCSI{Log: logging.For(log, "open-iscsi")}, FastKDF: f.fastKDF}
	}
	log.Info().Str("backend", map[bool]string{true: "kernel", false: "userspace"}[kernel]).Msg("data path")
	exp := &agent.ISCSIExporter{Log: log, StateDir: filepath.Join(f.dataDir, "exports"), Address: f.address, Domain: f.domain}
	nw := &agent.NetNetwork{Log: logging.For(log, "netrewrite"), Worker: f.worker, Dir: filepath.Join(f.dataDir, "net"), Grace: f.grace}
	mach := machine.ByKind{Exec: &machine.Exec{StateDir: filepath.Join(f.dataDir, "machines"), Log: logging.For(log, "machine")},
		Script: machine.Script{}}
	acfg := agent.Config{Worker: f.worker, HostID: f.hostID, Address: f.address, DataDir: f.dataDir, Exe: exe, LeaseTTL: f.leaseTTL}
	if f.hydrationRate != "" && f.hydrationRate != "0" {
		if acfg.HydrationRate, err = parseSize(f.hydrationRate); err != nil {
			return nil, nil, withCode(ExitUsage, fmt.Errorf("--hydration-rate: %w", err))
		}
	}
	if kernel && acfg.HydrationRate > 0 {
		log.Warn().Msg("--hydration-rate is not honoured by the kernel data path (dm-clone has no rate limit); hydration runs with ferry's batch and threshold tunables")
	}
	if fp := os.Getenv("FERRY_FAILPOINT_PAUSE_BEFORE"); fp != "" {
		if acfg.PauseBefore, err = agent.ParsePauseBefore(fp); err != nil {
			return nil, nil, withCode(ExitUsage, err)
		}
	}
	a, err := agent.New(alog, acfg, &agent.APIControlPlane{C: c, LeaseTTL: f.leaseTTL, Report: volumeStoreReport(f.dataDir, acfg.HydrationRate)}, exp, nw, mach, vols)
	return a, nw, err
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
			a, nw, err := f.build(ctx)
			if err != nil {
				return err
			}
			go nw.ExpireLoop(ctx)
			if f.metricsListen != "" {
				go func() {
					if err := a.ServeMetrics(ctx, f.metricsListen); err != nil {
						fmt.Fprintf(os.Stderr, "ferry agent: metrics on %s: %v\n", f.metricsListen, err)
					}
				}()
			}
			return a.Run(ctx)
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
	fl.StringVar(&f.hydrationRate, "hydration-rate", "0", "cap on background hydration per migration, bytes/s with K/M/G suffixes (0: none)")
	// Volume passphrases are 256-bit random keys held by the server, so a
	// memory-hard KDF adds no security, and unlocking happens between
	// source_stopped and cutover: argon2id's ~1 s would be downtime.
	fl.BoolVar(&f.fastKDF, "fast-kdf", true, "format new volumes with a pbkdf2 keyslot (their passphrases are random 256-bit keys; a slow KDF only adds downtime)")
	fl.StringVar(&f.metricsListen, "metrics-listen", "", "serve Prometheus metrics on this address (e.g. 127.0.0.1:9410); empty: off")
	fl.BoolVar(&f.dev, "dev", false, "also run a one-node server in this process (development)")
	fl.StringVar(&f.devListen, "dev-listen", "127.0.0.1:7400", "with --dev: the server's API address")

	clean := &cobra.Command{
		Use:   "cleanup --worker NAME --data-dir DIR",
		Short: "Tear down everything an agent left running from its data dir (machines, mounts, loop devices, datapaths, exports, namespaces)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			a, _, err := f.build(cmd.Context())
			if err != nil {
				return err
			}
			return a.Cleanup(cmd.Context())
		},
	}
	f.clientFlags.add(clean, "")
	clean.Flags().StringVar(&f.worker, "worker", "", "the worker's name")
	clean.Flags().StringVar(&f.dataDir, "data-dir", "/var/lib/ferry/agent", "the agent's data dir")
	clean.Flags().StringVar(&f.backend, "backend", "auto", "the data path the agent ran: auto, userspace or kernel")
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
	if _, err := os.Stat(filepath.Join(f.tlsDir, "ca.pem")); os.IsNotExist(err) {
		if err := tlsutil.InitCA(f.tlsDir); err != nil {
			return err
		}
	}
	for name, kind := range map[string]string{"server": tlsutil.KindServer, f.worker: tlsutil.KindWorker, "operator": tlsutil.KindOperator} {
		if cert, _ := tlsutil.Files(f.tlsDir, name); !exists(cert) {
			if err := tlsutil.Issue(f.tlsDir, name, kind, []string{"127.0.0.1", "localhost"}); err != nil {
				return err
			}
		}
	}
	_, err = server.StartServer(ctx, log, server.Config{ID: "server", DataDir: filepath.Join(f.dataDir, "server"),
		Listen: f.devListen, RaftAddr: "127.0.0.1:0", Bootstrap: true, TLSDir: f.tlsDir})
	if err != nil {
		return fmt.Errorf("dev server: %w", err)
	}
	f.server = f.devListen
	return nil
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }
