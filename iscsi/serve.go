package iscsi

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"syscall"
	"time"

	"github.com/gostor/gotgt/pkg/api"
	"github.com/gostor/gotgt/pkg/config"
	_ "github.com/gostor/gotgt/pkg/port/iscsit" // registers the "iscsi" target driver
	"github.com/gostor/gotgt/pkg/scsi"
	_ "github.com/gostor/gotgt/pkg/scsi/backingstore" // registers "null", which gotgt's fake LUN 0 needs
	"github.com/rs/zerolog"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/internal/childctl"
	"github.com/ferry-dev/ferry/internal/logging"
)

// childEnv marks a process started as an export child. The ferry binary
// dispatches on its "iscsi serve" arguments; test binaries on this variable.
const childEnv = "FERRY_ISCSI_EXPORT_CHILD"

// childListenerFD is the export child's inherited gate listener (bound in
// the host namespace).
const childListenerFD = 3

// GotgtPort is where gotgt listens inside the export child's private
// network namespace. gotgt binds every interface; there, that is loopback
// alone, reached by the gate (and by benchmarks that measure gotgt without
// the gate, from inside the namespace).
const GotgtPort = 3260

const roStoreName = "ferry-ro"

// childConfig is what the parent sends the child on stdin (it may hold TLS
// key material, hence not on the command line or in a file).
type childConfig struct {
	Path      string   `json:"path"`
	IQN       string   `json:"iqn"`
	LUN       uint64   `json:"lun"`
	BlockSize int      `json:"block_size"`
	Portal    string   `json:"portal"`
	Allow     []string `json:"allow"`
	TLS       *GateTLS `json:"tls,omitempty"`
	LogLevel  string   `json:"log_level"`
	Control   string   `json:"control"` // the control socket the child serves once ready
}

// IsExportChild reports whether this process was started as an export child
// (test binaries call ServeChild from TestMain when it is true).
func IsExportChild() bool { return os.Getenv(childEnv) == "1" }

// ServeChild is the body of `ferry iscsi serve`: it runs one export inside
// the private network namespace its parent created, until SIGTERM. It never
// returns normally; the exit status tells the supervisor what happened.
func ServeChild() {
	log := logging.For(zerolog.New(os.Stderr).With().Timestamp().Logger(), "iscsi-export-child")
	if err := serveChild(log); err != nil {
		log.Error().Err(err).Msg("export child failed")
		os.Exit(1)
	}
	os.Exit(0)
}

// The export child's runtime settings. gotgt allocates about 3 MiB of
// short-lived buffers per MiB it serves (per command and per Data-In PDU)
// and its live heap is a few MiB: with the default GOGC the child spends
// most of its CPU collecting, sweeping and refaulting freed pages. A high
// GOGC with a memory limit collects rarely and still bounds the process.
// gotgt hands every command to a new goroutine that waits on the
// connection's lock, so processors beyond one per busy connection only
// add wakeups and runtime lock contention: at most one per session of
// ferry's initiator. (One processor costs the least CPU per byte but
// stalls whenever the machine is loaded.) GOGC, GOMEMLIMIT and
// FERRY_EXPORT_GOMAXPROCS in the environment override these (GOMAXPROCS
// itself would reach the agent too).
const (
	childGCPercent   = 800
	childMemoryLimit = 256 << 20
	childMaxProcs    = 4
	childProcsEnv    = "FERRY_EXPORT_GOMAXPROCS"
)

func tuneChildRuntime() {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(childGCPercent)
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(childMemoryLimit)
	}
	procs := min(childMaxProcs, runtime.NumCPU())
	if n, err := strconv.Atoi(os.Getenv(childProcsEnv)); err == nil && n > 0 {
		procs = n
	}
	runtime.GOMAXPROCS(procs)
}

func serveChild(log zerolog.Logger) error {
	tuneChildRuntime()
	var cfg childConfig
	if err := json.NewDecoder(io.LimitReader(os.Stdin, 1<<20)).Decode(&cfg); err != nil {
		return fmt.Errorf("reading the export configuration from the parent: %w", err)
	}
	if lvl, err := zerolog.ParseLevel(cfg.LogLevel); err == nil && cfg.LogLevel != "" {
		log = log.Level(lvl)
	}
	log = log.With().Str("iqn", cfg.IQN).Logger()
	// gotgt logs through the global logrus logger: keep it to warnings, as JSON, on our stderr.
	logrus.SetOutput(os.Stderr)
	logrus.SetFormatter(&logrus.JSONFormatter{})
	logrus.SetLevel(logrus.WarnLevel)

	if err := loopbackOnly(); err != nil {
		return err
	}
	allow, err := parseAllow(cfg.Allow)
	if err != nil {
		return err
	}
	lf := os.NewFile(childListenerFD, "gate-listener")
	ln, err := net.FileListener(lf)
	if err != nil {
		return fmt.Errorf("gate listener from the parent: %w", err)
	}
	lf.Close()
	gt, err := newGate(log, ln, allow, cfg.TLS, net.JoinHostPort("127.0.0.1", strconv.Itoa(GotgtPort)))
	if err != nil {
		ln.Close()
		return err
	}

	if err := startGotgt(cfg); err != nil {
		return err
	}
	if err := waitListening(gt.backend, 10*time.Second); err != nil {
		return err
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	signal.Ignore(syscall.SIGPIPE, syscall.SIGHUP)
	// Answering the control socket is the readiness the parent waits for.
	ctl, err := childctl.Listen(cfg.Control)
	if err != nil {
		return err
	}
	stop := make(chan string, 1)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		childctl.Reply(w, childStatus{Pid: os.Getpid(), Portal: cfg.Portal, IQN: cfg.IQN}, nil)
	})
	mux.HandleFunc("POST /v1/denied", gt.handleDenied)
	mux.HandleFunc("POST /v1/shutdown", func(w http.ResponseWriter, r *http.Request) {
		childctl.Reply(w, nil, nil)
		select {
		case stop <- "shutdown request":
		default:
		}
	})
	srv := childctl.Serve(ctl, mux)
	defer func() {
		srv.Close()
		os.Remove(cfg.Control)
	}()
	log.Info().Str("portal", cfg.Portal).Msg("export serving")

	errc := make(chan error, 1)
	go func() { errc <- gt.serve() }()
	var why string
	select {
	case s := <-sig:
		why = s.String()
	case why = <-stop:
	case err := <-errc:
		return err
	}
	log.Info().Str("by", why).Msg("export stopping")
	gt.close()
	// gotgt is not closed: this process exits now, which closes its
	// listener. Its Close writes the client status that its accept loop
	// writes with no lock (iscsid.go:252), a race the detector reported
	// from this call in a chaos run; the gate, its only way in, is closed.
	return nil
}

// childStatus is what an export child reports on its control socket.
type childStatus struct {
	Pid    int    `json:"pid"`
	Portal string `json:"portal"`
	IQN    string `json:"iqn"`
}

// controlSocket is the control socket of the export in stateDir: inside it,
// unless that path is too long for a unix socket.
func controlSocket(stateDir string) string {
	abs, err := filepath.Abs(stateDir)
	if err != nil {
		abs = stateDir
	}
	p := filepath.Join(abs, "control.sock")
	if len(p) < 100 {
		return p
	}
	sum := sha256.Sum256([]byte(abs))
	return filepath.Join(os.TempDir(), "ferry-export-"+hex.EncodeToString(sum[:8])+".sock")
}

// loopbackOnly brings lo up and refuses to go on if the namespace has any
// other interface: gotgt binds all of them, so it must see nothing else.
func loopbackOnly() error {
	ifs, err := net.Interfaces()
	if err != nil {
		return fmt.Errorf("listing interfaces: %w", err)
	}
	for _, i := range ifs {
		if i.Flags&net.FlagLoopback == 0 {
			return fmt.Errorf("export child sees interface %s: it must run in a private network namespace (CLONE_NEWNET)", i.Name)
		}
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket for bringing lo up: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("reading lo flags: %w", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("bringing lo up: %w", err)
	}
	return nil
}

// startGotgt serves cfg's LUN read-only with gotgt on loopback, behind the
// gate, until the process exits (it is never closed: serveChild says why).
func startGotgt(cfg childConfig) error {
	shift := uint(9)
	for 1<<shift < cfg.BlockSize {
		shift++
	}
	scsi.RegisterBackingStore(roStoreName, func() (api.BackingStore, error) {
		return &roStore{BaseBackingStore: scsi.BaseBackingStore{Name: roStoreName}}, nil
	})
	const deviceID = 1000
	gc := &config.Config{
		Storages:     []config.BackendStorage{{DeviceID: deviceID, Path: roStoreName + ":" + cfg.Path, Online: true, BlockShift: shift}},
		ISCSIPortals: []config.ISCSIPortalInfo{{ID: 0, Portal: net.JoinHostPort("127.0.0.1", strconv.Itoa(GotgtPort))}},
		ISCSITargets: map[string]config.ISCSITarget{cfg.IQN: {
			TPGTs: map[string][]uint64{"1": {0}},
			LUNs:  map[string]uint64{strconv.FormatUint(cfg.LUN, 10): deviceID},
		}},
	}
	if err := scsi.InitSCSILUMap(gc); err != nil {
		return fmt.Errorf("configuring the target's LUN: %w", err)
	}
	lu := scsi.GetLU(cfg.IQN, cfg.LUN)
	if lu == nil {
		return errors.New("gotgt did not map the LUN")
	}
	// gotgt answers writes to a read-only LU with DATA PROTECT / WRITE
	// PROTECTED before they reach the store (and before ORWRITE can panic).
	lu.Attrs.Readonly = true
	lu.DeviceProtocol = roProtocol{lu.DeviceProtocol}
	// The LU implements SBC-3's READ CAPACITY(16) and Block Limits page: say so.
	lu.Attrs.VersionDesction[0] = 0x04c0
	drv, err := scsi.NewTargetDriver("iscsi", scsi.NewSCSITargetService())
	if err != nil {
		return fmt.Errorf("gotgt iscsi driver: %w", err)
	}
	if err := drv.NewTarget(cfg.IQN, gc); err != nil {
		return fmt.Errorf("gotgt target: %w", err)
	}
	// Discovery must announce the gate, not gotgt's loopback address.
	drv.SetClusterIP(cfg.Portal)
	go func() { _ = drv.Run(GotgtPort) }()
	return nil
}

func waitListening(addr string, within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("gotgt did not start listening on %s: %w", addr, err)
		}
		// gotgt listens within milliseconds of its start, inside a
		// migration's downtime: look often.
		time.Sleep(2 * time.Millisecond)
	}
}
