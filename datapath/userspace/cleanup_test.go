package userspace

import (
	"context"
	"errors"
	"os"
	"testing"

	"github.com/rs/zerolog"
)

// stillOpenLoops is a loop device that stays open for its first fails
// detaches, as one held by a machine dying inside its I/O.
type stillOpenLoops struct {
	fails, calls int
	detached     bool
}

func (l *stillOpenLoops) Attach(string, bool) (string, error) {
	return "", errors.New("not in this test")
}

func (l *stillOpenLoops) Detach(string) error {
	l.calls++
	if l.fails > 0 {
		l.fails--
		return errors.New("/dev/loop9 is still open by someone after detaching")
	}
	l.detached = true
	return nil
}

func (l *stillOpenLoops) FindByBackingFile(string) ([]string, error) {
	if l.detached {
		return nil, nil
	}
	return []string{"/dev/loop9"}, nil
}

// A teardown meeting a loop device that is still open detaches it again
// until it is released, rather than failing and leaving the datapath, its
// FUSE file and the shared mounts behind.
func TestCleanupAllDetachesAStillOpenLoopAgain(t *testing.T) {
	loops := &stillOpenLoops{fails: 2}
	v := &Backend{DataDir: t.TempDir(), Log: zerolog.Nop(), Loops: loops}
	if err := os.MkdirAll(v.FuseDir("vol1"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := v.CleanupAll(context.Background()); err != nil {
		t.Fatalf("cleanup: %v", err)
	}
	if !loops.detached || loops.calls != 3 {
		t.Fatalf("detached %v after %d detaches, want detached after 3", loops.detached, loops.calls)
	}
}
