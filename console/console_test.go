package console

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"html"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/tlsutil"
)

func TestDerivePathsFromTheTable(t *testing.T) {
	p := derivePaths(fsm.Transitions)
	if len(p.Forward) == 0 || p.Forward[0] != fsm.Planned || p.Forward[len(p.Forward)-1] != fsm.Completed {
		t.Fatalf("forward line %v: want planned ... completed", p.Forward)
	}
	if !slices.Equal(p.Rollback, []fsm.State{fsm.RollingBack, fsm.RolledBack}) {
		t.Fatalf("rollback line %v", p.Rollback)
	}
	// Every consecutive pair is a row of the table, and the two lines hold
	// every state exactly once.
	for _, line := range [][]fsm.State{p.Forward, p.Rollback} {
		for i := 1; i < len(line); i++ {
			found := false
			for _, tr := range fsm.Transitions {
				found = found || (slices.Contains(tr.From, line[i-1]) && tr.To == line[i])
			}
			if !found {
				t.Errorf("no row %s -> %s", line[i-1], line[i])
			}
		}
	}
	all := append(slices.Clone(p.Forward), p.Rollback...)
	for _, s := range fsm.AllStates {
		if n := len(slices.DeleteFunc(slices.Clone(all), func(x fsm.State) bool { return x != s })); n != 1 {
			t.Errorf("state %s appears %d times on the stepper lines", s, n)
		}
	}
	if len(all) != len(fsm.AllStates) {
		t.Errorf("stepper lines hold %d states, the table %d", len(all), len(fsm.AllStates))
	}

	// Another table: the derivation follows it, nothing is listed by hand.
	tbl := []fsm.Transition{
		{Event: "x", From: []fsm.State{"b"}, To: "c"},
		{Event: "y", From: []fsm.State{"a"}, To: "b"},
		{Event: "z", From: []fsm.State{"a", "b"}, To: "r"},
		{Event: "w", From: []fsm.State{"r"}, To: "r"},
		{Event: "v", From: []fsm.State{"r"}, To: "s"},
	}
	q := derivePaths(tbl)
	if !slices.Equal(q.Forward, []fsm.State{"a", "b", "c"}) || !slices.Equal(q.Rollback, []fsm.State{"r", "s"}) {
		t.Fatalf("synthetic table: %+v", q)
	}
}

func TestStepperMarksPosition(t *testing.T) {
	m := &fsm.Migration{ID: "x", State: fsm.Exported}
	st := stepper(m)
	for _, s := range st {
		want := "todo"
		switch i, j := slices.Index(statePaths.Forward, s.State), slices.Index(statePaths.Forward, fsm.Exported); {
		case i < j:
			want = "done"
		case i == j:
			want = "current"
		}
		if s.Status != want {
			t.Errorf("%s: %s, want %s", s.State, s.Status, want)
		}
	}
	// Rolled back from source_stopped: forward up to there, then the rollback line.
	m = &fsm.Migration{ID: "y", State: fsm.RollingBack, Rollback: &fsm.RollbackInfo{From: fsm.SourceStopped}}
	var got []string
	for _, s := range stepper(m) {
		got = append(got, string(s.State)+"="+s.Status)
	}
	want := []string{"planned=done", "target_prepared=done", "source_stopped=done", "rolling_back=current", "rolled_back=todo"}
	if !slices.Equal(got, want) {
		t.Fatalf("rollback stepper %v, want %v", got, want)
	}
	if s := stepper(&fsm.Migration{State: fsm.Completed}); s[len(s)-1].Status != "done" {
		t.Fatalf("completed is not done: %+v", s[len(s)-1])
	}
}

func TestCheckListen(t *testing.T) {
	for _, a := range []string{"127.0.0.1:7480", "[::1]:0", "localhost:7480", "127.0.0.2:1"} {
		if err := CheckListen(a, false); err != nil {
			t.Errorf("%s: %v", a, err)
		}
	}
	for _, a := range []string{":7480", "0.0.0.0:7480", "[::]:7480", "192.168.1.4:7480", "example.com:80", "nonsense"} {
		err := CheckListen(a, false)
		if err == nil {
			t.Errorf("%s accepted without --allow-non-loopback", a)
		} else if a != "nonsense" && !strings.Contains(err.Error(), "--allow-non-loopback") {
			t.Errorf("%s: refusal does not say what to do: %v", a, err)
		}
	}
	if err := CheckListen("0.0.0.0:7480", true); err != nil {
		t.Errorf("allowed explicitly: %v", err)
	}
	ln, err := Listen("0.0.0.0:0", false)
	if err == nil {
		ln.Close()
		t.Fatal("Listen opened a non-loopback address")
	}
}

func get(t *testing.T, u string) (int, string) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func wantAll(t *testing.T, page string, subs ...string) {
	t.Helper()
	for _, s := range subs {
		if !strings.Contains(page, s) {
			t.Errorf("page lacks %q", s)
		}
	}
}

func TestPagesAgainstARealServer(t *testing.T) {
	f := newFleet(t)
	srv := f.serve(t)

	code, page := get(t, srv.URL+"/")
	if code != http.StatusOK {
		t.Fatalf("fleet: %d %s", code, page)
	}
	wantAll(t, page,
		`<th scope="row">w-src</th>`, `<th scope="row">w-dst</th>`, // workers
		`id="server-s0"`, `<span class="badge">leader</span>`, "<td>Leader</td>", // the server's own raft state
		`id="mig-m1" data-state="planned"`, `id="mig-m2" data-state="cutover"`,
		`data-state="planned" aria-current="step"`, `data-state="cutover" aria-current="step"`,
		`<caption>`, `<th scope="col">`, `data-live="/events/migrations"`,
		"mach1", `href="/volumes/vol1"`)
	if strings.Contains(page, "Not everything could be read") {
		t.Errorf("fleet page reports a problem:\n%s", page)
	}

	code, page = get(t, srv.URL+"/volumes/vol1")
	if code != http.StatusOK {
		t.Fatalf("volume: %d %s", code, page)
	}
	wantAll(t, page, "48.0 MiB", "50331648 bytes", "w-src", "mach1", "sealed to its worker and the recovery key", "aes-xts-plain64", `id="mig-m1"`)
	for _, form := range []string{string(f.secretKey), hex.EncodeToString(f.secretKey), base64.StdEncoding.EncodeToString(f.secretKey)} {
		if strings.Contains(page, form) {
			t.Fatalf("volume page shows the key")
		}
	}

	// Hydration progress and a stall, as the target reports them.
	stalled := true
	f.propose(t, "m2", f.dst, fsm.EvHydrationStarted, fsm.EventPayload{})
	f.propose(t, "m2", f.dst, fsm.EvProgress, fsm.EventPayload{Progress: &fsm.Progress{
		HydratedBytes: 30 << 20, TotalBytes: 48 << 20, FetchedBytes: 10 << 20, SkippedBytes: 20 << 20, RateBPS: 5 << 20, ETASeconds: 4}})
	f.propose(t, "m2", f.dst, fsm.EvReport, fsm.EventPayload{Stalled: &stalled, Reason: "iSCSI reads time out <slow>"})
	code, page = get(t, srv.URL+"/migrations/m2")
	if code != http.StatusOK {
		t.Fatalf("migration: %d %s", code, page)
	}
	wantAll(t, page, "30.0 MiB of 48.0 MiB hydrated; fetched 10.0 MiB, skipped 20.0 MiB; 5.0 MiB/s, ETA 4s",
		`<progress max="100" value="62.5"`, "stalled: iSCSI reads time out &lt;slow&gt;", `data-live="/events/migrations/m2"`, "w-src → w-dst", "fdaa:0:8:0:2:0:1:0",
		"<td>hydrating</td>", "Applied proposals", "<td>clone_built</td>", "<td>target w-dst</td>", "<td>source w-src</td>", `data-state="hydrating" aria-current="step"`)
	if code, page = get(t, srv.URL+"/"); code != http.StatusOK {
		t.Fatalf("fleet page: %d %s", code, page)
	}
	wantAll(t, page, `<strong class="stalled">Stalled: iSCSI reads time out &lt;slow&gt;</strong>`, "ETA 4s")

	// A missing migration: the server's words and status.
	code, page = get(t, srv.URL+"/migrations/nope")
	if code != http.StatusNotFound || !strings.Contains(page, "not_found") {
		t.Fatalf("missing migration: %d %s", code, page)
	}
	// The assets are embedded.
	if code, js := get(t, srv.URL+"/static/live.js"); code != http.StatusOK || !strings.Contains(js, "EventSource") {
		t.Fatalf("live.js: %d", code)
	}
}

// readEvent reads one server-sent event, skipping comments.
func readEvent(t *testing.T, r *bufio.Reader) (string, string) {
	t.Helper()
	var event string
	var data []string
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the event stream: %v", err)
		}
		line = strings.TrimRight(line, "\n")
		switch {
		case line == "" && event != "":
			return event, strings.Join(data, "\n")
		case strings.HasPrefix(line, "event: "):
			event = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			data = append(data, strings.TrimPrefix(line, "data: "))
		}
	}
}

func TestEventsFollowTheServersBlockingQueries(t *testing.T) {
	f := newFleet(t)
	srv := f.serve(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, path := range []string{"/events/migrations", "/events/migrations/m1"} {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL+path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
			t.Fatalf("%s: content type %q", path, ct)
		}
		r := bufio.NewReader(resp.Body)
		cur, err := f.op.GetMigration(ctx, "m1")
		if err != nil {
			t.Fatal(err)
		}
		ev, data := readEvent(t, r)
		if ev != "update" || !strings.Contains(data, `data-state="`+string(cur.State)+`" aria-current="step"`) {
			t.Fatalf("%s first event %s: %s", path, ev, data)
		}
		next := map[string]fsm.Event{"/events/migrations": fsm.EvTargetPrepared, "/events/migrations/m1": fsm.EvSourceStopped}[path]
		var p fsm.EventPayload
		if next == fsm.EvTargetPrepared {
			p = f.targetPrepared(t, "m1")
		}
		f.propose(t, "m1", f.proposer(next), next, p)
		want, _ := fsm.Lookup(next)
		ev, data = readEvent(t, r)
		if ev != "update" || !strings.Contains(data, `data-state="`+string(want.To)+`" aria-current="step"`) {
			t.Fatalf("%s after %s: %s: %s", path, next, ev, data)
		}
	}
}

var csrfRE = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

// post submits the abort form as a browser on the console's page would.
func post(t *testing.T, srv string, path string, form url.Values, origin string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, srv+path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if origin != "" {
		req.Header.Set("Origin", origin)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestAbortPlanThenApply(t *testing.T) {
	f := newFleet(t)
	srv := f.serve(t)
	ctx := context.Background()

	code, page := get(t, srv.URL+"/migrations/m1/abort")
	if code != http.StatusOK {
		t.Fatalf("plan: %d %s", code, page)
	}
	// The plan comes from the table: the abort row, then the rollback rows with who does them.
	wantAll(t, page, "<td>abort</td>", "<td>planned → rolling_back</td>", "<td>target_torn_down</td>", "target worker w-dst",
		"<td>source_restored</td>", "source worker w-src", `<label for="confirm">`, "An abort is accepted in planned")
	m := csrfRE.FindStringSubmatch(page)
	if m == nil {
		t.Fatal("abort form carries no CSRF token")
	}
	token := m[1]
	origin := srv.URL

	// Cross-site and tokenless posts are refused before anything is sent.
	for name, c := range map[string]struct {
		form   url.Values
		origin string
	}{
		"no origin":    {url.Values{"csrf": {token}, "confirm": {"m1"}}, ""},
		"other origin": {url.Values{"csrf": {token}, "confirm": {"m1"}}, "http://evil.example"},
		"no token":     {url.Values{"confirm": {"m1"}}, origin},
		"bad token":    {url.Values{"csrf": {token + "x"}, "confirm": {"m1"}}, origin},
	} {
		if code, body := post(t, srv.URL, "/migrations/m1/abort", c.form, c.origin); code != http.StatusForbidden {
			t.Errorf("%s: %d %s", name, code, body)
		}
	}
	// A wrong typed confirmation sends nothing and says so.
	code, page = post(t, srv.URL, "/migrations/m1/abort", url.Values{"csrf": {token}, "confirm": {"m2"}}, origin)
	if code != http.StatusUnprocessableEntity || !strings.Contains(page, "Nothing was sent") || !strings.Contains(page, `aria-invalid="true"`) {
		t.Fatalf("wrong confirmation: %d %s", code, page)
	}
	if mig, err := f.op.GetMigration(ctx, "m1"); err != nil || mig.State != fsm.Planned {
		t.Fatalf("after a wrong confirmation: %+v %v", mig, err)
	}

	// Past cutover the servers refuse, in their words.
	code, page = get(t, srv.URL+"/migrations/m2/abort")
	if code != http.StatusOK || !strings.Contains(page, "will most likely refuse") {
		t.Fatalf("plan past cutover: %d %s", code, page)
	}
	code, page = post(t, srv.URL, "/migrations/m2/abort", url.Values{"csrf": {token}, "confirm": {"m2"}, "reason": {"test"}}, origin)
	if code != http.StatusConflict {
		t.Fatalf("abort past cutover: %d %s", code, page)
	}
	wantAll(t, page, "The servers refused", fsm.CodePastCutover, "<strong>cutover</strong>")
	_, err := f.op.Abort(ctx, "m2", "same question through the API")
	var past *api.Error
	if !errors.As(err, &past) {
		t.Fatalf("abort past cutover through the API: want a refusal, got %v", err)
	}
	wantAll(t, page, html.EscapeString(past.Reason))

	// Before cutover the abort applies.
	code, page = post(t, srv.URL, "/migrations/m1/abort", url.Values{"csrf": {token}, "confirm": {"m1"}, "reason": {"drill <b>"}}, origin)
	if code != http.StatusOK {
		t.Fatalf("abort: %d %s", code, page)
	}
	wantAll(t, page, "Abort accepted", "rolling_back")
	mig, err := f.op.GetMigration(ctx, "m1")
	if err != nil || mig.State != fsm.RollingBack || mig.Rollback == nil || mig.Rollback.Reason != "drill <b>" {
		t.Fatalf("after abort: %+v %v", mig, err)
	}
	// The reason is escaped where it is shown.
	_, page = get(t, srv.URL+"/migrations/m1")
	wantAll(t, page, "drill &lt;b&gt;")
}

func TestGuardRefusesOtherHosts(t *testing.T) {
	f := newFleet(t)
	srv := f.serve(t)
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	for host, want := range map[string]int{
		"127.0.0.1:" + port:        http.StatusOK,
		"localhost:" + port:        http.StatusOK,
		"[::1]:" + port:            http.StatusOK,
		"attacker.example:" + port: http.StatusMisdirectedRequest, // DNS rebinding
		"127.0.0.1.nip.io:" + port: http.StatusMisdirectedRequest,
		"127.0.0.1:1":              http.StatusMisdirectedRequest,
	} {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+"/", nil)
		req.Host = host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("Host %s: %d, want %d", host, resp.StatusCode, want)
		}
		if resp.Header.Get("X-Frame-Options") != "DENY" || !strings.Contains(resp.Header.Get("Content-Security-Policy"), "frame-ancestors 'none'") {
			t.Errorf("Host %s: framing not forbidden", host)
		}
	}
}

func TestDrainPlanThenApply(t *testing.T) {
	f := newFleet(t)
	srv := f.serve(t)
	ctx := context.Background()
	if _, err := f.src.CreateVolume(ctx, fsm.Volume{ID: "vol3", Worker: "w-src", Size: 48 << 20, State: fsm.VolCreated, Layout: layout()}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.op.CreateMachine(ctx, fsm.Machine{ID: "mach3", Worker: "w-src", Volume: "vol3", Network: 9, MachineNo: 1,
		State: fsm.MachineRunning, Addr6PN: "fdaa:0:9:0:1:0:1:0"}); err != nil {
		t.Fatal(err)
	}

	code, page := get(t, srv.URL+"/workers/w-src/drain")
	if code != http.StatusOK {
		t.Fatalf("plan: %d %s", code, page)
	}
	wantAll(t, page, `id="drain-mach1"`, `already moving: <a href="/migrations/m1">m1</a>`, `href="/migrations/m2"`,
		`<th scope="row">mach3</th>`+"\n"+`<td>migrate to w-dst</td>`, `data-live="/events/workers/w-src/migrations"`, `<label for="confirm">`)
	token := csrfRE.FindStringSubmatch(page)[1]

	code, page = post(t, srv.URL, "/workers/w-src/drain", url.Values{"csrf": {token}, "confirm": {"w-dst"}}, srv.URL)
	if code != http.StatusUnprocessableEntity || !strings.Contains(page, "Nothing was sent") {
		t.Fatalf("wrong confirmation: %d %s", code, page)
	}
	// Applying records a drain and returns: the servers run it.
	code, page = post(t, srv.URL, "/workers/w-src/drain", url.Values{"csrf": {token}, "confirm": {"w-src"}}, srv.URL)
	if code != http.StatusOK {
		t.Fatalf("drain: %d %s", code, page)
	}
	wantAll(t, page, "recorded: w-src is cordoned", `data-live="/events/workers/w-src/migrations"`)
	// w-src already sends two migrations, its capacity: the drain says mach3 waits.
	d := waitDrain(t, f.op, "w-src", "mach3 waiting", func(d *fsm.Drain) bool { return d.Waiting["mach3"] != "" })
	if !strings.Contains(d.Waiting["mach3"], "2 of its 2 outbound slots") {
		t.Fatalf("mach3 waits for %q, want the source's slots", d.Waiting["mach3"])
	}
	if len(d.Started) != 0 {
		t.Fatalf("the drain started %v past the admission limit", d.Started)
	}
	_, page = get(t, srv.URL+"/workers/w-src/drain")
	wantAll(t, page, "mach3 waiting: ", html.EscapeString(d.Waiting["mach3"]), "0 machines started", `id="drain-cancel"`) // the servers' words
	if w := must2(f.op.GetWorker(ctx, "w-src"))(t); !w.Cordoned {
		t.Fatal("a drained worker is not cordoned")
	}
	// A second apply while it runs is refused, in the servers' words.
	code, page = post(t, srv.URL, "/workers/w-src/drain", url.Values{"csrf": {token}, "confirm": {"w-src"}}, srv.URL)
	if code != http.StatusConflict || !strings.Contains(page, "already being drained by "+d.ID) {
		t.Fatalf("second drain: %d %s", code, page)
	}

	// Once m1 has rolled back there is room for one: the drain goes on
	// without the console, mach1 goes, mach3 waits.
	if _, err := f.op.Abort(ctx, "m1", "make room"); err != nil {
		t.Fatal(err)
	}
	f.propose(t, "m1", f.dst, fsm.EvTargetTornDown, fsm.EventPayload{})
	f.propose(t, "m1", f.src, fsm.EvSourceRestored, fsm.EventPayload{})
	d = waitDrain(t, f.op, "w-src", "mach1 started", func(d *fsm.Drain) bool { return d.Started["mach1"] != "" })
	_, page = get(t, srv.URL+"/workers/w-src/drain")
	wantAll(t, page, "1 machine started", `href="/migrations/`+d.Started["mach1"]+`"`, "mach3 waiting: ")
	ms, err := f.op.ListMigrations(ctx, "w-src")
	if err != nil {
		t.Fatal(err)
	}
	active := 0
	for _, m := range ms {
		if m.Active() {
			active++
			if m.Machine == "mach3" {
				t.Fatalf("mach3 started past the admission limit: %+v", m)
			}
		}
	}
	if active != 2 {
		t.Fatalf("%d active migrations off w-src, want 2", active)
	}

	// Cancelling needs the name typed too; running migrations go on.
	code, page = post(t, srv.URL, "/workers/w-src/drain", url.Values{"csrf": {token}, "confirm": {"w-sr"}, "cancel": {"1"}}, srv.URL)
	if code != http.StatusUnprocessableEntity || !strings.Contains(page, "Nothing was sent") {
		t.Fatalf("wrong cancel confirmation: %d %s", code, page)
	}
	code, page = post(t, srv.URL, "/workers/w-src/drain", url.Values{"csrf": {token}, "confirm": {"w-src"}, "cancel": {"1"}}, srv.URL)
	if code != http.StatusOK || !strings.Contains(page, "cancelled: migrations already running go on") {
		t.Fatalf("cancel: %d %s", code, page)
	}
	if ds := must2(f.op.ListDrains(ctx, "w-src"))(t); len(ds) != 1 || ds[0].State != fsm.DrainCancelled {
		t.Fatalf("after cancel: %+v", ds)
	}
	if m, err := f.op.GetMigration(ctx, d.Started["mach1"]); err != nil || !m.Active() {
		t.Fatalf("the drain's migration did not go on after the cancel: %+v %v", m, err)
	}
}

// waitDrain waits until the worker's drain satisfies ok.
func waitDrain(t *testing.T, c *api.Client, worker, what string, ok func(*fsm.Drain) bool) *fsm.Drain {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ds, err := c.ListDrains(context.Background(), worker)
		if err != nil {
			t.Fatal(err)
		}
		if len(ds) > 0 && ok(ds[0]) {
			return ds[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("drain of %s: no %s after 20s: %+v", worker, what, ds)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func must2[T any](v T, err error) func(*testing.T) T {
	return func(t *testing.T) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

func TestAllowedHosts(t *testing.T) {
	h := allowedHosts(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 80}, []string{"Console.Example", "other:8080"})
	for _, ok := range []string{"127.0.0.1:80", "127.0.0.1", "localhost", "[::1]:80", "console.example:80", "console.example", "other:8080"} {
		if !h[ok] {
			t.Errorf("%s refused", ok)
		}
	}
	h = allowedHosts(&net.TCPAddr{IP: net.IPv4zero, Port: 7480}, nil)
	if h["0.0.0.0:7480"] || h["127.0.0.1"] || !h["localhost:7480"] {
		t.Errorf("unspecified listen address: %v", h)
	}
}

// TestDialReachesTheServers: with Config.Dial set, the connections to the
// servers go through it: the shared client's and the one the fleet page
// opens to ask the server for its own raft state (two transports, so at
// least two dials).
func TestDialReachesTheServers(t *testing.T) {
	f := newFleet(t)
	tc, err := tlsutil.ClientConfig(f.cluster.TLSDir, "operator")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	dialed := map[string]int{}
	con, err := New(Config{Servers: f.cluster.Addrs(), TLS: tc, Log: zerolog.Nop(),
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			mu.Lock()
			dialed[addr]++
			mu.Unlock()
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(con.Close)
	srv := httptest.NewUnstartedServer(nil)
	srv.Config.Handler = con.Handler(srv.Listener.Addr())
	srv.Start()
	t.Cleanup(srv.Close)
	code, page := get(t, srv.URL+"/")
	if code != http.StatusOK {
		t.Fatalf("fleet: %d %s", code, page)
	}
	wantAll(t, page, `id="mig-m1" data-state="planned"`, `<span class="badge">leader</span>`)
	mu.Lock()
	defer mu.Unlock()
	total := 0
	for _, a := range f.cluster.Addrs() {
		total += dialed[a]
	}
	if total < 2 {
		t.Errorf("%d connections to the servers went through Dial, want at least 2 (dialed: %v)", total, dialed)
	}
}
