package machine

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"syscall"
	"time"
)

// Pauser is a Driver that can freeze a machine's processes and thaw them
// again: the machine keeps its memory, open files and mount while, for a
// moment, its disk does not answer (a datapath being restarted under it).
type Pauser interface {
	// Pause returns once every process of the machine is stopped.
	Pause(ctx context.Context, s Spec) error
	// Resume lets them run again; idempotent.
	Resume(ctx context.Context, s Spec) error
}

// ErrCannotPause is wrapped by Pause and Resume of a driver (or a machine
// kind) that cannot freeze its machines; stop and start them instead.
var ErrCannotPause = errors.New("this machine driver cannot pause machines")

// Pause stops the machine's process group (SIGSTOP: it runs in its own
// session, so the group is the machine and its children) and waits until
// every process of the group reports itself stopped.
func (e *Exec) Pause(ctx context.Context, s Spec) error {
	ref, err := e.liveRef(s)
	if err != nil {
		return err
	}
	if err := syscall.Kill(-ref.Pid, syscall.SIGSTOP); err != nil {
		return fmt.Errorf("pause machine %s (process group %d): %w", s.ID, ref.Pid, err)
	}
	// A pause that does not complete leaves nothing half-stopped behind:
	// the processes already stopped are continued.
	resume := func() { _ = syscall.Kill(-ref.Pid, syscall.SIGCONT) }
	deadline := time.Now().Add(5 * time.Second)
	for !groupStopped(ref.Pid) {
		if time.Now().After(deadline) {
			resume()
			return fmt.Errorf("machine %s (process group %d) did not stop within 5s of SIGSTOP (a process blocked in the kernel, on a dead disk say, stops only once that returns)", s.ID, ref.Pid)
		}
		select {
		case <-ctx.Done():
			resume()
			return fmt.Errorf("pause machine %s: %w", s.ID, ctx.Err())
		case <-time.After(20 * time.Millisecond): // each look reads all of /proc
		}
	}
	e.Log.Info().Str("machine", s.ID).Int("pid", ref.Pid).Msg("machine paused")
	return nil
}

// Resume continues the machine's process group (SIGCONT).
func (e *Exec) Resume(ctx context.Context, s Spec) error {
	ref, err := e.liveRef(s)
	if err != nil {
		return err
	}
	if err := syscall.Kill(-ref.Pid, syscall.SIGCONT); err != nil {
		return fmt.Errorf("resume machine %s (process group %d): %w", s.ID, ref.Pid, err)
	}
	e.Log.Info().Str("machine", s.ID).Int("pid", ref.Pid).Msg("machine resumed")
	return nil
}

func (e *Exec) liveRef(s Spec) (*procRef, error) {
	if err := ValidateID(s.ID); err != nil {
		return nil, err
	}
	ref, err := e.readRef(s.ID)
	if err != nil {
		return nil, err
	}
	if !ref.alive() {
		return nil, fmt.Errorf("machine %s does not run here", s.ID)
	}
	return ref, nil
}

// groupStopped reports whether every live process of process group pgid is
// stopped (state T) or gone.
func groupStopped(pgid int) bool {
	group, err := groupMembers(pgid)
	if err != nil {
		return false
	}
	for _, p := range group {
		switch p.state {
		case "T", "Z", "X":
			continue
		case "D":
			// A parent in vfork waits, uninterruptibly, for its child to
			// exec or exit; a child stopped before it did holds it there.
			// It makes no progress until the group is continued.
			if stoppedChild(group, p.pid) {
				continue
			}
		}
		return false
	}
	return true
}

// stoppedChild reports whether pid has a stopped child in group.
func stoppedChild(group []groupMember, pid int) bool {
	for _, c := range group {
		if c.ppid == strconv.Itoa(pid) && c.state == "T" {
			return true
		}
	}
	return false
}

// Pause pauses a machine whose driver can; a script machine cannot.
func (d ByKind) Pause(ctx context.Context, s Spec) error {
	if p, ok := d.pick(s).(Pauser); ok {
		return p.Pause(ctx, s)
	}
	return fmt.Errorf("machine %s: %w", s.ID, ErrCannotPause)
}

// Resume resumes a machine whose driver can pause.
func (d ByKind) Resume(ctx context.Context, s Spec) error {
	if p, ok := d.pick(s).(Pauser); ok {
		return p.Resume(ctx, s)
	}
	return fmt.Errorf("machine %s: %w", s.ID, ErrCannotPause)
}
