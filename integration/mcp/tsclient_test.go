// Package mcp drives `ferry mcp` through an MCP client independent of the Go
// SDK the server is built with: the official TypeScript SDK, run by node on
// testdata/tsclient/driver.mjs (no build step), against a real cluster with
// agents (internal/testbed). Needs root, like integration/e2e, and node with
// the SDK installed by scripts/deps.sh (npm ci from the lock file).
package mcp

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/testbed"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/machine/workload"
)

var ferryBin string

func TestMain(m *testing.M) {
	os.Exit(testbed.RunRaceBuilt(m, "mcp", &ferryBin))
}

// tsDir holds the driver, package.json and the lock file.
const tsDir = "testdata/tsclient"

func requireEnv(t *testing.T) {
	t.Helper()
	testenv.Root(t, "network namespaces, loop devices, mounts")
	testenv.Tools(t, "run scripts/deps.sh", "cryptsetup", "mkfs.ext4", "nsenter", "losetup", "fstrim", "fusermount3", "ip")
	testenv.Paths(t, "modprobe fuse", "/dev/fuse")
	testenv.Tools(t, "run scripts/deps.sh (Debian nodejs and npm)", "node", "npm")
	testenv.Paths(t, "run scripts/deps.sh (npm ci in integration/mcp/testdata/tsclient)",
		filepath.Join(tsDir, "node_modules", "@modelcontextprotocol", "sdk", "package.json"))
}

// driver is the node process running driver.mjs: one JSON request per line
// in, one JSON answer per line out.
type driver struct {
	t      *testing.T
	in     io.WriteCloser
	out    *bufio.Scanner
	cmd    *exec.Cmd
	stderr *syncBuffer
	// transcript is every request and answer of the sessions it records.
	record     map[string]bool
	transcript []exchange
}

type exchange struct {
	Session string
	Request map[string]any
	Answer  answer
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// answer is one line of the driver's output.
type answer struct {
	OK           bool            `json:"ok"`
	Error        string          `json:"error,omitempty"`
	Code         any             `json:"code,omitempty"`
	Server       map[string]any  `json:"server,omitempty"`
	Instructions string          `json:"instructions,omitempty"`
	Tools        []tsTool        `json:"tools,omitempty"`
	IsError      bool            `json:"isError,omitempty"`
	Text         string          `json:"text,omitempty"`
	Structured   json.RawMessage `json:"structured,omitempty"`
}

type tsTool struct {
	Name         string          `json:"name"`
	InputSchema  json.RawMessage `json:"inputSchema"`
	OutputSchema json.RawMessage `json:"outputSchema"`
	Annotations  struct {
		ReadOnlyHint    *bool `json:"readOnlyHint"`
		DestructiveHint *bool `json:"destructiveHint"`
	} `json:"annotations"`
}

// startDriver runs node on driver.mjs inside the namespace ns, so the
// `ferry mcp` processes it starts reach the servers and its HTTP sessions
// reach a loopback listener there.
func startDriver(t *testing.T, ns string) *driver {
	t.Helper()
	abs, err := filepath.Abs(filepath.Join(tsDir, "driver.mjs"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("nsenter", "--net=/run/netns/"+ns, "--", "node", abs)
	cmd.Dir = tsDir
	d := &driver{t: t, cmd: cmd, stderr: &syncBuffer{}, record: map[string]bool{}}
	cmd.Stderr = d.stderr
	if d.in, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	d.out = bufio.NewScanner(out)
	d.out.Buffer(make([]byte, 0, 1<<20), 16<<20)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start node: %v", err)
	}
	t.Cleanup(func() {
		d.in.Close()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil && !t.Failed() {
				t.Errorf("driver exited: %v\n%s", err, d.stderr.String())
			}
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Errorf("driver did not exit once its input closed\n%s", d.stderr.String())
		}
		if t.Failed() {
			t.Logf("driver and ferry mcp stderr:\n%s", tail(d.stderr.String(), 8000))
		}
	})
	return d
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// do sends one request and returns its answer (within a minute).
func (d *driver) do(req map[string]any) answer {
	d.t.Helper()
	b, err := json.Marshal(req)
	if err != nil {
		d.t.Fatal(err)
	}
	if _, err := d.in.Write(append(b, '\n')); err != nil {
		d.t.Fatalf("write to driver: %v\n%s", err, d.stderr.String())
	}
	line := make(chan []byte, 1)
	go func() {
		if d.out.Scan() {
			line <- slices.Clone(d.out.Bytes())
		}
		close(line)
	}()
	var a answer
	select {
	case l, ok := <-line:
		if !ok {
			d.t.Fatalf("driver stopped answering (%v) after %s\n%s", d.out.Err(), b, tail(d.stderr.String(), 8000))
		}
		if err := json.Unmarshal(l, &a); err != nil {
			d.t.Fatalf("driver answer %s: %v", l, err)
		}
	case <-time.After(time.Minute):
		d.t.Fatalf("driver did not answer %s within a minute\n%s", b, tail(d.stderr.String(), 8000))
	}
	if s, _ := req["session"].(string); d.record[s] {
		d.transcript = append(d.transcript, exchange{Session: s, Request: req, Answer: a})
	}
	return a
}

// note puts a line about what happens outside the session into the transcript.
func (d *driver) note(session, text string) {
	if d.record[session] {
		d.transcript = append(d.transcript, exchange{Session: session, Request: map[string]any{"op": "note", "text": text}})
	}
}

func (d *driver) connect(session string, extra map[string]any) answer {
	d.t.Helper()
	req := map[string]any{"op": "connect", "session": session}
	for k, v := range extra {
		req[k] = v
	}
	a := d.do(req)
	if !a.OK {
		d.t.Fatalf("connect %s: %s\n%s", session, a.Error, tail(d.stderr.String(), 8000))
	}
	return a
}

func (d *driver) tools(session string) []tsTool {
	d.t.Helper()
	a := d.do(map[string]any{"op": "tools", "session": session})
	if !a.OK {
		d.t.Fatalf("tools/list on %s: %s", session, a.Error)
	}
	return a.Tools
}

func (d *driver) call(session, name string, args map[string]any) answer {
	d.t.Helper()
	return d.do(map[string]any{"op": "call", "session": session, "name": name, "arguments": args})
}

// ok calls a tool that must succeed and decodes its structured output.
func ok[T any](d *driver, session, name string, args map[string]any) T {
	d.t.Helper()
	a := d.call(session, name, args)
	if !a.OK || a.IsError {
		d.t.Fatalf("%s %s(%v): error %q, tool refusal %q", session, name, args, a.Error, a.Text)
	}
	var out T
	if err := json.Unmarshal(a.Structured, &out); err != nil {
		d.t.Fatalf("%s: structured output %s: %v", name, a.Structured, err)
	}
	return out
}

// refused calls a tool that must be refused as a tool error whose text holds every want.
func (d *driver) refused(session, name string, args map[string]any, want ...string) string {
	d.t.Helper()
	a := d.call(session, name, args)
	if !a.OK {
		d.t.Fatalf("%s %s: protocol error %q, want a tool refusal", session, name, a.Error)
	}
	if !a.IsError {
		d.t.Fatalf("%s %s(%v) succeeded, want a refusal saying %q: %s", session, name, args, want, a.Structured)
	}
	for _, w := range want {
		if !strings.Contains(a.Text, w) {
			d.t.Fatalf("%s %s refusal %q does not say %q", session, name, a.Text, w)
		}
	}
	return a.Text
}

func toolNames(ts []tsTool) []string {
	var n []string
	for _, t := range ts {
		n = append(n, t.Name)
	}
	slices.Sort(n)
	return n
}

var (
	readTools  = []string{"drain_status", "machine_list", "machine_show", "migration_status", "volume_list", "volume_show", "worker_list"}
	writeTools = []string{"drain_apply", "drain_cancel_apply", "drain_cancel_plan", "drain_plan", "migration_apply", "migration_plan", "volume_create_apply", "volume_create_plan",
		"volume_extend_apply", "volume_extend_plan", "volume_fork_apply", "volume_fork_plan"}
	adminTools = []string{"migration_abort_apply", "migration_abort_plan", "volume_destroy_apply", "volume_destroy_plan"}
)

func sorted(lists ...[]string) []string {
	var all []string
	for _, l := range lists {
		all = append(all, l...)
	}
	slices.Sort(all)
	return all
}

// Plan mirrors the *_plan tools' output, read from JSON only.
type plan[D any] struct {
	PlanToken string    `json:"plan_token"`
	ExpiresAt time.Time `json:"expires_at"`
	Changes   []string  `json:"changes"`
	Details   D         `json:"details"`
}

type migrationDetails struct {
	Migration string   `json:"migration"`
	Machine   string   `json:"machine"`
	Volume    string   `json:"volume"`
	Source    string   `json:"source"`
	Target    string   `json:"target"`
	Locks     []string `json:"locks"`
}

type migrationOut struct {
	ID       string `json:"id"`
	State    string `json:"state"`
	Source   string `json:"source"`
	Target   string `json:"target"`
	Terminal bool   `json:"terminal"`
	Downtime string `json:"downtime"`
}

type volumeOut struct {
	ID              string `json:"id"`
	Worker          string `json:"worker"`
	SizeBytes       int64  `json:"size_bytes"`
	State           string `json:"state"`
	AttachedMachine string `json:"attached_machine"`
}

// TestTypeScriptClient: through the official TypeScript SDK, over stdio and
// streamable HTTP, against servers and two agents: each tool group lists
// exactly its tools and a read session cannot call a write tool; a
// migration is planned, applied and completes under a writing machine; a
// second plan of it and a plan whose volume grew since are refused; destroying
// the running machine's volume is refused in the servers' words.
func TestTypeScriptClient(t *testing.T) {
	requireEnv(t)
	id := testbed.RandHex(2)
	ws := []string{"w0" + id, "w1" + id}
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	prefix := "m" + id
	bed, err := testbed.Start(ctx, testbed.Config{Dir: dir, Exe: ferryBin, Prefix: prefix, Workers: ws, Log: zerolog.Nop(), Grace: time.Minute})
	if err != nil {
		t.Fatalf("start cluster: %v\n%s", err, bed.DumpLogs(60))
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("cluster logs:\n%s", bed.DumpLogs(60))
		}
		cctx, ccancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer ccancel()
		if err := bed.Close(cctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	const volSize = 64 << 20
	if err := bed.CreateVolume(ctx, "vol-a", ws[0], volSize); err != nil {
		t.Fatal(err)
	}
	if err := bed.CreateVolume(ctx, "vol-free", ws[0], 32<<20); err != nil {
		t.Fatal(err)
	}
	ack, err := bed.RunRecords(ctx, "mach-a", ws[0], "vol-a", 9)
	if err != nil {
		t.Fatal(err)
	}

	d := startDriver(t, bed.NSOf("ctl"))
	stdio := func(group string) map[string]any {
		return map[string]any{
			"command": ferryBin,
			"args":    []string{"mcp", "--allow", group, "--server", bed.ServerAddr, "--tls-dir", bed.TLSDir(), "--cert", "operator"},
			"env":     map[string]string{"GORACE": os.Getenv("GORACE")},
		}
	}

	// Read: exactly the read tools, and a write tool is not there to call.
	c := d.connect("read", stdio("read"))
	if c.Server["name"] != "ferry" || !strings.Contains(c.Instructions, "plan_token") {
		t.Fatalf("server info %v, instructions %q", c.Server, c.Instructions)
	}
	rt := d.tools("read")
	if got := toolNames(rt); !slices.Equal(got, readTools) {
		t.Fatalf("read tools = %v, want %v", got, readTools)
	}
	for _, tl := range rt {
		if len(tl.InputSchema) == 0 || len(tl.OutputSchema) == 0 || tl.Annotations.ReadOnlyHint == nil || !*tl.Annotations.ReadOnlyHint {
			t.Errorf("read tool %s: schemas %s / %s, annotations %+v", tl.Name, tl.InputSchema, tl.OutputSchema, tl.Annotations)
		}
	}
	if a := d.call("read", "migration_plan", map[string]any{"machine": "mach-a", "target": ws[1]}); a.OK && !a.IsError {
		t.Fatalf("a read session planned a migration: %s", a.Structured)
	} else if !strings.Contains(a.Error+a.Text, "migration_plan") {
		t.Fatalf("the read session's refusal does not name the tool: %+v", a)
	}
	vols := ok[struct {
		Volumes []volumeOut `json:"volumes"`
	}](d, "read", "volume_list", nil)
	if len(vols.Volumes) != 2 || vols.Volumes[0].ID != "vol-a" || vols.Volumes[0].AttachedMachine != "mach-a" || vols.Volumes[0].SizeBytes != volSize {
		t.Fatalf("volume_list: %+v", vols)
	}

	// Write and admin: each adds its tools; apply tools are not read-only.
	d.connect("write", stdio("write"))
	if got := toolNames(d.tools("write")); !slices.Equal(got, sorted(readTools, writeTools)) {
		t.Fatalf("write tools = %v", got)
	}
	d.record["admin"] = true
	d.connect("admin", stdio("admin"))
	at := d.tools("admin")
	if got := toolNames(at); !slices.Equal(got, sorted(readTools, writeTools, adminTools)) {
		t.Fatalf("admin tools = %v", got)
	}
	for _, tl := range at {
		ro := tl.Annotations.ReadOnlyHint != nil && *tl.Annotations.ReadOnlyHint
		if ro == strings.HasSuffix(tl.Name, "_apply") {
			t.Errorf("tool %s: readOnlyHint %v", tl.Name, ro)
		}
	}

	// The running machine's volume cannot be destroyed, in the servers' words.
	d.refused("admin", "volume_destroy_plan", map[string]any{"id": "vol-a"},
		fmt.Sprintf("volume vol-a is attached to machine mach-a (running on %s): stop the machine and detach the volume before destroying it", ws[0]))

	// Plan and apply a migration; a second plan of the same move goes stale.
	p := ok[plan[migrationDetails]](d, "admin", "migration_plan", map[string]any{"machine": "mach-a", "target": ws[1]})
	if p.Details.Machine != "mach-a" || p.Details.Volume != "vol-a" || p.Details.Source != ws[0] || p.Details.Target != ws[1] ||
		!slices.Equal(p.Details.Locks, []string{"volume/vol-a", "network/9"}) || p.PlanToken == "" || len(p.Changes) == 0 {
		t.Fatalf("migration plan: %+v", p)
	}
	if ms, err := bed.Client.ListMigrations(ctx, ""); err != nil || len(ms) != 0 {
		t.Fatalf("a plan started migrations: %v %v", ms, err)
	}
	p2 := ok[plan[migrationDetails]](d, "admin", "migration_plan", map[string]any{"machine": "mach-a", "target": ws[1]})
	m := ok[migrationOut](d, "admin", "migration_apply", map[string]any{"plan_token": p.PlanToken})
	if m.ID != p.Details.Migration || m.Source != ws[0] || m.Target != ws[1] {
		t.Fatalf("migration_apply: %+v, plan %+v", m, p.Details)
	}
	d.refused("admin", "migration_apply", map[string]any{"plan_token": p.PlanToken}, "plan refused", "already applied")
	d.refused("admin", "migration_apply", map[string]any{"plan_token": p2.PlanToken}, "plan refused", "no longer holds", "volume/vol-a is locked by migration "+m.ID)

	// Follow it with migration_status until it is done.
	d.note("admin", "another session polls migration_status every second until the migration is terminal")
	deadline := time.Now().Add(3 * time.Minute)
	for !m.Terminal {
		if time.Now().After(deadline) {
			t.Fatalf("migration %s still %s after 3 minutes", m.ID, m.State)
		}
		time.Sleep(time.Second)
		st := ok[struct {
			Migrations []migrationOut `json:"migrations"`
		}](d, "write", "migration_status", map[string]any{"id": m.ID})
		if len(st.Migrations) != 1 {
			t.Fatalf("migration_status: %+v", st)
		}
		m = st.Migrations[0]
	}
	// The last status goes into the transcript too.
	ok[struct {
		Migrations []migrationOut `json:"migrations"`
	}](d, "admin", "migration_status", map[string]any{"id": m.ID})
	if m.State != string(fsm.Completed) {
		t.Fatalf("migration %s ended %s", m.ID, m.State)
	}
	if sm, err := bed.Client.GetMachine(ctx, "mach-a"); err != nil || sm.Worker != ws[1] {
		t.Fatalf("machine after the migration: %+v %v", sm, err)
	}
	if _, err := testbed.WaitAcked(ctx, ack, 1, time.Minute); err != nil {
		t.Fatal(err)
	}
	n, _ := workload.Acked(ack)
	if _, err := testbed.WaitAcked(ctx, ack, n+20, time.Minute); err != nil {
		t.Fatalf("the machine does not write on %s: %v", ws[1], err)
	}
	present, acked, err := bed.VerifyRecords("mach-a", ws[1], ack)
	if err != nil {
		t.Fatalf("records after the migration: %v", err)
	}
	t.Logf("migration %s: %s, downtime %s; %d records acknowledged, %d present", m.ID, m.State, m.Downtime, acked, present)

	// After the move the machine runs on its new volume, which cannot be
	// destroyed either.
	mo := ok[struct {
		Volume string `json:"volume"`
		Worker string `json:"worker"`
	}](d, "admin", "machine_show", map[string]any{"id": "mach-a"})
	if mo.Worker != ws[1] || mo.Volume == "" {
		t.Fatalf("machine_show after the migration: %+v", mo)
	}
	d.refused("admin", "volume_destroy_plan", map[string]any{"id": mo.Volume},
		fmt.Sprintf("volume %s is attached to machine mach-a (running on %s): stop the machine and detach the volume before destroying it", mo.Volume, ws[1]))

	// A plan whose volume grew since is stale: apply names what changed.
	dp := ok[plan[struct {
		SizeBytes int64  `json:"size_bytes"`
		Outcome   string `json:"outcome"`
	}]](d, "admin", "volume_destroy_plan", map[string]any{"id": "vol-free", "retention": "1h"})
	if dp.Details.SizeBytes != 32<<20 || dp.Details.Outcome != string(fsm.VolPendingDelete) {
		t.Fatalf("destroy plan: %+v", dp)
	}
	d.note("admin", "meanwhile, outside this session, an operator extends vol-free to 48 MiB and its worker grows it")
	if _, err := bed.Client.ExtendVolume(ctx, "vol-free", 48<<20); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(time.Minute)
	for {
		v, err := bed.Client.GetVolume(ctx, "vol-free")
		if err == nil && v.Size == 48<<20 && !v.Extending() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("vol-free did not grow: %+v %v", v, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	d.refused("admin", "volume_destroy_apply", map[string]any{"plan_token": dp.PlanToken},
		"plan refused: stale plan, the world changed since it was made", fmt.Sprintf("size_bytes was %d, now %d", 32<<20, 48<<20))
	if v, err := bed.Client.GetVolume(ctx, "vol-free"); err != nil || v.State != fsm.VolCreated {
		t.Fatalf("a stale plan changed vol-free: %+v %v", v, err)
	}
	dp = ok[plan[struct {
		SizeBytes int64  `json:"size_bytes"`
		Outcome   string `json:"outcome"`
	}]](d, "admin", "volume_destroy_plan", map[string]any{"id": "vol-free", "retention": "1h"})
	if v := ok[volumeOut](d, "admin", "volume_destroy_apply", map[string]any{"plan_token": dp.PlanToken}); v.State != string(fsm.VolPendingDelete) {
		t.Fatalf("destroy apply: %+v", v)
	}
	if v, err := bed.Client.GetVolume(ctx, "vol-free"); err != nil || v.State != fsm.VolPendingDelete {
		t.Fatalf("vol-free after destroy: %+v %v", v, err)
	}
	delete(d.record, "admin")

	// Streamable HTTP, with a bearer token, from the same client library.
	token := testbed.RandHex(16)
	addr := "127.0.0.1:7480"
	hc := exec.Command("nsenter", "--net=/run/netns/"+bed.NSOf("ctl"), "--", ferryBin, "mcp", "--allow", "read", "--http", addr,
		"--server", bed.ServerAddr, "--tls-dir", bed.TLSDir(), "--cert", "operator")
	hc.Env = append(os.Environ(), "FERRY_MCP_TOKEN="+token)
	hlog := &syncBuffer{}
	hc.Stdout, hc.Stderr = hlog, hlog
	if err := hc.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		hc.Process.Signal(os.Interrupt)
		hc.Wait()
		if t.Failed() {
			t.Logf("ferry mcp --http:\n%s", tail(hlog.String(), 4000))
		}
	}()
	waitLog(t, hlog, "serving MCP")
	if a := d.do(map[string]any{"op": "connect", "session": "http-bad", "url": "http://" + addr + "/", "token": "wrong"}); a.OK {
		t.Fatal("an HTTP session with a wrong bearer token connected")
	}
	d.connect("http", map[string]any{"url": "http://" + addr + "/", "token": token})
	if got := toolNames(d.tools("http")); !slices.Equal(got, readTools) {
		t.Fatalf("HTTP read tools = %v", got)
	}
	mh := ok[struct {
		Worker string `json:"worker"`
	}](d, "http", "machine_show", map[string]any{"id": "mach-a"})
	if mh.Worker != ws[1] {
		t.Fatalf("machine_show over HTTP: %+v", mh)
	}
	for _, s := range []string{"read", "write", "admin", "http"} {
		if a := d.do(map[string]any{"op": "close", "session": s}); !a.OK {
			t.Errorf("close %s: %s", s, a.Error)
		}
	}
	if path := os.Getenv("FERRY_MCP_TRANSCRIPT"); path != "" {
		if err := os.WriteFile(path, []byte(transcript(d.transcript)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

var tokenRE = regexp.MustCompile(`"plan_token":( ?)"([A-Za-z0-9_-]{8})[A-Za-z0-9_.-]*([A-Za-z0-9_-]{10})"`)

func waitLog(t *testing.T, b *syncBuffer, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(b.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q within 30s:\n%s", want, b.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// transcript renders the recorded exchanges as Markdown for docs/mcp.md,
// plan tokens cut to their first 8 and last 10 characters.
func transcript(xs []exchange) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "Recorded %s by `FERRY_MCP_TRANSCRIPT=/tmp/t.md go test ./integration/mcp -run TestTypeScriptClient` (TypeScript SDK client, `ferry mcp --allow admin` over stdio; plan tokens shortened).\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 MST"))
	short := func(b []byte) []byte { return tokenRE.ReplaceAll(b, []byte(`"plan_token":${1}"${2}…${3}"`)) }
	for _, x := range xs {
		req := x.Request
		switch req["op"] {
		case "connect":
			b, _ := json.Marshal(x.Answer.Server)
			fmt.Fprintf(&sb, "→ initialize: server %s\n\n", b)
		case "tools":
			fmt.Fprintf(&sb, "→ tools/list: %s\n\n", strings.Join(toolNames(x.Answer.Tools), ", "))
		case "note":
			fmt.Fprintf(&sb, "(%s)\n\n", req["text"])
		case "call":
			args, _ := json.Marshal(req["arguments"])
			args = short(args)
			fmt.Fprintf(&sb, "→ tools/call `%s` %s\n\n", req["name"], args)
			switch {
			case !x.Answer.OK:
				fmt.Fprintf(&sb, "← protocol error: %s\n\n", x.Answer.Error)
			case x.Answer.IsError:
				fmt.Fprintf(&sb, "← refused (isError): %s\n\n", x.Answer.Text)
			default:
				var v any
				_ = json.Unmarshal(x.Answer.Structured, &v)
				var b bytes.Buffer
				enc := json.NewEncoder(&b)
				enc.SetEscapeHTML(false)
				enc.SetIndent("", "  ")
				_ = enc.Encode(v)
				fmt.Fprintf(&sb, "← result:\n\n```json\n%s```\n\n", short(b.Bytes()))
			}
		}
	}
	return sb.String()
}
