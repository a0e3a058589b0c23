package fsm

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestDestroyAttachedVolumeRefused(t *testing.T) {
	h := newHarness(t)
	h.setup(true)
	// vol1 is attached to mach1 and locked by m1.
	r := h.apply(CmdDestroyVolume, &DestroyVolumeCmd{Header: h.hdr(operator), ID: "vol1"})
	if r.Refusal == nil || r.Refusal.Code != CodeAttached || !strings.Contains(r.Refusal.Reason, "mach1") {
		t.Fatalf("destroy attached: %+v", r.Refusal)
	}
	if v, _ := h.s.Volume("vol1"); v.State != VolCreated {
		t.Fatalf("volume changed to %s", v.State)
	}
	// A free volume goes to pending_destroy, then destroyed only after retention.
	h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(srcW), Volume: Volume{ID: "free", Worker: srcW.Name, Size: 1, State: VolCreated}}))
	v := h.must(h.apply(CmdDestroyVolume, &DestroyVolumeCmd{Header: h.hdr(srcW), ID: "free", Retention: time.Hour})).Volume
	if v.State != VolPendingDelete {
		t.Fatalf("state %s", v.State)
	}
	if r := h.apply(CmdDestroyVolume, &DestroyVolumeCmd{Header: h.hdr(srcW), ID: "free"}); r.Refusal == nil {
		t.Fatal("destroyed before retention")
	}
	h.now = h.now.Add(2 * time.Hour)
	if v := h.must(h.apply(CmdDestroyVolume, &DestroyVolumeCmd{Header: h.hdr(server), ID: "free"})).Volume; v.State != VolDestroyed {
		t.Fatalf("state %s", v.State)
	}
	// Another worker may not destroy someone else's volume.
	if r := h.apply(CmdDestroyVolume, &DestroyVolumeCmd{Header: h.hdr(otherW), ID: "vol1-dst"}); r.Refusal == nil || r.Refusal.Code != CodeForbidden {
		t.Fatalf("foreign destroy: %+v", r.Refusal)
	}
}

func TestAdmission(t *testing.T) {
	h := newHarness(t)
	h.setup(true)
	// Same volume again: locked.
	r := h.apply(CmdPlan, &PlanCmd{Header: h.hdr(operator), ID: "m2", Machine: "mach1", Target: otherW.Name})
	if r.Refusal == nil || r.Refusal.Code != CodeLocked {
		t.Fatalf("second migration of a locked volume: %+v", r.Refusal)
	}
	// Another machine of the same private network: locked too (one per org).
	mk := func(id string, network uint32) {
		h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(srcW), Volume: Volume{ID: "v-" + id, Worker: srcW.Name, Size: 1, State: VolCreated}}))
		h.must(h.apply(CmdCreateMachine, &CreateMachineCmd{Header: h.hdr(operator), Machine: Machine{ID: id, Worker: srcW.Name, Volume: "v-" + id, Network: network, State: MachineRunning}}))
	}
	mk("same-org", 7)
	if r := h.apply(CmdPlan, &PlanCmd{Header: h.hdr(operator), ID: "m3", Machine: "same-org", Target: otherW.Name}); r.Refusal == nil || r.Refusal.Code != CodeLocked || !strings.Contains(r.Refusal.Reason, "network/7") {
		t.Fatalf("same network: %+v", r.Refusal)
	}
	// Outbound limit 2 per worker.
	mk("a", 100)
	mk("b", 101)
	h.must(h.apply(CmdPlan, &PlanCmd{Header: h.hdr(operator), ID: "ma", Machine: "a", Target: otherW.Name}))
	if r := h.apply(CmdPlan, &PlanCmd{Header: h.hdr(operator), ID: "mb", Machine: "b", Target: otherW.Name}); r.Refusal == nil || r.Refusal.Code != CodeAdmission {
		t.Fatalf("third outbound: %+v", r.Refusal)
	}
	// Workers cannot plan.
	if r := h.apply(CmdPlan, &PlanCmd{Header: h.hdr(srcW), ID: "mw", Machine: "b", Target: otherW.Name}); r.Refusal == nil || r.Refusal.Code != CodeForbidden {
		t.Fatalf("worker planned: %+v", r.Refusal)
	}
	// Expired target lease.
	h.now = h.now.Add(2 * time.Hour)
	h.must(h.apply(CmdHeartbeat, &HeartbeatCmd{Header: h.hdr(srcW), Name: srcW.Name, LeaseTTL: time.Hour}))
	if r := h.apply(CmdPlan, &PlanCmd{Header: h.hdr(operator), ID: "mx", Machine: "b", Target: dstW.Name}); r.Refusal == nil || r.Refusal.Code != CodeAdmission {
		t.Fatalf("dead target: %+v", r.Refusal)
	}
}

func TestWorkersTouchOnlyTheirOwn(t *testing.T) {
	h := newHarness(t)
	h.setup(true)
	st := MachineStopped
	cases := []struct {
		typ CommandType
		p   any
	}{
		{CmdRegisterWorker, &RegisterWorkerCmd{Header: h.hdr(otherW), Worker: Worker{Name: srcW.Name}}},
		{CmdHeartbeat, &HeartbeatCmd{Header: h.hdr(otherW), Name: srcW.Name}},
		{CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(otherW), Volume: Volume{ID: "x", Worker: srcW.Name}}},
		{CmdUpdateMachine, &UpdateMachineCmd{Header: h.hdr(otherW), ID: "mach1", State: &st}},
		{CmdRegisterServer, &RegisterServerCmd{Header: h.hdr(operator), Member: ServerMember{ID: "x", RaftAddr: "a"}}},
	}
	for _, c := range cases {
		if r := h.apply(c.typ, c.p); r.Refusal == nil || r.Refusal.Code != CodeForbidden {
			t.Errorf("%s: %+v", c.typ, r.Refusal)
		}
	}
}

func TestDecodeStrict(t *testing.T) {
	h := newHarness(t)
	bad := []string{
		``, `{}`, `null`, `[]`, `{"v":2,"type":"heartbeat","payload":{}}`,
		`{"v":1,"type":"nope","payload":{}}`,
		`{"v":1,"type":"heartbeat"}`,
		`{"v":1,"type":"heartbeat","payload":{"name":"x","bogus":1}}`,
		`{"v":1,"type":"heartbeat","payload":{"name":"x"},"extra":1}`,
		`{"v":1,"type":"heartbeat","payload":{"name":"x"}} trailing`,
		`{"v":1,"type":"propose","payload":{"id":"m1","event":"abort","payload":{"reason":5}}}`,
	}
	for _, b := range bad {
		before := dumpNoIndex(t, h.s)
		h.index++
		r := h.s.ApplyCommand(h.index, []byte(b))
		if r.Refusal == nil || r.Refusal.Code != CodeBadCommand {
			t.Errorf("%q: %+v", b, r.Refusal)
		}
		if after := dumpNoIndex(t, h.s); after != before {
			t.Errorf("%q changed the state", b)
		}
	}
}

// dumpNoIndex is the state without the applied index (which every command moves).
func dumpNoIndex(t testing.TB, s *Store) string {
	var m map[string]any
	if err := json.Unmarshal(s.Dump(), &m); err != nil {
		t.Fatal(err)
	}
	delete(m, "index")
	b, _ := json.Marshal(m)
	return string(b)
}

func FuzzDecode(f *testing.F) {
	for _, typ := range []CommandType{CmdHeartbeat, CmdPropose, CmdPlan, CmdCreateVolume} {
		b, _ := Encode(typ, map[string]any{"actor": map[string]string{"name": "w", "kind": "worker"}})
		f.Add(b)
	}
	b, _ := Encode(CmdPropose, &ProposeCmd{ID: "m1", Event: EvExported, StepID: "s", Payload: payloadOf(EvExported)})
	f.Add(b)
	f.Add([]byte(`{"v":1,"type":"propose","payload":{"id":"m1","event":"progress","payload":{"progress":{"total_bytes":-1}}}}`))
	// A fork's copy as its source's worker publishes it (hostile sizes and holes).
	b, _ = Encode(CmdForkServe, &ForkServeCmd{Header: Header{Actor: srcW}, ID: "vol1", Layout: testLayout(),
		Export: &Export{Portal: "127.0.0.1:3260", IQN: "iqn.x"}, KnownZero: []Range{{Off: 1 << 20, Len: 4096}}})
	f.Add(b)
	b, _ = Encode(CmdForkVolume, &ForkVolumeCmd{Header: Header{Actor: operator}, ID: "f1", Source: "vol1", Worker: dstW.Name})
	f.Add(b)
	f.Fuzz(func(t *testing.T, data []byte) {
		h := newHarness(t)
		h.setup(true)
		_, _, _ = Decode(data)
		h.index++
		r := h.s.ApplyCommand(h.index, data) // must not panic
		if r == nil {
			t.Fatal("nil result")
		}
	})
}

// The machine's worker records crashes and may mark it failed; an
// operator's start resets the count.
func TestMachineCrashCounter(t *testing.T) {
	h := newHarness(t)
	h.setup(true)
	n := 3
	h.must(h.apply(CmdUpdateMachine, &UpdateMachineCmd{Header: h.hdr(srcW), ID: "mach1", Crashes: &n}))
	if m, _ := h.s.Machine("mach1"); m.Crashes != 3 || m.State != MachineRunning {
		t.Fatalf("after a crash report: %+v", m)
	}
	failed, n5 := MachineFailed, 5
	h.must(h.apply(CmdUpdateMachine, &UpdateMachineCmd{Header: h.hdr(srcW), ID: "mach1", State: &failed, Crashes: &n5}))
	if m, _ := h.s.Machine("mach1"); m.Crashes != 5 || m.State != MachineFailed {
		t.Fatalf("after failing: %+v", m)
	}
	neg := -1
	if r := h.apply(CmdUpdateMachine, &UpdateMachineCmd{Header: h.hdr(srcW), ID: "mach1", Crashes: &neg}); r.Refusal == nil {
		t.Fatal("negative crash count accepted")
	}
	running := MachineRunning
	h.must(h.apply(CmdUpdateMachine, &UpdateMachineCmd{Header: h.hdr(operator), ID: "mach1", State: &running}))
	if m, _ := h.s.Machine("mach1"); m.Crashes != 0 || m.State != MachineRunning {
		t.Fatalf("after an operator's start: %+v", m)
	}
}
