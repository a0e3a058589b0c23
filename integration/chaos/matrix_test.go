package chaos

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/fsm"
)

// The matrix is generated from fsm.Transitions: every state some event
// leaves is a row, so a new state is covered without touching this file.
// A row's migration is held in its state by pausing the agent that proposes
// the event leaving it (FERRY_FAILPOINT_PAUSE_BEFORE), the participant is
// killed with SIGKILL as soon as the state is seen committed, then restarted
// at once, or (lease variant) only after its lease expired and the server
// acted on it.

const (
	matrixVolSize = 128 << 20 // the records workload fills ~10 MiB per 200k records: room for the full matrix
	pause         = 4 * time.Second
	// 5s, not 3s: under a full CI run (three race-built clusters, the VM)
	// healthy agents missed 3s leases between rows.
	leaseTTL = 5 * time.Second
)

// leaving is the first row of the table leaving s (table order puts the
// forward step first); a self-loop such as target_torn_down counts, since it
// is the next thing that happens.
func leaving(s fsm.State) (fsm.Transition, bool) {
	for _, t := range fsm.Transitions {
		if slices.Contains(t.From, s) {
			return t, true
		}
	}
	return fsm.Transition{}, false
}

// forwardPath follows, from planned, the first row leaving each state to another state.
func forwardPath() []fsm.State {
	path := []fsm.State{fsm.Planned}
	for cur := fsm.Planned; !cur.Terminal(); {
		next := fsm.State("")
		for _, t := range fsm.Transitions {
			if slices.Contains(t.From, cur) && t.To != cur {
				next = t.To
				break
			}
		}
		if next == "" || slices.Contains(path, next) {
			break
		}
		path = append(path, next)
		cur = next
	}
	return path
}

// matrixStates: every state some event leaves, in fsm.AllStates order.
func matrixStates() []fsm.State {
	var out []fsm.State
	for _, s := range fsm.AllStates {
		if _, ok := leaving(s); ok && !s.Terminal() {
			out = append(out, s)
		}
	}
	return out
}

// detour says how to reach a state off the forward path: an operator event
// proposed while the migration is held at a forward state.
type detour struct {
	at fsm.State
	ev fsm.Event
}

func reach(s fsm.State) (*detour, error) {
	fwd := forwardPath()
	if slices.Contains(fwd, s) {
		return nil, nil
	}
	for _, t := range fsm.Transitions {
		if t.To != s || !slices.Contains(t.Roles, fsm.RoleOperator) {
			continue
		}
		// The latest forward state the event may come from whose leaving
		// event an agent proposes (so the failpoint can hold it there).
		for i := len(fwd) - 1; i >= 0; i-- {
			lt, ok := leaving(fwd[i])
			if slices.Contains(t.From, fwd[i]) && ok && agentRole(lt) != "" {
				return &detour{at: fwd[i], ev: t.Event}, nil
			}
		}
	}
	return nil, fmt.Errorf("state %s is neither on the forward path %v nor reachable by an operator event: teach the chaos matrix how to get there", s, fwd)
}

// agentRole is "source" or "target" when an agent proposes t, else "".
func agentRole(t fsm.Transition) string {
	switch {
	case slices.Contains(t.Roles, fsm.RoleTarget):
		return "target"
	case slices.Contains(t.Roles, fsm.RoleSource):
		return "source"
	}
	return ""
}

type matrixCase struct {
	state fsm.State
	who   string // source, target, leader, follower
	lease bool   // stay dead until the lease expired and the server acted
}

func (k matrixCase) name() string {
	mode := "restart"
	if k.lease {
		mode = "lease"
	}
	return fmt.Sprintf("%s/%s/%s", k.state, k.who, mode)
}

// participants of the matrix: the two agents and the raft leader and a
// follower among the three servers.
var participants = []string{"target", "source", "leader", "follower"}

// shortMatrix is the short form's selection: each participant killed
// before and after cutover, plus the states only a failpoint of the server
// (source_released) or an operator's detour (rolling_back) holds, and
// hydrated (where a killed target once leaked its clone's metadata).
// TestMatrixTable checks the selection keeps that coverage.
var shortMatrix = []matrixCase{
	{fsm.Planned, "target", false}, {fsm.SourceStopped, "leader", false}, {fsm.Exported, "follower", false},
	{fsm.Trimmed, "source", false}, {fsm.Cutover, "follower", false}, {fsm.Hydrating, "leader", false},
	{fsm.Hydrated, "target", false}, {fsm.SourceReleased, "source", false}, {fsm.RollingBack, "target", false},
}

// matrixCases: the short form is shortMatrix plus lease-expiry variants
// before and after cutover; FERRY_CHAOS=full kills every participant at
// every state, with and without waiting for the lease.
func matrixCases(lease bool) []matrixCase {
	if !lease && !full {
		return shortMatrix
	}
	var out []matrixCase
	for _, s := range matrixStates() {
		if lease {
			if full {
				out = append(out, matrixCase{s, "source", true}, matrixCase{s, "target", true})
			}
			continue
		}
		for _, p := range participants {
			out = append(out, matrixCase{s, p, false})
		}
	}
	if lease && !full {
		out = append(out, matrixCase{fsm.Exported, "target", true}, matrixCase{fsm.Hydrating, "source", true})
	}
	return out
}

func TestMatrixTable(t *testing.T) {
	// The generator itself: every non-terminal state is covered and reachable.
	states := matrixStates()
	for _, s := range fsm.AllStates {
		if !s.Terminal() && !slices.Contains(states, s) {
			t.Errorf("state %s is not in the matrix", s)
		}
	}
	for _, s := range states {
		if _, err := reach(s); err != nil {
			t.Error(err)
		}
		// Every state can be held, so a row's fault cannot miss it.
		lt, _ := leaving(s)
		if agentRole(lt) == "" && !slices.Contains(lt.Roles, fsm.RoleServer) {
			t.Errorf("state %s: its leaving event %s is proposed by %v, which no failpoint holds", s, lt.Event, lt.Roles)
		}
	}
	if d, _ := reach(fsm.RollingBack); d == nil || d.ev != fsm.EvAbort {
		t.Errorf("rolling_back is reached by %+v, want an operator abort", d)
	}
	if got := len(matrixCases(false)); full && got != len(states)*len(participants) {
		t.Errorf("full form has %d cases for %d states and %d participants", got, len(states), len(participants))
	}
	for _, k := range shortMatrix {
		if !slices.Contains(states, k.state) || !slices.Contains(participants, k.who) {
			t.Errorf("short row %s is not in the matrix", k.name())
		}
	}
	for _, s := range []fsm.State{fsm.SourceReleased, fsm.RollingBack} {
		if !slices.ContainsFunc(shortMatrix, func(k matrixCase) bool { return k.state == s }) {
			t.Errorf("the short form has no row at %s", s)
		}
	}
	// The short form still kills each participant somewhere, before and after cutover.
	seen := map[string]map[bool]bool{}
	for _, k := range shortMatrix {
		if seen[k.who] == nil {
			seen[k.who] = map[bool]bool{}
		}
		seen[k.who][k.state.AfterCutover()] = true
	}
	for _, p := range participants {
		if !seen[p][false] || !seen[p][true] {
			t.Errorf("the matrix kills %s before cutover: %v, after: %v; want both", p, seen[p][false], seen[p][true])
		}
	}
}

func TestChaosMatrix(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	runMatrix(t, false)
}

func TestChaosMatrixLease(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	runMatrix(t, true)
}

func runMatrix(t *testing.T, lease bool) {
	var args []string
	if lease {
		args = []string{"--lease-ttl", leaseTTL.String()}
	}
	// The servers hold source_released (the server proposes completed), so
	// that row too is held by a failpoint.
	c := newClusterFP(t, 2, fmt.Sprintf("%s=%s", fsm.EvCompleted, pause), args...)
	a := c.ws[0]
	tag := "m"
	if lease {
		tag = "l"
	}
	if err := c.bed.CreateVolume(c.ctx, tag+"vol", a, matrixVolSize); err != nil {
		t.Fatal(err)
	}
	ack, err := c.bed.RunRecords(c.ctx, tag+"mach", a, tag+"vol", 50)
	if err != nil {
		t.Fatal(err)
	}
	table := "chaos matrix (kill -9 right after the state commits; an agent restarts at once, a leader once another leads, a follower after the end)"
	if lease {
		table = "chaos matrix, lease variant (kill -9, restart only after the lease expired, ttl " + leaseTTL.String() + ")"
	}
	report(table, "| state | killed | landed in | ended | path | acked/present | source after | leaks | took |")
	report(table, "|---|---|---|---|---|---|---|---|---|")
	for _, k := range matrixCases(lease) {
		ok := t.Run(k.name(), func(t *testing.T) {
			parent := c.t
			c.t = t
			defer func() { c.t = parent }()
			// A row whose kill missed its state (the harness saw the state
			// late: the migration had left it) tested nothing: it runs
			// again. Each run still checks every invariant.
			report(table, untilLanded(t, func() (string, error) { return runMatrixCase(c, k, tag+"mach", ack) }))
		})
		if !ok {
			report(table, fmt.Sprintf("| %s | %s | | FAILED | | | | | |", k.state, k.who))
		}
	}
}

// rowAttempts bounds the runs of a row whose fault misses its state.
const rowAttempts = 3

// untilLanded runs a row until its fault lands in its state (run returns
// no error), at most rowAttempts times, and returns its report line.
func untilLanded(t *testing.T, run func() (string, error)) string {
	t.Helper()
	for attempt := 1; ; attempt++ {
		line, missed := run()
		if missed == nil {
			return line
		}
		if attempt == rowAttempts {
			t.Fatal(missed)
		}
		t.Logf("run %d: %v; running the row again", attempt, missed)
	}
}

// runMatrixCase runs one row; the error says its kill missed the state.
func runMatrixCase(c *cluster, k matrixCase, machineID, ack string) (string, error) {
	t := c.t
	src := c.machineOn(machineID)
	dst := c.other(src)
	mach, err := c.bed.Client.GetMachine(c.ctx, machineID)
	if err != nil {
		t.Fatal(err)
	}
	srcVol := mach.Volume
	roleWorker := map[string]string{"source": src, "target": dst}

	// Hold the migration in the state (and at the detour's state, if any);
	// the servers hold every state the server leaves (newClusterFP).
	fp := map[string][]string{}
	hold := func(s fsm.State) {
		lt, ok := leaving(s)
		if !ok {
			return
		}
		if r := agentRole(lt); r != "" {
			fp[roleWorker[r]] = append(fp[roleWorker[r]], fmt.Sprintf("%s=%s", lt.Event, pause))
		}
	}
	hold(k.state)
	d, err := reach(k.state)
	if err != nil {
		t.Fatal(err)
	}
	if d != nil {
		hold(d.at)
	}
	want := map[string]string{}
	for w, l := range fp {
		want[w] = strings.Join(l, ",")
	}
	c.setFailpoints(want)

	start := time.Now()
	id, err := c.bed.Migrate(c.ctx, machineID, dst)
	if err != nil {
		t.Fatal(err)
	}
	w := c.watch(id, src, srcVol)
	if d != nil {
		if _, err := c.bed.WaitState(c.ctx, id, 2*time.Minute, d.at); err != nil {
			w.close()
			t.Fatal(err)
		}
		if _, err := c.bed.Client.Propose(c.ctx, id, d.ev, "", fsm.EventPayload{Reason: "chaos: operator " + string(d.ev)}); err != nil {
			w.close()
			t.Fatalf("operator %s at %s: %v", d.ev, d.at, err)
		}
	}
	// Kill as soon as the state is committed.
	if _, err := c.bed.WaitState(c.ctx, id, 2*time.Minute, k.state); err != nil {
		w.close()
		t.Fatalf("the fault missed its state: %v (path %s)", err, w.path())
	}
	victim := k.who
	switch k.who {
	case "source", "target":
		victim = roleWorker[k.who]
	case "leader", "follower":
		victim = c.server(k.who)
	}
	killFrom := time.Now()
	c.kill9(victim)
	killTo := time.Now()
	extra := ""
	switch {
	case k.who == "leader":
		// The other two elect a leader; then the old one comes back as a follower.
		l, took := c.failover(victim, time.Minute)
		extra = fmt.Sprintf("; %s led after %v", l, took.Round(10*time.Millisecond))
		c.restart(victim)
	case k.who == "follower":
		// Stays dead to the end: two of three servers carry the migration.
		// Back for the next row even when this one fails.
		defer c.restart(victim)
	case k.lease:
		if stateAt(mustGet(c, id), killFrom).BeforeCutover() {
			// The server rolls a pre-cutover migration of a dead worker back.
			if _, err := c.bed.WaitState(c.ctx, id, time.Minute, fsm.RollingBack, fsm.RolledBack); err != nil {
				w.close()
				t.Fatalf("lease of the dead %s expired, no rollback: %v", k.who, err)
			}
		} else {
			time.Sleep(3 * leaseTTL)
		}
		c.restart(victim)
	default:
		time.Sleep(200 * time.Millisecond)
		c.restart(victim)
	}
	o := c.finish(id, machineID, src, dst, srcVol, ack, w, start, 4*time.Minute)
	at, missed := landedIn(o.final, k.state, killFrom, killTo, w.path())
	if missed != nil {
		return "", missed
	}
	t.Logf("%s: killed %s in %s%s, ended %s via %s, records %d/%d, source %s, %v", k.name(), victim, at, extra, o.final.State, w.path(), o.acked, o.present, o.frozenSame, o.took.Round(time.Millisecond))
	return fmt.Sprintf("| %s | %s %s | %s | %s | %s | %d/%d | %s | %s | %s |", k.state, k.who, victim, at, o.final.State,
		w.path(), o.acked, o.present, o.frozenSame, o.leaks, o.took.Round(100*time.Millisecond)), nil
}

// mustGet reads a migration, retrying through a failover.
func mustGet(c *cluster, id string) *fsm.Migration {
	c.t.Helper()
	m, err := c.bed.Client.GetMigration(c.ctx, id)
	if err != nil {
		c.t.Fatal(err)
	}
	return m
}
