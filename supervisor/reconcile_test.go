package supervisor

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
)

// mountBackend places every machine's mount at dir.
type mountBackend struct {
	datapath.Backend
	dir string
}

func (b mountBackend) MountPoint(string) string { return b.dir }

// volumeStore records the volumes asked for and has none.
type volumeStore struct {
	Store
	log *opLog
}

func (s volumeStore) GetVolume(_ context.Context, id string) (*fsm.Volume, error) {
	s.log.add("get volume " + id)
	return nil, errors.New("no volumes here")
}

// A machine running here with its volume mounted costs the reconcile no
// read of the store (nor a key); one whose mount is gone is mounted again.
func TestReconcileRunningMachineMountsOnlyAMissingVolume(t *testing.T) {
	for _, c := range []struct {
		name string
		dir  string
		want []string
	}{
		{"mounted", "/proc", nil}, // a mount point on every Linux host
		{"not mounted", t.TempDir(), []string{"get volume v1"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			ops := &opLog{}
			var out bytes.Buffer
			s := New(zerolog.New(&out), Config{Worker: "w1"}, volumeStore{log: ops}, stiffDriver{log: ops}, mountBackend{dir: c.dir}, nil, nil)
			for range 3 {
				s.Reconcile(context.Background(), &fsm.Machine{ID: "m1", Volume: "v1", Worker: "w1", State: fsm.MachineRunning})
			}
			got := slices.Compact(ops.got())
			if !slices.Equal(got, c.want) {
				t.Fatalf("did %q, want %q (log: %s)", got, c.want, out.String())
			}
		})
	}
}
