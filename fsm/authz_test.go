package fsm

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestIDRule(t *testing.T) {
	for _, id := range []string{"a", "v1", "vol1-dst", "mig-0123456789ab", "w_x", strings.Repeat("a", MaxIDLen)} {
		if !ValidID(id) {
			t.Errorf("%q refused", id)
		}
	}
	for _, id := range []string{"", ".", "..", "../x", ".a", "-a", "_a", "a/b", "a b", "A", "a\n", "a.b", strings.Repeat("a", MaxIDLen+1)} {
		if ValidID(id) {
			t.Errorf("%q accepted", id)
		}
	}
}

func TestWorkerAddress(t *testing.T) {
	for _, a := range []string{"127.0.0.1", "10.1.2.3", "fd00::2", "::ffff:10.0.0.1"} {
		if _, err := ParseWorkerAddress(a); err != nil {
			t.Errorf("%q refused: %v", a, err)
		}
	}
	for _, a := range []string{"", "0.0.0.0/0", "10.0.0.0/8", "0.0.0.0", "::", "169.254.169.254", "fe80::1", "fe80::1%eth0",
		"224.0.0.1", "10.0.0.1:80", "host.example", strings.Repeat("1", 100)} {
		if _, err := ParseWorkerAddress(a); err == nil {
			t.Errorf("%q accepted", a)
		}
	}
	if ClampLeaseTTL(0) != DefaultLeaseTTL || ClampLeaseTTL(-time.Second) != DefaultLeaseTTL ||
		ClampLeaseTTL(200*365*24*time.Hour) != MaxLeaseTTL || ClampLeaseTTL(time.Second) != time.Second {
		t.Fatal("lease clamp")
	}
}

// TestAuthorizeRefusesBeforeApply: Authorize gives the refusal Apply would,
// without changing anything, so the server can keep it out of the log.
func TestAuthorizeRefusesBeforeApply(t *testing.T) {
	h := newHarness(t)
	h.setup(true)
	spec := json.RawMessage(`{"command":["sh"]}`)
	st := MachineStopped
	addr := "fdaa:0:7:0:1:0:2:0"
	cases := []struct {
		name string
		cmd  any
		kind RefusalKind
	}{
		{"worker writes a spec", &UpdateMachineCmd{Header: h.hdr(srcW), ID: "mach1", Spec: &spec}, RefuseForbidden},
		{"worker moves its address", &UpdateMachineCmd{Header: h.hdr(srcW), ID: "mach1", Addr6PN: &addr}, RefuseForbidden},
		{"worker creates a machine", &CreateMachineCmd{Header: h.hdr(srcW), Machine: Machine{ID: "mx", Worker: srcW.Name}}, RefuseForbidden},
		{"server updates a machine", &UpdateMachineCmd{Header: h.hdr(server), ID: "mach1", State: &st}, RefuseForbidden},
		{"server heartbeats a worker", &HeartbeatCmd{Header: h.hdr(server), Name: srcW.Name}, RefuseForbidden},
		{"worker registers another", &RegisterWorkerCmd{Header: h.hdr(otherW), Worker: Worker{Name: srcW.Name}}, RefuseForbidden},
		{"taken host id", &RegisterWorkerCmd{Header: h.hdr(otherW), Worker: Worker{Name: otherW.Name, HostID: 1}}, RefuseConflict},
		{"CIDR address", &RegisterWorkerCmd{Header: h.hdr(otherW), Worker: Worker{Name: otherW.Name, Address: "0.0.0.0/0"}}, RefuseInvalid},
		{"huge capacity", &RegisterWorkerCmd{Header: h.hdr(otherW), Worker: Worker{Name: otherW.Name, Capacity: 1 << 20}}, RefuseInvalid},
		{"volume id ..", &CreateVolumeCmd{Header: h.hdr(otherW), Volume: Volume{ID: "..", Worker: otherW.Name}}, RefuseInvalid},
		{"volume of another", &CreateVolumeCmd{Header: h.hdr(otherW), Volume: Volume{ID: "vol1", Worker: otherW.Name}}, RefuseConflict},
		{"oversized spec", &CreateMachineCmd{Header: h.hdr(operator), Machine: Machine{ID: "mx", Worker: srcW.Name,
			Spec: json.RawMessage(`"` + strings.Repeat("a", MaxSpecBytes) + `"`)}}, RefuseInvalid},
		{"address of another org", &CreateMachineCmd{Header: h.hdr(operator), Machine: Machine{ID: "mx", Worker: srcW.Name, Network: 8,
			Addr6PN: "fdaa:0:7:0:1:0:9:0"}}, RefuseInvalid},
		{"foreign proposal", &ProposeCmd{Header: h.hdr(otherW), ID: "m1", Event: EvTargetPrepared, Payload: EventPayload{TargetVolume: "vol1-dst"}}, RefuseForbidden},
		{"wrong state", &ProposeCmd{Header: h.hdr(srcW), ID: "m1", Event: EvExported, Payload: payloadOf(EvExported)}, RefuseConflict},
		{"target volume of the source", &ProposeCmd{Header: h.hdr(dstW), ID: "m1", Event: EvTargetPrepared, Payload: EventPayload{TargetVolume: "vol1"}}, RefuseForbidden},
		{"long reason", &ProposeCmd{Header: h.hdr(operator), ID: "m1", Event: EvAbort, Payload: EventPayload{Reason: strings.Repeat("r", MaxTextLen+1)}}, RefuseInvalid},
		{"gc by an operator", &GCCmd{Header: h.hdr(operator), Retention: time.Hour}, RefuseForbidden},
		{"worker cordons another", &CordonCmd{Header: h.hdr(srcW), Worker: dstW.Name, Cordoned: true}, RefuseForbidden},
		{"worker uncordons itself", &CordonCmd{Header: h.hdr(srcW), Worker: srcW.Name}, RefuseForbidden},
		{"server cordons", &CordonCmd{Header: h.hdr(server), Worker: srcW.Name, Cordoned: true}, RefuseForbidden},
		{"worker drains another", &DrainCmd{Header: h.hdr(srcW), ID: "d1", Worker: dstW.Name}, RefuseForbidden},
		{"server records a drain", &DrainCmd{Header: h.hdr(server), ID: "d1", Worker: dstW.Name}, RefuseForbidden},
		{"drain id ..", &DrainCmd{Header: h.hdr(operator), ID: "..", Worker: dstW.Name}, RefuseInvalid},
		{"drain of a bad target", &DrainCmd{Header: h.hdr(operator), ID: "d1", Worker: dstW.Name, Targets: []string{"a/b"}}, RefuseInvalid},
		{"drain too parallel", &DrainCmd{Header: h.hdr(operator), ID: "d1", Worker: dstW.Name, Parallel: MaxDrainParallel + 1}, RefuseInvalid},
		{"worker updates a drain", &DrainUpdateCmd{Header: h.hdr(srcW), ID: "d1", Finish: DrainCancelled}, RefuseForbidden},
		{"operator starts drain migrations", &DrainUpdateCmd{Header: h.hdr(operator), ID: "d1", Start: []DrainStart{{Machine: "mach1", Target: otherW.Name, Migration: "m9"}}}, RefuseForbidden},
		{"drain start of a bad id", &DrainUpdateCmd{Header: h.hdr(server), ID: "d1", Start: []DrainStart{{Machine: "mach1", Target: otherW.Name, Migration: "../m"}}}, RefuseInvalid},
		{"unknown drain finish", &DrainUpdateCmd{Header: h.hdr(server), ID: "d1", Finish: "exploded"}, RefuseInvalid},
		{"negative capacity report", &HeartbeatCmd{Header: h.hdr(srcW), Name: srcW.Name, Report: &WorkerReport{FreeBytes: -1}}, RefuseInvalid},
		{"registration with an inverted report", &RegisterWorkerCmd{Header: h.hdr(otherW), Worker: Worker{Name: otherW.Name, Report: &WorkerReport{FreeBytes: 2, TotalBytes: 1}}}, RefuseInvalid},
	}
	for _, c := range cases {
		before := string(h.s.Dump())
		r := h.s.Authorize(c.cmd)
		if r == nil || r.Kind != c.kind {
			t.Errorf("%s: Authorize = %v, want %s", c.name, r, c.kind)
			continue
		}
		if string(h.s.Dump()) != before {
			t.Errorf("%s: Authorize changed the state", c.name)
		}
		typ := typeOf(c.cmd)
		if res := h.apply(typ, c.cmd); res.Refusal == nil || res.Refusal.Kind != c.kind {
			t.Errorf("%s: Apply = %v, want the same refusal", c.name, res.Refusal)
		}
	}
}

func typeOf(v any) CommandType {
	switch v.(type) {
	case *UpdateMachineCmd:
		return CmdUpdateMachine
	case *CreateMachineCmd:
		return CmdCreateMachine
	case *HeartbeatCmd:
		return CmdHeartbeat
	case *RegisterWorkerCmd:
		return CmdRegisterWorker
	case *CreateVolumeCmd:
		return CmdCreateVolume
	case *ProposeCmd:
		return CmdPropose
	case *GCCmd:
		return CmdGC
	case *CordonCmd:
		return CmdCordon
	case *DrainCmd:
		return CmdDrain
	case *DrainUpdateCmd:
		return CmdDrainUpdate
	}
	panic(v)
}

// TestReportedFields: what a participant reports must match the records.
func TestReportedFields(t *testing.T) {
	h := driveTo(t, SourceStopped)
	exp := func(portal, iqn string, kz ...Range) EventPayload {
		return EventPayload{Export: &Export{Portal: portal, IQN: iqn}, KnownZero: kz}
	}
	l := testLayout()
	for name, p := range map[string]EventPayload{
		"metadata portal":       exp("169.254.169.254:80", "iqn.2026-01.dev.ferry:ferry:m1"),
		"other host's portal":   exp("127.0.0.2:3260", "iqn.2026-01.dev.ferry:ferry:m1"),
		"portal without port":   exp("127.0.0.1", "iqn.2026-01.dev.ferry:ferry:m1"),
		"IQN with a space":      exp("127.0.0.1:3260", "iqn.2026-01.dev.ferry:ferry:m1 "),
		"IQN of another":        exp("127.0.0.1:3260", "iqn.2026-01.dev.ferry:ferry:m2"),
		"zeros over the header": exp("127.0.0.1:3260", "iqn.2026-01.dev.ferry:ferry:m1", Range{Off: 0, Len: l.DeviceSize()}),
		"zeros past the end":    exp("127.0.0.1:3260", "iqn.2026-01.dev.ferry:ferry:m1", Range{Off: l.DataOffset, Len: l.PayloadSize + 4096}),
	} {
		if r := h.propose(srcW, EvExported, "x", p); r.Refusal == nil || r.Refusal.Kind != RefuseInvalid {
			t.Errorf("%s: %v", name, r.Refusal)
		}
	}
	h.must(h.propose(srcW, EvExported, "e", exp("127.0.0.1:3260", "iqn.2026-01.dev.ferry:ferry:m1",
		Range{Off: l.DataOffset, Len: l.PayloadSize})))
	h.must(h.propose(dstW, EvCloneBuilt, "c", EventPayload{}))
	h.must(h.propose(dstW, EvTrimmed, "t", EventPayload{}))
	for _, a := range []string{"fdaa:0:8:0:2:0:9:0", "fdaa:0:7:0:1:0:9:0", "fdaa:0:7:0:2:0:8:0", "fdaa::/16", "10.0.0.1"} {
		if r := h.propose(dstW, EvCutover, "x", EventPayload{New6PN: a}); r.Refusal == nil {
			t.Errorf("new_6pn %s accepted", a)
		}
	}
	h.must(h.propose(dstW, EvCutover, "cut", EventPayload{New6PN: "fdaa:0:7:0:2:0:9:0"}))
}

// TestScopes: a worker reads what names it; specs only as owner or target.
func TestScopes(t *testing.T) {
	h := newHarness(t)
	h.setup(true)
	h.must(h.apply(CmdCreateMachine, &CreateMachineCmd{Header: h.hdr(operator), Machine: Machine{ID: "other", Worker: otherW.Name,
		Spec: json.RawMessage(`{"env":{"K":"secret"}}`)}}))
	sc := h.s.ScopeOf(otherW)
	if !sc.CanReadMachine("other") || sc.CanReadMachine("mach1") || sc.CanReadMigration("m1") || sc.CanReadVolume("vol1") ||
		sc.CanReadWorker(srcW.Name) || !sc.CanReadWorker(otherW.Name) || sc.CanReadLock("m1") {
		t.Fatalf("unrelated worker's scope: %+v", sc)
	}
	dst := h.s.ScopeOf(dstW)
	if !dst.CanReadMigration("m1") || !dst.CanReadWorker(srcW.Name) || !dst.CanReadVolume("vol1") || !dst.CanReadSpec("mach1") || dst.CanReadMachine("other") {
		t.Fatalf("target's scope: %+v", dst)
	}
	m, _ := h.s.Machine("other")
	if got := dst.Machine(m); got.Spec != nil {
		t.Fatal("a spec shown to a worker that neither owns nor targets the machine")
	}
	if len(sc.Migrations(h.s.Migrations(""))) != 0 || len(sc.Machines(h.s.Machines(""))) != 1 || len(sc.Volumes(h.s.Volumes(""))) != 0 {
		t.Fatal("lists not cut to the scope")
	}
	if !h.s.ScopeOf(operator).All() || h.s.ScopeOf(Identity{Name: "x", Kind: "alien"}).CanReadWorker("x") {
		t.Fatal("operator or unknown kind scope")
	}
	// A drain names placements on other workers: only its own worker reads it.
	h.must(h.apply(CmdDrain, &DrainCmd{Header: h.hdr(operator), ID: "d1", Worker: srcW.Name}))
	if len(sc.Drains(h.s.Drains(""))) != 0 || len(dst.Drains(h.s.Drains(""))) != 0 ||
		len(h.s.ScopeOf(srcW).Drains(h.s.Drains(""))) != 1 || len(h.s.ScopeOf(operator).Drains(h.s.Drains(""))) != 1 ||
		len(h.s.ScopeOf(Identity{Name: srcW.Name, Kind: "alien"}).Drains(h.s.Drains(""))) != 0 {
		t.Fatal("drains not cut to the scope")
	}
}

// TestGC: terminal migrations and destroyed, unused volumes go once their
// retention passed; everything else stays; replicas agree.
func TestGC(t *testing.T) {
	h := driveTo(t, RolledBack)
	h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(otherW), Volume: Volume{ID: "spare", Worker: otherW.Name}}))
	h.must(h.apply(CmdDestroyVolume, &DestroyVolumeCmd{Header: h.hdr(otherW), ID: "spare", Retention: time.Second}))
	h.now = h.now.Add(time.Minute)
	h.must(h.apply(CmdDestroyVolume, &DestroyVolumeCmd{Header: h.hdr(server), ID: "spare"}))
	if h.s.Collectable(h.now, time.Hour) {
		t.Fatal("collectable before the retention passed")
	}
	h.must(h.apply(CmdGC, &GCCmd{Header: h.hdr(server), Retention: time.Hour}))
	if _, ok := h.s.Migration("m1"); !ok {
		t.Fatal("collected before the retention passed")
	}
	h.now = h.now.Add(2 * time.Hour)
	if !h.s.Collectable(h.now, time.Hour) {
		t.Fatal("nothing collectable after the retention")
	}
	h.must(h.apply(CmdGC, &GCCmd{Header: h.hdr(server), Retention: time.Hour}))
	if _, ok := h.s.Migration("m1"); ok {
		t.Fatal("terminal migration kept")
	}
	if _, ok := h.s.Volume("spare"); ok {
		t.Fatal("destroyed volume kept")
	}
	if _, ok := h.s.Volume("vol1"); !ok {
		t.Fatal("a volume in use was collected")
	}
	if h.s.Collectable(h.now, time.Hour) {
		t.Fatal("still collectable after GC")
	}
	// Replaying the log gives the same state.
	r := NewStore(h.s.log)
	for i, b := range h.log {
		r.ApplyCommand(uint64(i+1), b)
	}
	if string(r.Dump()) != string(h.s.Dump()) {
		t.Fatal("replay differs")
	}
}
