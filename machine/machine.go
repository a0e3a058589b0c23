// Package machine starts, stops and watches the workload that uses a volume.
// Drivers: exec (a command run with the volume mounted at a path, Fly-like
// kill signal then kill timeout) and script (operator-supplied executables
// for real hypervisors). Every operation is idempotent: Start of a running
// machine and Stop of a stopped one do nothing, so an agent that crashed
// mid-step can simply do the step again.
package machine

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"syscall"
	"time"
)

// Spec describes one machine on one worker.
type Spec struct {
	ID          string            `json:"id"`
	Command     []string          `json:"command"`            // exec driver: argv
	MountDir    string            `json:"mount_dir"`          // where the volume's filesystem is mounted
	NetNS       string            `json:"netns,omitempty"`    // network namespace to run in (name under /run/netns)
	Env         map[string]string `json:"env,omitempty"`      // extra environment
	KillSignal  string            `json:"kill_signal"`        // SIGINT (default), SIGTERM, ...
	KillTimeout time.Duration     `json:"kill_timeout"`       // then SIGKILL; default 5s
	Script      *ScriptSpec       `json:"script,omitempty"`   // script driver
	Dir         string            `json:"work_dir,omitempty"` // working directory (default MountDir)
	// FailStuckIO makes a stop that must end (the fence's) have the volume
	// I/O a killed machine is stuck in failed (Exec.Stuck). Other stops
	// leave it alone: failing it loses the writes the kernel still holds
	// for the volume, which a process that is slow to die (a core dump, a
	// large address space) would otherwise keep.
	FailStuckIO bool `json:"-"`
}

// State of a machine on this worker.
type State string

const (
	Running State = "running"
	Stopped State = "stopped"
)

// Driver runs machines.
type Driver interface {
	Start(ctx context.Context, s Spec) error
	Stop(ctx context.Context, s Spec) error
	Status(ctx context.Context, s Spec) (State, error)
}

// Lister is a Driver that can name the machines it runs on this worker,
// including ones no record mentions any more (the agent's fence stops
// machines the store does not assign here).
type Lister interface {
	Running(ctx context.Context) ([]string, error)
}

var idRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$`)

// ValidateID refuses machine ids that are not safe as file and namespace names.
func ValidateID(id string) error {
	if !idRE.MatchString(id) || !filepath.IsLocal(id) {
		return fmt.Errorf("machine id %q: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit", id)
	}
	return nil
}

// ParseSignal maps a signal name to its number.
func ParseSignal(name string) (syscall.Signal, error) {
	switch name {
	case "", "SIGINT", "INT":
		return syscall.SIGINT, nil
	case "SIGTERM", "TERM":
		return syscall.SIGTERM, nil
	case "SIGQUIT", "QUIT":
		return syscall.SIGQUIT, nil
	case "SIGUSR1", "USR1":
		return syscall.SIGUSR1, nil
	case "SIGKILL", "KILL":
		return syscall.SIGKILL, nil
	}
	return 0, fmt.Errorf("kill signal %q: use SIGINT, SIGTERM, SIGQUIT, SIGUSR1 or SIGKILL", name)
}

// ByKind runs a machine with the script driver when its spec names
// scripts, and with the exec driver otherwise.
type ByKind struct {
	Exec   Driver
	Script Driver
}

func (d ByKind) pick(s Spec) Driver {
	if s.Script != nil {
		return d.Script
	}
	return d.Exec
}

func (d ByKind) Start(ctx context.Context, s Spec) error { return d.pick(s).Start(ctx, s) }
func (d ByKind) Stop(ctx context.Context, s Spec) error  { return d.pick(s).Stop(ctx, s) }
func (d ByKind) Status(ctx context.Context, s Spec) (State, error) {
	return d.pick(s).Status(ctx, s)
}

// Running lists what the exec driver runs; script machines cannot be listed
// (ask Status with their spec).
func (d ByKind) Running(ctx context.Context) ([]string, error) {
	if l, ok := d.Exec.(Lister); ok {
		return l.Running(ctx)
	}
	return nil, nil
}
