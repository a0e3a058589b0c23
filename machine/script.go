package machine

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// ScriptSpec names operator-supplied executables for a real hypervisor. Each
// is run with FERRY_MACHINE_ID, FERRY_VOLUME_DIR and FERRY_NETNS set. Status
// prints "running" or "stopped" on stdout.
type ScriptSpec struct {
	Start  string `json:"start"`
	Stop   string `json:"stop"`
	Status string `json:"status"`
}

// Script drives machines through ScriptSpec executables.
type Script struct{}

func (Script) run(ctx context.Context, s Spec, path, what string) (string, error) {
	if s.Script == nil || path == "" {
		return "", fmt.Errorf("machine %s: script driver has no %s executable configured", s.ID, what)
	}
	cmd := exec.CommandContext(ctx, path)
	cmd.Env = append(os.Environ(), "FERRY_MACHINE_ID="+s.ID, "FERRY_VOLUME_DIR="+s.MountDir, "FERRY_NETNS="+s.NetNS)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("machine %s: %s script %s: %w: %s", s.ID, what, path, err, strings.TrimSpace(errb.String()))
	}
	return strings.TrimSpace(out.String()), nil
}

func (d Script) Start(ctx context.Context, s Spec) error {
	_, err := d.run(ctx, s, s.Script.startPath(), "start")
	return err
}

func (d Script) Stop(ctx context.Context, s Spec) error {
	_, err := d.run(ctx, s, s.Script.stopPath(), "stop")
	return err
}

func (d Script) Status(ctx context.Context, s Spec) (State, error) {
	out, err := d.run(ctx, s, s.Script.statusPath(), "status")
	if err != nil {
		return "", err
	}
	switch State(out) {
	case Running, Stopped:
		return State(out), nil
	}
	return "", fmt.Errorf("machine %s: status script printed %q, want running or stopped", s.ID, out)
}

func (s *ScriptSpec) startPath() string {
	if s == nil {
		return ""
	}
	return s.Start
}
func (s *ScriptSpec) stopPath() string {
	if s == nil {
		return ""
	}
	return s.Stop
}
func (s *ScriptSpec) statusPath() string {
	if s == nil {
		return ""
	}
	return s.Status
}
