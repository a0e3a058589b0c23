// Package mountns finds who pins a filesystem from another mount namespace
// and keeps ferry's mounts from being pinned that way in the first place.
//
// A process that copies the mount table (ip netns exec, a systemd service
// with private mounts, a container) keeps every filesystem mounted at that
// moment alive in its copy. If the copy is a slave of a shared mount, the
// unmount propagates to it; if it is private, the filesystem (and its loop
// device) stays busy and nothing in ferry's own namespace shows why.
package mountns

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Holder is a process whose mount namespace still mounts a filesystem.
type Holder struct {
	PID        int
	Command    string
	MountNS    string // e.g. mnt:[4026532843]
	MountPoint string // where that namespace mounts it
}

func (h Holder) String() string {
	return fmt.Sprintf("pid %d (%s) in mount namespace %s, at %s", h.PID, h.Command, h.MountNS, h.MountPoint)
}

// EnsureShared makes dir a mount point with shared propagation (a bind
// mount of itself when it is none), so the mounts made under it reach
// copies of the mount table made later as slaves, and their unmounts too.
// Idempotent.
func EnsureShared(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if !isMountPoint(dir) {
		if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind-mounting %s on itself (to share its mounts' propagation): %w", dir, err)
		}
	}
	if err := unix.Mount("", dir, "", unix.MS_SHARED, ""); err != nil {
		return fmt.Errorf("making %s a shared mount: %w", dir, err)
	}
	return nil
}

// Release undoes EnsureShared once nothing is mounted under dir.
func Release(dir string) error {
	if !isMountPoint(dir) {
		return nil
	}
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && err != unix.EINVAL {
		return fmt.Errorf("unmount %s: %w", dir, err)
	}
	return nil
}

func isMountPoint(dir string) bool {
	clean := filepath.Clean(dir)
	found := false
	scanMountinfo("/proc/self/mountinfo", func(f []string) bool {
		if unescape(f[4]) == clean {
			found = true
			return false
		}
		return true
	})
	return found
}

// DeviceOf returns the device number of the filesystem mounted at path, or
// of the block device node path.
func DeviceOf(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		return st.Rdev, nil
	}
	return st.Dev, nil
}

// Holders lists, one per mount namespace other than this process's, a
// process whose namespace mounts the filesystem on device dev.
func Holders(dev uint64) []Holder {
	want := fmt.Sprintf("%d:%d", unix.Major(dev), unix.Minor(dev))
	self, _ := os.Readlink("/proc/self/ns/mnt")
	seen := map[string]bool{self: true}
	ents, _ := os.ReadDir("/proc")
	var out []Holder
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid))
		if err != nil || seen[ns] {
			continue
		}
		seen[ns] = true
		mp := ""
		scanMountinfo(fmt.Sprintf("/proc/%d/mountinfo", pid), func(f []string) bool {
			if f[2] == want {
				mp = unescape(f[4])
				return false
			}
			return true
		})
		if mp == "" {
			continue
		}
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		out = append(out, Holder{PID: pid, Command: strings.TrimSpace(string(comm)), MountNS: ns, MountPoint: mp})
	}
	return out
}

// Explain says who pins what and what to do, for an error message; empty
// when no other namespace holds dev.
func Explain(dev uint64, what string) string {
	hs := Holders(dev)
	if len(hs) == 0 {
		return ""
	}
	var parts []string
	for _, h := range hs {
		parts = append(parts, h.String())
	}
	h := hs[0]
	return fmt.Sprintf("%s is still mounted in another mount namespace: %s. That process copied the mount table privately "+
		"(e.g. `ip netns exec` on a host whose / is not shared, a systemd service with private mounts, a container); "+
		"end it, or unmount there: nsenter -t %d -m umount %s",
		what, strings.Join(parts, "; "), h.PID, h.MountPoint)
}

func scanMountinfo(path string, fn func(fields []string) bool) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		// id parent major:minor root mountpoint opts ... - fstype source superopts
		fields := strings.Fields(s.Text())
		if len(fields) < 5 {
			continue
		}
		if !fn(fields) {
			return
		}
	}
}

func unescape(s string) string {
	return strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`).Replace(s)
}

// OpenOn lists the processes holding dev open: the device node itself, or
// a file, working directory or root on a filesystem dev carries (one
// unmounted lazily lives on until they let go). For an error message: it
// reads every process's descriptors, so call it only once a wait failed.
func OpenOn(dev uint64) []string {
	ents, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		dir := filepath.Join("/proc", e.Name())
		paths := []string{filepath.Join(dir, "cwd"), filepath.Join(dir, "root")}
		fds, _ := os.ReadDir(filepath.Join(dir, "fd"))
		for _, fd := range fds {
			paths = append(paths, filepath.Join(dir, "fd", fd.Name()))
		}
		for _, p := range paths {
			var st unix.Stat_t
			if unix.Stat(p, &st) != nil {
				continue
			}
			onFS := st.Dev == dev
			isNode := st.Mode&unix.S_IFMT == unix.S_IFBLK && st.Rdev == dev
			if !onFS && !isNode {
				continue
			}
			target, _ := os.Readlink(p)
			cmd, _ := os.ReadFile(filepath.Join(dir, "cmdline"))
			out = append(out, fmt.Sprintf("pid %d (%s) has %s open", pid, strings.TrimSpace(strings.ReplaceAll(string(cmd), "\x00", " ")), target))
			break
		}
	}
	return out
}
