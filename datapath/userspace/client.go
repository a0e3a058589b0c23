package userspace

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
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/dmclone"
	"github.com/ferry-dev/ferry/internal/atomicfile"
	"github.com/ferry-dev/ferry/internal/childctl"
)

// Process is the agent's handle on a running `ferry volume serve`.
type Process struct {
	cfg    Config
	client *childctl.Client
}

// Dial connects to the process serving on socket (`ferry clone` finds its
// clone this way); it fails if nothing answers.
func Dial(ctx context.Context, socket string) (*Process, error) {
	return Adopt(ctx, Config{VolumeID: filepath.Base(socket), Socket: socket})
}

// Adopt connects to an already running serve process (after an agent
// restart). It fails if nothing answers on the socket.
func Adopt(ctx context.Context, cfg Config) (*Process, error) {
	p := &Process{cfg: cfg, client: childctl.Dial(cfg.Socket)}
	if _, err := p.Status(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

// Start launches `ferry volume serve` for cfg (the same binary, exe), passing
// the passphrase on stdin, and waits until its FUSE file is ready. If a serve
// process for this volume already answers on the socket it is adopted instead
// (idempotent).
func Start(ctx context.Context, log zerolog.Logger, exe string, cfg Config, passphrase []byte, stateDir string) (*Process, error) {
	return StartKeyed(ctx, log, exe, cfg, func(context.Context) ([]byte, error) { return bytes.Clone(passphrase), nil }, stateDir)
}

// StartKeyed is Start with the passphrase from key, called only when a new
// process starts and beside its start: the process reads it when its view
// opens (after its login to the source and its engine's open), so a key
// that takes a round trip to the servers costs no time of its own. A key
// that fails ends the process, and StartKeyed returns the key's error.
func StartKeyed(ctx context.Context, log zerolog.Logger, exe string, cfg Config, key func(context.Context) ([]byte, error), stateDir string) (*Process, error) {
	return startKeyed(ctx, log, exe, cfg, key, stateDir, nil)
}

// startKeyed is StartKeyed handing the configuration to pre, a process
// prestarted for this volume, when it is alive, instead of starting one.
// pre is released when it is not used.
func startKeyed(ctx context.Context, log zerolog.Logger, exe string, cfg Config, key func(context.Context) ([]byte, error), stateDir string, pre *prestarted) (*Process, error) {
	handed := false
	defer func() {
		if pre != nil && !handed {
			pre.release()
		}
	}()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	p, aerr := Adopt(ctx, cfg)
	if aerr == nil {
		return p, nil
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	// Remove the socket only when nothing listens on it: a live serve
	// process that is slow to answer would otherwise lose its socket, and
	// with it every later adoption and teardown.
	if c, err := net.DialTimeout("unix", cfg.Socket, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("datapath for volume %s listens on %s but does not answer (%v): retry, or see its log in %s", cfg.VolumeID, cfg.Socket, aerr, stateDir)
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("datapath state dir: %w", err)
	}
	_ = os.Remove(cfg.Socket)
	cfgPath := filepath.Join(stateDir, cfg.VolumeID+".json")
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := atomicfile.WriteFile(cfgPath, b, 0o600); err != nil {
		return nil, fmt.Errorf("write datapath config: %w", err)
	}
	tExec := time.Now()
	var (
		cmd    *exec.Cmd
		keyW   *os.File
		exited = make(chan error, 1)
	)
	// The configuration is on disk (synced): the prestarted process may read it.
	if pre != nil && pre.hand() {
		handed = true
		cmd, keyW = pre.cmd, pre.stdin
		go func() {
			<-pre.exited
			exited <- pre.err
		}()
	} else {
		pre = nil // gone, and released by hand
		if cmd, keyW, err = execServe(exe, filepath.Join(stateDir, cfg.VolumeID+".log"), nil, "--config", cfgPath); err != nil {
			return nil, fmt.Errorf("start datapath for volume %s: %w", cfg.VolumeID, err)
		}
		go func() { exited <- cmd.Wait() }()
	}
	// The key goes down the pipe once it is known; the write end closes
	// either way, so a process waiting for a key that failed reads an
	// empty one and ends.
	keyErr := make(chan error, 1)
	go func() {
		defer keyW.Close()
		k, err := key(ctx)
		if err == nil {
			_, err = keyW.Write(k)
			clear(k)
		}
		keyErr <- err
	}()
	p = &Process{cfg: cfg, client: childctl.Dial(cfg.Socket)}
	if err := p.client.WaitReady(ctx, "/v1/status", nil, exited, 60*time.Second); err != nil {
		_ = cmd.Process.Kill()
		select {
		case kerr := <-keyErr:
			if kerr != nil {
				return nil, fmt.Errorf("datapath for volume %s: its key: %w", cfg.VolumeID, kerr)
			}
		default:
		}
		tail, _ := tailFile(filepath.Join(stateDir, cfg.VolumeID+".log"), 2048)
		return nil, fmt.Errorf("datapath for volume %s: %w: %s", cfg.VolumeID, err, tail)
	}
	log.Info().Str("volume", cfg.VolumeID).Int("pid", cmd.Process.Pid).Bool("clone", cfg.Clone != nil).Bool("prestarted", handed).Dur("took", time.Since(tExec)).Msg("datapath ready")
	return p, nil
}

// execServe starts `exe volume serve ARGS`, its output appended to
// logPath, and returns it with the write end of its stdin (the key).
func execServe(exe, logPath string, extra []*os.File, args ...string) (*exec.Cmd, *os.File, error) {
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, nil, fmt.Errorf("datapath log: %w", err)
	}
	defer logf.Close()
	keyR, keyW, err := os.Pipe()
	if err != nil {
		return nil, nil, fmt.Errorf("a pipe for the datapath's key: %w", err)
	}
	defer keyR.Close()
	cmd := exec.Command(exe, append(append([]string{"volume", "serve"}, args...), "--log-format", "json")...)
	cmd.Stdin = keyR
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = extra // fd 3 onwards
	// Its own session: it outlives the agent, which re-adopts it by socket.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		keyW.Close()
		return nil, nil, err
	}
	return cmd, keyW, nil
}

func tailFile(path string, n int64) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	if int64(len(b)) > n {
		b = b[int64(len(b))-n:]
	}
	return string(bytes.TrimSpace(b)), nil
}

// Config returns the configuration the process was started with.
func (p *Process) Config() Config { return p.cfg }

// CallError is a refusal by the process (its HTTP status and message).
type CallError = childctl.Error

func (p *Process) call(ctx context.Context, method, path string, in, out any) error {
	if err := p.client.Call(ctx, method, path, in, out); err != nil {
		return fmt.Errorf("datapath of volume %s: %w", p.cfg.VolumeID, err)
	}
	return nil
}

// Mounted tells the process its filesystem is mounted: a clone then reads
// the machine's recent files ahead.
func (p *Process) Mounted(ctx context.Context) error {
	return p.call(ctx, http.MethodPost, "/v1/mounted", struct{}{}, nil)
}

// Status asks the process for its state and clone progress.
func (p *Process) Status(ctx context.Context) (*datapath.Status, error) {
	st, err := p.Detail(ctx)
	if err != nil {
		return nil, err
	}
	return &st.Status, nil
}

// Detail is Status with where the volume is served and the engine's record.
func (p *Process) Detail(ctx context.Context) (*ProcessStatus, error) {
	var s ProcessStatus
	if err := p.call(ctx, http.MethodGet, "/v1/status", nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// EnableHydration starts the background copy.
func (p *Process) EnableHydration(ctx context.Context) error {
	return p.call(ctx, http.MethodPost, "/v1/hydration/enable", nil, nil)
}

// DisableHydration stops the background copy; reads still hydrate on demand.
func (p *Process) DisableHydration(ctx context.Context) error {
	return p.call(ctx, http.MethodPost, "/v1/hydration/disable", nil, nil)
}

// SetTunables changes the background copy's batch, parallelism, rate and share.
func (p *Process) SetTunables(ctx context.Context, t *dmclone.Tunables) error {
	return p.call(ctx, http.MethodPost, "/v1/tunables", t, nil)
}

// SourceMove is where a clone's source export moved.
type SourceMove struct {
	Portal string `json:"portal"`
	IQN    string `json:"iqn"`
}

// Retarget reconnects the clone's source to the export at its new portal
// and IQN (datapath.Retargeter).
func (p *Process) Retarget(ctx context.Context, portal, iqn string) error {
	return p.call(ctx, http.MethodPost, "/v1/source", SourceMove{Portal: portal, IQN: iqn}, nil)
}

// SetDenied sends the process the revoked certificate serials: a clone
// refuses a source presenting one from its next handshake on and cuts its
// live sessions to it.
func (p *Process) SetDenied(ctx context.Context, serials []string) error {
	if serials == nil {
		serials = []string{}
	}
	return p.call(ctx, http.MethodPost, "/v1/denied", DenyUpdate{Serials: serials}, nil)
}

// Grow asks the process to serve payload plaintext bytes, growing its file.
func (p *Process) Grow(ctx context.Context, payload int64) error {
	return p.call(ctx, http.MethodPost, "/v1/grow", GrowRequest{PayloadSize: payload}, nil)
}

// Snapshot starts a point-in-time copy of the volume's ciphertext into
// path and returns at the instant; the copy completes in the background
// (Detail's Snapshot). The same path again answers the same copy.
func (p *Process) Snapshot(ctx context.Context, path string) (*SnapshotStatus, error) {
	var st SnapshotStatus
	err := p.call(ctx, http.MethodPost, "/v1/snapshot", SnapshotRequest{Path: path}, &st)
	return &st, err
}

// Dissolve replaces the clone with the destination alone once complete.
func (p *Process) Dissolve(ctx context.Context) error {
	return p.call(ctx, http.MethodPost, "/v1/dissolve", nil, nil)
}

// Stop asks the process to release its file and end; it returns once the
// process accepted (a refusal is a *CallError with Refused).
func (p *Process) Stop(ctx context.Context) error {
	if err := p.call(ctx, http.MethodPost, "/v1/shutdown", nil, nil); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// Shutdown flushes, unmounts the FUSE file and ends the process. The loop
// device on the FUSE file must be detached first.
func (p *Process) Shutdown(ctx context.Context) error {
	pidStatus, err := p.Status(ctx)
	if err != nil {
		return nil // already gone
	}
	if err := p.Stop(ctx); err != nil {
		return err
	}
	// Looked at every 2 ms: a migration's source waits here inside the
	// downtime, and the process usually ends within a few milliseconds.
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		if syscall.Kill(pidStatus.Pid, 0) != nil {
			return nil
		}
		time.Sleep(2 * time.Millisecond)
	}
	return fmt.Errorf("datapath for volume %s (pid %d) did not exit within 5s after shutdown (%s); "+
		"it may still be flushing its volume; its log says what it did last", p.cfg.VolumeID, pidStatus.Pid, describeWait(pidStatus.Pid))
}

// describeWait says what a process's threads wait in (/proc's state and
// wchan of each), so an error about a process that will not end tells
// whether it is busy, stuck in the kernel's I/O, or waiting on a lock.
func describeWait(pid int) string {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return "its threads cannot be read: " + err.Error()
	}
	counts := map[string]int{}
	for _, t := range tasks {
		dir := fmt.Sprintf("/proc/%d/task/%s/", pid, t.Name())
		state := "?"
		if b, err := os.ReadFile(dir + "stat"); err == nil {
			// The state follows the command, which is in parentheses and
			// may hold spaces.
			if i := strings.LastIndexByte(string(b), ')'); i >= 0 && i+2 < len(b) {
				state = string(b[i+2])
			}
		}
		wchan, _ := os.ReadFile(dir + "wchan")
		w := strings.TrimSpace(string(wchan))
		if w == "" || w == "0" {
			w = "running"
		}
		counts[state+" "+w]++
	}
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s ×%d", k, counts[k]))
	}
	return "threads by state and wait: " + strings.Join(parts, ", ")
}
