// Package security is the attacker suite of issue 13: each test replays one
// finding against real ferry servers (raft, mTLS with certificates made by
// the code behind `ferry tls init` and `ferry tls issue`) with raw HTTP
// requests, as curl would send them, and asserts that the attack is
// refused and that nothing changed: not the replicated state, not the raft
// log.
package security

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
	"github.com/ferry-dev/ferry/server"
	"github.com/ferry-dev/ferry/server/servertest"
)

// secret is what machine ma's operator-written environment holds.
const secret = "hunter2-db-password"

// env is a cluster with three workers: w-a runs machine ma on volume va,
// migration mig1 moves it to w-c (target volume vc); w-b is the attacker's
// worker, unrelated to all of it.
type env struct {
	t          *testing.T
	c          *servertest.Cluster
	op, wa, wc *api.Client
	wb         *api.Client
}

func layout() *fsm.LUKSLayout {
	return &fsm.LUKSLayout{UUID: "u", DataOffset: 16 << 20, MetadataSize: 16384, KeyslotsSize: 16744448,
		SectorSize: 4096, Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: 32 << 20}
}

func newEnv(t *testing.T, n int, o servertest.Options) *env {
	t.Helper()
	if o.ReconcileInterval == 0 {
		// Housekeeping registers the servers, then proposes nothing while
		// every lease is valid: "nothing changed" stays exact.
		o.ReconcileInterval = 100 * time.Millisecond
	}
	c := servertest.New(t, n, o)
	e := &env{t: t, c: c, op: c.Client("operator", tlsutil.KindOperator),
		wa: c.Client("w-a", tlsutil.KindWorker), wb: c.Client("w-b", tlsutil.KindWorker), wc: c.Client("w-c", tlsutil.KindWorker)}
	ctx := context.Background()
	for i, w := range []*api.Client{e.wa, e.wb, e.wc} {
		name := []string{"w-a", "w-b", "w-c"}[i]
		addr := []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"}[i]
		if _, err := w.RegisterWorker(ctx, fsm.Worker{Name: name, HostID: uint32(i + 1), Address: addr}, time.Minute); err != nil {
			t.Fatalf("register %s: %v", name, err)
		}
	}
	must(e.wa.CreateVolume(ctx, fsm.Volume{ID: "va", Worker: "w-a", Size: 48 << 20, State: fsm.VolCreated, Layout: layout()}))(t)
	must(e.wb.CreateVolume(ctx, fsm.Volume{ID: "vb", Worker: "w-b", Size: 48 << 20, State: fsm.VolCreated, Layout: layout()}))(t)
	must(e.wc.CreateVolume(ctx, fsm.Volume{ID: "vc", Worker: "w-c", Size: 48 << 20, State: fsm.VolHydrating}))(t)
	spec := `{"command":["sleep","600"],"env":{"DB_PASSWORD":"` + secret + `"}}`
	must(e.op.CreateMachine(ctx, fsm.Machine{ID: "ma", Worker: "w-a", Volume: "va", Network: 7, MachineNo: 1,
		Addr6PN: "fdaa:0:7:0:1:0:1:0", State: fsm.MachineRunning, Spec: []byte(spec)}))(t)
	must(e.op.CreateMigration(ctx, api.PlanRequest{ID: "mig1", Machine: "ma", Target: "w-c"}))(t)
	c.WaitConverged(10 * time.Second)
	return e
}

// must(call(...))(t) returns call's value or fails the test.
func must[T any](v T, err error) func(*testing.T) T {
	return func(t *testing.T) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

// drive proposes events on mig1 as the worker holding each role.
func (e *env) drive(evs ...fsm.Event) {
	e.t.Helper()
	for _, ev := range evs {
		cl, p := e.wc, fsm.EventPayload{}
		switch ev {
		case fsm.EvTargetPrepared:
			p.TargetVolume = "vc"
		case fsm.EvSourceStopped, fsm.EvSourceReleased, fsm.EvSourceRestored:
			cl = e.wa
		case fsm.EvExported:
			cl = e.wa
			p.Export = &fsm.Export{Portal: "127.0.0.1:3260", IQN: "iqn.2026-12.dev.ferry:ferry:mig1"}
		case fsm.EvCutover:
			p.New6PN = "fdaa:0:7:0:3:0:1:0" // org 7, host 3 (w-c), machine 1
		}
		if _, err := cl.Propose(context.Background(), "mig1", ev, "drive-"+string(ev), p); err != nil {
			e.t.Fatalf("%s: %v", ev, err)
		}
	}
	e.c.WaitConverged(10 * time.Second)
}

// state is everything that must not change under a refused attack: every
// server's replicated state (which holds the last applied index) and its
// raft log's last index (a refused command must not even be logged).
type state struct {
	dumps   [][]byte
	lastLog []uint64
}

func (e *env) state() state {
	e.t.Helper()
	e.c.WaitConverged(10 * time.Second)
	var s state
	for _, sv := range e.c.Servers {
		s.dumps = append(s.dumps, sv.Store().Dump())
		s.lastLog = append(s.lastLog, sv.Node().Raft.LastIndex())
	}
	return s
}

// unchanged fails when anything changed since before.
func (e *env) unchanged(before state, attack string) {
	e.t.Helper()
	time.Sleep(50 * time.Millisecond) // a logged command would be applied by now
	after := e.state()
	for i := range before.dumps {
		if before.lastLog[i] != after.lastLog[i] {
			e.t.Errorf("%s: server %d's raft log grew from %d to %d entries", attack, i, before.lastLog[i], after.lastLog[i])
		}
		if !bytes.Equal(before.dumps[i], after.dumps[i]) {
			e.t.Errorf("%s: server %d's state changed", attack, i)
		}
	}
}

type reply struct {
	status int
	body   string
	header http.Header
}

// raw sends one request with cert's certificate to server i (the leader
// when i < 0), like curl --cert.
func (e *env) raw(i int, cert, method, path, body string) reply {
	e.t.Helper()
	if i < 0 {
		i = e.c.WaitLeader(10 * time.Second)
	}
	tc, err := tlsutil.ClientConfig(e.c.TLSDir, cert)
	if err != nil {
		e.t.Fatal(err)
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tc}, Timeout: 20 * time.Second}
	defer hc.CloseIdleConnections()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, "https://"+e.c.Servers[i].Addr()+path, rd)
	if err != nil {
		e.t.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return reply{resp.StatusCode, string(b), resp.Header}
}

// refused asserts a 4xx reply of the given status (0: any 4xx).
func (e *env) refused(r reply, status int, what string) {
	e.t.Helper()
	if r.status/100 != 4 || status != 0 && r.status != status {
		e.t.Errorf("%s: got %d %s, want a refusal (%d)", what, r.status, strings.TrimSpace(r.body), status)
	}
}

// attack runs a raw request that must be refused and change nothing.
func (e *env) attack(cert, method, path, body string, status int, what string) reply {
	e.t.Helper()
	before := e.state()
	r := e.raw(-1, cert, method, path, body)
	e.refused(r, status, what)
	e.unchanged(before, what)
	return r
}

// issue makes a certificate of kind in the cluster's CA folder.
func (e *env) issue(name, kind string) {
	e.t.Helper()
	if err := server.EnsureCerts(e.c.TLSDir, map[string]string{name: kind}); err != nil {
		e.t.Fatal(err)
	}
}
