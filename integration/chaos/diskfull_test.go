package chaos

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/internal/testbed"
	"github.com/ferry-dev/ferry/machine/workload"
)

// smallFS is an ext4 filesystem on a loop-mounted image outside the bed's
// dir (so the bed's leak check sees only the bed's own objects), growable.
type smallFS struct {
	img, mnt string
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

func newSmallFS(t *testing.T, size int64) *smallFS {
	dir, err := os.MkdirTemp("", "ferry-chaos-disk-")
	if err != nil {
		t.Fatal(err)
	}
	fs := &smallFS{img: filepath.Join(dir, "img"), mnt: filepath.Join(dir, "mnt")}
	if err := os.Mkdir(fs.mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(fs.img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(fs.img, size); err != nil {
		t.Fatal(err)
	}
	if err := run("mkfs.ext4", "-q", "-F", "-m", "0", fs.img); err != nil {
		t.Fatal(err)
	}
	if err := run("mount", "-o", "loop", fs.img, fs.mnt); err != nil {
		t.Fatal(err)
	}
	// Registered before the cluster's: runs after the cluster is torn down.
	t.Cleanup(func() {
		if err := run("umount", fs.mnt); err != nil {
			t.Errorf("small filesystem: %v", err)
		}
		os.RemoveAll(dir)
	})
	return fs
}

// fillTo allocates a ballast file leaving about free bytes on the filesystem.
func (fs *smallFS) fillTo(free int64) error {
	var st unix.Statfs_t
	if err := unix.Statfs(fs.mnt, &st); err != nil {
		return err
	}
	avail := int64(st.Bavail) * int64(st.Bsize)
	f, err := os.Create(filepath.Join(fs.mnt, "ballast"))
	if err != nil {
		return err
	}
	defer f.Close()
	if avail > free {
		return unix.Fallocate(int(f.Fd()), 0, 0, avail-free)
	}
	return nil
}

// freeUp deletes the ballast: the operator adds space.
func (fs *smallFS) freeUp() error { return os.Remove(filepath.Join(fs.mnt, "ballast")) }

// The target's disk fills up mid-hydration (24 MiB free, 32 MiB to copy):
// the migration shows stalled with a reason naming the full disk, the
// machine's acknowledged records survive; once space is freed, hydration resumes and completes, and the data on the
// target equals what was written on the source.
func TestTargetDiskFull(t *testing.T) {
	t.Parallel() // each test has its own cluster; most of their time is waiting
	requireEnv(t)
	small := newSmallFS(t, 160<<20)
	if err := small.fillTo(24 << 20); err != nil {
		t.Fatal(err)
	}
	c := newCluster(t, 2, "--hydration-rate", "4M")
	a, b := c.ws[0], c.ws[1]
	// The target's volumes live on the small filesystem.
	vols := filepath.Join(c.bed.WorkerDir(b), "volumes")
	if err := os.RemoveAll(vols); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(small.mnt, vols); err != nil {
		t.Fatal(err)
	}
	if err := c.bed.CreateVolume(c.ctx, "fvol", a, 96<<20); err != nil {
		t.Fatal(err)
	}
	ack, err := c.bed.RunRecords(c.ctx, "fmach", a, "fvol", 63)
	if err != nil {
		t.Fatal(err)
	}
	c.fill(a, "fmach", 32)
	want, err := testbed.FileSum(filepath.Join(c.bed.WorkerDir(a), "mnt", "fmach", "dense.bin"))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	id, err := c.bed.Migrate(c.ctx, "fmach", b)
	if err != nil {
		t.Fatal(err)
	}
	w := c.watch(id, a, "fvol")
	var stalled *fsm.Migration
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		m, err := c.bed.Client.GetMigration(c.ctx, id)
		if err == nil && m.Stalled {
			stalled = m
			break
		}
		if err == nil && m.State.Terminal() {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if stalled == nil {
		m, _ := c.bed.Client.GetMigration(c.ctx, id)
		w.close()
		t.Fatalf("the target's disk is full but the migration never showed stalled (state %s, progress %+v, last error %q)", m.State, m.Progress, m.LastError)
	}
	if !strings.Contains(stalled.StallCause, "space") {
		t.Errorf("stall reason %q does not say the disk is full", stalled.StallCause)
	}
	t.Logf("stalled in %s after %v: %q", stalled.State, time.Since(start).Round(time.Millisecond), stalled.StallCause)
	// The machine's own writes need the space too: they fail (EIO), its
	// ext4 may turn read-only. What must hold: nothing acknowledged is lost,
	// nothing is corrupted, and the migration completes once space is back.
	c.machineMayDie = true
	ackAtStall, _ := workload.Acked(ack)
	if err := small.freeUp(); err != nil {
		w.close()
		t.Fatal(err)
	}
	o := c.finish(id, "fmach", a, b, "fvol", ack, w, start, 4*time.Minute)
	if o.final.State != fsm.Completed && !(o.final.State == fsm.RolledBack && stalled.State.BeforeCutover()) {
		t.Fatalf("ended %s after stalling in %s", o.final.State, stalled.State)
	}
	where := o.ranOn
	got, err := testbed.FileSum(filepath.Join(c.bed.WorkerDir(where), "mnt", "fmach", "dense.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatal("the data written on the source reads differently on the target: corruption")
	}
	machineState := "machine kept writing"
	if o.acked < ackAtStall+20 {
		machineState = "machine's writes failed (ENOSPC -> EIO, ext4 read-only), restarted by the agent in a loop"
	}
	t.Logf("after the disk filled: %s", machineState)
	report("storage faults", fmt.Sprintf("| target disk full mid-hydration (24 MiB free, 32 MiB to copy), then space freed | stalled in %s: %q | %s after space freed; dense file identical; %s | records %d/%d, source %s, leaks %s, %v |",
		stalled.State, stalled.StallCause, o.final.State, machineState, o.acked, o.present, o.frozenSame, o.leaks, o.took.Round(100*time.Millisecond)))
}
