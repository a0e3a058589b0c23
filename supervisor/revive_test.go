package supervisor

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/machine"
)

// opLog records, in order, what the fakes below were asked to do.
type opLog struct {
	mu  sync.Mutex
	ops []string
}

func (l *opLog) add(op string) {
	l.mu.Lock()
	l.ops = append(l.ops, op)
	l.mu.Unlock()
}

func (l *opLog) got() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.ops)
}

// stiffDriver is a unit-test machine driver that cannot pause.
type stiffDriver struct{ log *opLog }

func (d stiffDriver) Start(_ context.Context, s machine.Spec) error {
	d.log.add("start " + s.ID)
	return nil
}
func (d stiffDriver) Stop(_ context.Context, s machine.Spec) error {
	d.log.add("stop " + s.ID + " " + s.KillSignal)
	return nil
}
func (d stiffDriver) Status(context.Context, machine.Spec) (machine.State, error) {
	return machine.Running, nil
}
func (d stiffDriver) StopSpec(id string) machine.Spec { return machine.Spec{ID: id} }

// pausingDriver can pause.
type pausingDriver struct{ stiffDriver }

func (d pausingDriver) Pause(_ context.Context, s machine.Spec) error {
	d.log.add("pause " + s.ID)
	return nil
}
func (d pausingDriver) Resume(_ context.Context, s machine.Spec) error {
	d.log.add("resume " + s.ID)
	return nil
}

// deadBackend is a data path whose datapath of every volume is dead and
// which can only release it.
type deadBackend struct {
	datapath.Backend
	log *opLog
}

func (b deadBackend) DatapathDead(context.Context, string) bool { return true }
func (b deadBackend) ReleaseDead(_ context.Context, vol, mnt string) error {
	b.log.add("release " + vol + " " + mnt)
	return nil
}
func (b deadBackend) MountPoint(id string) string { return "/mnt/" + id }

// keepingBackend can serve the kept mount from a new datapath.
type keepingBackend struct {
	deadBackend
	err error
}

func (b keepingBackend) ReattachDead(_ context.Context, vol string) error {
	b.log.add("reattach " + vol)
	return b.err
}

func TestReviveOrder(t *testing.T) {
	cases := []struct {
		name    string
		pauses  bool
		backend func(*opLog) datapath.Backend
		want    []string
		why     string // in the log when the machine is restarted
	}{
		{"kept mount: paused while the disk is away", true,
			func(l *opLog) datapath.Backend { return keepingBackend{deadBackend: deadBackend{log: l}} },
			[]string{"pause m1", "reattach v1", "resume m1"}, ""},
		{"mount dropped: restarted", true,
			func(l *opLog) datapath.Backend { return deadBackend{log: l} },
			[]string{"stop m1 SIGKILL", "release v1 /mnt/m1"}, "cannot restart a datapath under the kept filesystem"},
		{"reattach failed: thawed, then restarted", true,
			func(l *opLog) datapath.Backend {
				return keepingBackend{deadBackend: deadBackend{log: l}, err: errors.New("connection lost")}
			},
			[]string{"pause m1", "reattach v1", "resume m1", "stop m1 SIGKILL", "release v1 /mnt/m1"}, "connection lost"},
		{"machine cannot pause: restarted", false,
			func(l *opLog) datapath.Backend { return keepingBackend{deadBackend: deadBackend{log: l}} },
			[]string{"stop m1 SIGKILL", "release v1 /mnt/m1"}, "cannot pause"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ops := &opLog{}
			var drv Driver = stiffDriver{log: ops}
			if c.pauses {
				drv = pausingDriver{stiffDriver{log: ops}}
			}
			var out bytes.Buffer
			s := New(zerolog.New(&out), Config{Worker: "w1"}, nil, drv, c.backend(ops), nil, nil)
			did, err := s.Revive(context.Background(), "v1", "m1")
			if err != nil || !did {
				t.Fatalf("Revive = %v, %v; want true, nil", did, err)
			}
			if got := ops.got(); !slices.Equal(got, c.want) {
				t.Fatalf("did %q, want %q", got, c.want)
			}
			if c.why != "" && !strings.Contains(out.String(), c.why) {
				t.Fatalf("the log does not say why the machine is restarted (%q): %s", c.why, out.String())
			}
		})
	}
}
