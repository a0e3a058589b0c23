package netrewrite

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/rs/zerolog"
)

// TestMissingPrivileges re-runs this test binary as an unprivileged user and
// checks that every entry point refuses with ErrPrivileges before touching
// anything.
func TestMissingPrivileges(t *testing.T) {
	if os.Getenv("NETREWRITE_UNPRIV_CHILD") == "1" {
		unprivChild(t)
		return
	}
	needRoot(t)
	// The go test build directory is private to root: copy the binary where
	// the unprivileged user may execute it.
	dir, err := os.MkdirTemp("", "nrt-unpriv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "netrewrite.test")
	if err := os.WriteFile(exe, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^TestMissingPrivileges$", "-test.v")
	cmd.Env = append(os.Environ(), "NETREWRITE_UNPRIV_CHILD=1")
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "PASS") {
		t.Fatalf("unprivileged child: %v\n%s", err, out)
	}
	t.Logf("child output:\n%s", out)
}

func unprivChild(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Fatal("child still root")
	}
	ctx := context.Background()
	log := zerolog.Nop()
	old, nw := MustBuild(1, 2, 3), MustBuild(1, 4, 3)
	m := MachineNet{WorkerNS: "nrt-unpriv-w", MachineNS: "nrt-unpriv-m", Addr: nw}
	errs := map[string]error{
		"EnsureNamespace":    EnsureNamespace("nrt-unpriv-x"),
		"DeleteNamespace":    DeleteNamespace("nrt-unpriv-x"),
		"SetupMachineNet":    SetupMachineNet(ctx, log, m),
		"TeardownMachineNet": TeardownMachineNet(ctx, log, m),
		"CutoverTarget":      CutoverTarget(ctx, log, TargetPlan{Machine: m, Old: old}),
		"RollbackTarget":     RollbackTarget(ctx, log, TargetPlan{Machine: m, Old: old}),
		"CutoverSource":      CutoverSource(ctx, log, SourcePlan{Machine: m, Via: nw.IP()}),
		"RollbackSource":     RollbackSource(ctx, log, SourcePlan{Machine: m, Via: nw.IP()}),
	}
	for name, err := range errs {
		if !errors.Is(err, ErrPrivileges) {
			t.Errorf("%s as uid %d: %v, want ErrPrivileges", name, os.Geteuid(), err)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}
