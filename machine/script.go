package machine

import (
	"bytes"
	"context"
	"fmt"
	"strings"
)

// ScriptSpec names executables for a real hypervisor, as paths relative to
// the machine's mount (never outside it). Each runs as the machine's user
// with no_new_privs, in the mount, with a clean environment holding
// FERRY_MACHINE_ID, FERRY_VOLUME_DIR and FERRY_NETNS. Status prints
// "running" or "stopped" on stdout.
type ScriptSpec struct {
	Start  string `json:"start"`
	Stop   string `json:"stop"`
	Status string `json:"status"`
}

// Script drives machines through ScriptSpec executables.
type Script struct {
	User *User // who the scripts run as (nil: Nobody)
}

func (d Script) run(ctx context.Context, s Spec, path, what string) (string, error) {
	if s.Script == nil || path == "" {
		return "", fmt.Errorf("machine %s: script driver has no %s executable configured", s.ID, what)
	}
	if err := ValidateID(s.ID); err != nil {
		return "", err
	}
	if _, err := confined(s, what+" script", path); err != nil {
		return "", err
	}
	env, err := machineEnv(s, "FERRY_NETNS="+s.NetNS)
	if err != nil {
		return "", err
	}
	user := d.User.orNobody()
	if err := ownMount(s.MountDir, user); err != nil {
		return "", err
	}
	// "./" + path: run from the mount the agent entered, so the script
	// needs no access to the folders above it.
	cmd, err := command(ctx, []string{"./" + path}, env)
	if err != nil {
		return "", err
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = startConfined(cmd, s.MountDir, "", user)
	if err == nil {
		err = cmd.Wait()
	}
	if err != nil {
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
