package fsm

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

var (
	t0       = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	server   = Identity{Name: "s1", Kind: KindServer}
	operator = Identity{Name: "op", Kind: KindOperator}
	srcW     = Identity{Name: "w-src", Kind: KindWorker}
	dstW     = Identity{Name: "w-dst", Kind: KindWorker}
	otherW   = Identity{Name: "w-other", Kind: KindWorker}
)

func testLayout() *LUKSLayout {
	return &LUKSLayout{UUID: "u-1", DataOffset: 16 << 20, MetadataSize: 16384, KeyslotsSize: 16744448,
		SectorSize: 4096, Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: 64 << 20}
}

// harness applies commands to a store at increasing indexes and a fixed clock.
type harness struct {
	t     testing.TB
	s     *Store
	index uint64
	now   time.Time
	log   [][]byte // every command applied, in order (replay checks)
}

func newHarness(t testing.TB) *harness {
	return &harness{t: t, s: NewStore(zerolog.Nop()), now: t0}
}

func (h *harness) apply(typ CommandType, p any) *Result {
	h.t.Helper()
	b, err := Encode(typ, p)
	if err != nil {
		h.t.Fatal(err)
	}
	h.index++
	h.now = h.now.Add(time.Second)
	h.log = append(h.log, b)
	return h.s.ApplyCommand(h.index, b)
}

func (h *harness) hdr(id Identity) Header { return Header{Actor: id, Now: h.now.Add(time.Second)} }

func (h *harness) must(r *Result) *Result {
	h.t.Helper()
	if r.Refusal != nil {
		h.t.Fatalf("refused: %v", r.Refusal)
	}
	return r
}

// setup registers two workers (plus a spare), a volume with a layout, and
// a running machine on the source, then plans migration "m1".
func (h *harness) setup(withLayout bool) *Migration {
	h.t.Helper()
	for i, w := range []string{srcW.Name, dstW.Name, otherW.Name} {
		h.must(h.apply(CmdRegisterWorker, &RegisterWorkerCmd{Header: h.hdr(Identity{Name: w, Kind: KindWorker}), Worker: Worker{Name: w, HostID: uint32(i + 1), Address: fmt.Sprintf("127.0.0.%d", i+1)}, LeaseTTL: time.Minute}))
	}
	v := Volume{ID: "vol1", Worker: srcW.Name, Size: 80 << 20, State: VolCreated}
	if withLayout {
		v.Layout = testLayout()
	}
	h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(srcW), Volume: v}))
	h.must(h.apply(CmdCreateMachine, &CreateMachineCmd{Header: h.hdr(operator), Machine: Machine{ID: "mach1", Worker: srcW.Name, Volume: "vol1",
		Network: 7, MachineNo: 9, Addr6PN: "fdaa:0:7:0:1:0:9:0", State: MachineRunning}}))
	h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(dstW), Volume: Volume{ID: "vol1-dst", Worker: dstW.Name, Size: 80 << 20, State: VolHydrating}}))
	return h.must(h.apply(CmdPlan, &PlanCmd{Header: h.hdr(operator), ID: "m1", Machine: "mach1", Target: dstW.Name, StepID: "plan-1"})).Migration
}

func (h *harness) propose(id Identity, ev Event, step string, p EventPayload) *Result {
	h.t.Helper()
	return h.apply(CmdPropose, &ProposeCmd{Header: h.hdr(id), ID: "m1", Event: ev, StepID: step, Payload: p})
}

// actorFor returns an identity holding role r in migration m1.
func actorFor(r Role) Identity {
	switch r {
	case RoleServer:
		return server
	case RoleOperator:
		return operator
	case RoleSource:
		return srcW
	case RoleTarget:
		return dstW
	}
	panic(r)
}

// payloadFor returns a payload an event accepts.
func payloadOf(ev Event) EventPayload {
	switch ev {
	case EvExported:
		return EventPayload{Export: &Export{Portal: "127.0.0.1:3260", IQN: "iqn.2026-01.dev.ferry:ferry:m1"}}
	case EvTargetPrepared:
		return EventPayload{TargetVolume: "vol1-dst"}
	case EvCutover:
		return EventPayload{New6PN: "fdaa:0:7:0:2:0:9:0"}
	case EvProgress:
		return EventPayload{Progress: &Progress{HydratedBytes: 1 << 20, TotalBytes: 64 << 20}}
	case EvReport:
		return EventPayload{Error: "transient: connection reset"}
	case EvAbort, EvFailed:
		return EventPayload{Reason: "test"}
	}
	return EventPayload{}
}

// pathTo lists the events that drive a planned migration to st.
func pathTo(st State) []Event {
	forward := []Event{EvTargetPrepared, EvSourceStopped, EvExported, EvCloneBuilt, EvTrimmed, EvCutover,
		EvHydrationStarted, EvHydrated, EvSourceReleased, EvCompleted}
	switch st {
	case RollingBack:
		return []Event{EvAbort}
	case RolledBack:
		return []Event{EvAbort, EvTargetTornDown, EvSourceRestored}
	}
	for i, s := range AllStates[:11] {
		if s == st {
			return forward[:i]
		}
	}
	panic(st)
}

// driveTo returns a harness whose migration m1 is in st.
func driveTo(t testing.TB, st State) *harness {
	t.Helper()
	h := newHarness(t)
	h.setup(true)
	for i, ev := range pathTo(st) {
		tr, _ := Lookup(ev)
		h.must(h.propose(actorFor(tr.Roles[0]), ev, fmt.Sprintf("drive-%d", i), payloadOf(ev)))
	}
	if m, _ := h.s.Migration("m1"); m.State != st {
		t.Fatalf("drove to %s, got %s", st, m.State)
	}
	return h
}

func migJSON(t testing.TB, s *Store) string {
	m, ok := s.Migration("m1")
	if !ok {
		t.Fatal("no migration m1")
	}
	b, _ := json.Marshal(m)
	return string(b)
}
