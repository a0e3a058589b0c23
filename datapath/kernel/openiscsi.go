package kernel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/rs/zerolog"
)

// OpenISCSI logs into iSCSI targets with open-iscsi (iscsiadm + iscsid),
// the kernel initiator of the kernel data path. Sessions live in the kernel
// and survive the agent: Login adopts an existing session of the same IQN.
type OpenISCSI struct {
	Log zerolog.Logger
	// Bin is iscsiadm (default: found on PATH).
	Bin string
	// SysRoot is where sysfs is mounted (default /sys; tests use a fake tree).
	SysRoot string
	// DiskTimeout bounds the wait for the session's disk (default 30 s).
	DiskTimeout time.Duration
	// run executes iscsiadm; unit tests substitute it.
	run func(ctx context.Context, args ...string) (string, error)
}

// iscsiadm's exit codes that mean "already so" (see iscsiadm(8)).
const (
	iscsiErrSessExists = 15 // ISCSI_ERR_SESS_EXISTS: already logged in
	iscsiErrNoObjs     = 21 // ISCSI_ERR_NO_OBJS_FOUND: no session / record
)

type iscsiExitError struct {
	code int
	err  error
}

func (e *iscsiExitError) Error() string { return e.err.Error() }
func (e *iscsiExitError) Unwrap() error { return e.err }

func (o *OpenISCSI) sysRoot() string {
	if o.SysRoot == "" {
		return "/sys"
	}
	return o.SysRoot
}

func (o *OpenISCSI) iscsiadm(ctx context.Context, args ...string) (string, error) {
	if o.run != nil {
		return o.run(ctx, args...)
	}
	bin := o.Bin
	if bin == "" {
		p, err := exec.LookPath("iscsiadm")
		if err != nil {
			return "", fmt.Errorf("the kernel data path needs iscsiadm (Debian package open-iscsi): %w", err)
		}
		bin = p
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	text := strings.TrimSpace(out.String())
	if err != nil {
		code := -1
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		}
		return text, &iscsiExitError{code: code, err: fmt.Errorf("iscsiadm %s: %w: %s", strings.Join(args, " "), err, text)}
	}
	return text, nil
}

func exitCode(err error) int {
	var e *iscsiExitError
	if errors.As(err, &e) {
		return e.code
	}
	return -1
}

// Login logs into iqn at portal ("ip:port" or "[ipv6]:port") and returns the
// session's disk (/dev/sdX), found through sysfs by session rather than
// guessed. The node record is made by hand: discovery would return the
// target's own bind address, which need not be the one we reach. An
// existing session for iqn is adopted. Idempotent.
func (o *OpenISCSI) Login(ctx context.Context, portal, iqn string) (string, error) {
	if iqn == "" || portal == "" || strings.ContainsAny(iqn+portal, " \t\n") {
		return "", fmt.Errorf("iSCSI login: portal %q and IQN %q must be non-empty without spaces", portal, iqn)
	}
	if _, err := o.sessionDir(iqn); err != nil {
		node := []string{"-m", "node", "-T", iqn, "-p", portal}
		if _, err := o.iscsiadm(ctx, append(node, "-o", "new")...); err != nil {
			return "", fmt.Errorf("iSCSI node record for %s at %s: %w", iqn, portal, err)
		}
		if _, err := o.iscsiadm(ctx, append(node, "--login")...); err != nil && exitCode(err) != iscsiErrSessExists {
			return "", fmt.Errorf("iSCSI login to %s at %s (is iscsid running? is the export reachable from here?): %w", iqn, portal, err)
		}
		o.Log.Info().Str("iqn", iqn).Str("portal", portal).Msg("open-iscsi logged in")
	} else {
		o.Log.Info().Str("iqn", iqn).Msg("adopting the existing open-iscsi session")
	}
	return o.waitDisk(ctx, iqn)
}

func (o *OpenISCSI) waitDisk(ctx context.Context, iqn string) (string, error) {
	timeout := o.DiskTimeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	deadline := time.Now().Add(timeout)
	for {
		d, err := o.Disk(iqn)
		if err == nil {
			if _, serr := os.Stat(d); serr == nil {
				return d, nil
			}
			err = fmt.Errorf("%s has no device node yet", d)
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("iSCSI session of %s: no disk after %v: %w", iqn, timeout, err)
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// sessionDir is the sysfs directory of the session logged into iqn.
func (o *OpenISCSI) sessionDir(iqn string) (string, error) {
	sessions, _ := filepath.Glob(filepath.Join(o.sysRoot(), "class", "iscsi_session", "session*"))
	for _, s := range sessions {
		name, err := os.ReadFile(filepath.Join(s, "targetname"))
		if err == nil && strings.TrimSpace(string(name)) == iqn {
			return s, nil
		}
	}
	return "", fmt.Errorf("no iSCSI session for %s", iqn)
}

// Disk is the block device of the session logged into iqn (one LUN).
func (o *OpenISCSI) Disk(iqn string) (string, error) {
	s, err := o.sessionDir(iqn)
	if err != nil {
		return "", err
	}
	blocks, _ := filepath.Glob(filepath.Join(s, "device", "target*", "*", "block", "*"))
	if len(blocks) != 1 {
		return "", fmt.Errorf("iSCSI session %s of %s has %d disks, want 1", filepath.Base(s), iqn, len(blocks))
	}
	return "/dev/" + filepath.Base(blocks[0]), nil
}

// Logout ends the session of iqn and deletes its node record. Nothing to do
// is not an error.
func (o *OpenISCSI) Logout(ctx context.Context, portal, iqn string) error {
	node := []string{"-m", "node", "-T", iqn, "-p", portal}
	if _, err := o.sessionDir(iqn); err == nil {
		if _, err := o.iscsiadm(ctx, append(node, "--logout")...); err != nil && exitCode(err) != iscsiErrNoObjs {
			return fmt.Errorf("iSCSI logout of %s (is its disk still in use?): %w", iqn, err)
		}
		o.Log.Info().Str("iqn", iqn).Msg("open-iscsi logged out")
	}
	if _, err := o.iscsiadm(ctx, append(node, "-o", "delete")...); err != nil && exitCode(err) != iscsiErrNoObjs {
		o.Log.Debug().Err(err).Str("iqn", iqn).Msg("deleting the node record")
	}
	return nil
}
