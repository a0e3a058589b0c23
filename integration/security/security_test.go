package security

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server/servertest"
)

// Finding 2: /v1/internal/apply applied bytes whose actor the forwarding
// server chose, so any server certificate acted as any worker. Now there is
// no such endpoint, a follower redirects writes to the leader (the caller
// sends them itself), and a server certificate is no worker.
func TestFinding2_NoServerSpeaksForAnother(t *testing.T) {
	e := newEnv(t, 3, servertest.Options{})
	e.issue("rogue", tlsutil.KindServer)
	forged, err := fsm.Encode(fsm.CmdUpdateMachine, &fsm.UpdateMachineCmd{
		Header: fsm.Header{Actor: fsm.Identity{Name: "w-a", Kind: fsm.KindWorker}, Now: time.Now().UTC()},
		ID:     "ma", Spec: ptr(json.RawMessage(`{"command":["sh","-c","id"]}`))})
	if err != nil {
		t.Fatal(err)
	}
	for i := range e.c.Servers {
		before := e.state()
		r := e.raw(i, "rogue", http.MethodPost, "/v1/internal/apply", string(forged))
		e.refused(r, 0, fmt.Sprintf("forged apply on server %d", i))
		e.unchanged(before, "forged apply")
	}
	// With its own identity a server certificate may not do a worker's writes.
	e.attack("rogue", http.MethodPatch, "/v1/machines/ma", `{"spec":{"command":["sh"]}}`, http.StatusForbidden, "server writes a spec")
	e.attack("rogue", http.MethodPost, "/v1/workers/w-a/heartbeat", `{"lease_ttl":"1m"}`, http.StatusForbidden, "server heartbeats a worker")
	e.attack("rogue", http.MethodPost, "/v1/migrations/mig1/events", `{"event":"target_prepared","step_id":"r1","payload":{"target_volume":"vc"}}`,
		http.StatusForbidden, "server proposes a worker's event")
	e.attack("rogue", http.MethodPatch, "/v1/volumes/va", `{"state":"enabling_remote_export"}`, http.StatusForbidden, "server updates a volume")
	e.attack("rogue", http.MethodGet, "/v1/volumes/va/envelopes/owner", "", http.StatusForbidden, "server reads a key envelope")

	// A follower does not forward: it names the leader, and the caller's
	// own connection carries the write there.
	leader := e.c.WaitLeader(10 * time.Second)
	follower := (leader + 1) % len(e.c.Servers)
	before := e.state()
	r := e.raw(follower, "w-a", http.MethodPost, "/v1/workers/w-a/heartbeat", `{"lease_ttl":"1m"}`)
	if r.status != http.StatusServiceUnavailable || r.header.Get(api.LeaderHeader) != e.c.Servers[leader].Addr() {
		t.Fatalf("follower write: %d %q leader header %q, want 503 naming %s", r.status, r.body, r.header.Get(api.LeaderHeader), e.c.Servers[leader].Addr())
	}
	e.unchanged(before, "write sent to a follower")
	tc, err := tlsutil.ClientConfig(e.c.TLSDir, "operator")
	if err != nil {
		t.Fatal(err)
	}
	viaFollower, err := api.NewClient([]string{e.c.Servers[follower].Addr()}, tc)
	if err != nil {
		t.Fatal(err)
	}
	defer viaFollower.Close()
	m, err := viaFollower.Abort(context.Background(), "mig1", "through a follower")
	if err != nil {
		t.Fatalf("abort through a follower: %v", err)
	}
	if m.Rollback == nil || m.Rollback.By != "operator" {
		t.Fatalf("the abort was recorded as %+v, want the operator's own identity", m.Rollback)
	}
	// The client now asks the leader first: it reads what it wrote.
	if got, err := viaFollower.GetMigration(context.Background(), "mig1"); err != nil || got.State != fsm.RollingBack {
		t.Fatalf("read after the redirected write: %v %+v", err, got)
	}
}

func ptr[T any](v T) *T { return &v }

// Finding 3: every certificate read every record. Now w-b, which no record
// names, sees none of w-a's machine, its environment, the migration's
// portal or IQN.
func TestFinding3_WorkersReadOnlyTheirRecords(t *testing.T) {
	e := newEnv(t, 1, servertest.Options{})
	e.drive(fsm.EvTargetPrepared, fsm.EvSourceStopped, fsm.EvExported)
	leaks := []string{secret, "DB_PASSWORD", "iqn.", "3260", "mig1", `"ma"`, `"va"`, `"w-a"`}
	for _, path := range []string{"/v1/machines", "/v1/machines?worker=w-a", "/v1/volumes", "/v1/volumes?worker=w-a",
		"/v1/migrations", "/v1/migrations?worker=w-a", "/v1/workers", "/v1/locks"} {
		r := e.raw(-1, "w-b", http.MethodGet, path, "")
		if r.status != http.StatusOK {
			t.Errorf("GET %s: %d %s", path, r.status, r.body)
		}
		for _, l := range leaks {
			if strings.Contains(r.body, l) {
				t.Errorf("GET %s as w-b shows %s: %s", path, l, r.body)
			}
		}
	}
	for _, path := range []string{"/v1/machines/ma", "/v1/volumes/va", "/v1/volumes/vc", "/v1/migrations/mig1", "/v1/workers/w-a"} {
		r := e.raw(-1, "w-b", http.MethodGet, path, "")
		e.refused(r, http.StatusNotFound, "GET "+path+" as w-b")
		if strings.Contains(r.body, secret) || strings.Contains(r.body, "iqn.") {
			t.Errorf("GET %s as w-b leaks: %s", path, r.body)
		}
	}
	// The owner, the target of its active migration and operators still read
	// what they need: the spec to run it, the export to connect to.
	for _, cert := range []string{"w-a", "w-c", "operator"} {
		if r := e.raw(-1, cert, http.MethodGet, "/v1/machines/ma", ""); r.status != http.StatusOK || !strings.Contains(r.body, secret) {
			t.Errorf("GET /v1/machines/ma as %s: %d %s", cert, r.status, r.body)
		}
		if r := e.raw(-1, cert, http.MethodGet, "/v1/migrations/mig1", ""); r.status != http.StatusOK || !strings.Contains(r.body, "iqn.") {
			t.Errorf("GET /v1/migrations/mig1 as %s: %d %s", cert, r.status, r.body)
		}
	}
}

// Finding 4: a worker rewrote its machine's spec (command, LD_PRELOAD,
// script paths, work dir, 6PN address), which the target then ran as root.
// Specs are now written by operators only (and machines run unprivileged:
// machine.TestMachineRunsUnprivileged, machine.TestSpecPathsConfined).
func TestFinding4_WorkersCannotWriteSpecs(t *testing.T) {
	e := newEnv(t, 1, servertest.Options{})
	for what, body := range map[string]string{
		"command":    `{"spec":{"command":["sh","-c","id > /tmp/pwned"]}}`,
		"LD_PRELOAD": `{"spec":{"command":["sleep","600"],"env":{"LD_PRELOAD":"/tmp/evil.so"}}}`,
		"scripts":    `{"spec":{"script":{"start":"/tmp/evil.sh"}}}`,
		"work dir":   `{"spec":{"command":["sleep","600"],"work_dir":"/"}}`,
		"6PN":        `{"addr_6pn":"fdaa:0:8:0:1:0:1:0"}`,
		"volume":     `{"volume":"vb"}`,
	} {
		e.attack("w-a", http.MethodPatch, "/v1/machines/ma", body, http.StatusForbidden, "owner rewrites the "+what)
	}
	e.attack("w-a", http.MethodPost, "/v1/machines", `{"id":"mx","worker":"w-a","volume":"","spec":{"command":["sh"]}}`,
		http.StatusForbidden, "worker creates a machine")
	// It still reports its machine's runtime state.
	if r := e.raw(-1, "w-a", http.MethodPatch, "/v1/machines/ma", `{"state":"stopped"}`); r.status != http.StatusOK {
		t.Fatalf("owner reports its machine stopped: %d %s", r.status, r.body)
	}
}

// Finding 5: IDs ".", ".." and "../x" were accepted; destroying volume "."
// removed the agent's whole volumes folder. The store now enforces one ID
// rule (and the agent checks filepath.IsLocal: agent.TestLocalID).
func TestFinding5_PathLikeIDsRefused(t *testing.T) {
	e := newEnv(t, 1, servertest.Options{})
	for _, id := range []string{".", "..", "../x", ".hidden", "a/b", "A", strings.Repeat("a", 64), "a b", "a\x00"} {
		q, _ := json.Marshal(id)
		e.attack("w-b", http.MethodPost, "/v1/volumes", `{"id":`+string(q)+`,"worker":"w-b","size":1048576}`, http.StatusBadRequest, "volume id "+string(q))
		e.attack("operator", http.MethodPost, "/v1/machines", `{"id":`+string(q)+`,"worker":"w-b"}`, http.StatusBadRequest, "machine id "+string(q))
		e.attack("operator", http.MethodPost, "/v1/migrations", `{"id":`+string(q)+`,"machine":"ma","target":"w-b"}`, http.StatusBadRequest, "migration id "+string(q))
	}
	e.attack("w-b", http.MethodDelete, "/v1/volumes/%2E", "", 0, "destroy volume .")
	e.attack("w-b", http.MethodDelete, "/v1/volumes/..%2F..", "", 0, "destroy volume ../..")
}

// Finding 6: a worker chose its lease (year 2319), registered a CIDR as its
// address (opening every export meant for it to the fabric) and any
// capacity.
func TestFinding6_LeaseAddressCapacity(t *testing.T) {
	e := newEnv(t, 1, servertest.Options{})
	for what, w := range map[string]string{
		"CIDR":          `{"name":"w-b","host_id":2,"address":"0.0.0.0/0"}`,
		"unspecified":   `{"name":"w-b","host_id":2,"address":"0.0.0.0"}`,
		"metadata":      `{"name":"w-b","host_id":2,"address":"169.254.169.254"}`,
		"host:port":     `{"name":"w-b","host_id":2,"address":"127.0.0.2:80"}`,
		"name":          `{"name":"w-b","host_id":2,"address":"evil.example"}`,
		"capacity":      `{"name":"w-b","host_id":2,"address":"127.0.0.2","capacity":1000000}`,
		"other's name":  `{"name":"w-a","host_id":1,"address":"127.0.0.2"}`,
		"other's host":  `{"name":"w-b","host_id":1,"address":"127.0.0.2"}`,
		"negative cap.": `{"name":"w-b","host_id":2,"address":"127.0.0.2","capacity":-1}`,
	} {
		e.attack("w-b", http.MethodPost, "/v1/workers", `{"worker":`+w+`}`, 0, "register with a bad "+what)
	}
	// A year-long lease is clamped to the server's maximum.
	for _, path := range []string{"/v1/workers", "/v1/workers/w-b/heartbeat"} {
		body := `{"worker":{"name":"w-b","host_id":2,"address":"127.0.0.2"},"lease_ttl":"2000000h"}`
		if strings.HasSuffix(path, "heartbeat") {
			body = `{"lease_ttl":"2000000h"}`
		}
		start := time.Now()
		if r := e.raw(-1, "w-b", http.MethodPost, path, body); r.status != http.StatusOK {
			t.Fatalf("POST %s: %d %s", path, r.status, r.body)
		}
		w := must(e.op.GetWorker(context.Background(), "w-b"))(t)
		if w.LeaseExpiry.After(start.Add(fsm.MaxLeaseTTL + 5*time.Second)) {
			t.Errorf("POST %s: lease runs until %s, more than %s from now", path, w.LeaseExpiry, fsm.MaxLeaseTTL)
		}
	}
}

// Finding 7: fields a participant wrote were taken as given.
func TestFinding7_ReportedFieldsCheckedAgainstRecords(t *testing.T) {
	e := newEnv(t, 1, servertest.Options{})
	ev := func(event, payload string) string {
		return `{"event":"` + event + `","step_id":"x-` + event + `","payload":` + payload + `}`
	}
	const events = "/v1/migrations/mig1/events"
	e.attack("w-c", http.MethodPost, events, ev("target_prepared", `{"target_volume":"vb"}`), http.StatusForbidden, "target volume of another worker")
	e.attack("w-c", http.MethodPost, events, ev("target_prepared", `{"target_volume":"va"}`), 0, "the migrated volume as target")
	e.attack("w-c", http.MethodPost, events, ev("target_prepared", `{}`), http.StatusBadRequest, "no target volume")
	e.drive(fsm.EvTargetPrepared, fsm.EvSourceStopped)
	for what, p := range map[string]string{
		"metadata portal":         `{"export":{"portal":"169.254.169.254:80","iqn":"iqn.2026-12.dev.ferry:ferry:mig1"}}`,
		"portal of another host":  `{"export":{"portal":"127.0.0.2:3260","iqn":"iqn.2026-12.dev.ferry:ferry:mig1"}}`,
		"portal without port":     `{"export":{"portal":"127.0.0.1","iqn":"iqn.2026-12.dev.ferry:ferry:mig1"}}`,
		"IQN with spaces":         `{"export":{"portal":"127.0.0.1:3260","iqn":"iqn.2026-12.dev.ferry:ferry:mig1 x"}}`,
		"IQN of another":          `{"export":{"portal":"127.0.0.1:3260","iqn":"iqn.2026-12.dev.ferry:ferry:mig2"}}`,
		"known zero whole device": `{"export":{"portal":"127.0.0.1:3260","iqn":"iqn.2026-12.dev.ferry:ferry:mig1"},"known_zero":[{"off":0,"len":50331648}]}`,
		"known zero past the end": `{"export":{"portal":"127.0.0.1:3260","iqn":"iqn.2026-12.dev.ferry:ferry:mig1"},"known_zero":[{"off":16777216,"len":68719476736}]}`,
	} {
		e.attack("w-a", http.MethodPost, events, ev("exported", p), 0, what)
	}
	e.drive(fsm.EvExported, fsm.EvCloneBuilt, fsm.EvTrimmed)
	for what, p := range map[string]string{
		"6PN of another org":     `{"new_6pn":"fdaa:0:8:0:3:0:1:0"}`,
		"6PN of another host":    `{"new_6pn":"fdaa:0:7:0:2:0:1:0"}`,
		"6PN of another machine": `{"new_6pn":"fdaa:0:7:0:3:0:2:0"}`,
		"6PN prefix":             `{"new_6pn":"fdaa::/16"}`,
	} {
		e.attack("w-c", http.MethodPost, events, ev("cutover", p), http.StatusBadRequest, what)
	}
	e.drive(fsm.EvCutover)
	// The volume the target named is its own; the source's can still be destroyed.
	if v := must(e.op.GetVolume(context.Background(), "vc"))(t); v.Worker != "w-c" || v.AttachedMachine != "ma" {
		t.Fatalf("target volume after cutover: %+v", v)
	}
}

// Finding 8: authorization ran after replication, milestone skipped the
// progress limit, a 900 KiB field was stored, nothing was ever deleted and
// trailing garbage after a body was accepted.
func TestFinding8_StrictInputAndBoundedLog(t *testing.T) {
	e := newEnv(t, 1, servertest.Options{})
	// Refused commands never reach the log (unchanged checks the raft log).
	e.attack("w-b", http.MethodPost, "/v1/migrations/mig1/events", `{"event":"target_prepared","step_id":"b1","payload":{"target_volume":"vb"}}`,
		http.StatusForbidden, "a foreign worker's proposal")
	e.attack("w-b", http.MethodPost, "/v1/workers/w-a/heartbeat", `{}`, http.StatusForbidden, "a foreign heartbeat")
	// Strict JSON everywhere: unknown fields, trailing data, oversized bodies and fields.
	e.attack("operator", http.MethodPost, "/v1/migrations/mig1/abort", `{"reason":"x"} {"reason":"y"}`, http.StatusBadRequest, "two JSON values")
	e.attack("operator", http.MethodPost, "/v1/migrations/mig1/abort", `{"reason":"x"}garbage`, http.StatusBadRequest, "trailing garbage")
	e.attack("w-a", http.MethodPost, "/v1/workers/w-a/heartbeat", `{"lease_ttl":"1m","admin":true}`, http.StatusBadRequest, "unknown field")
	e.attack("operator", http.MethodPost, "/v1/migrations/mig1/abort", `{"reason":"`+strings.Repeat("A", 2<<10)+`"}`, http.StatusBadRequest, "a 2 KiB reason")
	e.attack("operator", http.MethodPatch, "/v1/machines/ma", `{"spec":{"command":["sleep"],"env":{"X":"`+strings.Repeat("A", 100<<10)+`"}}}`, http.StatusBadRequest, "a 100 KiB spec")
	big := strings.Repeat("A", 900<<10)
	e.attack("operator", http.MethodPost, "/v1/migrations/mig1/abort", `{"reason":"`+big+`"}`, http.StatusBadRequest, "a 900 KiB reason")
	e.attack("operator", http.MethodPatch, "/v1/machines/ma", `{"spec":{"command":["sleep"],"env":{"X":"`+big+`"}}}`, http.StatusBadRequest, "a 900 KiB spec")
	e.attack("operator", http.MethodPost, "/v1/migrations/mig1/abort", `{"reason":"`+strings.Repeat("A", 2<<20)+`"}`, http.StatusBadRequest, "a 2 MiB body")

	// The progress limit is the server's alone: milestone is not a field.
	e.drive(fsm.EvTargetPrepared, fsm.EvSourceStopped, fsm.EvExported)
	progress := func(n int, extra string) string {
		return fmt.Sprintf(`{"event":"progress","step_id":"","payload":{"progress":{"hydrated_bytes":%d,"total_bytes":50331648}%s}}`, n, extra)
	}
	if r := e.raw(-1, "w-c", http.MethodPost, "/v1/migrations/mig1/events", progress(1<<20, "")); r.status != http.StatusOK {
		t.Fatalf("first progress: %d %s", r.status, r.body)
	}
	e.attack("w-c", http.MethodPost, "/v1/migrations/mig1/events", progress(2<<20, `,"milestone":true`), http.StatusBadRequest, "milestone")
	before := e.state()
	r := e.raw(-1, "w-c", http.MethodPost, "/v1/migrations/mig1/events", progress(3<<20, ""))
	if r.status != http.StatusOK || !strings.Contains(r.body, `"ignored":true`) {
		t.Fatalf("second progress within the interval: %d %s", r.status, r.body)
	}
	e.unchanged(before, "a rate-limited progress update")
}

// Finding 8, rate: one identity's writes are limited, others' are not.
func TestFinding8_PerIdentityWriteLimit(t *testing.T) {
	e := newEnv(t, 1, servertest.Options{WriteRate: 1, WriteBurst: 5})
	limited := 0
	for i := 0; i < 20; i++ {
		r := e.raw(-1, "w-b", http.MethodPost, "/v1/workers/w-b/heartbeat", `{}`)
		if r.status == http.StatusTooManyRequests && strings.Contains(r.body, fsm.CodeRateLimited) {
			limited++
		}
	}
	if limited < 10 {
		t.Fatalf("%d of 20 rapid writes were limited", limited)
	}
	if r := e.raw(-1, "w-c", http.MethodPost, "/v1/workers/w-c/heartbeat", `{}`); r.status != http.StatusOK {
		t.Fatalf("another identity was limited too: %d %s", r.status, r.body)
	}
}

// Finding 8, retention: terminal migrations and destroyed volumes are
// deleted by a replicated GC command once their retention passed.
func TestFinding8_EndedRecordsCollected(t *testing.T) {
	e := newEnv(t, 3, servertest.Options{ReconcileInterval: 100 * time.Millisecond, GCRetention: time.Second})
	ctx := context.Background()
	must(e.op.Abort(ctx, "mig1", "test"))(t)
	e.drive(fsm.EvTargetTornDown, fsm.EvSourceRestored)
	must(e.wb.DestroyVolume(ctx, "vb", time.Second))(t) // pending_destroy for 1s, then destroyed, then collected
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, merr := e.op.GetMigration(ctx, "mig1")
		_, verr := e.op.GetVolume(ctx, "vb")
		if api.ErrorCode(merr) == fsm.CodeNotFound && api.ErrorCode(verr) == fsm.CodeNotFound {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not collected: migration %v, volume %v", merr, verr)
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.c.WaitConverged(10 * time.Second)
	for i, s := range e.c.Servers {
		if _, ok := s.Store().Migration("mig1"); ok {
			t.Errorf("server %d still holds mig1", i)
		}
		if len(s.Store().Locks()) != 0 {
			t.Errorf("server %d holds locks: %v", i, s.Store().Locks())
		}
	}
	// What is still in use stays.
	if _, err := e.op.GetVolume(ctx, "va"); err != nil {
		t.Fatalf("volume va in use was collected: %v", err)
	}
}
