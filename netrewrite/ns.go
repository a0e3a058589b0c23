package netrewrite

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrPrivileges is wrapped when the process lacks CAP_NET_ADMIN/CAP_SYS_ADMIN.
var ErrPrivileges = errors.New("netrewrite needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)")

// netnsDir is where `ip netns` keeps named namespaces; both this package and
// `ip netns exec` use it, so either can create a namespace the other uses.
const netnsDir = "/run/netns"

// CheckPrivileges returns an error wrapping ErrPrivileges unless the process
// has CAP_NET_ADMIN (addresses, routes, links) and CAP_SYS_ADMIN (setns,
// creating named namespaces) in its effective set.
func CheckPrivileges() error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return fmt.Errorf("reading capabilities: %w", err)
	}
	has := func(c uint) bool { return data[c/32].Effective&(1<<(c%32)) != 0 }
	var missing []string
	if !has(unix.CAP_NET_ADMIN) {
		missing = append(missing, "CAP_NET_ADMIN")
	}
	if !has(unix.CAP_SYS_ADMIN) {
		missing = append(missing, "CAP_SYS_ADMIN")
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: missing %s (uid %d); run as root", ErrPrivileges, strings.Join(missing, ", "), os.Getuid())
	}
	return nil
}

// validNSName refuses names `ip netns` would refuse, and anything that could
// escape /run/netns.
func validNSName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") || len(name) > 200 {
		return fmt.Errorf("network namespace name %q: use a short name without '/'", name)
	}
	return nil
}

// NamespaceExists reports whether the named namespace exists in /run/netns.
func NamespaceExists(name string) bool {
	if validNSName(name) != nil {
		return false
	}
	h, err := netns.GetFromName(name)
	if err != nil {
		return false
	}
	h.Close()
	return true
}

// EnsureNamespace creates the named network namespace (as `ip netns add`
// would) unless it exists. Its loopback is brought up.
func EnsureNamespace(name string) error {
	if err := validNSName(name); err != nil {
		return err
	}
	if err := CheckPrivileges(); err != nil {
		return err
	}
	if !NamespaceExists(name) {
		// A file left by a crash between create and bind mount is not a
		// namespace (GetFromName failed): remove it so NewNamed can retry.
		_ = os.Remove(filepath.Join(netnsDir, name))
		if err := createNamed(name); err != nil {
			return fmt.Errorf("creating network namespace %s: %w", name, err)
		}
	}
	return withHandle(name, func(h *netlink.Handle) error {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("namespace %s: loopback: %w", name, err)
		}
		return h.LinkSetUp(lo)
	})
}

// createNamed runs netns.NewNamed on a locked thread and puts the thread back
// into its original namespace; if that fails the thread stays locked, so the
// runtime discards it instead of reusing it in the wrong namespace.
func createNamed(name string) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	h, err := netns.NewNamed(name)
	if err == nil {
		h.Close()
	}
	if serr := netns.Set(orig); serr != nil {
		return fmt.Errorf("returning to the original namespace: %w", serr)
	}
	runtime.UnlockOSThread()
	return err
}

// DeleteNamespace removes the named namespace (as `ip netns delete`); the
// kernel frees it, and the links in it, once no process uses it. Deleting a
// namespace that does not exist is not an error.
func DeleteNamespace(name string) error {
	if err := validNSName(name); err != nil {
		return err
	}
	if err := CheckPrivileges(); err != nil {
		return err
	}
	p := filepath.Join(netnsDir, name)
	if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := netns.DeleteNamed(name); err != nil && !errors.Is(err, os.ErrNotExist) {
		// An unmounted leftover file (crash mid-create) is removed anyway.
		if rerr := os.Remove(p); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			return fmt.Errorf("deleting network namespace %s: %w", name, err)
		}
	}
	return nil
}

// openNS opens a namespace by name; "" is the namespace of this process
// (the host namespace of a real worker).
func openNS(name string) (netns.NsHandle, error) {
	if name == "" {
		h, err := netns.GetFromPid(os.Getpid())
		if err != nil {
			return netns.None(), fmt.Errorf("opening this process's network namespace: %w", err)
		}
		return h, nil
	}
	if err := validNSName(name); err != nil {
		return netns.None(), err
	}
	h, err := netns.GetFromName(name)
	if err != nil {
		return netns.None(), fmt.Errorf("network namespace %q: %w (create it with EnsureNamespace or `ip netns add`)", name, err)
	}
	return h, nil
}

// withHandle runs fn with a netlink handle whose sockets live in the named
// namespace. No thread switches namespace: the sockets are created there.
func withHandle(ns string, fn func(h *netlink.Handle) error) error {
	nsh, err := openNS(ns)
	if err != nil {
		return err
	}
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	if err != nil {
		return privErr(fmt.Errorf("netlink in namespace %q: %w", ns, err))
	}
	defer h.Close()
	return fn(h)
}

// RunInNS runs fn on a locked OS thread switched into the named namespace.
// Sockets fn creates stay in that namespace after it returns, so a test can
// open a listener or dial from inside and use the socket from any goroutine.
func RunInNS(ns string, fn func() error) error {
	target, err := openNS(ns)
	if err != nil {
		return err
	}
	defer target.Close()
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("reading this thread's network namespace: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return privErr(fmt.Errorf("entering network namespace %q: %w", ns, err))
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: the runtime kills it when this goroutine ends.
		return fmt.Errorf("leaving network namespace %q: %w", ns, err)
	}
	runtime.UnlockOSThread()
	return ferr
}

// ExecInNS returns a function that makes an exec.Cmd run inside the named
// network namespace by prefixing it with `ip netns exec NAME`. That is the
// same mechanism an operator uses by hand, and it also gives the child the
// namespace's /etc/netns/NAME files and a matching /sys. Apply it before
// Start:
//
//	cmd := exec.CommandContext(ctx, "my-server")
//	netrewrite.ExecInNS("ferry-m-1")(cmd)
//
// ns "" leaves the command unchanged (this process's namespace).
func ExecInNS(ns string) func(*exec.Cmd) {
	return func(cmd *exec.Cmd) {
		if ns == "" {
			return
		}
		ipPath, err := exec.LookPath("ip")
		if err != nil {
			ipPath = "ip"
		}
		args := append([]string{ipPath, "netns", "exec", ns}, cmd.Args...)
		// cmd.Path is already resolved; pass it as the program so PATH
		// lookups inside the namespace cannot pick another binary.
		if len(cmd.Args) > 0 && cmd.Path != "" {
			args[4] = cmd.Path
		}
		cmd.Path = ipPath
		cmd.Args = args
	}
}

// CommandInNS is exec.CommandContext(ctx, name, args...) run inside ns.
func CommandInNS(ctx context.Context, ns, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	ExecInNS(ns)(cmd)
	return cmd
}

// sysctlInNS writes a /proc/sys value as seen from inside ns. /proc/sys/net
// resolves against the opening thread's namespace, hence RunInNS.
func sysctlInNS(ns, key, value string) error {
	path := filepath.Join("/proc/sys", strings.ReplaceAll(key, ".", "/"))
	return RunInNS(ns, func() error {
		cur, err := os.ReadFile(path)
		if err == nil && strings.TrimSpace(string(cur)) == value {
			return nil
		}
		if err := os.WriteFile(path, []byte(value), 0o644); err != nil {
			return fmt.Errorf("sysctl %s=%s in namespace %q: %w", key, value, ns, err)
		}
		return nil
	})
}

// privErr turns EPERM/EACCES into an error that says what to do.
func privErr(err error) error {
	if err != nil && (errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES)) {
		return fmt.Errorf("%w: %w", ErrPrivileges, err)
	}
	return err
}

// retryDump repeats a netlink dump the kernel interrupted (the table changed
// while it was read), which netlink reports as ErrDumpInterrupted.
func retryDump[T any](fn func() (T, error)) (T, error) {
	var v T
	var err error
	for i := 0; i < 10; i++ {
		v, err = fn()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return v, err
		}
		time.Sleep(time.Millisecond)
	}
	return v, err
}
