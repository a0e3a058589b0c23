package console

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/browsertest"
)

// chromium finds Debian's chromium. Without it the browser test skips, or
// fails under CI or FERRY_REQUIRE, where a skip would hide a missing install.
// TestBrowser drives headless chromium through the console: the fleet page,
// a migration's state changing live over server-sent events, and the abort
// flow (a refusal past cutover in the server's words, a wrong confirmation,
// then an accepted abort), and a drain. FERRY_UI_SCREENSHOTS=DIR saves screenshots there.
func TestBrowser(t *testing.T) {
	browsertest.Chromium(t) // before the fleet: a missing browser fails at once
	f := newFleet(t)
	ln, err := Listen("127.0.0.1:0", false)
	if err != nil {
		t.Fatal(err)
	}
	sctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- f.console.Serve(sctx, ln) }()
	t.Cleanup(func() {
		stop()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	base := "http://" + ln.Addr().String()

	bctx := browsertest.Start(t)
	// The whole walk; each step has its own 30 s. Two minutes ran out on a
	// CI host busy with the cluster tests (CI37: 129.8 s, in the last step).
	ctx, cancel := context.WithTimeout(bctx, 5*time.Minute)
	defer cancel()

	shot := browsertest.Screenshot
	do := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := chromedp.Do(sctx, steps...); err != nil {
			// Say where the browser is and what it shows.
			loc, _ := chromedp.Run(ctx, chromedp.Location())
			body, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.body ? document.body.innerText : ""`))
			t.Fatalf("%s: %v\nbrowser at %s showing:\n%s", what, err, loc, body)
		}
	}
	text := func(sel string) string {
		t.Helper()
		s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
		if err != nil {
			t.Fatalf("text of %s: %v", sel, err)
		}
		return s
	}
	visible := func(sel string) chromedp.Action[chromedp.Void] { return chromedp.WaitVisible(chromedp.CSS(sel)) }
	liveSince := func(id string) chromedp.Action[chromedp.Void] {
		return chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
			_, err := chromedp.Poll[bool](`document.getElementById("`+id+`").textContent.startsWith("Live")`,
				chromedp.WithPollingTimeout(20*time.Second))(ctx, tg)
			return err
		})
	}

	// The browser lives as long as the context of the first run: start it on
	// the test's context, so each step may have its own timeout.
	if err := chromedp.Do(ctx, chromedp.Navigate("about:blank")); err != nil {
		t.Fatalf("starting chromium: %v", err)
	}

	// The fleet page, then a change on the servers shows up without a reload.
	do("fleet page",
		chromedp.Navigate(base+"/"),
		visible(`#mig-m1[data-state="planned"] li[data-state="planned"][aria-current="step"]`),
		visible(`#worker-w-src`),
		visible(`#server-s0`),
		liveSince("migrations-status"), // the event stream is open
		chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
			_, err := chromedp.Evaluate[bool](`window.notReloaded = true`)(ctx, tg)
			return err
		}),
		shot("fleet"),
	)
	if h := text("h1"); h != "Fleet" {
		t.Fatalf("heading %q", h)
	}
	f.propose(t, "m1", f.dst, fsm.EvTargetPrepared, f.targetPrepared(t, "m1"))
	f.propose(t, "m1", f.src, fsm.EvSourceStopped, fsm.EventPayload{})
	do("live update", visible(`#mig-m1[data-state="source_stopped"] li[data-state="source_stopped"][aria-current="step"]`))
	if same, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`window.notReloaded === true`)); err != nil || !same {
		t.Fatalf("the page reloaded instead of updating from the event stream (%v)", err)
	}
	if live := text("#migrations-status"); !strings.HasPrefix(live, "Live; updated") {
		t.Fatalf("live status %q", live)
	}

	// Abort past cutover: the plan warns, the servers refuse, their words show.
	do("abort past cutover",
		chromedp.Navigate(base+"/migrations/m2/abort"),
		visible(`.warning`),
		chromedp.SendKeys(chromedp.CSS(`#confirm`), "m2"),
		chromedp.Click(chromedp.CSS(`#abort-submit`)),
		visible(`#outcome`),
		shot("abort-refused"),
	)
	if out := text("#outcome"); !strings.Contains(out, "The servers refused") || !strings.Contains(out, fsm.CodePastCutover) || !strings.Contains(out, "cutover") {
		t.Fatalf("refusal shown: %q", out)
	}

	// Abort before cutover: a wrong confirmation sends nothing, the right one applies.
	do("abort with a wrong confirmation",
		chromedp.Navigate(base+"/migrations/m1/abort"),
		visible(`#confirm`),
		chromedp.SendKeys(chromedp.CSS(`#confirm`), "m"),
		chromedp.Click(chromedp.CSS(`#abort-submit`)),
		visible(`#confirm-problem`),
	)
	if p := text("#confirm-problem"); !strings.Contains(p, "Nothing was sent") {
		t.Fatalf("wrong confirmation: %q", p)
	}
	if m, err := f.op.GetMigration(ctx, "m1"); err != nil || m.State != fsm.SourceStopped {
		t.Fatalf("after a wrong confirmation: %+v %v", m, err)
	}
	do("abort",
		chromedp.Clear(chromedp.CSS(`#confirm`)),
		chromedp.SendKeys(chromedp.CSS(`#confirm`), "m1"),
		shot("abort-plan"),
		chromedp.Click(chromedp.CSS(`#abort-submit`)),
		visible(`#outcome`),
	)
	if out := text("#outcome"); !strings.Contains(out, "Abort accepted") || !strings.Contains(out, "rolling_back") {
		t.Fatalf("abort outcome: %q", out)
	}
	if m, err := f.op.GetMigration(ctx, "m1"); err != nil || m.State != fsm.RollingBack {
		t.Fatalf("after abort: %+v %v", m, err)
	}
	// The migration's own page follows the rollback live.
	do("migration page",
		chromedp.Navigate(base+"/migrations/m1"),
		visible(`li[data-state="rolling_back"][aria-current="step"]`),
		liveSince("migration-status"),
	)
	f.propose(t, "m1", f.dst, fsm.EvTargetTornDown, fsm.EventPayload{})
	f.propose(t, "m1", f.src, fsm.EvSourceRestored, fsm.EventPayload{})
	do("rolled back live", visible(`li[data-state="rolled_back"].done`), shot("migration"))

	// Drain w-src: mach1 is free again (mach2 is on w-dst since cutover).
	do("drain",
		chromedp.Navigate(base+"/workers/w-src/drain"),
		visible(`#drain-mach1`),
		chromedp.SendKeys(chromedp.CSS(`#confirm`), "w-src"),
		shot("drain-plan"),
		chromedp.Click(chromedp.CSS(`#drain-submit`)),
		visible(`#outcome`),
	)
	if out := text("#outcome"); !strings.Contains(out, "recorded: w-src is cordoned") {
		t.Fatalf("drain outcome: %q", out)
	}
	// The servers run the drain: its progress shows up live.
	do("drain progress", liveSince("drained-status"), chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
		_, err := chromedp.Poll[bool](`document.getElementById("drained").textContent.includes("1 machine started")`,
			chromedp.WithPollingTimeout(20*time.Second))(ctx, tg)
		return err
	}), shot("drain-progress"))
}
