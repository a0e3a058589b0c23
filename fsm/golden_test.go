package fsm

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// The golden files pin the replicated format. testdata/golden/v<N>/ holds, for
// format N: snapshot.json (a populated store), commands/ (one encoded command
// per command type, applied in name order) and dump.json (the store restored
// from the oldest version's snapshot after applying N's commands). Only the
// current version's folder is ever rewritten, and only with -update; older
// folders are frozen and must keep replaying.
var update = flag.Bool("update", false, "rewrite testdata/golden/v<FormatVersion> from the current code")

const goldenDir = "testdata/golden"

// goldenStore builds the populated store the current version's snapshot holds:
// every registry filled, one migration mid-flight with layout, known-zero
// ranges, export, progress, a key access and step IDs, one rolling back.
func goldenStore(t *testing.T) *harness {
	h := newHarness(t)
	h.must(h.apply(CmdRegisterServer, &RegisterServerCmd{Header: h.hdr(server), Member: ServerMember{ID: "s1", RaftAddr: "10.0.0.1:7001", APIAddr: "10.0.0.1:7000"}}))
	h.setup(true)
	// A retired plaintext-key command from an old log: applied as a no-op.
	h.must(h.apply(CmdSetVolumeKey, &SetVolumeKeyCmd{Header: h.hdr(srcW), ID: "vol1", Key: bytes.Repeat([]byte{7}, 64)}))
	// Sealed keys: worker keys, the recovery key, vol1's owner and recovery envelopes.
	for i, w := range []Identity{srcW, dstW, otherW} {
		h.must(h.apply(CmdSetWorkerKey, &SetWorkerKeyCmd{Header: h.hdr(w), Name: w.Name, Key: testKey(byte(i + 1))}))
	}
	h.must(h.apply(CmdSetRecoveryKey, &SetRecoveryKeyCmd{Header: h.hdr(operator), Key: testKey(9)}))
	h.must(h.apply(CmdPutEnvelopes, &PutEnvelopesCmd{Header: h.hdr(srcW), Volume: "vol1", Envelopes: []Envelope{
		testEnvelope("vol1", PurposeOwner, srcW.Name, testKey(1), ""), testEnvelope("vol1", PurposeRecovery, RecoveryRecipient, testKey(9), "")}}))
	h.must(h.propose(dstW, EvTargetPrepared, "m1/target_prepared", EventPayload{TargetVolume: "vol1-dst", Layout: testLayout()}))
	h.must(h.propose(srcW, EvSourceStopped, "m1/source_stopped", EventPayload{Layout: testLayout()}))
	exp := payloadOf(EvExported)
	exp.KnownZero = []Range{{Off: 16 << 20, Len: 4 << 20}, {Off: 40 << 20, Len: 1 << 20}}
	h.must(h.apply(CmdPutEnvelopes, &PutEnvelopesCmd{Header: h.hdr(srcW), Volume: "vol1", Envelopes: []Envelope{
		testEnvelope("vol1", PurposeMigration, dstW.Name, testKey(2), "m1")}}))
	h.must(h.propose(srcW, EvExported, "m1/exported", exp))
	h.must(h.apply(CmdKeyAccess, &KeyAccessCmd{Header: h.hdr(dstW), ID: "vol1"}))
	h.must(h.propose(dstW, EvCloneBuilt, "m1/clone_built", EventPayload{}))
	h.must(h.propose(dstW, EvProgress, "", payloadOf(EvProgress)))
	h.must(h.propose(dstW, EvTrimmed, "m1/trimmed", EventPayload{}))
	yes := true
	h.must(h.propose(dstW, EvReport, "", EventPayload{Error: "iscsi read: timeout", Stalled: &yes, Reason: "no progress for 150s"}))

	// A second machine whose migration is rolling back (locks held, rollback record).
	h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(srcW), Volume: Volume{ID: "vol2", Worker: srcW.Name, Size: 80 << 20, State: VolCreated, Layout: testLayout()}}))
	h.must(h.apply(CmdCreateMachine, &CreateMachineCmd{Header: h.hdr(operator), Machine: Machine{ID: "mach2", Worker: srcW.Name, Volume: "vol2",
		Network: 8, MachineNo: 3, Addr6PN: "fdaa:0:8:0:1:0:3:0", State: MachineRunning, Spec: json.RawMessage(`{"cmd":["sleep","inf"]}`)}}))
	h.must(h.apply(CmdPlan, &PlanCmd{Header: h.hdr(operator), ID: "m2", Machine: "mach2", Target: otherW.Name, StepID: "plan-2"}))
	h.must(h.apply(CmdPropose, &ProposeCmd{Header: h.hdr(operator), ID: "m2", Event: EvAbort, StepID: "m2/abort", Payload: EventPayload{Reason: "operator changed their mind"}}))
	// A spare volume nobody uses (destroyed by the golden destroy_volume).
	h.must(h.apply(CmdCreateVolume, &CreateVolumeCmd{Header: h.hdr(otherW), Volume: Volume{ID: "vol-spare", Worker: otherW.Name, Size: 8 << 20, State: VolCreated}}))
	return h
}

// goldenCommands are the current version's commands, one per type, in the
// order they apply. They are written against the oldest golden snapshot.
func goldenCommands() []struct {
	typ CommandType
	p   any
} {
	now := t0.Add(10 * time.Minute)
	hdr := func(id Identity) Header { now = now.Add(time.Second); return Header{Actor: id, Now: now} }
	newW := Identity{Name: "w-new", Kind: KindWorker}
	l := testLayout()
	created, stopped := VolCreated, MachineStopped
	vol3, addr := "vol3", "fdaa:0:9:0:4:0:5:0"
	spec := json.RawMessage(`{"cmd":["true"]}`)
	grown, grownLayout := int64(96<<20), *l
	grownLayout.PayloadSize = grown - l.DataOffset
	return []struct {
		typ CommandType
		p   any
	}{
		{CmdRegisterServer, &RegisterServerCmd{Header: hdr(server), Member: ServerMember{ID: "s2", RaftAddr: "10.0.0.2:7001", APIAddr: "10.0.0.2:7000"}}},
		{CmdRegisterWorker, &RegisterWorkerCmd{Header: hdr(newW), Worker: Worker{Name: newW.Name, HostID: 4, Address: "10.0.1.4", Capacity: 3}, LeaseTTL: time.Hour}},
		{CmdHeartbeat, &HeartbeatCmd{Header: hdr(srcW), Name: srcW.Name, LeaseTTL: 30 * time.Minute}},
		{CmdCreateVolume, &CreateVolumeCmd{Header: hdr(newW), Volume: Volume{ID: vol3, Worker: newW.Name, Size: 80 << 20, State: VolCreating}}},
		{CmdUpdateVolume, &UpdateVolumeCmd{Header: hdr(newW), ID: vol3, State: &created, Layout: l}},
		{CmdSetVolumeKey, &SetVolumeKeyCmd{Header: hdr(newW), ID: vol3, Key: bytes.Repeat([]byte{9}, 64)}},
		{CmdKeyAccess, &KeyAccessCmd{Header: hdr(dstW), ID: "vol1"}},
		{CmdCreateMachine, &CreateMachineCmd{Header: hdr(operator), Machine: Machine{ID: "mach3", Worker: newW.Name, Volume: vol3, Network: 9, MachineNo: 5, State: MachineRunning}}},
		{CmdUpdateMachine, &UpdateMachineCmd{Header: hdr(operator), ID: "mach3", State: &stopped, Addr6PN: &addr, Spec: &spec}},
		{CmdPlan, &PlanCmd{Header: hdr(operator), ID: "m3", Machine: "mach3", Target: srcW.Name, StepID: "plan-3"}},
		{CmdPropose, &ProposeCmd{Header: hdr(dstW), ID: "m1", Event: EvCutover, StepID: "m1/cutover", Payload: EventPayload{New6PN: "fdaa:0:7:0:2:0:9:0"}}},
		{CmdDestroyVolume, &DestroyVolumeCmd{Header: hdr(operator), ID: "vol-spare", Retention: time.Hour}},
		{CmdRevokeCert, &RevokeCertCmd{Header: hdr(operator), Serial: "5eed0f1e2d3c4b5a", Reason: "host of worker w-new decommissioned"}},
		{CmdGC, &GCCmd{Header: hdr(server), Retention: 7 * 24 * time.Hour}},
		{CmdSetWorkerKey, &SetWorkerKeyCmd{Header: hdr(newW), Name: newW.Name, Key: testKey(4)}},
		{CmdSetRecoveryKey, &SetRecoveryKeyCmd{Header: hdr(operator), Key: testKey(9)}},
		{CmdPutEnvelopes, &PutEnvelopesCmd{Header: hdr(newW), Volume: vol3, Envelopes: []Envelope{
			testEnvelope(vol3, PurposeOwner, newW.Name, testKey(4), ""), testEnvelope(vol3, PurposeRecovery, RecoveryRecipient, testKey(9), "")}}},
		// Every volume above is locked by a migration or destroyed: extend
		// gets a fresh one of its own.
		{CmdCreateVolume, &CreateVolumeCmd{Header: hdr(operator), Volume: Volume{ID: "vol4", Worker: newW.Name, Size: 64 << 20, State: VolCreated, Layout: l}}},
		{CmdExtendVolume, &ExtendVolumeCmd{Header: hdr(operator), ID: "vol4", Size: 96 << 20}},
		{CmdUpdateVolume, &UpdateVolumeCmd{Header: hdr(newW), ID: "vol4", Size: &grown, Layout: &grownLayout}},
		{CmdForkVolume, &ForkVolumeCmd{Header: hdr(operator), ID: "vol5", Source: "vol4", Worker: newW.Name}},
		{CmdCordon, &CordonCmd{Header: hdr(operator), Worker: otherW.Name, Cordoned: true, Reason: "disk swap"}},
		{CmdDrain, &DrainCmd{Header: hdr(operator), ID: "d1", Worker: newW.Name, Deadline: time.Hour, Parallel: 4, Targets: []string{srcW.Name, dstW.Name}, BandwidthBPS: 100 << 20}},
		{CmdDrainUpdate, &DrainUpdateCmd{Header: hdr(server), ID: "d1", Start: []DrainStart{{Machine: "mach3", Target: dstW.Name, Migration: "m4"}},
			Waiting: map[string]string{"mach3": "no target with room"}}},
		// A fork to another worker: its source's worker seals the fork's key
		// to the fork's worker and publishes the copy.
		{CmdForkVolume, &ForkVolumeCmd{Header: hdr(operator), ID: "vol6", Source: "vol4", Worker: srcW.Name}},
		{CmdPutEnvelopes, &PutEnvelopesCmd{Header: hdr(newW), Volume: "vol6", Envelopes: []Envelope{
			testEnvelope("vol6", PurposeOwner, srcW.Name, testKey(1), ""), testEnvelope("vol6", PurposeRecovery, RecoveryRecipient, testKey(9), "")}}},
		{CmdForkServe, &ForkServeCmd{Header: hdr(newW), ID: "vol6", Layout: &grownLayout, Export: &Export{Portal: "10.0.1.4:3260", IQN: "iqn.2026-01.dev.ferry:ferry:fork-vol6"},
			KnownZero: []Range{{Off: 33554432, Len: 8388608}}}},
	}
}

func indentJSON(t *testing.T, b []byte) []byte {
	var out bytes.Buffer
	if err := json.Indent(&out, b, "", "  "); err != nil {
		t.Fatal(err)
	}
	out.WriteByte('\n')
	return out.Bytes()
}

func compactJSON(t *testing.T, b []byte) []byte {
	var out bytes.Buffer
	if err := json.Compact(&out, b); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// goldenVersions lists the version folders, oldest first.
func goldenVersions(t *testing.T) []int {
	ents, err := os.ReadDir(goldenDir)
	if err != nil && !*update {
		t.Fatalf("reading %s: %v (create it with go test ./fsm -run TestGolden -update)", goldenDir, err)
	}
	var vs []int
	for _, e := range ents {
		n, err := strconv.Atoi(strings.TrimPrefix(e.Name(), "v"))
		if e.IsDir() && strings.HasPrefix(e.Name(), "v") && err == nil {
			vs = append(vs, n)
		}
	}
	slices.Sort(vs)
	return vs
}

func versionDir(v int) string { return filepath.Join(goldenDir, fmt.Sprintf("v%d", v)) }

func restoreFile(t *testing.T, path string) *Store {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := NewStore(zerolog.Nop())
	if err := s.Restore(io.NopCloser(bytes.NewReader(b))); err != nil {
		t.Fatalf("restoring %s: %v", path, err)
	}
	return s
}

// replay applies a version's commands, in name order, to s; each must be accepted.
func replay(t *testing.T, s *Store, v int) []string {
	t.Helper()
	dir := filepath.Join(versionDir(v), "commands")
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for i, e := range ents {
		raw, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if r := s.ApplyCommand(s.Index()+1, compactJSON(t, raw)); r.Refusal != nil {
			t.Fatalf("v%d command %d (%s) refused: %v", v, i, e.Name(), r.Refusal)
		}
		names = append(names, e.Name())
	}
	return names
}

func writeGolden(t *testing.T) {
	dir := versionDir(FormatVersion)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "commands"), 0o755); err != nil {
		t.Fatal(err)
	}
	snap := snapshotBytes(t, goldenStore(t).s)
	if err := os.WriteFile(filepath.Join(dir, "snapshot.json"), indentJSON(t, snap), 0o644); err != nil {
		t.Fatal(err)
	}
	for i, c := range goldenCommands() {
		b, err := Encode(c.typ, c.p)
		if err != nil {
			t.Fatal(err)
		}
		name := fmt.Sprintf("%02d-%s.json", i+1, c.typ)
		if err := os.WriteFile(filepath.Join(dir, "commands", name), indentJSON(t, b), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	vs := goldenVersions(t)
	s := restoreFile(t, filepath.Join(versionDir(vs[0]), "snapshot.json"))
	replay(t, s, FormatVersion)
	if err := os.WriteFile(filepath.Join(dir, "dump.json"), indentJSON(t, s.Dump()), 0o644); err != nil {
		t.Fatal(err)
	}
}

func snapshotBytes(t *testing.T, s *Store) []byte {
	t.Helper()
	snap, err := s.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	return sink.Bytes()
}

// TestGoldenFormat replays every version's golden commands on the oldest
// golden snapshot and compares the store with that version's dump; for the
// current version it also checks the code still encodes exactly the golden
// bytes, so a format change cannot slip in without a new version folder.
func TestGoldenFormat(t *testing.T) {
	if *update {
		writeGolden(t)
	}
	vs := goldenVersions(t)
	if len(vs) == 0 || vs[len(vs)-1] != FormatVersion {
		t.Fatalf("golden versions %v: the newest must be FormatVersion %d (go test ./fsm -run TestGolden -update writes it)", vs, FormatVersion)
	}
	oldest := filepath.Join(versionDir(vs[0]), "snapshot.json")
	for _, v := range vs {
		t.Run(fmt.Sprintf("v%d", v), func(t *testing.T) {
			// Every version's snapshot still restores.
			restoreFile(t, filepath.Join(versionDir(v), "snapshot.json"))

			s := restoreFile(t, oldest)
			names := replay(t, s, v)
			want, err := os.ReadFile(filepath.Join(versionDir(v), "dump.json"))
			if err != nil {
				t.Fatal(err)
			}
			got := s.Dump()
			if v != FormatVersion {
				// A frozen version's dump is read through today's types: new
				// fields may appear, but nothing it recorded may change.
				old := newData()
				if err := json.Unmarshal(want, old); err != nil {
					t.Fatalf("v%d dump: %v", v, err)
				}
				want, _ = json.Marshal(old)
			}
			if !bytes.Equal(compactJSON(t, want), got) {
				t.Fatalf("v%d: the store after replaying its golden commands differs from dump.json:\n got %s\nwant %s", v, got, compactJSON(t, want))
			}
			if v != FormatVersion {
				return
			}
			// One command per type, and the current code encodes them byte for byte.
			cmds := goldenCommands()
			var types []CommandType
			for i, c := range cmds {
				types = append(types, c.typ)
				b, _ := Encode(c.typ, c.p)
				raw, _ := os.ReadFile(filepath.Join(versionDir(v), "commands", names[i]))
				if !bytes.Equal(b, compactJSON(t, raw)) {
					t.Errorf("%s encodes differently from the golden file: the replicated format changed; raise FormatVersion and run go test ./fsm -run TestGolden -update\n got %s\nwant %s", names[i], b, compactJSON(t, raw))
				}
			}
			if len(names) != len(cmds) {
				t.Errorf("%d golden commands on disk, %d in goldenCommands", len(names), len(cmds))
			}
			for _, ct := range CommandTypes {
				if !slices.Contains(types, ct) {
					t.Errorf("command type %s has no golden command", ct)
				}
			}
			snap, _ := os.ReadFile(filepath.Join(versionDir(v), "snapshot.json"))
			if got := snapshotBytes(t, goldenStore(t).s); !bytes.Equal(got, compactJSON(t, snap)) {
				t.Errorf("the snapshot encodes differently from the golden one: raise FormatVersion and run -update\n got %s\nwant %s", got, compactJSON(t, snap))
			}
		})
	}
}

// TestDecodeRejectsWhatItDoesNotKnow: a command or snapshot from a newer
// format is an error that says to upgrade, never silently half-applied.
func TestDecodeRejectsWhatItDoesNotKnow(t *testing.T) {
	good, _ := Encode(CmdHeartbeat, &HeartbeatCmd{Name: "w", LeaseTTL: time.Second})
	if _, _, err := Decode(good); err != nil {
		t.Fatal(err)
	}
	cases := map[string][]byte{
		"unknown type":           []byte(`{"v":1,"type":"drain_worker","payload":{"name":"w"}}`),
		"unknown payload field":  []byte(`{"v":1,"type":"heartbeat","payload":{"name":"w","lease_ttl":1,"drain":true}}`),
		"unknown envelope field": []byte(`{"v":1,"type":"heartbeat","payload":{"name":"w"},"flags":1}`),
		"newer envelope":         []byte(`{"v":2,"type":"heartbeat","payload":{"name":"w"}}`),
	}
	for name, raw := range cases {
		_, _, err := Decode(raw)
		if !errors.Is(err, ErrBadCommand) || !strings.Contains(err.Error(), "upgrade") && name != "unknown envelope field" {
			t.Errorf("%s: %v", name, err)
		}
		s := NewStore(zerolog.Nop())
		if r := s.ApplyCommand(1, raw); r.Refusal == nil || r.Refusal.Code != CodeBadCommand {
			t.Errorf("%s applied: %+v", name, r.Refusal)
		}
	}
	// Snapshots: an unknown field or a newer format is refused, the store keeps its state.
	for name, raw := range map[string]string{
		"unknown field": `{"index":3,"migrations":{},"quotas":{}}`,
		"newer format":  `{"format":99,"index":3}`,
	} {
		s := NewStore(zerolog.Nop())
		err := s.Restore(io.NopCloser(strings.NewReader(raw)))
		if err == nil || !strings.Contains(err.Error(), "upgrade") {
			t.Errorf("snapshot with %s: %v", name, err)
		}
		if s.Index() != 0 {
			t.Errorf("snapshot with %s changed the store", name)
		}
	}
	// A snapshot written before the format was recorded still restores.
	s := NewStore(zerolog.Nop())
	if err := s.Restore(io.NopCloser(strings.NewReader(`{"index":3,"migrations":{}}`))); err != nil || s.Index() != 3 {
		t.Fatalf("unversioned snapshot: %v", err)
	}
}
