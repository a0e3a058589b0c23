package hostfs

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// LiveHolders lists the processes that keep the mount at mnt busy and are
// not already dying: one of their threads has a file, its working or root
// directory there, or the process maps a file from there. A process
// already killed (SIGKILL pending, or its thread-group leader a zombie) is
// left out: what it holds goes once its I/O in flight returns, and a read
// through a clone whose source is gone can keep it in the kernel for
// minutes while the filesystem's read-ahead asks again and again.
func LiveHolders(mnt string) []int {
	clean := filepath.Clean(mnt)
	under := func(p string) bool { return p == clean || strings.HasPrefix(p, clean+"/") }
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		dir := filepath.Join("/proc", e.Name())
		status, err := os.ReadFile(filepath.Join(dir, "status"))
		if err != nil || dying(string(status)) {
			continue
		}
		if holds(dir, under) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// holds reports whether the process at /proc/PID (dir) uses a path under
// (any thread's files and directories: a zombie leader lists none of its
// own) or maps a file there.
func holds(dir string, under func(string) bool) bool {
	tasks, _ := os.ReadDir(filepath.Join(dir, "task"))
	for _, t := range tasks {
		td := filepath.Join(dir, "task", t.Name())
		for _, l := range []string{"cwd", "root"} {
			if p, err := os.Readlink(filepath.Join(td, l)); err == nil && under(p) {
				return true
			}
		}
		fds, _ := os.ReadDir(filepath.Join(td, "fd"))
		for _, fd := range fds {
			if p, err := os.Readlink(filepath.Join(td, "fd", fd.Name())); err == nil && under(p) {
				return true
			}
		}
	}
	f, err := os.Open(filepath.Join(dir, "maps"))
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// address perms offset dev inode path
		if fs := strings.Fields(sc.Text()); len(fs) >= 6 && under(strings.Join(fs[5:], " ")) {
			return true
		}
	}
	return false
}

// dying reports whether a /proc/PID/status text is a process on its way
// out: a zombie (or dead) leader, or SIGKILL pending for the process or
// its thread.
func dying(status string) bool {
	for _, line := range strings.Split(status, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "State":
			if strings.HasPrefix(v, "Z") || strings.HasPrefix(v, "X") {
				return true
			}
		case "SigPnd", "ShdPnd":
			if mask, err := strconv.ParseUint(v, 16, 64); err == nil && mask&(1<<(9-1)) != 0 {
				return true
			}
		}
	}
	return false
}
