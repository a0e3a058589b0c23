package operator

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// extendFake records the request and reports the growth after grownAfter reads.
type extendFake struct {
	*fake
	asked      int64
	grownAfter int
}

func (f *extendFake) ExtendVolume(_ context.Context, id string, size int64) (*fsm.Volume, error) {
	v := f.volumes[id]
	if v == nil {
		return nil, notFound("volume")
	}
	f.asked = size
	v.WantSize = size
	cp := *v
	return &cp, nil
}

func (f *extendFake) GetVolume(ctx context.Context, id string) (*fsm.Volume, error) {
	v, err := f.fake.GetVolume(ctx, id)
	if err == nil && f.grownAfter > 0 && f.reads >= f.grownAfter {
		f.volumes[id].Size, f.volumes[id].WantSize = f.volumes[id].WantSize, 0
		v = f.volumes[id]
	}
	return v, err
}

func TestExtendVolumeWaitsForTheWorker(t *testing.T) {
	f := &extendFake{fake: newFake(), grownAfter: 3}
	f.volumes["v"] = &fsm.Volume{ID: "v", Worker: "w1", Size: 1 << 30, State: fsm.VolCreated}
	if _, err := extendVolume(t.Context(), f, "v", 1000, time.Second, time.Millisecond); !errors.Is(err, ErrInvalid) || f.asked != 0 {
		t.Fatalf("unaligned size: %v (asked %d)", err, f.asked)
	}
	v, err := extendVolume(t.Context(), f, "v", 2<<30, time.Second, time.Millisecond)
	if err != nil || v.Size != 2<<30 || v.Extending() || f.reads < 3 {
		t.Fatalf("extend: %+v %v after %d reads", v, err, f.reads)
	}
	// A worker that never reports: the timeout names both sizes and the worker.
	f.grownAfter = 0
	_, err = extendVolume(t.Context(), f, "v", 3<<30, 5*time.Millisecond, time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "growing to 3.0 GiB") || !strings.Contains(err.Error(), "w1") {
		t.Fatalf("timeout: %v", err)
	}
}
