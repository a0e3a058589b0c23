package vm

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/dmclone"
	"github.com/ferry-dev/ferry/iscsi"
	"github.com/ferry-dev/ferry/luks"
)

// TestMain lets this test binary double as ferry's iSCSI export child: the
// host side of TestKernelPathInVM exports a volume with iscsi.StartExport,
// which re-executes the running binary.
func TestMain(m *testing.M) {
	if iscsi.IsExportChild() {
		iscsi.ServeChild()
	}
	os.Exit(m.Run())
}

// guestISCSI is what the host tells the guest about the export it runs.
type guestISCSI struct {
	Portal  string      `json:"portal"` // as the guest reaches it: 10.0.2.2:<port>
	IQN     string      `json:"iqn"`
	Layout  luks.Layout `json:"layout"` // carried from the "source"
	KeyFile string      `json:"key_file"`
	Plain   string      `json:"plain"`  // the expected plaintext, over 9p
	Cipher  string      `json:"cipher"` // the exported image itself, over 9p
}

const guestISCSIFile = "iscsi.json"

// These phases run inside the VM only (FERRY_IN_VM=1), started by
// TestKernelPathInVM, which checks they passed.
func inGuest(t *testing.T) guestISCSI {
	t.Helper()
	if os.Getenv("FERRY_IN_VM") == "" {
		t.Skip("runs inside the VM that TestKernelPathInVM boots")
	}
	b, err := os.ReadFile(filepath.Join("/host", guestISCSIFile))
	if err != nil {
		t.Fatalf("the host left no %s: %v", guestISCSIFile, err)
	}
	var g guestISCSI
	if err := json.Unmarshal(b, &g); err != nil {
		t.Fatal(err)
	}
	return g
}

func guestRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// sessionDisk finds the block device of the iSCSI session logged into iqn,
// through sysfs rather than by guessing /dev/sdX.
func sessionDisk(iqn string) (string, error) {
	sessions, _ := filepath.Glob("/sys/class/iscsi_session/session*")
	for _, s := range sessions {
		name, err := os.ReadFile(filepath.Join(s, "targetname"))
		if err != nil || strings.TrimSpace(string(name)) != iqn {
			continue
		}
		blocks, _ := filepath.Glob(filepath.Join(s, "device", "target*", "*", "block", "*"))
		if len(blocks) == 1 {
			return "/dev/" + filepath.Base(blocks[0]), nil
		}
		return "", fmt.Errorf("session %s has %d disks so far", filepath.Base(s), len(blocks))
	}
	return "", fmt.Errorf("no iSCSI session for %s", iqn)
}

func TestGuestISCSIKernelChain(t *testing.T) {
	g := inGuest(t)
	ctx := context.Background()
	log := zerolog.New(zerolog.NewTestWriter(t))
	node := []string{"-m", "node", "-T", g.IQN, "-p", g.Portal}

	// Discovery would return the target's own bind address, which the
	// guest cannot reach: create the node record by hand.
	guestRun(t, "iscsiadm", append(node, "-o", "new")...)
	// NOP-Outs every second: they must not stall ferry's export.
	guestRun(t, "iscsiadm", append(node, "-o", "update", "-n", "node.conn[0].timeo.noop_out_interval", "-v", "1")...)
	guestRun(t, "iscsiadm", append(node, "-o", "update", "-n", "node.conn[0].timeo.noop_out_timeout", "-v", "3")...)
	start := time.Now()
	guestRun(t, "iscsiadm", append(node, "--login")...)
	loggedIn := true
	t.Cleanup(func() {
		if loggedIn {
			_ = exec.Command("iscsiadm", append(node, "--logout")...).Run()
		}
	})
	var disk string
	for {
		d, err := sessionDisk(g.IQN)
		if err == nil {
			if _, serr := os.Stat(d); serr == nil {
				disk = d
				break
			}
		}
		if time.Since(start) > 20*time.Second {
			t.Fatalf("no disk for the session: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("logged in, %s after %s", disk, time.Since(start).Round(time.Millisecond))

	want, err := os.ReadFile(g.Cipher)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("the LUN (%d bytes) differs from the exported image (%d bytes)", len(got), len(want))
	}

	// Idle for a few NOP-Out intervals, then the session must still be up
	// and answer, with no connection error logged by the kernel.
	time.Sleep(3 * time.Second)
	st := guestRun(t, "iscsiadm", "-m", "session", "-P", "1")
	if !strings.Contains(st, "iSCSI Session State: LOGGED_IN") {
		t.Fatalf("session after NOP-Outs:\n%s", st)
	}
	if dm := guestRun(t, "dmesg"); strings.Contains(dm, "ping timeout") || strings.Contains(dm, "detected conn error") {
		t.Fatalf("the kernel initiator lost the connection:\n%s", dm)
	}

	// The kernel chain: dm-clone over the LUN, dm-crypt over the clone with
	// the carried layout.
	dir := t.TempDir()
	size := g.Layout.DeviceSize()
	dest := loopOf(t, filepath.Join(dir, "dest"), size)
	meta := loopOf(t, filepath.Join(dir, "meta"), dmclone.KernelMetadataSize(size, 4096))
	k, err := dmclone.CreateKernel(ctx, log, dmclone.KernelConfig{
		Name: "ferry-vm-clone", Source: disk, Dest: dest, Meta: meta, Size: size, RegionSize: 4096,
		Tunables: dmclone.Tunables{BatchRegions: 64, InFlight: 4}, PollInterval: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = luks.CloseKernel(context.Background(), "ferry-vm-plain")
		k.Close()
		_ = dmclone.RemoveKernel(context.Background(), "", "ferry-vm-clone")
	})
	mapper, err := luks.OpenKernel(ctx, k.Path(), "ferry-vm-plain", g.Layout, g.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := os.ReadFile(g.Plain)
	if err != nil {
		t.Fatal(err)
	}
	got, err = os.ReadFile(mapper)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, plain) {
		t.Fatal("plaintext through iSCSI -> dm-clone -> dm-crypt differs from what was written on the source")
	}
	before := k.Progress().HydratedRegions

	// A trim through dm-crypt reaches dm-clone: regions hydrated, nothing fetched.
	guestRun(t, "blkdiscard", "-o", fmt.Sprint(8<<20), "-l", fmt.Sprint(1<<20), mapper)
	waitUntil(t, "discard hydrates 256 regions", func() bool { return k.Progress().HydratedRegions >= before+256 })
	// The machine writes on the target.
	w := bytes.Repeat([]byte("ferry-vm"), 8<<10)
	f, err := os.OpenFile(mapper, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(w, 16<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	copy(plain[16<<20:], w)

	if err := k.EnableHydration(); err != nil {
		t.Fatal(err)
	}
	hstart := time.Now()
	select {
	case <-k.Done():
	case <-time.After(3 * time.Minute):
		t.Fatalf("hydration over iSCSI did not finish: %+v", k.Progress())
	}
	p := k.Progress()
	t.Logf("hydrated %d regions over iSCSI in %s (%.1f MB/s)", p.TotalRegions-before-256, time.Since(hstart).Round(time.Millisecond), p.RateBytesPerSec/1e6)
	// Dissolve under the open dm-crypt mapping: its users never notice.
	if _, err := k.Dissolve(); err != nil {
		t.Fatal(err)
	}
	if table := guestRun(t, "dmsetup", "table", "ferry-vm-clone"); !strings.Contains(table, " linear ") {
		t.Fatalf("after dissolve: %s", table)
	}
	got, err = os.ReadFile(mapper)
	if err != nil {
		t.Fatal(err)
	}
	clear(got[8<<20 : 9<<20]) // trimmed: its content is undefined
	clear(plain[8<<20 : 9<<20])
	if !bytes.Equal(got, plain) {
		t.Fatal("plaintext after hydration and dissolve differs")
	}
	if err := luks.CloseKernel(ctx, "ferry-vm-plain"); err != nil {
		t.Fatal(err)
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if err := dmclone.RemoveKernel(ctx, "", "ferry-vm-clone"); err != nil {
		t.Fatal(err)
	}

	// Log out cleanly: the session and its disk go away.
	guestRun(t, "iscsiadm", append(node, "--logout")...)
	loggedIn = false
	waitUntil(t, "the session and its disk are gone", func() bool {
		_, err := sessionDisk(g.IQN)
		_, serr := os.Stat(disk)
		return err != nil && serr != nil
	})
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func loopOf(t *testing.T, path string, size int64) string {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	dev := guestRun(t, "losetup", "-f", "--show", path)
	t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	return dev
}
