package machine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/atomicfile"
)

// Exec runs machines as processes. Each machine's pid and start time live in
// StateDir/<id>/, so a restarted agent finds the process it started (the
// process runs in its own session and survives the agent). A journal of
// start/stop instants is kept per machine for invariant checks.
type Exec struct {
	StateDir string
	Log      zerolog.Logger
	User     *User // who machines run as (nil: Nobody)
	// Stuck, if set, is asked to fail the I/O under mountDir that a
	// machine still alive stuckAfter its SIGKILL waits in, on a stop with
	// Spec.FailStuckIO, and reports whether it did (the agent: the data
	// path's StuckIOFailer). Without it such a machine lives until that
	// I/O returns.
	Stuck func(ctx context.Context, mountDir string) bool
	// reaped: pid -> a channel closed once a machine this process started
	// was reaped (reapGroup), so Stop returns at its exit; it polled every
	// stopPoll before, 5 ms of every migration's pause (traced: the
	// workload exits within 1 ms of its signal).
	reaped sync.Map
}

// stopPoll is how often Stop checks whether a machine it signalled is
// gone when no reaper tells it (one started by an earlier agent process).
var stopPoll = 5 * time.Millisecond

// stuckAfter is how long a SIGKILLed machine may take to go before Stop
// takes it for stuck in I/O.
const stuckAfter = 2 * time.Second

type procRef struct {
	Pid       int
	StartTime string // /proc/<pid>/stat field 22: guards against pid reuse
}

func (e *Exec) dir(id string) string { return filepath.Join(e.StateDir, id) }

func procStartTime(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	// comm may contain spaces; fields after the last ')' are fixed.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return "", fmt.Errorf("unparsable /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return "", fmt.Errorf("short /proc/%d/stat", pid)
	}
	if (f[0] == "Z" || f[0] == "X") && !threadsRun(pid) {
		return "", fmt.Errorf("process %d is a zombie", pid)
	}
	return f[19], nil
}

// threadsRun reports whether a thread of process pid has not exited yet.
// A killed multi-threaded process whose leader thread exited first shows
// the leader as a zombie while another thread is still in uninterruptible
// I/O (a write through a clone whose source is cut off): until that thread
// ends, the process still holds its files and its folder in the volume.
func threadsRun(pid int) bool {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, t := range tasks {
		b, err := os.ReadFile(filepath.Join(dir, t.Name(), "stat"))
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		if st := strings.TrimSpace(s[i+1:]); st != "" && st[0] != 'Z' && st[0] != 'X' {
			return true
		}
	}
	return false
}

func (e *Exec) readRef(id string) (*procRef, error) {
	b, err := os.ReadFile(filepath.Join(e.dir(id), "pid"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read pid file of machine %s: %w", id, err)
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return nil, nil
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil {
		return nil, nil
	}
	return &procRef{Pid: pid, StartTime: f[1]}, nil
}

// alive reports whether the recorded process is still the one we started.
func (r *procRef) alive() bool {
	if r == nil {
		return false
	}
	st, err := procStartTime(r.Pid)
	return err == nil && st == r.StartTime
}

func (e *Exec) journal(id, what string) {
	f, err := os.OpenFile(filepath.Join(e.dir(id), "journal"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		e.Log.Warn().Err(err).Str("machine", id).Msg("cannot write machine journal")
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "%d %s\n", time.Now().UnixNano(), what)
	f.Sync()
}

// Start runs the machine's command unless it already runs.
func (e *Exec) Start(ctx context.Context, s Spec) error {
	if err := ValidateID(s.ID); err != nil {
		return err
	}
	if len(s.Command) == 0 {
		return fmt.Errorf("machine %s has no command to run", s.ID)
	}
	ref, err := e.readRef(s.ID)
	if err != nil {
		return err
	}
	if ref.alive() {
		return nil
	}
	if err := os.MkdirAll(e.dir(s.ID), 0o700); err != nil {
		return fmt.Errorf("machine state dir: %w", err)
	}
	user := e.User.orNobody()
	dir := s.MountDir
	if s.Dir != "" {
		if dir, err = confined(s, "work_dir", s.Dir); err != nil {
			return err
		}
	}
	env, err := machineEnv(s)
	if err != nil {
		return err
	}
	if err := ownMount(s.MountDir, user); err != nil {
		return err
	}
	cmd, err := command(context.Background(), s.Command, env) // outlives ctx
	if err != nil {
		return fmt.Errorf("start machine %s: %w", s.ID, err)
	}
	logf, err := os.OpenFile(filepath.Join(e.dir(s.ID), "output.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("machine log: %w", err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true} // survives the agent
	if err := startConfined(cmd, dir, s.NetNS, user); err != nil {
		return fmt.Errorf("start machine %s (%s): %w", s.ID, s.Command[0], err)
	}
	st, err := procStartTime(cmd.Process.Pid)
	if err != nil {
		return fmt.Errorf("machine %s exited at once: see %s", s.ID, filepath.Join(e.dir(s.ID), "output.log"))
	}
	// Record the process before relying on it (crash safety): write then rename.
	if err := atomicfile.WriteFile(filepath.Join(e.dir(s.ID), "pid"), []byte(fmt.Sprintf("%d %s\n", cmd.Process.Pid, st)), 0o600); err != nil {
		return fmt.Errorf("record machine pid: %w", err)
	}
	e.journal(s.ID, "start")
	// Reap it when it exits while we are alive; after an agent restart init reaps it.
	pid, reaped := cmd.Process.Pid, make(chan struct{})
	e.reaped.Store(pid, reaped)
	go func() {
		reapGroup(cmd)
		e.reaped.CompareAndDelete(pid, reaped)
		close(reaped)
	}()
	e.Log.Info().Str("machine", s.ID).Int("pid", cmd.Process.Pid).Uint32("uid", user.UID).Uint32("gid", user.GID).Msg("machine started")
	return nil
}

// Stop sends the kill signal to the machine's process, waits up to the kill
// timeout, then SIGKILLs its process group; once the process is gone it
// SIGKILLs what is left of the group. It returns once they are gone.
func (e *Exec) Stop(ctx context.Context, s Spec) error {
	if err := ValidateID(s.ID); err != nil {
		return err
	}
	ref, err := e.readRef(s.ID)
	if err != nil {
		return err
	}
	if !ref.alive() {
		return e.markStopped(s.ID, ref)
	}
	sig, err := ParseSignal(s.KillSignal)
	if err != nil {
		return err
	}
	timeout := s.KillTimeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	// Listed while the leader lives, so every one is the machine's: one
	// still in the group later proves the group's id was not reused.
	members, _ := groupMembers(ref.Pid)
	var reaped <-chan struct{} // nil (never ready) for a machine another process started
	if ch, ok := e.reaped.Load(ref.Pid); ok {
		reaped = ch.(chan struct{})
	}
	_ = syscall.Kill(ref.Pid, sig)
	deadline := time.Now().Add(timeout)
	for ref.alive() {
		if time.Now().After(deadline) {
			e.Log.Warn().Str("machine", s.ID).Dur("kill_timeout", timeout).Msg("machine ignored its kill signal; killing")
			if !signalGroup(ref.Pid, members) {
				_ = syscall.Kill(ref.Pid, syscall.SIGKILL)
			}
			// A killed process is gone within milliseconds unless it is in
			// I/O that does not return, as through a clone whose source is
			// cut off: after stuckAfter, Stuck may fail that I/O.
			killed := time.Now()
			deadline = killed.Add(10 * time.Second)
			askedStuck := e.Stuck == nil || s.MountDir == "" || !s.FailStuckIO
			for ref.alive() {
				if !askedStuck && time.Since(killed) > stuckAfter {
					askedStuck = true
					if e.Stuck(ctx, s.MountDir) {
						e.Log.Warn().Str("machine", s.ID).Msg("machine stuck in its volume's I/O after SIGKILL: that I/O was failed")
						deadline = time.Now().Add(10 * time.Second)
					}
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("machine %s (pid %d) survived SIGKILL for 10s: check for a hung mount", s.ID, ref.Pid)
				}
				time.Sleep(5 * time.Millisecond)
			}
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("stop machine %s: %w", s.ID, ctx.Err())
		case <-reaped:
			reaped = nil // gone: the loop's check says so; polled from here if not
		case <-time.After(stopPoll):
		}
	}
	// The leader's children (a shell's background jobs) are the machine
	// too: left alone they run on, and write to its volume, after it
	// stopped.
	if n := endGroup(ref.Pid, members); n > 0 {
		e.Log.Warn().Str("machine", s.ID).Int("processes", n).Msg("processes of the machine's group survived SIGKILL for 10s: check for a hung mount")
	}
	e.Log.Info().Str("machine", s.ID).Msg("machine stopped")
	return e.markStopped(s.ID, ref)
}

func (e *Exec) markStopped(id string, ref *procRef) error {
	if ref == nil {
		return nil
	}
	e.journal(id, "stop")
	if err := os.Remove(filepath.Join(e.dir(id), "pid")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove pid file of machine %s: %w", id, err)
	}
	return nil
}

// Status reports whether the machine's process runs.
func (e *Exec) Status(ctx context.Context, s Spec) (State, error) {
	if err := ValidateID(s.ID); err != nil {
		return "", err
	}
	ref, err := e.readRef(s.ID)
	if err != nil {
		return "", err
	}
	if ref.alive() {
		return Running, nil
	}
	return Stopped, nil
}

// Running lists the machines whose recorded process is alive.
func (e *Exec) Running(ctx context.Context) ([]string, error) {
	ents, err := os.ReadDir(e.StateDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list machines in %s: %w", e.StateDir, err)
	}
	var out []string
	for _, ent := range ents {
		if !ent.IsDir() || ValidateID(ent.Name()) != nil {
			continue
		}
		if ref, err := e.readRef(ent.Name()); err == nil && ref.alive() {
			out = append(out, ent.Name())
		}
	}
	return out, nil
}

// Interval is one period during which a machine ran on a worker.
type Interval struct{ Start, Stop time.Time }

// Journal returns the run intervals recorded for a machine under stateDir;
// a still-running machine's last interval has a zero Stop.
func Journal(stateDir, id string) ([]Interval, error) {
	b, err := os.ReadFile(filepath.Join(stateDir, id, "journal"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Interval
	for _, line := range bytes.Split(b, []byte("\n")) {
		f := strings.Fields(string(line))
		if len(f) != 2 {
			continue
		}
		ns, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			continue
		}
		t := time.Unix(0, ns)
		switch f[1] {
		case "start":
			out = append(out, Interval{Start: t})
		case "stop":
			if n := len(out); n > 0 && out[n-1].Stop.IsZero() {
				out[n-1].Stop = t
			}
		}
	}
	return out, nil
}
