package fsm

import (
	"encoding/json"
	"testing"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/luks"
)

// TestStoredTypesEncodeLikeTheLibraries: records written when the store held
// luks.Layout and blockdev.Range stay readable, because fsm's own types encode
// the same way (and convert with a plain Go conversion).
func TestStoredTypesEncodeLikeTheLibraries(t *testing.T) {
	ll := luks.Layout{UUID: "u-1", DataOffset: 16 << 20, MetadataSize: 16384, KeyslotsSize: 16744448,
		SectorSize: 4096, Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: 64 << 20}
	fl := LUKSLayout(ll)
	a, _ := json.Marshal(ll)
	b, _ := json.Marshal(fl)
	if string(a) != string(b) {
		t.Fatalf("layout encodings differ:\nluks %s\nfsm  %s", a, b)
	}
	var back LUKSLayout
	if err := strictUnmarshal(a, &back); err != nil || back != fl {
		t.Fatalf("a luks.Layout encoding does not decode strictly into LUKSLayout: %v %+v", err, back)
	}
	if fl.DeviceSize() != ll.DeviceSize() {
		t.Fatalf("device size %d, luks says %d", fl.DeviceSize(), ll.DeviceSize())
	}
	// The store's validation agrees with the library's on good and broken layouts.
	broken := []func(*luks.Layout){
		func(l *luks.Layout) {},
		func(l *luks.Layout) { l.DataOffset = 0 },
		func(l *luks.Layout) { l.DataOffset = 1000 },
		func(l *luks.Layout) { l.SectorSize = 333 },
		func(l *luks.Layout) { l.PayloadSize = 4097 },
		func(l *luks.Layout) { l.PayloadSize = -4096 },
		func(l *luks.Layout) { l.Cipher = "" },
		func(l *luks.Layout) { l.KeyBytes = 0 },
	}
	for i, mutate := range broken {
		l := ll
		mutate(&l)
		if (l.Validate() == nil) != (LUKSLayout(l).Validate() == nil) {
			t.Errorf("case %d: luks says %v, the store says %v", i, l.Validate(), LUKSLayout(l).Validate())
		}
	}

	br := blockdev.Range{Off: 4096, Len: 1 << 20}
	fr := Range(br)
	a, _ = json.Marshal([]blockdev.Range{br})
	b, _ = json.Marshal([]Range{fr})
	if string(a) != string(b) || fr.End() != br.End() {
		t.Fatalf("range encodings differ: %s %s", a, b)
	}
}
