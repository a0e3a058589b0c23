package iscsi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/atomicfile"
	"github.com/ferry-dev/ferry/internal/childctl"
	"github.com/ferry-dev/ferry/internal/logging"
)

// ExportConfig describes one migration's export of a frozen volume.
type ExportConfig struct {
	Path      string   // file or block device, opened read-only
	Listen    string   // host:port of the gate; port 0 picks one
	Allow     []string // addresses or CIDR prefixes admitted by the gate
	IQN       string   // target name, e.g. MigrationIQN(...)
	LUN       uint64   // default 0
	BlockSize int      // logical block size, default 512; the volume size must be a multiple
	StateDir  string   // private directory for the child's state and log; required
	TLS       *GateTLS // optional: the gate speaks TLS (mTLS with ClientCAPEM)
	LogLevel  string   // child log level, default "info"
	// MaxRestarts bounds how often a crashed export process is restarted
	// within a minute (default 3; negative: never).
	MaxRestarts int
}

// stateFile records a running export so an agent restarted after a crash
// can adopt or stop it.
const (
	stateFileName = "export.json"
	logFileName   = "export.log"
)

type exportState struct {
	PID     int       `json:"pid"`
	Portal  string    `json:"portal"`
	IQN     string    `json:"iqn"`
	Path    string    `json:"path"`
	Started time.Time `json:"started"`
}

// Export is a running export: a supervised child process (gotgt in a private
// network namespace) behind a gate listening in the host namespace.
type Export struct {
	log      zerolog.Logger
	cfg      ExportConfig
	stateDir string
	portal   string
	iqn      string
	ln       *net.TCPListener // nil when adopted
	child    []byte           // child configuration (JSON), for restarts
	reaped   chan struct{}    // closed once our child has been waited for after Stop; nil when adopted

	mu       sync.Mutex
	pid      int
	stopping bool
	done     chan struct{}
	err      error
}

// Portal is the gate's address (host:port) the target connects to.
func (e *Export) Portal() string { return e.portal }

// IQN is the exported target's name.
func (e *Export) IQN() string { return e.iqn }

// PID is the export process, for diagnostics and tests.
func (e *Export) PID() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.pid
}

// Done is closed when the export has ended for good (stopped, or crashed
// more often than MaxRestarts allows); Err then says why.
func (e *Export) Done() <-chan struct{} { return e.done }

// Err is nil while running or after a clean Stop.
func (e *Export) Err() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.err
}

func (c *ExportConfig) validate() error {
	if c.Path == "" {
		return errors.New("export: the path of the volume is required")
	}
	if c.StateDir == "" {
		return errors.New("export: a state directory is required")
	}
	if c.IQN == "" {
		return errors.New("export: an IQN is required (see MigrationIQN)")
	}
	if err := validIQN(c.IQN); err != nil {
		return err
	}
	if c.BlockSize == 0 {
		c.BlockSize = 512
	}
	if c.BlockSize < 512 || c.BlockSize > 65536 || c.BlockSize&(c.BlockSize-1) != 0 {
		return fmt.Errorf("export: block size %d: want a power of two from 512 to 65536", c.BlockSize)
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.MaxRestarts == 0 {
		c.MaxRestarts = 3
	}
	if _, err := parseAllow(c.Allow); err != nil {
		return err
	}
	f, err := os.Open(c.Path)
	if err != nil {
		return fmt.Errorf("export: %w", err)
	}
	defer f.Close()
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return fmt.Errorf("export: sizing %s: %w", c.Path, err)
	}
	if size == 0 || size%int64(c.BlockSize) != 0 {
		return fmt.Errorf("export: %s is %d bytes, not a positive multiple of the %d-byte block size", c.Path, size, c.BlockSize)
	}
	return nil
}

// StartExport exports cfg.Path read-only and returns once the target answers.
// It is idempotent: if cfg.StateDir already records a live export of the
// same IQN and path, that export is adopted and returned.
func StartExport(ctx context.Context, log zerolog.Logger, cfg ExportConfig) (*Export, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	log = logging.For(log, "iscsi-export").With().Str("iqn", cfg.IQN).Logger()
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("export state directory: %w", err)
	}
	if st, err := readState(cfg.StateDir); err == nil {
		if st.IQN == cfg.IQN && st.Path == cfg.Path && childAlive(st.PID, cfg.StateDir) {
			log.Info().Int("pid", st.PID).Str("portal", st.Portal).Msg("adopting the export already running")
			return adopt(log, cfg.StateDir, st), nil
		}
		log.Warn().Int("pid", st.PID).Msg("replacing a stale export record")
		if err := killRecorded(st, cfg.StateDir); err != nil {
			return nil, err
		}
		removeState(cfg.StateDir)
	}

	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("export gate: listening on %s: %w", cfg.Listen, err)
	}
	e := &Export{
		log: log, cfg: cfg, stateDir: cfg.StateDir, iqn: cfg.IQN,
		ln: ln.(*net.TCPListener), portal: ln.Addr().String(), done: make(chan struct{}), reaped: make(chan struct{}),
	}
	abs, _ := filepath.Abs(cfg.Path)
	e.child, err = json.Marshal(childConfig{
		Path: abs, IQN: cfg.IQN, LUN: cfg.LUN, BlockSize: cfg.BlockSize, Portal: e.portal,
		Allow: cfg.Allow, TLS: cfg.TLS, LogLevel: cfg.LogLevel, Control: controlSocket(cfg.StateDir),
	})
	if err != nil {
		ln.Close()
		return nil, err
	}
	cmd, exited, err := e.spawn(ctx)
	if err != nil {
		ln.Close()
		removeState(cfg.StateDir)
		return nil, err
	}
	log.Info().Str("portal", e.portal).Int("pid", cmd.Process.Pid).Msg("export started")
	go e.supervise(exited)
	return e, nil
}

// childCommand returns how to run `ferry iscsi serve`: this very binary.
func childCommand(stateDir string) (*exec.Cmd, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("finding this executable to run the export process: %w", err)
	}
	cmd := exec.Command(self, "iscsi", "serve", "--state-dir", stateDir)
	cmd.Env = append(os.Environ(), childEnv+"=1")
	return cmd, nil
}

// spawn starts one child on the gate listener and waits until it answers
// its control socket. exited yields the child's end (supervise reaps it).
func (e *Export) spawn(ctx context.Context) (*exec.Cmd, <-chan error, error) {
	cmd, err := childCommand(e.stateDir)
	if err != nil {
		return nil, nil, err
	}
	lnFile, err := e.ln.File()
	if err != nil {
		return nil, nil, fmt.Errorf("export gate listener: %w", err)
	}
	defer lnFile.Close()
	logf, err := os.OpenFile(filepath.Join(e.stateDir, logFileName), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("export log: %w", err)
	}
	defer logf.Close()
	e.mu.Lock()
	cmd.Stdin = bytes.NewReader(e.child) // SetDenied may have updated it
	e.mu.Unlock()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{lnFile}
	// A private network namespace holding only loopback contains gotgt's
	// listen-on-everything; its own process group keeps the agent's
	// terminal signals away from it (the agent stops it explicitly).
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("starting the export process (needs root for its network namespace): %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	var st childStatus
	if err := childctl.Dial(controlSocket(e.stateDir)).WaitReady(ctx, "/v1/status", &st, exited, 20*time.Second); err != nil {
		_ = cmd.Process.Kill()
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
		}
		return nil, nil, fmt.Errorf("export process: %w (log: %s)", err, logTail(filepath.Join(e.stateDir, logFileName)))
	}
	e.mu.Lock()
	e.pid = cmd.Process.Pid
	e.mu.Unlock()
	if err := writeState(e.stateDir, exportState{PID: cmd.Process.Pid, Portal: e.portal, IQN: e.iqn, Path: e.cfg.Path, Started: time.Now().UTC()}); err != nil {
		_ = cmd.Process.Kill()
		<-exited
		return nil, nil, err
	}
	return cmd, exited, nil
}

// supervise restarts a crashed child (a gotgt panic kills one export
// process, never the agent) on the same listener, within MaxRestarts a minute.
func (e *Export) supervise(exited <-chan error) {
	var crashes []time.Time
	for {
		err := <-exited
		e.mu.Lock()
		stopping := e.stopping
		e.mu.Unlock()
		if stopping {
			close(e.reaped)
			return
		}
		if _, serr := readState(e.stateDir); errors.Is(serr, os.ErrNotExist) {
			e.finish(nil) // `ferry iscsi stop` (StopRecorded) ended it on purpose
			return
		}
		e.log.Error().Err(err).Str("log", logTail(filepath.Join(e.stateDir, logFileName))).Msg("export process died")
		now := time.Now()
		recent := crashes[:0]
		for _, c := range crashes {
			if now.Sub(c) < time.Minute {
				recent = append(recent, c)
			}
		}
		crashes = append(recent, now)
		if e.cfg.MaxRestarts < 0 || len(crashes) > e.cfg.MaxRestarts {
			e.finish(fmt.Errorf("export process died %d times within a minute, last: %v", len(crashes), err))
			return
		}
		next, nextExited, serr := e.spawn(context.Background())
		if serr != nil {
			e.finish(fmt.Errorf("restarting the export process: %w", serr))
			return
		}
		e.log.Warn().Int("pid", next.Process.Pid).Msg("export process restarted")
		exited = nextExited
	}
}

// finish ends a failed export: listener and state go, Done closes.
func (e *Export) finish(err error) {
	e.mu.Lock()
	if e.stopping {
		e.mu.Unlock()
		return
	}
	e.stopping = true
	e.err = err
	e.mu.Unlock()
	if err != nil {
		e.log.Error().Err(err).Msg("export ended")
	} else {
		e.log.Info().Msg("export stopped from outside")
	}
	if e.ln != nil {
		e.ln.Close()
	}
	removeState(e.stateDir)
	close(e.done)
}

// Stop tears the export down without a trace: the process (and with it its
// namespace and gotgt) ends, the gate listener closes, the state files go.
func (e *Export) Stop() error {
	e.mu.Lock()
	if e.stopping {
		e.mu.Unlock()
		<-e.done
		return nil
	}
	e.stopping = true
	pid := e.pid
	e.mu.Unlock()
	err := terminate(pid, e.stateDir)
	if e.reaped != nil && err == nil {
		// terminate sees the child gone once it is a zombie; wait until
		// supervise has reaped it, so no trace of the process remains.
		select {
		case <-e.reaped:
		case <-time.After(5 * time.Second):
		}
	}
	if e.ln != nil {
		e.ln.Close()
	}
	removeState(e.stateDir)
	close(e.done)
	e.log.Info().Msg("export stopped")
	return err
}

// AdoptExport takes over the export recorded in stateDir by an earlier agent
// (e.g. one killed with SIGKILL), so it can be used or stopped.
func AdoptExport(log zerolog.Logger, stateDir string) (*Export, error) {
	st, err := readState(stateDir)
	if err != nil {
		return nil, err
	}
	if !childAlive(st.PID, stateDir) {
		removeState(stateDir)
		return nil, fmt.Errorf("export recorded in %s (pid %d) is no longer running; its record was removed", stateDir, st.PID)
	}
	return adopt(logging.For(log, "iscsi-export").With().Str("iqn", st.IQN).Logger(), stateDir, st), nil
}

func adopt(log zerolog.Logger, stateDir string, st exportState) *Export {
	e := &Export{log: log, stateDir: stateDir, portal: st.Portal, iqn: st.IQN, pid: st.PID, done: make(chan struct{})}
	e.cfg.Path = st.Path
	// Not our child: watch it by polling, since it cannot be waited for.
	go func() {
		for {
			time.Sleep(time.Second)
			e.mu.Lock()
			stopping := e.stopping
			e.mu.Unlock()
			if stopping {
				return
			}
			if !childAlive(st.PID, stateDir) {
				e.finish(fmt.Errorf("adopted export process %d died", st.PID))
				return
			}
		}
	}()
	return e
}

// StopRecorded stops the export recorded in stateDir, if any (`ferry iscsi stop`).
func StopRecorded(stateDir string) (bool, error) {
	st, err := readState(stateDir)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	// The record goes first: the supervising agent then knows the end is
	// deliberate and does not restart the process.
	_ = os.Remove(filepath.Join(stateDir, stateFileName))
	err = killRecorded(st, stateDir)
	removeState(stateDir)
	return true, err
}

func killRecorded(st exportState, stateDir string) error {
	if !childAlive(st.PID, stateDir) {
		return nil
	}
	return terminate(st.PID, stateDir)
}

// terminate asks the child to stop (SIGTERM if its socket does not
// answer), then SIGKILL after 5 s, and waits for the end.
func terminate(pid int, stateDir string) error {
	if pid <= 0 || !childAlive(pid, stateDir) {
		return nil
	}
	// Asked over its control socket; a signal if that does not answer.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	err := childctl.Dial(controlSocket(stateDir)).Call(ctx, http.MethodPost, "/v1/shutdown", nil, nil)
	cancel()
	if err != nil {
		_ = syscall.Kill(pid, syscall.SIGTERM)
	}
	deadline := time.Now().Add(5 * time.Second)
	killed := false
	for childAlive(pid, stateDir) {
		if time.Now().After(deadline) {
			if killed {
				return fmt.Errorf("export process %d survives SIGKILL (stuck in the kernel?); stop it by hand", pid)
			}
			_ = syscall.Kill(pid, syscall.SIGKILL)
			killed, deadline = true, time.Now().Add(5*time.Second)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// childAlive checks pid is a running export child of this state directory,
// so a recycled pid is never signalled.
func childAlive(pid int, stateDir string) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return false
	}
	if st, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil {
		if i := bytes.LastIndexByte(st, ')'); i > 0 && i+2 < len(st) && st[i+2] == 'Z' {
			return false // exited, waiting to be reaped
		}
	}
	return bytes.Contains(b, []byte("\x00serve\x00--state-dir\x00"+stateDir+"\x00"))
}

func readState(dir string) (exportState, error) {
	var st exportState
	b, err := os.ReadFile(filepath.Join(dir, stateFileName))
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("export record %s: %w", filepath.Join(dir, stateFileName), err)
	}
	return st, nil
}

func writeState(dir string, st exportState) error {
	b, _ := json.Marshal(st)
	if err := atomicfile.WriteFile(filepath.Join(dir, stateFileName), b, 0o600); err != nil {
		return fmt.Errorf("export record: %w", err)
	}
	return nil
}

// removeState deletes the files ferry put in dir, and dir if it is then empty.
func removeState(dir string) {
	for _, n := range []string{stateFileName, stateFileName + ".tmp", logFileName} {
		_ = os.Remove(filepath.Join(dir, n))
	}
	_ = os.Remove(dir)
}

// logTail returns the last lines of the child's log for error messages.
func logTail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "unavailable"
	}
	if len(b) > 1500 {
		b = b[len(b)-1500:]
	}
	return strings.TrimSpace(string(b))
}
