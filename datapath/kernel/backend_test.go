package kernel

import (
	"bufio"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/dmclone"
	"github.com/ferry-dev/ferry/internal/testenv"
	"github.com/ferry-dev/ferry/luks"
)

// The kernel backend's device work runs in the VM (integration/vm:
// TestGuestAgentKernelBackend); these tests cover its parsing, naming and
// the open-iscsi wrapper's decisions against a fake sysfs and iscsiadm.

func TestParseCloneTable(t *testing.T) {
	cfg, err := parseCloneTable("0 65536 clone 7:2 7:1 8:0 8 1 no_hydration 4 hydration_threshold 4096 hydration_batch_size 256")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Size != 65536*512 || cfg.Meta != "7:2" || cfg.Dest != "7:1" || cfg.Source != "8:0" || cfg.RegionSize != 4096 {
		t.Fatalf("parsed %+v", cfg)
	}
	for _, bad := range []string{"", "0 65536 linear 7:1 0", "0 x clone 7:2 7:1 8:0 8", "0 65536 clone 7:2 7:1 8:0 0", "0 65536 clone 7:2"} {
		if _, err := parseCloneTable(bad); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
	if tableTarget("0 65536 linear 7:1 0") != "linear" || tableTarget("junk") != "" {
		t.Fatal("tableTarget")
	}
}

func TestTargetsListClone(t *testing.T) {
	if !targetsListClone("crypt            v1.24.0\nclone            v1.0.0\nlinear           v1.4.0\n") {
		t.Fatal("clone not seen")
	}
	if targetsListClone("crypt v1.24.0\nclonex v1\nlinear v1.4.0\n") || targetsListClone("") {
		t.Fatal("clone seen where there is none")
	}
}

func TestDeviceNamesCarryTheVolume(t *testing.T) {
	// Two workers' volumes on one host: names differ by volume id.
	if CryptName("vol1") == CryptName("vol1-0a1b2c3d") || CloneName("vol1") == CloneName("vol1-0a1b2c3d") {
		t.Fatal("names collide")
	}
	if !strings.Contains(CloneName("vol1-0a1b2c3d"), "vol1-0a1b2c3d") || !strings.Contains(CryptName("v9"), "v9") {
		t.Fatal("names lack the volume id")
	}
	for _, bad := range []string{"", "a b", "a/b", strings.Repeat("x", 120)} {
		if checkVolumeName(bad) == nil {
			t.Errorf("volume id %q accepted", bad)
		}
	}
	if err := checkVolumeName("vol1-0a1b2c3d"); err != nil {
		t.Fatal(err)
	}
}

func TestKernelProgress(t *testing.T) {
	p := kernelProgress(dmclone.Progress{RegionSize: 4096, TotalRegions: 100, HydratedRegions: 25, HydrationEnabled: true,
		RateBPS: 1 << 20, ETA: 2 * time.Second, Stalled: true, StalledReason: "x"})
	if p.TotalBytes != 409600 || p.HydratedBytes != 102400 || p.RateBPS != 1<<20 || p.ETASeconds != 2 || !p.Stalled || p.StalledReason != "x" {
		t.Fatalf("%+v", p)
	}
	h := &kernelHandle{vol: "v"}
	st, err := h.Status(context.Background())
	if err != nil || !st.Complete || !st.Dissolved {
		t.Fatalf("dissolved handle: %+v %v", st, err)
	}
	if err := h.EnableHydration(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// fakeSession makes /sys/class/iscsi_session/sessionN for iqn with one disk.
func fakeSession(t *testing.T, root, n, iqn, disk string) {
	t.Helper()
	s := filepath.Join(root, "class", "iscsi_session", "session"+n)
	if err := os.MkdirAll(filepath.Join(s, "device", "target2:0:0", "2:0:0:0", "block", disk), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(s, "targetname"), []byte(iqn+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
}

type fakeIscsiadm struct {
	mu      sync.Mutex
	calls   []string
	fail    map[string]error // by the last argument
	onLogin func()           // if set, runs at each --login (the session appears)
}

func (f *fakeIscsiadm) run(_ context.Context, args ...string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, strings.Join(args, " "))
	if err := f.fail[args[len(args)-1]]; err != nil {
		return "", err
	}
	if f.onLogin != nil && args[len(args)-1] == "--login" {
		f.onLogin()
	}
	return "", nil
}

func TestOpenISCSILoginFindsDiskBySession(t *testing.T) {
	root := t.TempDir()
	fake := &fakeIscsiadm{}
	o := &OpenISCSI{Log: zerolog.Nop(), SysRoot: root, DiskTimeout: 300 * time.Millisecond, run: fake.run}
	const iqn = "iqn.2026-11.dev.ferry:mig-1"
	// Another session's disk must not be taken for ours.
	fakeSession(t, root, "1", "iqn.2026-11.dev.ferry:other", "sdz")
	// The disk never appears for our login: a clear timeout.
	if _, err := o.Login(context.Background(), "10.0.0.2:3260", iqn); err == nil || !strings.Contains(err.Error(), "no disk") {
		t.Fatalf("login without a disk: %v", err)
	}
	want := []string{"-m node -T " + iqn + " -p 10.0.0.2:3260 -o new", "-m node -T " + iqn + " -p 10.0.0.2:3260 --login"}
	if strings.Join(fake.calls, "|") != strings.Join(want, "|") {
		t.Fatalf("calls %q, want %q", fake.calls, want)
	}
	// Our session's disk is found through sysfs (the device node is
	// checked too: point /dev at something that exists via the fake).
	fakeSession(t, root, "2", iqn, "null")
	fake.calls = nil
	d, err := o.Login(context.Background(), "10.0.0.2:3260", iqn)
	if err != nil || d != "/dev/null" {
		t.Fatalf("adopting the session: %q %v", d, err)
	}
	if len(fake.calls) != 0 {
		t.Fatalf("an existing session was logged into again: %q", fake.calls)
	}
	if d, err := o.Disk("iqn.2026-11.dev.ferry:other"); err != nil || d != "/dev/sdz" {
		t.Fatalf("other session: %q %v", d, err)
	}
}

func TestOpenISCSIToleratesAlreadyDone(t *testing.T) {
	root := t.TempDir()
	const iqn = "iqn.2026-11.dev.ferry:mig-2"
	fake := &fakeIscsiadm{fail: map[string]error{
		"--login": &iscsiExitError{code: iscsiErrSessExists, err: errors.New("session exists")},
		"delete":  &iscsiExitError{code: iscsiErrNoObjs, err: errors.New("no records")},
	}}
	// The session shows up later, as the kernel's would; the login waits
	// for it up to DiskTimeout, generous for a loaded host.
	o := &OpenISCSI{Log: zerolog.Nop(), SysRoot: root, DiskTimeout: 10 * time.Second, run: fake.run}
	go func() {
		time.Sleep(100 * time.Millisecond)
		fakeSession(t, root, "3", iqn, "null")
	}()
	if d, err := o.Login(context.Background(), "[fd00:fe::11]:3260", iqn); err != nil || d != "/dev/null" {
		t.Fatalf("login when iscsiadm says the session exists: %q %v", d, err)
	}
	// Logout with no session left: only the record is deleted, and a
	// missing record is fine.
	os.RemoveAll(filepath.Join(root, "class"))
	fake.calls = nil
	if err := o.Logout(context.Background(), "[fd00:fe::11]:3260", iqn); err != nil {
		t.Fatal(err)
	}
	if len(fake.calls) != 1 || !strings.HasSuffix(fake.calls[0], "-o delete") {
		t.Fatalf("calls %q", fake.calls)
	}
	// A real login failure is an error naming iscsid.
	fake.fail["--login"] = &iscsiExitError{code: 8, err: errors.New("timeout")}
	if _, err := o.Login(context.Background(), "10.0.0.9:3260", "iqn.x:y"); err == nil || !strings.Contains(err.Error(), "iscsid") {
		t.Fatalf("failed login: %v", err)
	}
	if _, err := o.Login(context.Background(), "", "iqn.x:y"); err == nil {
		t.Fatal("empty portal accepted")
	}
}

// FuzzParseCloneTable: a live table read back after an agent restart never
// panics the agent, and what it accepts is a usable clone configuration.
func FuzzParseCloneTable(f *testing.F) {
	f.Add("0 65536 clone 7:2 7:1 8:0 8 1 no_hydration 4 hydration_threshold 4096 hydration_batch_size 256")
	f.Add("0 81920 clone /dev/loop2 /dev/loop1 /dev/sda 8 0")
	f.Add("0 65536 linear 7:1 0")
	f.Fuzz(func(t *testing.T, table string) {
		cfg, err := parseCloneTable(table)
		if err != nil {
			return
		}
		if cfg.Size <= 0 || cfg.Size%512 != 0 || cfg.RegionSize <= 0 || cfg.Meta == "" || cfg.Dest == "" || cfg.Source == "" {
			t.Fatalf("accepted %q as %+v", table, cfg)
		}
	})
}

func TestInInitialNetNS(t *testing.T) {
	testenv.Root(t, "to read /proc/1/ns/net")
	// Test processes run in PID 1's namespace unless a harness moved them.
	self, _ := os.Readlink("/proc/self/ns/net")
	pid1, _ := os.Readlink("/proc/1/ns/net")
	if inInitialNetNS() != (self == pid1 && self != "") {
		t.Fatalf("inInitialNetNS %v, self %q, pid 1 %q", inInitialNetNS(), self, pid1)
	}
}

// fakeDmsetup writes a dmsetup that logs its arguments to the returned
// file and answers `table NAME` with tables[NAME] (failing when absent).
func fakeDmsetup(t *testing.T, tables map[string]string) (bin, log string) {
	t.Helper()
	dir := t.TempDir()
	log = filepath.Join(dir, "calls")
	script := "#!/bin/sh\necho \"$*\" >>" + log + "\ncase \"$1 $2\" in\n"
	for name, table := range tables {
		script += "\"table " + name + "\") echo '" + table + "'; exit 0 ;;\n"
	}
	script += "\"table \"*) echo 'Device does not exist.' >&2; exit 1 ;;\nesac\nexit 0\n"
	bin = filepath.Join(dir, "dmsetup")
	if err := os.WriteFile(bin, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return bin, log
}

func calls(t *testing.T, log string) string {
	b, err := os.ReadFile(log)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func TestGrowLinearReloadsWithTheNewLength(t *testing.T) {
	bin, log := fakeDmsetup(t, nil)
	v := &Backend{Dmsetup: bin, Log: zerolog.Nop()}
	ctx := context.Background()
	if err := v.growLinear(ctx, "ferry-v-clone", "0 65536 linear 7:3 0", 64<<20); err != nil {
		t.Fatal(err)
	}
	want := "suspend ferry-v-clone\nload ferry-v-clone --table 0 131072 linear 7:3 0\nresume ferry-v-clone"
	if got := calls(t, log); got != want {
		t.Fatalf("dmsetup calls:\n%s\nwant:\n%s", got, want)
	}
	// Already that long (a re-run): nothing is reloaded.
	os.Remove(log)
	if err := v.growLinear(ctx, "ferry-v-clone", "0 131072 linear 7:3 0", 64<<20); err != nil {
		t.Fatal(err)
	}
	if got := calls(t, log); strings.Contains(got, "load ") || strings.Contains(got, "suspend ferry") {
		t.Fatalf("a mapping of the wanted length was reloaded: %s", got)
	}
	for _, bad := range []string{"0 65536 clone 7:2 7:1 8:0 8", "0 65536 linear 7:3 8", "0 100 linear 7:3 0\n100 100 linear 7:4 0", "0 65536 linear 7:3"} {
		if err := v.growLinear(ctx, "ferry-v-clone", bad, 64<<20); err == nil {
			t.Errorf("table %q was grown", bad)
		}
	}
	if err := v.growLinear(ctx, "ferry-v-clone", "0 65536 linear 7:3 0", 64<<20+100); err == nil {
		t.Error("a length that is not whole sectors was loaded")
	}
}

func TestExtendRefusals(t *testing.T) {
	bin, log := fakeDmsetup(t, map[string]string{CloneName("vc"): "0 65536 clone 7:2 7:1 8:0 8 1 no_hydration"})
	v := &Backend{DataDir: t.TempDir(), Dmsetup: bin, Log: zerolog.Nop()}
	ctx := context.Background()
	layout := testLayout()
	for _, vol := range []string{"vc", "vl"} {
		if err := os.MkdirAll(v.VolumeDir(vol), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(v.DataPath(vol), nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(v.DataPath(vol), layout.DeviceSize()); err != nil {
			t.Fatal(err)
		}
	}
	// A live clone is sized from its source: refused before anything grows.
	_, err := v.Extend(ctx, "vc", layout, 2*layout.DeviceSize(), []byte("p"))
	if err == nil || !strings.Contains(err.Error(), "still cloning") {
		t.Fatalf("Extend of a live clone: %v", err)
	}
	// Shrinking is refused with the reason.
	if _, err := v.Extend(ctx, "vl", layout, layout.DeviceSize()-1<<20, []byte("p")); err == nil || !strings.Contains(err.Error(), "shrink") {
		t.Fatalf("Extend to a smaller size: %v", err)
	}
	if _, err := v.Extend(ctx, "a b", layout, 2*layout.DeviceSize(), []byte("p")); err == nil {
		t.Fatal("Extend of a bad volume id succeeded")
	}
	for _, vol := range []string{"vc", "vl"} {
		if st, err := os.Stat(v.DataPath(vol)); err != nil || st.Size() != layout.DeviceSize() {
			t.Fatalf("a refused Extend changed %s's file: %v %v", vol, st.Size(), err)
		}
	}
	if got := calls(t, log); strings.Contains(got, "load ") || strings.Contains(got, "suspend ferry") {
		t.Fatalf("a refused Extend reloaded a mapping: %s", got)
	}
}

func TestMountinfoHas(t *testing.T) {
	const info = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n" +
		"95 29 253:3 / /srv/ferry/mnt/m1 rw,relatime shared:50 - ext4 /dev/mapper/ferry-v1 rw\n"
	scan := func() *bufio.Scanner { return bufio.NewScanner(strings.NewReader(info)) }
	if !mountinfoHas(scan(), 253, 3) {
		t.Fatal("mounted device not found")
	}
	if mountinfoHas(scan(), 253, 30) || mountinfoHas(scan(), 25, 33) || mountinfoHas(scan(), 7, 0) {
		t.Fatal("a device that is not mounted found")
	}
}

func testLayout() luks.Layout {
	return luks.Layout{DataOffset: 2 << 20, MetadataSize: 16 << 10, KeyslotsSize: 1 << 20, SectorSize: 4096,
		Cipher: "aes-xts-plain64", KeyBytes: 64, PayloadSize: 30 << 20}
}
