package datapath

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// Process is the agent's handle on a running `ferry volume serve`.
type Process struct {
	cfg    Config
	client *http.Client
}

func httpOverUnix(socket string) *http.Client {
	return &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}},
	}
}

// Adopt connects to an already running serve process (after an agent
// restart). It fails if nothing answers on the socket.
func Adopt(ctx context.Context, cfg Config) (*Process, error) {
	p := &Process{cfg: cfg, client: httpOverUnix(cfg.Socket)}
	if _, err := p.Status(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

// mayStartAnother says whether the failed adoption (adoptErr) shows that no
// serve process holds cfg's socket, so a new one may replace it. Anything
// else (a canceled context, a slow or busy process) must not: removing the
// socket of a live process and starting a second one orphans the first,
// FUSE mount and all, under the new one.
func mayStartAnother(ctx context.Context, cfg Config, adoptErr error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("datapath for volume %s: %w", cfg.VolumeID, ctx.Err())
	}
	if errors.Is(adoptErr, fs.ErrNotExist) || errors.Is(adoptErr, syscall.ECONNREFUSED) || errors.Is(adoptErr, syscall.ENOENT) {
		return nil
	}
	return fmt.Errorf("datapath for volume %s: its socket %s did not answer (%w); not starting a second one over a live one: retry, or stop the old process", cfg.VolumeID, cfg.Socket, adoptErr)
}

// Start launches `ferry volume serve` for cfg (the same binary, exe), passing
// the passphrase on stdin, and waits until its FUSE file is ready. If a serve
// process for this volume already answers on the socket it is adopted instead
// (idempotent).
func Start(ctx context.Context, log zerolog.Logger, exe string, cfg Config, passphrase []byte, stateDir string) (*Process, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if p, err := Adopt(ctx, cfg); err == nil {
		return p, nil
	} else if err := mayStartAnother(ctx, cfg, err); err != nil {
		return nil, err
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
	if err := os.WriteFile(cfgPath, b, 0o600); err != nil {
		return nil, fmt.Errorf("write datapath config: %w", err)
	}
	logf, err := os.OpenFile(filepath.Join(stateDir, cfg.VolumeID+".log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("datapath log: %w", err)
	}
	defer logf.Close()
	cmd := exec.Command(exe, "volume", "serve", "--config", cfgPath, "--log-format", "json")
	cmd.Stdin = bytes.NewReader(passphrase)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own session: it outlives the agent, which re-adopts it by socket.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start datapath for volume %s: %w", cfg.VolumeID, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	p := &Process{cfg: cfg, client: httpOverUnix(cfg.Socket)}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := p.Status(ctx); err == nil {
			log.Info().Str("volume", cfg.VolumeID).Int("pid", cmd.Process.Pid).Bool("clone", cfg.Clone != nil).Msg("datapath ready")
			return p, nil
		}
		select {
		case err := <-exited:
			tail, _ := tailFile(filepath.Join(stateDir, cfg.VolumeID+".log"), 2048)
			return nil, fmt.Errorf("datapath for volume %s exited before it was ready (%v): %s", cfg.VolumeID, err, tail)
		case <-ctx.Done():
			_ = cmd.Process.Kill()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			return nil, fmt.Errorf("datapath for volume %s not ready after 60s: see %s", cfg.VolumeID, filepath.Join(stateDir, cfg.VolumeID+".log"))
		}
	}
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

func (p *Process) call(ctx context.Context, method, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://datapath"+path, nil)
	if err != nil {
		return err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return fmt.Errorf("datapath %s for volume %s: %w", path, p.cfg.VolumeID, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("datapath %s for volume %s: %s", path, p.cfg.VolumeID, bytes.TrimSpace(body))
	}
	if out != nil {
		if err := json.Unmarshal(body, out); err != nil {
			return fmt.Errorf("datapath %s reply: %w", path, err)
		}
	}
	return nil
}

// Status asks the process for its state and clone progress.
func (p *Process) Status(ctx context.Context) (*Status, error) {
	var s Status
	if err := p.call(ctx, http.MethodGet, "/v1/status", &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// EnableHydration starts the background copy.
func (p *Process) EnableHydration(ctx context.Context) error {
	return p.call(ctx, http.MethodPost, "/v1/hydration/enable", nil)
}

// Dissolve replaces the clone with the destination alone once complete.
func (p *Process) Dissolve(ctx context.Context) error {
	return p.call(ctx, http.MethodPost, "/v1/dissolve", nil)
}

// Shutdown flushes, unmounts the FUSE file and ends the process. The loop
// device on the FUSE file must be detached first.
func (p *Process) Shutdown(ctx context.Context) error {
	pidStatus, err := p.Status(ctx)
	if err != nil {
		return nil // already gone
	}
	if err := p.call(ctx, http.MethodPost, "/v1/shutdown", nil); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	for i := 0; i < 500; i++ {
		if syscall.Kill(pidStatus.Pid, 0) != nil {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("datapath for volume %s (pid %d) did not exit after shutdown", p.cfg.VolumeID, pidStatus.Pid)
}
