package datapath

import (
	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/luks"
)

// The replicated store keeps its own copies of the LUKS2 layout and of byte
// ranges, so its format does not follow the libraries; these convert at the
// edge between the store's records and the data path.
//
// StoredLayout, LayoutOf, StoredRanges and RangesOf convert each way.

func StoredLayout(l luks.Layout) *fsm.LUKSLayout {
	s := fsm.LUKSLayout(l)
	return &s
}

func LayoutOf(l fsm.LUKSLayout) luks.Layout { return luks.Layout(l) }

func StoredRanges(rs []blockdev.Range) []fsm.Range {
	if rs == nil {
		return nil
	}
	out := make([]fsm.Range, len(rs))
	for i, r := range rs {
		out[i] = fsm.Range(r)
	}
	return out
}

func RangesOf(rs []fsm.Range) []blockdev.Range {
	if rs == nil {
		return nil
	}
	out := make([]blockdev.Range, len(rs))
	for i, r := range rs {
		out[i] = blockdev.Range(r)
	}
	return out
}
