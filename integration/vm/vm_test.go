package vm

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/internal/passphrase"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/luks"
)

// smokeScript is the guest's first check: dm-clone itself, driven by hand,
// before any ferry code runs. A failure here points at the harness, not at
// ferry's backends.
const smokeScript = `
set -e
echo "== smoke: dm-clone"
cd /tmp
dd if=/dev/urandom of=src.img bs=1M count=8 2>/dev/null
truncate -s 8M dst.img
truncate -s 4M meta.img
S=$(/usr/local/sbin/losetup -f --show src.img)
D=$(/usr/local/sbin/losetup -f --show dst.img)
M=$(/usr/local/sbin/losetup -f --show meta.img)
dmsetup create smoke --table "0 16384 clone $M $D $S 8 1 no_hydration"
dmsetup status smoke
/usr/local/sbin/blkdiscard -o 0 -l 1048576 /dev/mapper/smoke
st=$(dmsetup status smoke)
echo "after discard: $st"
case "$st" in *" 256/2048 "*) ;; *) echo "smoke: discard did not hydrate 256 regions"; exit 1 ;; esac
dmsetup message smoke 0 enable_hydration
i=0
until dmsetup status --noflush smoke | grep -q " 2048/2048 "; do
	i=$((i+1)); [ $i -lt 600 ] || { echo "smoke: hydration did not finish"; exit 1; }
	sleep 0.1
done
dmsetup remove smoke
cmp -n 1048576 /dev/zero $D
cmp $S $D 1048576 1048576
echo "== smoke: dm-clone ok"
`

// guestSuite is one test binary run inside the guest, and the tests in it
// that must report PASS (a SKIP there is a failure: the guest has every tool).
type guestSuite struct {
	pkg   string // import path relative to the module root, e.g. ./dmclone
	run   string // -test.run pattern
	needs []string
}

var guestSuites = []guestSuite{
	{pkg: "./dmclone", run: "Kernel", needs: []string{"TestKernel"}},
	{pkg: "./luks", run: "Kernel", needs: []string{"TestKernel"}},
	{pkg: "./datapath/kernel", run: "TestConformance", needs: []string{"TestConformance"}},
	// The userspace path's online growth, which the development host
	// (no CAP_SYS_RESOURCE) never shows: only its Extend cases.
	{pkg: "./datapath/userspace", run: "TestConformance/Extend", needs: []string{"TestConformance/Extend"}},
	{pkg: "./datapath/nbdexport", run: "Kernel", needs: []string{"TestKernel"}},
	{pkg: "./integration/vm", run: "TestGuest", needs: []string{"TestGuestISCSIKernelChain", "TestGuestKernelMigration",
		"TestGuestAgentKernelBackend", "TestGuestAgentMigration", "TestGuestLayers"}},
}

// selectedSuites applies FERRY_VM_GUEST_PKG (one suite's package, e.g.
// ./datapath/kernel) or FERRY_VM_GUEST_RUN (a -test.run pattern): when set,
// only that package's guest tests, or this package's guest tests matching
// the pattern, run, for a quick iteration.
func selectedSuites() []guestSuite {
	if pkg := os.Getenv("FERRY_VM_GUEST_PKG"); pkg != "" {
		for _, s := range guestSuites {
			if s.pkg == pkg {
				return []guestSuite{s}
			}
		}
	}
	pat := os.Getenv("FERRY_VM_GUEST_RUN")
	if pat == "" {
		return guestSuites
	}
	re := regexp.MustCompile(pat)
	s := guestSuite{pkg: "./integration/vm", run: pat}
	for _, n := range guestSuites[len(guestSuites)-1].needs {
		if re.MatchString(n) {
			s.needs = append(s.needs, n)
		}
	}
	return []guestSuite{s}
}

// goBin is the go command building the guest's test binaries.
func goBin() string {
	// go test puts its own GOROOT/bin first on the test's PATH.
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "go"
}

func moduleRoot(t *testing.T) string {
	out, err := exec.Command(goBin(), "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// needVM skips without root or the host tools the harness uses, naming them.
func needVM(t *testing.T) {
	t.Helper()
	testenv.Root(t, "apt-get download, depmod, qemu with 9p")
	for _, tool := range []string{QEMU, "cryptsetup", "apt-get", "apt-cache", "dpkg-deb", "make", "gcc", "modprobe", "depmod", "xz", "busybox", "ldd"} {
		_, err := lookTool(tool)
		testenv.Require(t, tool+": run scripts/deps.sh (scripts/packages.txt lists it)", err == nil)
	}
}

func testLogger(t *testing.T) zerolog.Logger {
	return zerolog.New(zerolog.NewTestWriter(t)).With().Timestamp().Str("component", "vm").Logger()
}

// prepare returns the kernel and initramfs, building what the cache lacks.
func prepare(t *testing.T, ctx context.Context) (*Kernel, string, time.Duration, time.Duration) {
	t.Helper()
	log := testLogger(t)
	t0 := time.Now()
	cache := CacheDir()
	k, err := PrepareKernel(ctx, log, cache)
	if err != nil {
		t.Fatal(err)
	}
	tKernel := time.Since(t0)
	initrd, err := BuildInitramfs(ctx, log, k, cache)
	if err != nil {
		t.Fatal(err)
	}
	return k, initrd, tKernel, time.Since(t0) - tKernel
}

// TestFailingGuestFailsTheRun proves the verdict path: a guest whose script
// fails must fail the run, with its exit code.
func TestFailingGuestFailsTheRun(t *testing.T) {
	needVM(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	k, initrd, _, _ := prepare(t, ctx)
	share := t.TempDir()
	if err := os.WriteFile(filepath.Join(share, "run.sh"), []byte("#!/bin/sh\necho guest-says-no\nexit 7\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	res, err := Boot(ctx, testLogger(t), BootConfig{Kernel: k, Initrd: initrd, Share: share, Timeout: 3 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if res.Passed() || res.GuestRC != 7 || res.ExitCode != 3 {
		t.Fatalf("failing guest: passed=%v guest rc %d qemu exit %d\n%s", res.Passed(), res.GuestRC, res.ExitCode, res.Console)
	}
	if err := res.Err(); err == nil || !strings.Contains(err.Error(), "guest-says-no") {
		t.Fatalf("error should carry the console tail: %v", err)
	}
	t.Logf("boot to init %s, whole boot %s (%s)", res.BootTime.Round(time.Millisecond), res.Total.Round(time.Millisecond), res.Accel)
}

// guestTimeout bounds the guest's whole run: under TCG on cores the rest of
// the suite shares it took 4 to 7 minutes on a busy 2-core host, 8 to 9
// with more load.
const guestTimeout = 15 * time.Minute

func TestKernelPathInVM(t *testing.T) {
	needVM(t)
	// The guest's own bound, and the kernel, initramfs and test binaries
	// built before it boots (about a minute).
	ctx, cancel := context.WithTimeout(context.Background(), guestTimeout+5*time.Minute)
	defer cancel()
	log := testLogger(t)
	t0 := time.Now()
	k, initrd, tKernel, tInitrd := prepare(t, ctx)
	cache := CacheDir()

	share := t.TempDir()
	root := moduleRoot(t)
	var script strings.Builder
	script.WriteString("#!/bin/sh\ncd /tmp\nfail=0\n")
	// A file of its own: set -e is ignored inside "( ... ) || ...".
	if err := os.WriteFile(filepath.Join(share, "smoke.sh"), []byte(smokeScript), 0o755); err != nil {
		t.Fatal(err)
	}
	script.WriteString("sh /host/smoke.sh || { echo 'SUITE smoke FAIL'; fail=1; }\n")
	t1 := time.Now()
	var suites []guestSuite
	// The ferry binary itself: the guest runs a server and agents.
	fb := exec.CommandContext(ctx, goBin(), "build", "-o", filepath.Join(share, "ferry"), "./cmd/ferry")
	fb.Dir = root
	fb.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=")
	if out, err := fb.CombinedOutput(); err != nil {
		t.Fatalf("building ferry for the guest: %v\n%s", err, out)
	}
	for _, s := range selectedSuites() {
		if _, err := os.Stat(filepath.Join(root, s.pkg)); err != nil {
			t.Fatalf("guest suite %s: %v", s.pkg, err)
		}
		name := filepath.Base(s.pkg) + ".test"
		cmd := exec.CommandContext(ctx, goBin(), "test", "-c", "-o", filepath.Join(share, name), s.pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building guest test binary %s: %v\n%s", s.pkg, err, out)
		}
		if _, err := os.Stat(filepath.Join(share, name)); err != nil {
			t.Fatalf("%s has no tests to run in the guest", s.pkg)
		}
		suites = append(suites, s)
		fmt.Fprintf(&script, "echo '== suite %s'\n(cd /tmp && FERRY_IN_VM=1 /host/%s -test.v -test.count=1 -test.timeout=10m -test.run '%s') || { echo 'SUITE %s FAIL'; fail=1; }\n",
			name, name, s.run, name)
	}
	tBuild := time.Since(t1)
	script.WriteString("exit $fail\n")
	if err := os.WriteFile(filepath.Join(share, "run.sh"), []byte(script.String()), 0o755); err != nil {
		t.Fatal(err)
	}

	export := startGuestExport(t, ctx, share)
	res, err := Boot(ctx, log, BootConfig{Kernel: k, Initrd: initrd, Share: share, Timeout: guestTimeout})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-export.Done():
		t.Errorf("ferry's iSCSI export ended while the guest used it: %v", export.Err())
	default:
	}
	t.Logf("timings: kernel %s, initramfs %s, guest test binaries %s, boot %s (%s), guest total %s, whole %s",
		tKernel.Round(time.Millisecond), tInitrd.Round(time.Millisecond), tBuild.Round(time.Millisecond),
		res.BootTime.Round(time.Millisecond), res.Accel, res.Total.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
	consoleLog := filepath.Join(cache, "last-console.log")
	_ = os.WriteFile(consoleLog, []byte(res.Console), 0o644)
	t.Logf("guest console: %s", consoleLog)
	if os.Getenv("FERRY_VM_CONSOLE") != "" {
		t.Log(res.Console)
	}
	if b, err := os.ReadFile(filepath.Join(share, layersReport)); err == nil {
		t.Logf("the data path per layer, measured in the guest (TestGuestLayers):\n%s", b)
	}
	// Name the failing suites and their failures first: the console tail in
	// res.Err shows only the last suite, which may well have passed.
	if strings.Contains(res.Console, "SUITE smoke FAIL") {
		_, out, _ := strings.Cut(res.Console, "== smoke: dm-clone\n")
		out, _, _ = strings.Cut(out, "SUITE smoke FAIL")
		t.Errorf("the dm-clone smoke script failed:\n%s", out)
	}
	for _, s := range suites {
		name := filepath.Base(s.pkg) + ".test"
		if strings.Contains(res.Console, "SUITE "+name+" FAIL") {
			t.Errorf("guest suite %s failed:\n%s", s.pkg, failureLines(suiteOutput(res.Console, name)))
		}
	}
	if err := res.Err(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(res.Console, "== smoke: dm-clone ok") {
		t.Errorf("smoke test did not report success")
	}
	for _, s := range suites {
		out := suiteOutput(res.Console, filepath.Base(s.pkg)+".test")
		for _, n := range s.needs {
			// Every matching test must have passed, and at least one ran.
			pass := regexp.MustCompile(`(?m)^\s*--- PASS: `+n+`\S*`).FindAllString(out, -1)
			bad := regexp.MustCompile(`(?m)^\s*--- (SKIP|FAIL): `+n+`\S*`).FindAllString(out, -1)
			if len(pass) == 0 || len(bad) > 0 {
				t.Errorf("%s: tests %s*: passed %v, skipped/failed %v", s.pkg, n, pass, bad)
			} else {
				t.Logf("%s in guest: %d passed: %s", s.pkg, len(pass), strings.Join(trimAll(pass), ", "))
			}
		}
	}
}

// startGuestExport makes a LUKS2 volume with a 4 MiB header (the layout of
// "another cryptsetup version"), writes random plaintext into it through
// ferry's userspace view, exports it with ferry's iSCSI export on the host,
// and tells the guest where to find it (slirp: the host is 10.0.2.2).
func startGuestExport(t *testing.T, ctx context.Context, share string) *iscsi.Export {
	t.Helper()
	image := filepath.Join(share, "volume.img")
	keyFile := filepath.Join(share, "key")
	pass := passphrase.New()
	if err := os.WriteFile(keyFile, pass, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(image, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(image, 20<<20); err != nil {
		t.Fatal(err)
	}
	if err := luks.Format(ctx, image, keyFile, luks.FormatOptions{MetadataSize: 16 << 10, KeyslotsSize: 4<<20 - 32<<10, FastKDF: true}); err != nil {
		t.Fatal(err)
	}
	dev, err := blockdev.OpenFile(image, false)
	if err != nil {
		t.Fatal(err)
	}
	view, layout, err := luks.OpenHeaderView(dev, pass)
	if err != nil {
		t.Fatal(err)
	}
	plain := make([]byte, view.Size())
	_, _ = rand.Read(plain)
	if _, err := view.WriteAt(plain, 0); err != nil {
		t.Fatal(err)
	}
	if err := view.Close(); err != nil {
		t.Fatal(err)
	}
	if layout.DataOffset != 4<<20 {
		t.Fatalf("test volume has data offset %d, want 4 MiB", layout.DataOffset)
	}
	if err := os.WriteFile(filepath.Join(share, "plain.img"), plain, 0o600); err != nil {
		t.Fatal(err)
	}
	e, err := iscsi.StartExport(ctx, testLogger(t), iscsi.ExportConfig{
		Path: image, Listen: "127.0.0.1:0", Allow: []string{"127.0.0.1"},
		IQN:      iscsi.MigrationIQN("dev.ferry.vm", "m"+suffix(), time.Now()),
		StateDir: filepath.Join(t.TempDir(), "export"), LogLevel: "warn",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Stop() })
	_, port, _ := net.SplitHostPort(e.Portal())
	g := guestISCSI{Portal: "10.0.2.2:" + port, IQN: e.IQN(), Layout: layout, KeyFile: "/host/key",
		Plain: "/host/plain.img", Cipher: "/host/volume.img"}
	b, _ := json.Marshal(g)
	if err := os.WriteFile(filepath.Join(share, guestISCSIFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return e
}

func suffix() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// suiteOutput is the console between "== suite <name>" and the next marker.
func suiteOutput(console, name string) string {
	_, rest, ok := strings.Cut(console, "== suite "+name+"\n")
	if !ok {
		return ""
	}
	if i := strings.Index(rest, "== suite "); i >= 0 {
		rest = rest[:i]
	}
	return rest
}

// failureLines picks out of a test binary's -v output what explains a
// failure: FAIL lines, panics, t.Error/t.Fatal messages (file.go:N:) and
// their following lines, capped, then the last lines of the output.
func failureLines(out string) string {
	lines := strings.Split(out, "\n")
	var b strings.Builder
	picked, follow := 0, 0
	for _, l := range lines {
		tl := strings.TrimSpace(l)
		hit := strings.HasPrefix(tl, "--- FAIL") || strings.HasPrefix(tl, "panic:") ||
			strings.HasPrefix(tl, "FAIL") || testMessage.MatchString(tl)
		if hit {
			follow = 3
		} else if follow > 0 {
			follow--
			hit = true
		}
		if hit && picked < 120 {
			b.WriteString(l + "\n")
			picked++
		}
	}
	b.WriteString("--- last lines ---\n")
	if len(lines) > 25 {
		lines = lines[len(lines)-25:]
	}
	b.WriteString(strings.Join(lines, "\n"))
	return b.String()
}

// testMessage is the head of a t.Error or t.Fatal line: "name_test.go:12: ".
var testMessage = regexp.MustCompile(`^\w+_test\.go:\d+: `)

func trimAll(ss []string) []string {
	for i := range ss {
		ss[i] = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(ss[i]), "--- PASS: "))
	}
	return ss
}
