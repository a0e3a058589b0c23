package userspace

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// A prestarted datapath is `ferry volume serve --config VOL.json
// --await-config`, started when a migration's target is prepared, before
// its configuration exists (the portal and IQN come only with `exported`).
// It pays for its exec and the Go runtime's start (25–49 ms on a busy
// 2-core host: docs/profiles.md) outside the machine's pause, then waits
// for one line on stdin saying the configuration is written; the key
// follows on the same pipe. Its command line names its configuration like
// any datapath's, so every kill by configuration (abandon, cleanup, stuck
// I/O) finds it. End of stdin before the line (the agent gone, or the
// volume removed) or PrestartPatience without it is a clean exit.

// It reports on a status pipe (StatusFDFlag, fd 3) when an early login it
// was asked for ended, so the agent can wait for it before it lets the
// source stop the machine.

// PrestartPatience bounds how long a prestarted datapath waits for its
// configuration; the agent starts a fresh process for a clone built later.
const PrestartPatience = 5 * time.Minute

// AwaitConfigFlag is the serve flag of a prestarted datapath.
const AwaitConfigFlag = "--await-config"

// StatusFDFlag names the descriptor a prestarted datapath writes its
// status lines to (loggedInLine).
const StatusFDFlag = "--status-fd"

// loggedInLine on the status pipe: the early login ended (its session up
// with the volume's header read, or failed: the clone logs in itself).
const loggedInLine = "logged-in\n"

// ServeAwaitingConfig is `ferry volume serve --config path --await-config`:
// it waits for a line on stdin (at most patience), then serves path like
// ServeConfigFile, reading the key from what follows on stdin.
// Status lines go to status, when not nil, which is closed once said or
// not needed (the agent stops reading it then).
func ServeAwaitingConfig(ctx context.Context, log zerolog.Logger, path string, stdin io.Reader, status io.WriteCloser, patience time.Duration) error {
	reported := false
	defer func() {
		if status != nil && !reported {
			status.Close()
		}
	}()
	// Set now, not once the configuration came: the change stops the world
	// and waited 2-20 ms inside the machine's pause for the goroutines of
	// an early login to reach a safe point.
	if n := ServeProcs(); n > 0 {
		runtime.GOMAXPROCS(n)
	}
	br := bufio.NewReader(stdin)
	type result struct {
		line string
		err  error
	}
	lines := make(chan result, 1)
	next := func() {
		go func() {
			l, err := br.ReadString('\n')
			lines <- result{l, err}
		}()
	}
	next()
	t := time.NewTimer(patience)
	defer t.Stop()
	var early *earlyLogin
	for {
		select {
		case r := <-lines:
			if errors.Is(r.err, io.EOF) {
				early.close()
				return nil // released before its configuration: nothing to serve
			}
			if r.err != nil {
				early.close()
				return fmt.Errorf("prestarted datapath: waiting for its configuration: %w", r.err)
			}
			if pre, ok := strings.CutPrefix(r.line, connectLine); ok {
				if early == nil {
					early = connectEarly(ctx, log, pre)
					if status != nil && !reported {
						reported = true
						go reportLoggedIn(early, status)
					}
				}
				next()
				continue
			}
			return serveConfigFile(ctx, log, path, br, early)
		case <-t.C:
			early.close()
			log.Info().Dur("waited", patience).Msg("prestarted datapath: no configuration came; exiting (a clone built later starts its own process)")
			return nil
		case <-ctx.Done():
			early.close()
			return nil
		}
	}
}

// reportLoggedIn writes loggedInLine to status once early ended (at once
// when there is none), and closes it. A write error (the agent gone)
// changes nothing.
func reportLoggedIn(early *earlyLogin, status io.WriteCloser) {
	if early != nil {
		<-early.done
	}
	_, _ = io.WriteString(status, loggedInLine)
	status.Close()
}

// StatusFile is the status pipe a prestarted datapath inherited as fd
// (StatusFDFlag), kept from any process it starts; nil for fd < 3.
func StatusFile(fd int) io.WriteCloser {
	if fd < 3 {
		return nil
	}
	syscall.CloseOnExec(fd)
	return os.NewFile(uintptr(fd), "status")
}

// connectLine starts a line carrying a preliminary configuration (JSON on
// one line): the source published its export, the clone may log in.
const connectLine = "connect "

// connectEarly begins the login of the preliminary configuration pre; a
// bad one is logged and the clone logs in once its configuration is final.
func connectEarly(ctx context.Context, log zerolog.Logger, pre string) *earlyLogin {
	cfg, err := decodeConfig([]byte(pre))
	if err == nil {
		log = log.With().Str("process", "datapath").Str("volume", cfg.VolumeID).Logger()
		var early *earlyLogin
		if early, err = startEarlyLogin(ctx, log, cfg); err == nil {
			return early
		}
	}
	log.Warn().Err(err).Msg("prestarted datapath: no early login; the clone logs in once its configuration is final")
	return nil
}

// prestarted is the agent's handle on a prestarted datapath.
type prestarted struct {
	cmd    *exec.Cmd
	stdin  *os.File // the write end: a connect line, the go line, then the key
	exited chan struct{}
	err    error // how it exited, once exited is closed
	// connected: a connect line was sent (under prestarts.mu).
	connected bool
	// loggedIn is closed once the process reported its early login ended,
	// or exited.
	loggedIn chan struct{}
}

// startPrestarted starts a datapath for vol that waits for its
// configuration (stateDir/vol.json, not yet written).
func startPrestarted(exe, stateDir, vol string) (*prestarted, error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("datapath state dir: %w", err)
	}
	statusR, statusW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("a status pipe for the datapath of volume %s: %w", vol, err)
	}
	cmd, w, err := execServe(exe, filepath.Join(stateDir, vol+".log"), []*os.File{statusW},
		"--config", filepath.Join(stateDir, vol+".json"), AwaitConfigFlag, StatusFDFlag, "3")
	statusW.Close()
	if err != nil {
		statusR.Close()
		return nil, fmt.Errorf("prestart the datapath of volume %s: %w", vol, err)
	}
	p := &prestarted{cmd: cmd, stdin: w, exited: make(chan struct{}), loggedIn: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	go func() {
		// The first line, or the pipe's end (the process exited or
		// dropped it), ends the wait; nothing else is read.
		_, _ = bufio.NewReader(statusR).ReadString('\n')
		close(p.loggedIn)
		statusR.Close()
	}()
	return p, nil
}

// hand tells the process its configuration is written; false if it is
// gone (then it is released and the caller starts a process itself).
func (p *prestarted) hand() bool {
	select {
	case <-p.exited:
		p.stdin.Close()
		return false
	default:
	}
	if _, err := p.stdin.Write([]byte("\n")); err != nil {
		p.release()
		return false
	}
	return true
}

// releaseWait bounds the wait for a released process to exit.
const releaseWait = 5 * time.Second

// release ends a process not handed its configuration: its stdin closes
// and it exits; one that does not is killed.
func (p *prestarted) release() {
	p.stdin.Close()
	select {
	case <-p.exited:
	case <-time.After(releaseWait):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// prestarts holds a backend's prestarted datapaths by volume.
type prestarts struct {
	mu sync.Mutex
	m  map[string]*prestarted
}

// add keeps p for vol; false if vol already has a live one.
func (ps *prestarts) add(vol string, p *prestarted) bool {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if old := ps.m[vol]; old != nil {
		select {
		case <-old.exited:
		default:
			return false
		}
	}
	if ps.m == nil {
		ps.m = map[string]*prestarted{}
	}
	ps.m[vol] = p
	return true
}

// take returns vol's prestarted process, if one is alive, and forgets it.
func (ps *prestarts) take(vol string) *prestarted {
	ps.mu.Lock()
	p := ps.m[vol]
	delete(ps.m, vol)
	ps.mu.Unlock()
	if p == nil {
		return nil
	}
	select {
	case <-p.exited:
		p.stdin.Close()
		return nil
	default:
	}
	return p
}

// connect sends vol's prestarted process, if alive and not yet connected,
// its preliminary configuration cfg (one line of JSON), and reports
// whether it did. loggedIn is closed when that login ended; it is the
// first one's when a line was sent before, and closed when none can be.
func (ps *prestarts) connect(vol string, cfg []byte) (sent bool, loggedIn <-chan struct{}) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	p := ps.m[vol]
	if p == nil {
		return false, closedChan
	}
	if p.connected {
		return false, p.loggedIn
	}
	select {
	case <-p.exited:
		return false, closedChan
	default:
	}
	line := append(append([]byte(connectLine), cfg...), '\n')
	if _, err := p.stdin.Write(line); err != nil {
		return false, closedChan
	}
	p.connected = true
	return true, p.loggedIn
}

// closedChan is a channel that never blocks.
var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// all takes every prestarted process.
func (ps *prestarts) all() []*prestarted {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	var out []*prestarted
	for vol, p := range ps.m {
		out = append(out, p)
		delete(ps.m, vol)
	}
	return out
}
