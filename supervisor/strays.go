package supervisor

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// killStrayMachines ends processes of machine id running on mountDir that
// the machine driver has no record of: an agent killed between starting the
// machine and recording its pid leaves one behind, untracked, holding the
// mount (found by the chaos matrix: kill -9 of the target during cutover,
// then a rollback that could never unmount). Machines carry
// FERRY_MACHINE_ID and FERRY_VOLUME_DIR in their environment.
func killStrayMachines(id, mountDir string) int {
	want := [][]byte{[]byte("FERRY_MACHINE_ID=" + id), []byte("FERRY_VOLUME_DIR=" + filepath.Clean(mountDir))}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil {
			continue
		}
		vars := bytes.Split(env, []byte{0})
		found := 0
		for _, w := range want {
			for _, v := range vars {
				if bytes.Equal(v, w) {
					found++
					break
				}
			}
		}
		if found != len(want) {
			continue
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
		for i := 0; i < 200 && syscall.Kill(pid, 0) == nil; i++ {
			time.Sleep(10 * time.Millisecond)
		}
		n++
	}
	return n
}
