package mountns

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/internal/testenv"
)

// startCopy starts a process in a new mount namespace with the given
// propagation for its copy of the mount table, and waits until it runs.
func startCopy(t *testing.T, propagation string) *exec.Cmd {
	t.Helper()
	ready := filepath.Join(t.TempDir(), "ready")
	cmd := exec.Command("unshare", "-m", "--propagation", propagation, "sh", "-c", "touch "+ready+"; exec sleep 60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for i := 0; i < 500; i++ {
		if _, err := os.Stat(ready); err == nil {
			return cmd
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatal("the copy never started")
	return nil
}

func mountsIn(pid int) string {
	b, _ := os.ReadFile("/proc/" + itoa(pid) + "/mountinfo")
	return string(b)
}

func itoa(n int) string { return strconv.Itoa(n) }

func TestSlaveCopyDropsUnmountAndPrivateCopyIsNamed(t *testing.T) {
	testenv.Root(t, "mounts and mount namespaces")
	testenv.Tools(t, "util-linux", "unshare")
	root := filepath.Join(t.TempDir(), "mnt")
	if err := EnsureShared(root); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Release(root) })
	if err := EnsureShared(root); err != nil { // idempotent
		t.Fatalf("second EnsureShared: %v", err)
	}
	for _, tc := range []struct {
		propagation string
		pinned      bool
	}{{"slave", false}, {"private", true}} {
		t.Run(tc.propagation, func(t *testing.T) {
			mnt := filepath.Join(root, "m-"+tc.propagation)
			os.MkdirAll(mnt, 0o755)
			if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=1m"); err != nil {
				t.Fatal(err)
			}
			dev, err := DeviceOf(mnt)
			if err != nil {
				t.Fatal(err)
			}
			cp := startCopy(t, tc.propagation)
			if !strings.Contains(mountsIn(cp.Process.Pid), mnt) {
				t.Fatalf("the copy does not have %s", mnt)
			}
			if err := unix.Unmount(mnt, 0); err != nil {
				t.Fatal(err)
			}
			still := strings.Contains(mountsIn(cp.Process.Pid), mnt)
			if still != tc.pinned {
				t.Fatalf("%s copy still mounts %s: %v, want %v", tc.propagation, mnt, still, tc.pinned)
			}
			why := Explain(dev, "volume v1")
			if !tc.pinned {
				if why != "" {
					t.Fatalf("nothing pins it, yet: %s", why)
				}
				return
			}
			if !strings.Contains(why, "pid "+itoa(cp.Process.Pid)) || !strings.Contains(why, "mnt:[") || !strings.Contains(why, "nsenter -t") {
				t.Fatalf("explanation %q does not name the holder's pid, namespace and the fix", why)
			}
		})
	}
}
