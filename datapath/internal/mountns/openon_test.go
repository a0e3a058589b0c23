package mountns

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// OpenOn names a process whose working directory is on the filesystem.
func TestOpenOnNamesAHolder(t *testing.T) {
	dir := t.TempDir()
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sleep", "30")
	cmd.Dir = dir
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	want := fmt.Sprintf("pid %d (sleep 30) has %s open", cmd.Process.Pid, dir)
	hs := OpenOn(st.Dev)
	for _, h := range hs {
		if h == want {
			return
		}
	}
	t.Fatalf("OpenOn(%d) = %d holders without %q:\n%s", st.Dev, len(hs), want, strings.Join(hs, "\n"))
}
