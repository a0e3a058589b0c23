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
	refused(fork(operator, "src", "f1", dstW.Name), CodeConflict, "registered no key-encryption key")
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

// TestRemoteFork walks a fork to another worker through the store: the
// source's worker seals the fork's key to the fork's worker and publishes
// its copy; only then is the source free; the fork's worker marks it
// created; the source's worker releases the copy. Nobody else may act for
// either of them.
func TestRemoteFork(t *testing.T) {
	h, keys := keyedHarness(t)
	h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(srcW), Volume: Volume{ID: "src", Worker: srcW.Name, Size: testLayout().DeviceSize(), State: VolCreated, Layout: testLayout()}}))
	refused := func(r *Result, code, words string) {
		t.Helper()
		if r.Refusal == nil || r.Refusal.Code != code || !strings.Contains(r.Refusal.Reason, words) {
			t.Fatalf("want refusal %s %q, got %+v", code, words, r.Refusal)
		}
	}
	fork := func(worker string) *Result {
		return h.apply(CmdForkVolume, &ForkVolumeCmd{Header: h.hdr(operator), ID: "far", Source: "src", Worker: worker})
	}
	h.must(h.apply(CmdCordon, &CordonCmd{Header: h.hdr(operator), Worker: otherW.Name, Cordoned: true, Reason: "disk swap"}))
	refused(fork(otherW.Name), CodeCordoned, "cordoned")
	v := h.must(fork(dstW.Name)).Volume
	if v.Worker != dstW.Name || v.ForkFrom != srcW.Name || !v.RemoteFork() || !v.ForkServed() || v.Layout != nil {
		t.Fatalf("remote fork record: %+v", v)
	}
	// The source's worker reads the fork and the fork's worker; the
	// bystander reads neither.
	if sc := h.s.ScopeOf(srcW); !sc.CanReadVolume("far") || !sc.CanReadWorker(dstW.Name) {
		t.Fatal("the fork's source worker cannot read the fork or its worker")
	}
	if sc := h.s.ScopeOf(otherW); sc.CanReadVolume("far") {
		t.Fatal("a bystander reads the fork")
	}
	if fs := h.s.ForksFrom(srcW.Name); len(fs) != 1 || fs[0].ID != "far" {
		t.Fatalf("forks from %s: %+v", srcW.Name, fs)
	}
	// Until the copy is published the source stays put.
	refused(h.apply(CmdExtendVolume, &ExtendVolumeCmd{Header: h.hdr(operator), ID: "src", Size: 128 << 20}), CodeWrongState, "being forked into far")

	owner := testEnvelope("far", PurposeOwner, dstW.Name, keys[dstW.Name], "")
	rec := testEnvelope("far", PurposeRecovery, RecoveryRecipient, keys[RecoveryRecipient], "")
	serve := func(id Identity, l *LUKSLayout) *Result {
		return h.apply(CmdForkServe, &ForkServeCmd{Header: h.hdr(id), ID: "far", Layout: l, Export: &Export{Portal: "127.0.0.1:3260", IQN: "iqn.x:fork-far"}, KnownZero: []Range{{Off: 1 << 20, Len: 1 << 20}}})
	}
	refused(serve(srcW, testLayout()), CodeConflict, "seal the fork's key")
	refused(h.apply(CmdPutEnvelopes, &PutEnvelopesCmd{Header: h.hdr(otherW), Volume: "far", Envelopes: []Envelope{owner, rec}}), CodeForbidden, "")
	// Sealed to the fork's worker only: the source's worker may not keep
	// an owner envelope of its own.
	refused(h.apply(CmdPutEnvelopes, &PutEnvelopesCmd{Header: h.hdr(srcW), Volume: "far", Envelopes: []Envelope{
		testEnvelope("far", PurposeOwner, srcW.Name, keys[srcW.Name], ""), rec}}), CodeInvalid, "must be sealed to its worker")
	h.must(h.apply(CmdPutEnvelopes, &PutEnvelopesCmd{Header: h.hdr(srcW), Volume: "far", Envelopes: []Envelope{owner, rec}}))
	for _, id := range []Identity{dstW, otherW, operator} {
		refused(serve(id, testLayout()), CodeForbidden, "")
	}
	refused(h.apply(CmdForkServe, &ForkServeCmd{Header: h.hdr(srcW), ID: "far", Released: true}), CodeWrongState, "still being forked")
	// A hostile copy: a layout larger than the fork, holes past its end.
	big := *testLayout()
	big.PayloadSize *= 4
	refused(serve(srcW, &big), CodeInvalid, "layout spans")
	refused(h.apply(CmdForkServe, &ForkServeCmd{Header: h.hdr(srcW), ID: "far", Layout: testLayout(), Export: &Export{Portal: "127.0.0.1:3260", IQN: "iqn.x:fork-far"},
		KnownZero: []Range{{Off: testLayout().DeviceSize() - 4096, Len: 8192}}}), CodeInvalid, "ends past")
	v = h.must(serve(srcW, testLayout())).Volume
	if v.ForkExport == nil || v.Layout == nil || len(v.ForkKnownZero) != 1 || v.State != VolCreating {
		t.Fatalf("published fork: %+v", v)
	}
	// Published: the key is fixed, the source is free, a republication
	// (a new portal) is accepted but not another layout.
	refused(h.apply(CmdPutEnvelopes, &PutEnvelopesCmd{Header: h.hdr(srcW), Volume: "far", Envelopes: []Envelope{owner, rec}}), CodeForbidden, "")
	h.must(h.apply(CmdExtendVolume, &ExtendVolumeCmd{Header: h.hdr(operator), ID: "src", Size: 128 << 20}))
	other := *testLayout()
	other.UUID = "another"
	refused(serve(srcW, &other), CodeConflict, "another layout")
	h.must(serve(srcW, testLayout()))
	// The fork's worker finishes; the source's worker releases its copy.
	created := VolCreated
	refused(h.apply(CmdUpdateVolume, &UpdateVolumeCmd{Header: h.hdr(srcW), ID: "far", State: &created}), CodeForbidden, "")
	h.must(h.apply(CmdUpdateVolume, &UpdateVolumeCmd{Header: h.hdr(dstW), ID: "far", State: &created}))
	if fs := h.s.ForksFrom(srcW.Name); len(fs) != 1 {
		t.Fatalf("a created fork's copy must stay listed until released: %+v", fs)
	}
	refused(serve(srcW, testLayout()), CodeWrongState, "no longer served")
	h.must(h.apply(CmdForkServe, &ForkServeCmd{Header: h.hdr(srcW), ID: "far", Released: true}))
	if fs := h.s.ForksFrom(srcW.Name); len(fs) != 0 {
		t.Fatalf("released fork still listed: %+v", fs)
	}
	if sc := h.s.ScopeOf(srcW); sc.CanReadVolume("far") {
		t.Fatal("the source's worker still reads the released fork")
	}
	if v, _ := h.s.Volume("far"); v.ForkExport != nil || !v.ForkReleased || v.State != VolCreated || v.Worker != dstW.Name {
		t.Fatalf("released fork: %+v", v)
	}
	h.must(h.apply(CmdForkServe, &ForkServeCmd{Header: h.hdr(srcW), ID: "far", Released: true})) // a retry
	refused(serve(srcW, testLayout()), CodeWrongState, "released")

	// A fork destroyed before its copy was published still leaves the copy
	// its source's worker began: it stays listed there until released.
	grown := int64(128 << 20)
	h.must(h.apply(CmdUpdateVolume, &UpdateVolumeCmd{Header: h.hdr(srcW), ID: "src", Size: &grown})) // the growth asked above, done
	h.must(h.apply(CmdForkVolume, &ForkVolumeCmd{Header: h.hdr(operator), ID: "gone", Source: "src", Worker: dstW.Name}))
	h.must(h.apply(CmdDestroyVolume, &DestroyVolumeCmd{Header: h.hdr(operator), ID: "gone"}))
	if fs := h.s.ForksFrom(srcW.Name); len(fs) != 1 || fs[0].ID != "gone" || fs[0].Forking() {
		t.Fatalf("destroyed unpublished fork: %+v", fs)
	}
	h.must(h.apply(CmdForkServe, &ForkServeCmd{Header: h.hdr(srcW), ID: "gone", Released: true}))
	if fs := h.s.ForksFrom(srcW.Name); len(fs) != 0 {
		t.Fatalf("released fork still listed: %+v", fs)
	}
}
