package machine

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A machine runs in its own session, so its process group (id: the
// leader's pid) is the machine and its children. A group's id names the
// same group for as long as the group has a member or its leader is not
// reaped: until then the kernel hands the number to no new process. Every
// signal to a whole group below is sent only while that is known.

// groupMember is a process of a process group, from /proc/PID/stat.
type groupMember struct {
	pid                int
	state, ppid, start string
}

// groupMembers lists the processes of process group pgid, zombies included.
func groupMembers(pgid int) ([]groupMember, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var out []groupMember
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + ent.Name() + "/stat")
		if err != nil {
			continue // exited meanwhile
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:]) // state, ppid, pgrp, ... starttime (20th)
		if len(f) < 20 || f[2] != strconv.Itoa(pgid) {
			continue
		}
		out = append(out, groupMember{pid: pid, state: f[0], ppid: f[1], start: f[19]})
	}
	return out, nil
}

// procStat reads a process's state, process group and start time.
func procStat(pid int) (state, pgrp, start string, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return "", "", "", false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return "", "", "", false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return "", "", "", false
	}
	return f[0], f[2], f[19], true
}

// inGroup reports whether m is still the same process and in group pgid,
// and whether it still runs (is not a zombie whose threads all ended).
func (m groupMember) inGroup(pgid int) (member, runs bool) {
	state, pgrp, start, ok := procStat(m.pid)
	if !ok || start != m.start || pgrp != strconv.Itoa(pgid) {
		return false, false
	}
	return true, (state != "Z" && state != "X") || threadsRun(m.pid)
}

// stillOurs reports whether one of members (listed while the group was the
// machine's) is still in group pgid, the same process: then the group
// never emptied, so its id was not reused.
func stillOurs(pgid int, members []groupMember) bool {
	for _, m := range members {
		if in, _ := m.inGroup(pgid); in {
			return true
		}
	}
	return false
}

// signalGroup SIGKILLs process group pgid if it is still the machine's;
// it reports whether it did.
func signalGroup(pgid int, members []groupMember) bool {
	if !stillOurs(pgid, members) {
		return false
	}
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	return true
}

// endGroup SIGKILLs process group pgid if it is still the machine's and
// waits up to 10s for members to end; it returns how many still run.
func endGroup(pgid int, members []groupMember) int {
	if !signalGroup(pgid, members) {
		return 0
	}
	left := 0
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		left = 0
		for _, m := range members {
			if _, runs := m.inGroup(pgid); runs {
				left++
			}
		}
		if left == 0 {
			break
		}
	}
	return left
}

// reapGroup waits for a machine this process started to exit, SIGKILLs
// what is left of its process group, then reaps it. The leader is waited
// for without being reaped first: until it is reaped its pid, the group's
// id, cannot be reused, so the signal reaches only the machine's processes
// (after an agent restart init reaps it, and Stop ends the group).
func reapGroup(cmd *exec.Cmd) {
	pid := cmd.Process.Pid
	var info unix.Siginfo
	var err error = unix.EINTR
	for err == unix.EINTR {
		err = unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
	}
	if err == nil { // exited, not reaped: the group is still the machine's
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}
	_ = cmd.Wait()
}
