package hostfs

import (
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/internal/testenv"
)

func TestDying(t *testing.T) {
	for _, c := range []struct {
		status string
		want   bool
	}{
		{"Name:\tcat\nState:\tS (sleeping)\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n", false},
		{"Name:\tcat\nState:\tD (disk sleep)\nSigPnd:\t0000000000000100\nShdPnd:\t0000000000000100\n", true}, // SIGKILL pending
		{"Name:\tcat\nState:\tD (disk sleep)\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000100\n", true},
		{"Name:\tcat\nState:\tD (disk sleep)\nSigPnd:\t0000000000004000\nShdPnd:\t0000000000000000\n", false}, // SIGTERM only
		{"Name:\tferry\nState:\tZ (zombie)\n", true},
		{"State:\tX (dead)\n", true},
		{"garbage", false},
	} {
		if got := dying(c.status); got != c.want {
			t.Errorf("dying(%q) = %v, want %v", c.status, got, c.want)
		}
	}
}

// A live process with its working directory in a mount holds it; once it
// is gone, nothing does.
func TestLiveHolders(t *testing.T) {
	testenv.Root(t, "mount a tmpfs")
	mnt := t.TempDir()
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(mnt, unix.MNT_DETACH)
	if got := LiveHolders(mnt); len(got) != 0 {
		t.Fatalf("holders of an unused mount: %v", got)
	}
	cmd := exec.Command("sleep", "60")
	cmd.Dir = mnt
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	if got := LiveHolders(mnt); !slices.Contains(got, cmd.Process.Pid) {
		t.Fatalf("holders %v do not include %d, whose working directory is the mount", got, cmd.Process.Pid)
	}
	// A sibling path that shares the prefix is not under the mount.
	other := mnt + "-sibling"
	if err := os.Mkdir(other, 0o700); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(other)
	if got := LiveHolders(other); slices.Contains(got, cmd.Process.Pid) {
		t.Fatalf("%d counted as holding %s", cmd.Process.Pid, other)
	}
	cmd.Process.Kill()
	cmd.Wait()
	deadline := time.Now().Add(5 * time.Second)
	for len(LiveHolders(mnt)) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("holders after the process ended: %v", LiveHolders(mnt))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
