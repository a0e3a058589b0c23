package fsm

import (
	"strings"
	"testing"
)

func TestForkVolume(t *testing.T) {
	h := newHarness(t)
	h.setup(true) // vol1 is locked by migration m1
	h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(srcW), Volume: Volume{ID: "src", Worker: srcW.Name, Size: 64 << 20, State: VolCreated, Layout: testLayout()}}))
	h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(srcW), Volume: Volume{ID: "raw", Worker: srcW.Name, Size: 64 << 20, State: VolCreated}}))
	fork := func(id Identity, src, dst, worker string) *Result {
		return h.apply(CmdForkVolume, &ForkVolumeCmd{Header: h.hdr(id), ID: dst, Source: src, Worker: worker})
	}
	refused := func(r *Result, code, words string) {
		t.Helper()
		if r.Refusal == nil || r.Refusal.Code != code || !strings.Contains(r.Refusal.Reason, words) {
			t.Fatalf("want refusal %s %q, got %+v", code, words, r.Refusal)
		}
	}
	refused(fork(srcW, "src", "f1", srcW.Name), CodeForbidden, "operators only")
	refused(fork(operator, "vol1", "f1", srcW.Name), CodeLocked, "in migration m1")
	refused(fork(operator, "src", "f1", dstW.Name), CodeInvalid, "not supported yet")
	refused(fork(operator, "raw", "f1", srcW.Name), CodeLayoutNeeded, "no recorded layout")
	refused(fork(operator, "src", "vol1", srcW.Name), CodeConflict, "already exists")
	refused(fork(operator, "nope", "f1", srcW.Name), CodeNotFound, "nope")

	v := h.must(fork(operator, "src", "f1", srcW.Name)).Volume
	if v.ForkOf != "src" || v.State != VolCreating || v.Size != 64<<20 || v.Layout != nil || !v.Forking() {
		t.Fatalf("fork record: %+v", v)
	}
	if again := h.must(fork(operator, "src", "f1", srcW.Name)).Volume; again.ID != "f1" || again.CreatedAt != v.CreatedAt {
		t.Fatalf("retried fork: %+v", again)
	}
	// While the copy is made, the source neither grows nor migrates.
	refused(h.apply(CmdExtendVolume, &ExtendVolumeCmd{Header: h.hdr(operator), ID: "src", Size: 128 << 20}), CodeWrongState, "being forked into f1")
	h.must(h.apply(CmdCreateMachine, &CreateMachineCmd{Header: h.hdr(operator), Machine: Machine{ID: "ms", Worker: srcW.Name, Volume: "src", Network: 42, MachineNo: 9, State: MachineRunning}}))
	refused(h.apply(CmdPlan, &PlanCmd{Header: h.hdr(operator), ID: "mx", Machine: "ms", Target: otherW.Name}), CodeWrongState, "being forked into f1")

	// The worker reports the copy done; then the source is free again.
	created := VolCreated
	h.must(h.apply(CmdUpdateVolume, &UpdateVolumeCmd{Header: h.hdr(srcW), ID: "f1", State: &created, Layout: testLayout()}))
	h.must(h.apply(CmdExtendVolume, &ExtendVolumeCmd{Header: h.hdr(operator), ID: "src", Size: 128 << 20}))
	refused(fork(operator, "src", "f2", srcW.Name), CodeWrongState, "being extended")
	// A worker cannot fake a fork through create.
	r := h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(srcW), Volume: Volume{ID: "w", Worker: srcW.Name, Size: 8 << 20, ForkOf: "src"}}))
	if r.Volume.ForkOf != "" {
		t.Fatalf("create kept fork_of %q", r.Volume.ForkOf)
	}
}
