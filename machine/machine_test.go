package machine

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

func TestExecStartStopIdempotent(t *testing.T) {
	e := &Exec{StateDir: t.TempDir(), Log: zerolog.Nop()}
	s := Spec{ID: "m1", Command: []string{"sleep", "30"}, MountDir: t.TempDir(), KillTimeout: time.Second}
	ctx := context.Background()
	if err := e.Start(ctx, s); err != nil {
		t.Fatal(err)
	}
	ref, _ := e.readRef("m1")
	if err := e.Start(ctx, s); err != nil { // already running: nothing
		t.Fatal(err)
	}
	ref2, _ := e.readRef("m1")
	if ref.Pid != ref2.Pid {
		t.Fatalf("second Start started another process (%d, then %d)", ref.Pid, ref2.Pid)
	}
	if st, _ := e.Status(ctx, s); st != Running {
		t.Fatalf("status %s, want running", st)
	}
	if ids, err := e.Running(ctx); err != nil || len(ids) != 1 || ids[0] != "m1" {
		t.Fatalf("Running = %v, %v; want [m1]", ids, err)
	}
	if err := e.Stop(ctx, s); err != nil {
		t.Fatal(err)
	}
	if ids, err := e.Running(ctx); err != nil || len(ids) != 0 {
		t.Fatalf("Running after stop = %v, %v; want none", ids, err)
	}
	if st, _ := e.Status(ctx, s); st != Stopped {
		t.Fatalf("status %s after stop, want stopped", st)
	}
	if err := e.Stop(ctx, s); err != nil {
		t.Fatal(err)
	}
	iv, err := Journal(e.StateDir, "m1")
	if err != nil || len(iv) != 1 || iv[0].Stop.IsZero() {
		t.Fatalf("journal = %+v, %v; want one closed interval", iv, err)
	}
}

func TestExecKillTimeout(t *testing.T) {
	e := &Exec{StateDir: t.TempDir(), Log: zerolog.Nop()}
	// A machine that ignores SIGINT is killed after the timeout.
	mnt := t.TempDir()
	s := Spec{ID: "stubborn", Command: []string{"sh", "-c", "trap '' INT; touch trapped; sleep 30"}, MountDir: mnt, KillTimeout: 200 * time.Millisecond}
	if err := e.Start(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	// Stopped only once the trap holds: on a busy host the shell takes a
	// while to get there, and SIGINT before it would end it at once.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(filepath.Join(mnt, "trapped")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the machine did not set its trap within 10 s")
		}
	}
	start := time.Now()
	if err := e.Stop(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 200*time.Millisecond {
		t.Fatalf("stopped after %v, before the kill timeout: the trap did not hold?", d)
	}
}

func TestRejectsBadInput(t *testing.T) {
	e := &Exec{StateDir: t.TempDir(), Log: zerolog.Nop()}
	if err := e.Start(context.Background(), Spec{ID: "../x", Command: []string{"true"}}); err == nil {
		t.Fatal("path-like machine id accepted")
	}
	if err := e.Start(context.Background(), Spec{ID: "ok"}); err == nil {
		t.Fatal("empty command accepted")
	}
	if _, err := ParseSignal("SIGBOGUS"); err == nil {
		t.Fatal("bogus signal accepted")
	}
}

func TestScriptDriver(t *testing.T) {
	dir := t.TempDir()
	state := "state" // relative: scripts run in the machine's mount, as its user
	write := func(name, body string) string {
		os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\n"+body+"\n"), 0o755)
		return name
	}
	s := Spec{ID: "vm1", MountDir: dir, Script: &ScriptSpec{
		Start:  write("start", "echo running > "+state),
		Stop:   write("stop", "echo stopped > "+state),
		Status: write("status", "cat "+state+" 2>/dev/null || echo stopped"),
	}}
	d := Script{}
	ctx := context.Background()
	if st, err := d.Status(ctx, s); err != nil || st != Stopped {
		t.Fatalf("initial status %q %v", st, err)
	}
	if err := d.Start(ctx, s); err != nil {
		t.Fatal(err)
	}
	if st, _ := d.Status(ctx, s); st != Running {
		t.Fatalf("status after start %q", st)
	}
	bad := s
	bad.Script = &ScriptSpec{Status: write("bad", "echo maybe")}
	if _, err := d.Status(ctx, bad); err == nil {
		t.Fatal("a status script printing garbage was accepted")
	}
}

func TestByKindPicksScriptWhenNamed(t *testing.T) {
	dir := t.TempDir()
	marker := filepath.Join(dir, "started")
	os.WriteFile(filepath.Join(dir, "start"), []byte("#!/bin/sh\ntouch started\n"), 0o755)
	d := ByKind{Exec: &Exec{StateDir: t.TempDir(), Log: zerolog.Nop()}, Script: Script{}}
	if err := d.Start(context.Background(), Spec{ID: "vm", MountDir: dir, Script: &ScriptSpec{Start: "start"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Fatal("the script driver did not run the start script")
	}
}

// TestMachineRunsUnprivileged: the process runs as the configured user
// (nobody by default) with no_new_privs, in its mount, with none of the
// agent's environment.
func TestMachineRunsUnprivileged(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("dropping to another user needs root")
	}
	t.Setenv("FERRY_AGENT_SECRET", "leaked")
	mnt := t.TempDir()
	// In a network namespace of its own, as a migrated machine runs.
	ns := fmt.Sprintf("ferry-test-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	var nsStat syscall.Stat_t
	if err := syscall.Stat("/run/netns/"+ns, &nsStat); err != nil {
		t.Fatal(err)
	}
	e := &Exec{StateDir: t.TempDir(), Log: zerolog.Nop()}
	s := Spec{ID: "m1", MountDir: mnt, NetNS: ns, KillTimeout: time.Second, Env: map[string]string{"APP": "yes"},
		Command: []string{"sh", "-c", "id -u > out; id -g >> out; id -G >> out; grep NoNewPrivs /proc/self/status >> out; readlink /proc/self/ns/net >> out; env > env; sleep 30"}}
	ctx := context.Background()
	agentState := func() string { // what the start must leave as it was in the agent
		wd, _ := os.Getwd()
		ns, _ := os.Readlink("/proc/self/ns/net")
		st, _ := os.ReadFile("/proc/self/status")
		nnp := regexp.MustCompile(`NoNewPrivs:\s*(\d)`).FindSubmatch(st)
		return fmt.Sprintf("folder %s, network %s, no_new_privs %q", wd, ns, nnp)
	}
	before := agentState()
	if err := e.Start(ctx, s); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Stop(ctx, s) })
	if after := agentState(); after != before {
		t.Fatalf("starting the machine changed the agent: %s, was %s", after, before)
	}
	var out, env []byte
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		out, _ = os.ReadFile(filepath.Join(mnt, "out"))
		env, _ = os.ReadFile(filepath.Join(mnt, "env"))
		if strings.Count(string(out), "\n") >= 5 && len(env) > 0 {
			break
		}
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 5 || lines[0] != "65534" || lines[1] != "65534" || lines[2] != "65534" || !strings.HasSuffix(lines[3], "1") {
		t.Fatalf("machine identity:\n%s", out)
	}
	if want := fmt.Sprintf("net:[%d]", nsStat.Ino); lines[4] != want {
		t.Fatalf("machine's network namespace %s, want %s (%s)", lines[4], want, ns)
	}
	if strings.Contains(string(env), "FERRY_AGENT_SECRET") || !strings.Contains(string(env), "APP=yes") ||
		!strings.Contains(string(env), "FERRY_MACHINE_ID=m1") {
		t.Fatalf("machine environment:\n%s", env)
	}
}

// TestSpecPathsConfined: work_dir and script paths outside the machine's
// mount are refused before anything runs.
func TestSpecPathsConfined(t *testing.T) {
	mnt := t.TempDir()
	outside := filepath.Join(t.TempDir(), "ran")
	e := &Exec{StateDir: t.TempDir(), Log: zerolog.Nop()}
	for _, dir := range []string{"/", "..", "../x", "/etc"} {
		s := Spec{ID: "m1", MountDir: mnt, Dir: dir, Command: []string{"touch", outside}}
		if err := e.Start(context.Background(), s); err == nil {
			e.Stop(context.Background(), s)
			t.Fatalf("work_dir %q accepted", dir)
		}
	}
	for _, p := range []string{"/bin/true", "../start", ""} {
		s := Spec{ID: "vm", MountDir: mnt, Script: &ScriptSpec{Start: p}}
		if err := (Script{}).Start(context.Background(), s); err == nil {
			t.Fatalf("script %q accepted", p)
		}
	}
	if _, err := os.Stat(outside); err == nil {
		t.Fatal("a refused spec ran")
	}
	if _, err := ParseUser("65534:65534"); err != nil {
		t.Fatal(err)
	}
	if u, err := ParseUser("root"); err != nil || u != (User{}) {
		t.Fatalf("root: %+v %v", u, err)
	}
	if _, err := ParseUser("nobody"); err == nil {
		t.Fatal("a user name was accepted where numbers are expected")
	}
}
