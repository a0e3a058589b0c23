package datapath

import (
	"testing"

	"github.com/ferry-dev/ferry/luks"
)

func TestGrownLayout(t *testing.T) {
	l := luks.Layout{DataOffset: 16 << 20, SectorSize: 4096, PayloadSize: 48 << 20}
	g, err := GrownLayout(l, 128<<20+1000) // a tail short of a sector is not served
	if err != nil || g.PayloadSize != 112<<20 || g.DataOffset != l.DataOffset {
		t.Fatalf("grown: %+v %v", g, err)
	}
	if g, err := GrownLayout(l, 64<<20); err != nil || g.PayloadSize != l.PayloadSize {
		t.Fatalf("same size: %+v %v", g, err)
	}
	for _, size := range []int64{32 << 20, 16 << 20, 0} {
		if _, err := GrownLayout(l, size); err == nil {
			t.Fatalf("GrownLayout(%d) succeeded", size)
		}
	}
}
