package machine

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// User is the unprivileged identity a machine's processes run as. A
// machine's spec is data from the control plane and its filesystem is
// writable by the machine, so neither may run as the agent (root).
type User struct {
	UID, GID uint32
}

// Nobody is the default: the conventional unprivileged nobody/nogroup.
var Nobody = User{UID: 65534, GID: 65534}

// ParseUser reads "UID:GID", "UID" (GID the same) or "root"; "" is Nobody.
func ParseUser(s string) (User, error) {
	switch s {
	case "root":
		return User{}, nil
	case "":
		return Nobody, nil
	}
	u, g, found := strings.Cut(s, ":")
	uid, err := strconv.ParseUint(u, 10, 32)
	if err != nil {
		return User{}, fmt.Errorf("machine user %q: want UID:GID (numbers) or root", s)
	}
	gid := uid
	if found {
		if gid, err = strconv.ParseUint(g, 10, 32); err != nil {
			return User{}, fmt.Errorf("machine user %q: want UID:GID (numbers) or root", s)
		}
	}
	return User{UID: uint32(uid), GID: uint32(gid)}, nil
}

func (u *User) orNobody() User {
	if u == nil {
		return Nobody
	}
	return *u
}

// baseEnv is all a machine inherits: nothing of the agent's environment
// (credentials, LD_* or proxies of the agent's host must not leak in).
var baseEnv = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"}

// machineEnv is the clean environment of machine s: the base, ferry's
// variables and the spec's own, sorted. Names are checked so a spec cannot
// smuggle a second assignment.
func machineEnv(s Spec, extra ...string) ([]string, error) {
	env := append([]string(nil), baseEnv...)
	env = append(env, "HOME="+s.MountDir, "FERRY_MACHINE_ID="+s.ID, "FERRY_VOLUME_DIR="+s.MountDir)
	env = append(env, extra...)
	keys := make([]string, 0, len(s.Env))
	for k := range s.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(s.Env[k], 0) {
			return nil, fmt.Errorf("machine %s: environment variable %q is not valid", s.ID, k)
		}
		env = append(env, k+"="+s.Env[k])
	}
	return env, nil
}

// confined resolves p (a script or working directory named by the spec)
// under the machine's mount: it must be a local path, so a spec cannot
// point the driver at the agent's files.
func confined(s Spec, what, p string) (string, error) {
	if !filepath.IsLocal(p) {
		return "", fmt.Errorf("machine %s: %s %q must be a relative path inside the machine's volume", s.ID, what, p)
	}
	if s.MountDir == "" {
		return "", fmt.Errorf("machine %s: no mount to resolve %s %q in", s.ID, what, p)
	}
	return filepath.Join(s.MountDir, p), nil
}

// startConfined starts cmd in dir, in the network namespace netns (none
// when empty), as u with no supplementary groups and no_new_privs (a
// setuid binary on the volume cannot regain root), as nsenter and setpriv
// did without their two execs (about 5 ms on a busy 2-core host, inside a
// migration's pause). The fork runs on a thread of its own that first
// takes its own working directory (entered as the agent: the machine needs
// no access to the folders above its mount), joins the namespace and sets
// no_new_privs; the child inherits all three, and the kernel applies the
// credentials before the exec. That thread is never handed back to the
// runtime: it ends with its goroutine.
func startConfined(cmd *exec.Cmd, dir, netns string, u User) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Credential = &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: []uint32{}}
	cmd.Dir = "" // the thread's own, below
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // and never unlocked: the thread is no longer like the others
		started <- func() error {
			if err := unix.Unshare(unix.CLONE_FS); err != nil {
				return fmt.Errorf("a working directory of its own for the machine's start: %w", err)
			}
			if err := unix.Chdir(dir); err != nil {
				return fmt.Errorf("enter the machine's folder %s: %w", dir, err)
			}
			if netns != "" {
				fd, err := unix.Open(filepath.Join("/run/netns", netns), unix.O_RDONLY|unix.O_CLOEXEC, 0)
				if err != nil {
					return fmt.Errorf("open the machine's network namespace %s: %w", netns, err)
				}
				err = unix.Setns(fd, unix.CLONE_NEWNET)
				unix.Close(fd)
				if err != nil {
					return fmt.Errorf("join the machine's network namespace %s: %w", netns, err)
				}
			}
			if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
				return fmt.Errorf("set no_new_privs for the machine: %w", err)
			}
			return cmd.Start()
		}()
	}()
	return <-started
}

// ownMount gives the machine its filesystem's root folder (not what is in
// it): the machine writes there as u.
func ownMount(dir string, u User) error {
	if dir == "" {
		return nil
	}
	fi, err := os.Lstat(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("machine mount %s is not a folder", dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid == u.UID && st.Gid == u.GID {
		return nil
	}
	if err := os.Lchown(dir, int(u.UID), int(u.GID)); err != nil {
		return fmt.Errorf("give machine mount %s to %d:%d: %w", dir, u.UID, u.GID, err)
	}
	return nil
}
