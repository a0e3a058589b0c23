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

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// A spare is a `ferry volume serve --spare DIR` process started ahead of
// need (the agent starts one when it prepares a migration's target): it has
// paid for its exec and the Go runtime's start, about 10 ms of a
// migration's pause on an idle machine, and waits on stdin for the path of
// the configuration to serve, then for its key on the same pipe. It ends
// when stdin closes without a path (the agent is gone).

// spareLog is an idle spare's log in its run directory (no volume id
// starts with a dot).
const spareLog = ".spare.log"

// maxSpareLine bounds the configuration path a spare reads.
const maxSpareLine = 4096

// ServeSpare is `ferry volume serve --spare stateDir`: it waits for a line
// on stdin naming a configuration file in stateDir, moves its output to that
// volume's log beside it, and serves it like ServeConfigFile, reading the
// key from what follows on stdin. End of input before a line is a clean
// exit.
func ServeSpare(ctx context.Context, log zerolog.Logger, stateDir string, stdin io.Reader) error {
	if n := ServeProcs(); n > 0 {
		runtime.GOMAXPROCS(n)
	}
	br := bufio.NewReaderSize(stdin, maxSpareLine)
	line, err := br.ReadSlice('\n')
	if len(line) == 0 && errors.Is(err, io.EOF) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("spare datapath: reading the configuration's path: %w", err)
	}
	path, err := spareConfigPath(stateDir, string(line[:len(line)-1]))
	if err != nil {
		return err
	}
	logf, err := os.OpenFile(strings.TrimSuffix(path, ".json")+".log", os.O_WRONLY|os.O_CREATE|os.O_APPEND|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("spare datapath: its log: %w", err)
	}
	// The logger writes to standard error: both descriptors now name the
	// volume's log, as for a process started with its configuration.
	for _, fd := range []int{1, 2} {
		if err := unix.Dup3(int(logf.Fd()), fd, 0); err != nil {
			logf.Close()
			return fmt.Errorf("spare datapath: moving its output to %s: %w", logf.Name(), err)
		}
	}
	logf.Close()
	return ServeConfigFile(ctx, log, path, br)
}

// spareConfigPath checks the path a spare was handed: a configuration file
// (NAME.json) directly in stateDir, nothing else.
func spareConfigPath(stateDir, path string) (string, error) {
	dir, err := filepath.Abs(stateDir)
	if err != nil {
		return "", err
	}
	if !filepath.IsAbs(path) || filepath.Clean(path) != path || filepath.Dir(path) != dir ||
		!strings.HasSuffix(path, ".json") || checkVolumeName(strings.TrimSuffix(filepath.Base(path), ".json")) != nil {
		return "", fmt.Errorf("spare datapath: %q is not a volume's configuration in %s", path, dir)
	}
	return path, nil
}

// spare is the agent's handle on a spare process.
type spare struct {
	cmd    *exec.Cmd
	stdin  *os.File // the write end: the configuration's path, then the key
	exited chan struct{}
	err    error // how it exited, once exited is closed
}

// startSpare starts a spare for configurations in stateDir.
func startSpare(exe, stateDir string) (*spare, error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("datapath state dir: %w", err)
	}
	cmd, w, err := execServe(exe, filepath.Join(stateDir, spareLog), "--spare", stateDir)
	if err != nil {
		return nil, fmt.Errorf("start a spare datapath: %w", err)
	}
	s := &spare{cmd: cmd, stdin: w, exited: make(chan struct{})}
	go func() {
		s.err = cmd.Wait()
		close(s.exited)
	}()
	return s, nil
}

// hand gives the spare the configuration at cfgPath; false if it is gone,
// and then it is released.
func (s *spare) hand(cfgPath string) bool {
	select {
	case <-s.exited:
		s.stdin.Close()
		return false
	default:
	}
	if _, err := s.stdin.Write([]byte(cfgPath + "\n")); err != nil {
		s.release()
		return false
	}
	return true
}

// release ends an unused spare: its stdin closes and it exits.
func (s *spare) release() {
	s.stdin.Close()
	<-s.exited
}

// spares holds at most one spare per backend.
type spares struct {
	mu sync.Mutex
	s  *spare
}

// take returns the spare, if one is alive, and forgets it.
func (sp *spares) take() *spare {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	s := sp.s
	sp.s = nil
	if s != nil {
		select {
		case <-s.exited:
			s.stdin.Close()
			return nil
		default:
		}
	}
	return s
}
