package machine

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
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

// wrap returns argv run in the machine's network namespace as u with
// no_new_privs: nsenter (needs root to join the namespace) execs setpriv,
// which drops to u, clears supplementary groups, sets no_new_privs (a setuid
// binary on the volume cannot regain root) and execs argv. The working
// directory is entered by the agent first, so the machine needs no access
// to the folders above its mount.
func wrap(argv []string, netns string, u User) []string {
	out := []string{}
	if netns != "" {
		out = append(out, "nsenter", "--net=/run/netns/"+netns, "--")
	}
	out = append(out, "setpriv", "--reuid="+strconv.FormatUint(uint64(u.UID), 10), "--regid="+strconv.FormatUint(uint64(u.GID), 10),
		"--clear-groups", "--no-new-privs", "--")
	return append(out, argv...)
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
