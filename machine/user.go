package machine

import (
	"context"
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

	"github.com/vishvananda/netns"
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

// command returns argv as a command with the machine's environment env;
// a bare name is looked up in the machine's PATH (baseEnv), not the
// agent's. startConfined starts it.
func command(ctx context.Context, argv []string, env []string) (*exec.Cmd, error) {
	name := argv[0]
	if !strings.Contains(name, "/") {
		path, err := lookPath(name, strings.TrimPrefix(baseEnv[0], "PATH="))
		if err != nil {
			return nil, err
		}
		name = path
	}
	cmd := exec.CommandContext(ctx, name, argv[1:]...)
	cmd.Args[0] = argv[0]
	cmd.Env = env
	return cmd, nil
}

// lookPath finds the executable file name in the folders of path.
func lookPath(name, path string) (string, error) {
	for _, dir := range filepath.SplitList(path) {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: not found in the machine's PATH (%s)", name, path)
}

// startConfined starts cmd as u with no supplementary groups and
// no_new_privs (a setuid binary on the volume cannot regain root), in the
// network namespace netns when one is named, in folder dir. The folder is
// entered as the agent, so the machine needs no access to the folders
// above it. This is what nsenter and setpriv did, without their two execs
// (6-12 ms of a migrated machine's start on a busy host): the command is
// started from a thread of its own, which enters the namespace and the
// folder, sets no_new_privs and ends with the start, so no other goroutine
// ever runs on it.
func startConfined(cmd *exec.Cmd, dir, netnsName string, u User) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Credential = &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: []uint32{}}
	cmd.Dir = "" // the thread's folder; a Dir would be entered after the switch to u
	errc := make(chan error, 1)
	go startOnOwnThread(cmd, dir, netnsName, errc)
	return <-errc
}

// startOnOwnThread is startConfined's goroutine. The runtime ends a thread
// whose goroutine exits locked to it, except the process's main thread,
// which it parks instead: a main thread left in the machine's namespace
// would be the namespace /proc/self names (netrewrite reads the agent's
// own from there). So on the main thread it holds that thread and starts
// from another one.
func startOnOwnThread(cmd *exec.Cmd, dir, netnsName string, errc chan<- error) {
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		inner := make(chan error, 1)
		go startOnOwnThread(cmd, dir, netnsName, inner) // not here: this goroutine holds the main thread
		err := <-inner
		runtime.UnlockOSThread()
		errc <- err
		return
	}
	// Never unlocked: the thread ends with this goroutine.
	errc <- func() error {
		// The folder is per process unless the thread has its own.
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			return fmt.Errorf("start thread: unshare its folder: %w", err)
		}
		if dir != "" {
			if err := unix.Chdir(dir); err != nil {
				return fmt.Errorf("enter %s: %w", dir, err)
			}
		}
		if netnsName != "" {
			h, err := netns.GetFromPath(filepath.Join("/run/netns", netnsName))
			if err != nil {
				return fmt.Errorf("network namespace %s: %w", netnsName, err)
			}
			defer h.Close()
			if err := netns.Set(h); err != nil {
				return fmt.Errorf("enter network namespace %s: %w", netnsName, err)
			}
		}
		if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
			return fmt.Errorf("set no_new_privs: %w", err)
		}
		return cmd.Start()
	}()
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
