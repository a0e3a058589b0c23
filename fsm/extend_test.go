package fsm

import (
	"strings"
	"testing"
)

func TestExtendVolume(t *testing.T) {
	h := newHarness(t)
	h.setup(true) // vol1 is locked by migration m1
	h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(srcW), Volume: Volume{ID: "v", Worker: srcW.Name, Size: 64 << 20, State: VolCreated, Layout: testLayout()}}))
	ext := func(id Identity, vol string, size int64) *Result {
		return h.apply(CmdExtendVolume, &ExtendVolumeCmd{Header: h.hdr(id), ID: vol, Size: size})
	}
	refused := func(r *Result, code, words string) {
		t.Helper()
		if r.Refusal == nil || r.Refusal.Code != code || !strings.Contains(r.Refusal.Reason, words) {
			t.Fatalf("want refusal %s %q, got %+v", code, words, r.Refusal)
		}
	}
	refused(ext(srcW, "v", 128<<20), CodeForbidden, "operators only")
	refused(ext(operator, "v", 32<<20), CodeInvalid, "shrinking")
	refused(ext(operator, "v", 100), CodeInvalid, "multiple of 512")
	refused(ext(operator, "vol1", 128<<20), CodeLocked, "in migration m1")
	refused(ext(operator, "nope", 128<<20), CodeNotFound, "nope")

	v := h.must(ext(operator, "v", 128<<20)).Volume
	if v.Size != 64<<20 || v.WantSize != 128<<20 || !v.Extending() {
		t.Fatalf("after extend: size %d want %d", v.Size, v.WantSize)
	}
	h.must(ext(operator, "v", 128<<20)) // a retry answers the same
	refused(ext(operator, "v", 256<<20), CodeConflict, "already being extended")

	// A pending extend blocks a migration of the volume.
	h.must(h.apply(CmdCreateMachine, &CreateMachineCmd{Header: h.hdr(operator), Machine: Machine{ID: "mv", Worker: srcW.Name, Volume: "v", Network: 42, MachineNo: 9, State: MachineRunning}}))
	refused(h.apply(CmdPlan, &PlanCmd{Header: h.hdr(operator), ID: "mx", Machine: "mv", Target: otherW.Name}), CodeWrongState, "being extended")

	// The worker may report only the requested size, not any other.
	bad := int64(512 << 20)
	refused(h.apply(CmdUpdateVolume, &UpdateVolumeCmd{Header: h.hdr(srcW), ID: "v", Size: &bad}), CodeForbidden, "extend asked for")
	other := int64(128 << 20)
	refused(h.apply(CmdUpdateVolume, &UpdateVolumeCmd{Header: h.hdr(otherW), ID: "v", Size: &other}), CodeForbidden, "w-other")
	l := testLayout()
	l.PayloadSize = 128<<20 - l.DataOffset
	v = h.must(h.apply(CmdUpdateVolume, &UpdateVolumeCmd{Header: h.hdr(srcW), ID: "v", Size: &other, Layout: l})).Volume
	if v.Size != 128<<20 || v.WantSize != 0 || v.Extending() || v.Layout.PayloadSize != l.PayloadSize {
		t.Fatalf("after report: %+v", v)
	}
	// Done: the same size again is a no-op, a larger one a new request.
	if v := h.must(ext(operator, "v", 128<<20)).Volume; v.Extending() {
		t.Fatal("extend to the current size left a pending request")
	}
	if v := h.must(ext(operator, "v", 192<<20)).Volume; v.WantSize != 192<<20 {
		t.Fatalf("second extend: want %d", v.WantSize)
	}
	// A worker cannot sneak a pending request in through create.
	r := h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(srcW), Volume: Volume{ID: "w", Worker: srcW.Name, Size: 8 << 20, WantSize: 1 << 40}}))
	if r.Volume.WantSize != 0 {
		t.Fatalf("create kept want_size %d", r.Volume.WantSize)
	}
	// A destroyed volume is not extended.
	h.must(h.apply(CmdDestroyVolume, &DestroyVolumeCmd{Header: h.hdr(operator), ID: "w"}))
	refused(ext(operator, "w", 16<<20), CodeWrongState, "pending_destroy")
}
