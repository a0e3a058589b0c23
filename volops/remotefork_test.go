package volops

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/luks"
)

// forkRig records, in order, what the source's side of a fork to another
// worker does with the store, its keys, its data path and its exports.
type forkRig struct {
	datapath.Backend // only the methods below are called
	dir              string
	calls            []string
	vols             map[string]*fsm.Volume
	served           []fsm.ForkServeCmd
}

func (r *forkRig) note(s string) { r.calls = append(r.calls, s) }

// Store
func (r *forkRig) GetVolume(_ context.Context, id string) (*fsm.Volume, error) {
	if v, ok := r.vols[id]; ok {
		return v, nil
	}
	return nil, errors.New("not found")
}
func (r *forkRig) UpdateVolume(context.Context, fsm.UpdateVolumeCmd) error { return nil }
func (r *forkRig) GetMachine(context.Context, string) (*fsm.Machine, error) {
	return nil, errors.New("none")
}
func (r *forkRig) GetWorker(_ context.Context, name string) (*fsm.Worker, error) {
	return &fsm.Worker{Name: name, Address: "10.0.0.2"}, nil
}
func (r *forkRig) ServeFork(_ context.Context, c fsm.ForkServeCmd) error {
	r.note("serve_fork")
	r.served = append(r.served, c)
	return nil
}

// Keys
func (r *forkRig) OwnerKey(context.Context, string) ([]byte, error) { return []byte("src-key"), nil }
func (r *forkRig) NewVolumeKey(context.Context, string) ([]byte, error) {
	return nil, errors.New("not for forks")
}
func (r *forkRig) NewForkKey(_ context.Context, f *fsm.Volume) ([]byte, error) {
	r.note("seal_key_to_" + f.Worker)
	return []byte("fork-key"), nil
}

// Exporter
func (r *forkRig) Export(_ context.Context, id, path, target, allow string) (string, string, error) {
	r.note("export_" + id + "_to_" + target + "@" + allow)
	return "10.0.0.1:3260", "iqn.x:" + id, nil
}
func (r *forkRig) Unexport(_ context.Context, id string) error { r.note("unexport_" + id); return nil }
func (r *forkRig) Live(string) bool                            { return false }

// datapath.Backend
func (r *forkRig) Capabilities() datapath.Capabilities {
	return datapath.Capabilities{Name: "rig", Fork: true}
}
func (r *forkRig) DataPath(vol string) string { return filepath.Join(r.dir, vol) }
func (r *forkRig) Fork(_ context.Context, src string, _ []byte, dst string, _ []byte) (luks.Layout, datapath.ForkStats, error) {
	r.note("fork_" + src + "_into_" + dst)
	f, err := blockdev.CreateSparse(r.DataPath(dst), 32<<20)
	if err != nil {
		return luks.Layout{}, datapath.ForkStats{}, err
	}
	f.WriteAt([]byte{1}, 0)
	f.Close()
	return luks.Layout{UUID: "fork", DataOffset: 16 << 20, PayloadSize: 16 << 20, SectorSize: 4096, Cipher: "aes-xts-plain64", KeyBytes: 64}, datapath.ForkStats{}, nil
}
func (r *forkRig) Remove(_ context.Context, vol string) error {
	r.note("remove_" + vol)
	return os.Remove(r.DataPath(vol))
}

func newForkRig(t *testing.T) (*forkRig, *Ops) {
	r := &forkRig{dir: t.TempDir(), vols: map[string]*fsm.Volume{
		"src": {ID: "src", Worker: "w1", State: fsm.VolCreated},
	}}
	return r, New(zerolog.Nop(), "w1", r, r, r, nil, r)
}

// The copy: no earlier unpublished export survives, the key is sealed to
// the fork's worker before the copy is made, the copy is served to that
// worker alone, and published with its layout and holes.
func TestServeForkMakesSealsServesPublishes(t *testing.T) {
	r, o := newForkRig(t)
	f := &fsm.Volume{ID: "far", Worker: "w2", ForkOf: "src", ForkFrom: "w1", State: fsm.VolCreating}
	o.ServeFork(context.Background(), f)
	want := []string{"unexport_fork-far", "seal_key_to_w2", "fork_src_into_far", "export_fork-far_to_w2@10.0.0.2", "serve_fork"}
	if !slices.Equal(r.calls, want) {
		t.Fatalf("calls %v, want %v", r.calls, want)
	}
	c := r.served[0]
	if c.ID != "far" || c.Layout == nil || c.Layout.UUID != "fork" || c.Export == nil || c.Export.Portal != "10.0.0.1:3260" || c.Released {
		t.Fatalf("published %+v", c)
	}
	if len(c.KnownZero) == 0 {
		t.Fatal("the copy's holes were not published")
	}
}

// Once the fork is created (or destroyed), the copy is unexported, deleted
// and released, in that order; a fork whose source is not here is left
// alone; a fork of this worker's own is not served.
func TestServeForkReleasesAndRefuses(t *testing.T) {
	r, o := newForkRig(t)
	os.WriteFile(r.DataPath("far"), []byte("copy"), 0o600)
	o.ServeFork(context.Background(), &fsm.Volume{ID: "far", Worker: "w2", ForkOf: "src", ForkFrom: "w1", State: fsm.VolCreated})
	if want := []string{"unexport_fork-far", "remove_far", "serve_fork"}; !slices.Equal(r.calls, want) || !r.served[0].Released {
		t.Fatalf("release: calls %v, served %+v", r.calls, r.served)
	}

	r, o = newForkRig(t)
	r.vols["src"].Worker = "w3" // migrated away meanwhile
	o.ServeFork(context.Background(), &fsm.Volume{ID: "far", Worker: "w2", ForkOf: "src", ForkFrom: "w1", State: fsm.VolCreating})
	if slices.Contains(r.calls, "fork_src_into_far") || len(r.served) != 0 {
		t.Fatalf("copied a source that is not here: %v", r.calls)
	}

	r, o = newForkRig(t)
	o.ServeFork(context.Background(), &fsm.Volume{ID: "near", Worker: "w1", ForkOf: "src", State: fsm.VolCreating})
	o.ServeFork(context.Background(), &fsm.Volume{ID: "far", Worker: "w2", ForkOf: "src", ForkFrom: "w9", State: fsm.VolCreating})
	if len(r.calls) != 0 {
		t.Fatalf("served forks that are not this worker's to serve: %v", r.calls)
	}
}
