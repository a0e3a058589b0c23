// Package browsertest starts Debian's headless Chromium for the tests that
// drive ferry's console in a real browser (chromedp), the same way each time.
package browsertest

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/chromedp/chromedp"

	"github.com/ferry-dev/ferry/internal/testenv"
)

// ScreenshotsEnv names the folder Screenshot writes into (docs/ui when the
// docs' pictures are made); unset, Screenshot does nothing.
const ScreenshotsEnv = "FERRY_UI_SCREENSHOTS"

// Chromium finds Debian's chromium; without it the test skips, or fails in
// strict mode, naming the package.
func Chromium(t testing.TB) string {
	t.Helper()
	for _, name := range []string{"chromium", "/usr/bin/chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	testenv.Require(t, "chromium: install Debian's chromium (apt-get install -y chromium; it is in scripts/packages.txt)", false)
	return ""
}

// Start launches a headless Chromium with a fresh profile and returns the
// browser's context, closed when the test ends. The flags keep it off the
// network (this machine's closed network refuses its background traffic)
// and let it run as root in a container.
func Start(t testing.TB, extra ...chromedp.ExecAllocatorOption) context.Context {
	t.Helper()
	opts := append([]chromedp.ExecAllocatorOption{
		chromedp.ExecPath(Chromium(t)),
		chromedp.Headless,
		chromedp.NoSandbox, // root in a container: chromium's sandbox needs user namespaces it may not get
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1400, 1000),
	}, extra...)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancelAlloc)
	bctx, cancelBrowser := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	t.Cleanup(cancelBrowser)
	return bctx
}

// Screenshot saves a full-page PNG as name.png in $FERRY_UI_SCREENSHOTS,
// when that is set.
func Screenshot(name string) chromedp.Action[chromedp.Void] {
	return chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
		dir := os.Getenv(ScreenshotsEnv)
		if dir == "" {
			return nil
		}
		png, err := chromedp.FullScreenshot(100)(ctx, tg) // quality 100 makes a PNG
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dir, name+".png"), png, 0o644)
	})
}
