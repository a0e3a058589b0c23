// Package ui drives the on-call console (`ferry ui`) in headless chromium
// against a cluster with real agents: a server and two agents in network
// namespaces, a LUKS2 volume with a writing machine, a real migration.
// Needs root; CI runs it as root.
package ui

import (
	"context"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/console"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/browsertest"
	"github.com/ferry-dev/ferry/internal/testbed"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/internal/tlsutil"
)

var ferryBin string

func TestMain(m *testing.M) {
	os.Exit(testbed.RunRaceBuilt(m, "ui", &ferryBin))
}

// The volume is small: the test watches the page, not the data path.
const volSize = 64 << 20

// TestConsoleFollowsARealMigration opens the console on a cluster with two
// real agents and watches, in one tab that never reloads, a migration go
// from planned to completed; in a second tab it asks for an abort past
// cutover and sees the servers refuse it with their reason.
// FERRY_UI_SCREENSHOTS=DIR saves screenshots there (docs/ui.md shows them).
func TestConsoleFollowsARealMigration(t *testing.T) {
	browsertest.Chromium(t) // before the cluster: a missing browser fails at once
	testenv.Root(t, "network namespaces, loop devices, mounts")
	testenv.Tools(t, "run scripts/deps.sh", "cryptsetup", "mkfs.ext4", "nsenter", "losetup", "fstrim", "fusermount3", "ip")
	testenv.Paths(t, "modprobe fuse", "/dev/fuse")

	id := testbed.RandHex(2)
	src, dst := "w0"+id, "w1"+id
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bed, err := testbed.Start(ctx, testbed.Config{Dir: dir, Exe: ferryBin, Prefix: "u" + id, Workers: []string{src, dst},
		Log: zerolog.Nop(), Grace: time.Minute})
	if err != nil {
		if bed != nil {
			t.Log(bed.DumpLogs(40))
		}
		t.Fatalf("start cluster: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(bed.DumpLogs(60))
		}
		cctx, ccancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer ccancel()
		if err := bed.Close(cctx); err != nil {
			t.Errorf("cleanup: %v", err)
		}
		if left := bed.Leftovers(); len(left) > 0 {
			t.Errorf("left behind: %v", left)
		}
	})
	// The target holds the migration in planned long enough for the page
	// to show it, and holds hydration past cutover long enough to ask for
	// an abort there; both only delay a proposal, the steps are real.
	if err := bed.Kill("agent/"+dst, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := bed.StartAgentEnv(dst, []string{"FERRY_FAILPOINT_PAUSE_BEFORE=target_prepared=5s,hydrated=20s"}); err != nil {
		t.Fatal(err)
	}
	if err := bed.CreateVolume(ctx, "vol1", src, volSize); err != nil {
		t.Fatal(err)
	}
	if _, err := bed.RunRecords(ctx, "mach1", src, "vol1", 7); err != nil {
		t.Fatal(err)
	}

	// The console, as `ferry ui` runs it, with the operator's certificate;
	// it reaches the servers from the control namespace.
	tc, err := tlsutil.ClientConfig(bed.TLSDir(), "operator")
	if err != nil {
		t.Fatal(err)
	}
	con, err := console.New(console.Config{Servers: bed.ServerAddrs, TLS: tc, Log: zerolog.Nop(), Dial: bed.DialIn("ctl")})
	if err != nil {
		t.Fatal(err)
	}
	defer con.Close()
	ln, err := console.Listen("127.0.0.1:0", false)
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- con.Serve(sctx, ln) }()
	defer func() {
		stop()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()
	base := "http://" + ln.Addr().String()

	bctx := browsertest.Start(t,
		// The watching tab is in the background while the other acts.
		chromedp.Flag("disable-background-timer-throttling", true),
		chromedp.Flag("disable-renderer-backgrounding", true),
	)
	// The browser lives as long as the context of its first run.
	if err := chromedp.Do(bctx, chromedp.Navigate("about:blank")); err != nil {
		t.Fatalf("starting chromium: %v", err)
	}
	watch, cancelWatch := chromedp.NewContext(bctx) // tab 1: the fleet page, never reloaded
	defer cancelWatch()
	act, cancelAct := chromedp.NewContext(bctx) // tab 2: the abort, then the migration's page
	defer cancelAct()
	// A tab, too, lives as long as the context of its first run: open each
	// on its own context, so that every step may have its own timeout.
	for _, tab := range []context.Context{watch, act} {
		if err := chromedp.Do(tab, chromedp.Navigate("about:blank")); err != nil {
			t.Fatalf("opening a tab: %v", err)
		}
	}

	shot := browsertest.Screenshot
	do := func(tab context.Context, what string, timeout time.Duration, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		sctx, cancel := context.WithTimeout(tab, timeout)
		defer cancel()
		if err := chromedp.Do(sctx, steps...); err != nil {
			loc, _ := chromedp.Run(tab, chromedp.Location())
			body, _ := chromedp.Run(tab, chromedp.Evaluate[string](`document.body ? document.body.innerText : ""`))
			m, merr := bed.Client.GetMigration(ctx, "mig1")
			t.Fatalf("%s: %v\nmigration now: %+v (%v)\nbrowser at %s showing:\n%s", what, err, m, merr, loc, body)
		}
	}
	visible := func(sel string) chromedp.Action[chromedp.Void] { return chromedp.WaitVisible(chromedp.CSS(sel)) }
	eval := func(tab context.Context, js string) {
		t.Helper()
		ectx, cancel := context.WithTimeout(tab, 30*time.Second)
		defer cancel()
		if _, err := chromedp.Run(ectx, chromedp.Evaluate[bool](js)); err != nil {
			t.Fatalf("%s: %v", js, err)
		}
	}

	// Tab 1: the fleet page, live, with a recorder of every state the
	// page shows for the migration (the event stream replaces the rows).
	do(watch, "fleet page", 30*time.Second,
		chromedp.Navigate(base+"/"),
		visible(`#worker-`+src),
		visible(`#worker-`+dst),
		chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
			_, err := chromedp.Poll[bool](`document.getElementById("migrations-status").textContent.startsWith("Live")`,
				chromedp.WithPollingTimeout(20*time.Second))(ctx, tg)
			return err
		}),
	)
	eval(watch, `(() => {
		window.notReloaded = true;
		window.seen = [];
		const note = () => {
			const row = document.getElementById("mig-mig1");
			const st = row ? row.dataset.state : "";
			if (st && window.seen[window.seen.length - 1] !== st) window.seen.push(st);
		};
		new MutationObserver(note).observe(document.body, {subtree: true, childList: true, attributes: true});
		note();
		return true;
	})()`)

	if _, err := bed.Client.CreateMigration(ctx, api.PlanRequest{ID: "mig1", Machine: "mach1", Target: dst}); err != nil {
		t.Fatal(err)
	}
	do(watch, "planned on the page", 30*time.Second,
		visible(`#mig-mig1[data-state="planned"] li[data-state="planned"][aria-current="step"]`))
	do(watch, "past cutover on the page", 3*time.Minute,
		visible(`#mig-mig1[data-state="hydrating"]`), shot("live-fleet"))

	// Tab 2: an abort past cutover; the servers refuse it, in their words.
	do(act, "abort past cutover", time.Minute,
		chromedp.Navigate(base+"/migrations/mig1/abort"),
		visible(`.warning`),
		chromedp.SendKeys(chromedp.CSS(`#confirm`), "mig1"),
		chromedp.Click(chromedp.CSS(`#abort-submit`)),
		visible(`#outcome`),
		shot("live-abort-refused"),
	)
	tctx, tcancel := context.WithTimeout(act, 30*time.Second)
	defer tcancel()
	out, err := chromedp.Run(tctx, chromedp.Text(chromedp.CSS(`#outcome`)))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "The servers refused") || !strings.Contains(out, fsm.CodePastCutover) || !strings.Contains(out, "cutover") {
		t.Fatalf("refusal shown: %q", out)
	}
	if m, err := bed.Client.GetMigration(ctx, "mig1"); err != nil || !m.State.AfterCutover() {
		t.Fatalf("after the refused abort: %+v %v, want a state after cutover", m, err)
	}

	// Tab 1 sees it complete, without a reload.
	do(watch, "completed on the page", 3*time.Minute, visible(`#mig-mig1[data-state="completed"]`))
	wctx, wcancel := context.WithTimeout(watch, 30*time.Second)
	defer wcancel()
	seen, err := chromedp.Run(wctx, chromedp.Evaluate[[]string](`window.notReloaded === true ? window.seen : null`))
	if err != nil {
		t.Fatal(err)
	}
	if seen == nil {
		t.Fatal("the fleet page reloaded instead of updating from the event stream")
	}
	t.Logf("states the fleet page showed: %v", seen)
	if len(seen) < 3 || seen[0] != string(fsm.Planned) || !slices.Contains(seen, string(fsm.Hydrating)) ||
		seen[len(seen)-1] != string(fsm.Completed) || slices.Contains(seen, string(fsm.RollingBack)) {
		t.Fatalf("the page showed %v, want planned first, hydrating, completed last and no rollback", seen)
	}
	// Every state the page showed is one the migration went through, in order.
	m, err := bed.Client.GetMigration(ctx, "mig1")
	if err != nil {
		t.Fatal(err)
	}
	for i, s := range seen {
		at, ok := m.EnteredAt[fsm.State(s)]
		if !ok {
			t.Fatalf("the page showed %s, which the migration never entered (%v)", s, m.EnteredAt)
		}
		if i > 0 && at.Before(m.EnteredAt[fsm.State(seen[i-1])]) {
			t.Fatalf("the page showed %s after %s, out of order (%v)", s, seen[i-1], m.EnteredAt)
		}
	}
	mach, err := bed.Client.GetMachine(ctx, "mach1")
	if err != nil || mach.Worker != dst {
		t.Fatalf("machine after the migration: %+v %v", mach, err)
	}

	// The migration's own page, completed, with its timeline.
	do(act, "migration page", 30*time.Second,
		chromedp.Navigate(base+"/migrations/mig1"),
		visible(`li[data-state="completed"]`),
		shot("live-migration"),
	)
}
