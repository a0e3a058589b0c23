package machine

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/internal/testenv"
)

// A paused machine and its children make no progress; resumed, they do.
func TestExecPauseResume(t *testing.T) {
	testenv.Root(t, "machines start as another user")
	// As root: the machine writes into a test's temporary folder.
	e := &Exec{StateDir: t.TempDir(), Log: zerolog.Nop(), User: &User{}}
	dir := t.TempDir()
	tick := filepath.Join(dir, "tick")
	// The child writes the ticks, so the whole group must stop, not only the leader.
	s := Spec{ID: "p1", Command: []string{"sh", "-c", `(while :; do date +%s%N >> "$0"; sleep 0.01; done) & wait`, tick},
		MountDir: dir, KillTimeout: time.Second}
	ctx := context.Background()
	if err := e.Start(ctx, s); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Resume(ctx, s); e.Stop(ctx, s) })
	size := func() int64 {
		fi, err := os.Stat(tick)
		if err != nil {
			return 0
		}
		return fi.Size()
	}
	for deadline := time.Now().Add(30 * time.Second); size() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the machine never wrote")
		}
	}
	if err := e.Pause(ctx, s); err != nil {
		t.Fatal(err)
	}
	before := size()
	time.Sleep(200 * time.Millisecond)
	if after := size(); after != before {
		t.Fatalf("the paused machine wrote %d bytes", after-before)
	}
	if st, _ := e.Status(ctx, s); st != Running {
		t.Fatalf("a paused machine reports %s, want running (it keeps its place)", st)
	}
	if err := e.Resume(ctx, s); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); size() == before; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the resumed machine did not write again")
		}
	}
}

func TestScriptMachinesCannotPause(t *testing.T) {
	d := ByKind{Exec: &Exec{StateDir: t.TempDir(), Log: zerolog.Nop()}, Script: Script{}}
	s := Spec{ID: "vm1", Script: &ScriptSpec{}}
	if err := d.Pause(context.Background(), s); !errors.Is(err, ErrCannotPause) {
		t.Fatalf("Pause of a script machine: %v, want ErrCannotPause", err)
	}
}
