package e2e

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/ferry-dev/ferry/api"
	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/datapath/userspace"
	"github.com/ferry-dev/ferry/fsm"
	"github.com/ferry-dev/ferry/luks"
	"github.com/ferry-dev/ferry/machine/workload"
)

// TestExtendAndForkUnderWritingWorkload extends the volume of a running
// machine and forks it while it keeps writing records: the machine sees the
// new size, every acknowledged record survives, and the fork holds a prefix
// of the records (those acknowledged before the fork at least) under a
// master key of its own.
func TestExtendAndForkUnderWritingWorkload(t *testing.T) {
	e := newEnv(t, 1)
	w := e.ws[0]
	e.createVolume("vx", w, volSize)
	ack, _ := e.runMachine("mx", w, "vx", 9)
	e.waitAcked(ack, 100, time.Minute)
	mnt := filepath.Join(e.bed.WorkerDir(w), "mnt", "mx")
	before := statfsBytes(t, mnt)

	// Refusals with their reasons.
	if _, err := e.c.ExtendVolume(e.ctx, "vx", volSize/2); api.ErrorCode(err) != fsm.CodeInvalid {
		t.Fatalf("shrink: %v, want refused", err)
	}

	const grown = 2 * volSize
	if _, err := e.c.ExtendVolume(e.ctx, "vx", grown); err != nil {
		t.Fatal(err)
	}
	// The file under the machine grows at once; the filesystem online when
	// the host lets the agent resize a mounted ext4 (CAP_SYS_RESOURCE), else
	// once the machine stopped.
	deadline := time.Now().Add(time.Minute)
	for {
		st, err := os.Stat(sourceFile(e, w, "vx"))
		if err == nil && st.Size() == grown {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("volume file did not grow to %d: %v", grown, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	n, _ := workload.Acked(ack)
	e.waitAcked(ack, n+50, time.Minute) // it keeps writing
	if !datapath.CanResizeOnline() {
		t.Log("this host denies online ext4 resize: stopping the machine lets the agent finish offline")
		stopped, running := fsm.MachineStopped, fsm.MachineRunning
		if _, err := e.c.UpdateMachine(e.ctx, "mx", api.MachineUpdate{State: &stopped}); err != nil {
			t.Fatal(err)
		}
		waitSize(t, e, "vx", grown)
		if _, err := e.c.UpdateMachine(e.ctx, "mx", api.MachineUpdate{State: &running}); err != nil {
			t.Fatal(err)
		}
		n, _ = workload.Acked(ack)
		e.waitAcked(ack, n+50, time.Minute)
	}
	v := waitSize(t, e, "vx", grown)
	if v.Layout == nil || v.Layout.PayloadSize != grown-v.Layout.DataOffset {
		t.Fatalf("recorded layout after extend: %+v", v.Layout)
	}
	if after := statfsBytes(t, mnt); after < before+(grown-volSize)*8/10 {
		t.Fatalf("the machine's filesystem is %d bytes after extending to %d (was %d)", after, grown, before)
	}
	present, acked := e.verifyRecords("mx", w, ack)
	t.Logf("extend: %d records acknowledged, %d present", acked, present)

	// Fork while the machine writes.
	ackedBefore, _ := workload.Acked(ack)
	f, err := e.c.ForkVolume(e.ctx, "vx", "vx-fork", w)
	if err != nil {
		t.Fatal(err)
	}
	if f.ForkOf != "vx" || f.State != fsm.VolCreating {
		t.Fatalf("fork record at once: %+v", f)
	}
	// The fork's worker makes and seals the fork's own passphrase; the
	// test reads it back with the recovery key, as an operator would.
	fv := waitCreated(t, e, "vx-fork")
	forkKey := string(e.recoverKey("vx-fork"))
	e.keys["vx-fork"] = forkKey
	n, _ = workload.Acked(ack)
	e.waitAcked(ack, n+50, time.Minute) // it kept running through the fork
	ackedEnd, _ := workload.Acked(ack)

	// The fork, mounted on its worker, holds the records of its instant.
	b := &userspace.Backend{DataDir: e.bed.WorkerDir(w), Exe: ferryBin, Log: zerolog.Nop(), Loops: loopdev.System{}}
	fmnt := b.MountPoint("fork-check")
	if _, err := b.MountLocal(e.ctx, "vx-fork", datapath.LayoutOf(*fv.Layout), []byte(forkKey), fmnt); err != nil {
		t.Fatalf("mount the fork: %v", err)
	}
	forkRecords, _, err := workload.Scan(filepath.Join(fmnt, workload.RecordsFile))
	if uerr := b.Unmount(e.ctx, "vx-fork", fmnt); uerr != nil {
		t.Errorf("unmount the fork: %v", uerr)
	}
	if err != nil {
		t.Fatalf("records in the fork: %v", err)
	}
	if forkRecords < ackedBefore || forkRecords > ackedEnd+1 {
		t.Fatalf("fork holds %d records; %d were acknowledged before the fork and %d once it was made", forkRecords, ackedBefore, ackedEnd)
	}
	if bytes.Equal(masterKeyOf(t, sourceFile(e, w, "vx"), e.keys["vx"]), masterKeyOf(t, sourceFile(e, w, "vx-fork"), forkKey)) {
		t.Fatal("the fork has the source's master key")
	}
	present, acked = e.verifyRecords("mx", w, ack)
	t.Logf("fork: %d records (acknowledged before %d, at end %d); source %d present, %d acknowledged", forkRecords, ackedBefore, ackedEnd, present, acked)
	e.assertNoKeysInLogs()
}

func waitSize(t *testing.T, e *env, id string, size int64) *fsm.Volume {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		v, err := e.c.GetVolume(e.ctx, id)
		if err == nil && v.Size == size && !v.Extending() {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("volume %s did not report %d bytes: %+v %v", id, size, v, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func waitCreated(t *testing.T, e *env, id string) *fsm.Volume {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		v, err := e.c.GetVolume(e.ctx, id)
		if err == nil && v.State == fsm.VolCreated && v.Layout != nil {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("volume %s not created: %+v %v", id, v, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func statfsBytes(t *testing.T, mnt string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}

func masterKeyOf(t *testing.T, path, pass string) []byte {
	t.Helper()
	d, err := blockdev.OpenFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	h, err := luks.ReadHeader(d, d.Size())
	if err != nil {
		t.Fatal(err)
	}
	k, err := h.Unlock(d, []byte(pass))
	if err != nil {
		t.Fatal(err)
	}
	defer k.Wipe()
	return bytes.Clone(k.Bytes())
}

// TestForkToAnotherWorker forks the volume of a running machine onto
// another worker: the record appears at once on that worker; the source
// machine keeps writing; the source's worker makes the re-encrypted copy,
// serves it, and the fork's worker clones and hydrates it; once created,
// the source's worker has deleted its copy and stopped serving it. Mounted
// on its worker, the fork holds the records of its instant under a master
// key of its own, sealed to that worker.
func TestForkToAnotherWorker(t *testing.T) {
	e := newEnv(t, 2)
	src, dst := e.ws[0], e.ws[1]
	e.createVolume("vy", src, volSize)
	ack, _ := e.runMachine("my", src, "vy", 11)
	e.waitAcked(ack, 100, time.Minute)

	ackedBefore, _ := workload.Acked(ack)
	start := time.Now()
	f, err := e.c.ForkVolume(e.ctx, "vy", "vy-far", dst)
	if err != nil {
		t.Fatal(err)
	}
	if f.Worker != dst || f.ForkOf != "vy" || f.ForkFrom != src || f.State != fsm.VolCreating {
		t.Fatalf("fork record at once: %+v", f)
	}
	fv := waitCreated(t, e, "vy-far")
	took := time.Since(start)
	n, _ := workload.Acked(ack)
	e.waitAcked(ack, n+50, time.Minute) // the source machine kept running through the fork
	ackedEnd, _ := workload.Acked(ack)
	if fv.Worker != dst {
		t.Fatalf("fork created on %s, want %s", fv.Worker, dst)
	}

	// The source's worker releases its copy once the fork is created.
	srcBackend := &userspace.Backend{DataDir: e.bed.WorkerDir(src), Exe: ferryBin, Log: zerolog.Nop(), Loops: loopdev.System{}}
	deadline := time.Now().Add(time.Minute)
	for {
		v, err := e.c.GetVolume(e.ctx, "vy-far")
		_, statErr := os.Stat(srcBackend.VolumeDir("vy-far"))
		if err == nil && v.ForkExport == nil && os.IsNotExist(statErr) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the source's worker still holds the fork's copy: record %+v, copy on disk: %v", v, statErr)
		}
		time.Sleep(100 * time.Millisecond)
	}

	forkKey := string(e.recoverKey("vy-far"))
	b := &userspace.Backend{DataDir: e.bed.WorkerDir(dst), Exe: ferryBin, Log: zerolog.Nop(), Loops: loopdev.System{}}
	fmnt := b.MountPoint("fork-check")
	if _, err := b.MountLocal(e.ctx, "vy-far", datapath.LayoutOf(*fv.Layout), []byte(forkKey), fmnt); err != nil {
		t.Fatalf("mount the fork on %s: %v", dst, err)
	}
	forkRecords, _, err := workload.Scan(filepath.Join(fmnt, workload.RecordsFile))
	if uerr := b.Unmount(e.ctx, "vy-far", fmnt); uerr != nil {
		t.Errorf("unmount the fork: %v", uerr)
	}
	if err != nil {
		t.Fatalf("records in the fork: %v", err)
	}
	if forkRecords < ackedBefore || forkRecords > ackedEnd+1 {
		t.Fatalf("fork holds %d records; %d were acknowledged before the fork and %d once it was made", forkRecords, ackedBefore, ackedEnd)
	}
	srcKey := e.keys["vy"]
	if bytes.Equal(masterKeyOf(t, sourceFile(e, src, "vy"), srcKey), masterKeyOf(t, sourceFile(e, dst, "vy-far"), forkKey)) {
		t.Fatal("the fork has the source's master key")
	}
	// Its owner envelope is sealed to the fork's worker, not the source's.
	owner, err := e.c.ListEnvelopes(e.ctx, "vy-far")
	if err != nil {
		t.Fatal(err)
	}
	for _, env := range owner {
		if env.Purpose == fsm.PurposeOwner && env.Recipient != dst {
			t.Fatalf("the fork's owner envelope is sealed to %s, want %s", env.Recipient, dst)
		}
	}
	present, acked := e.verifyRecords("my", src, ack)
	t.Logf("fork to %s created %v after the request: %d records (acknowledged before %d, at end %d); source %d present, %d acknowledged",
		dst, took.Round(time.Millisecond), forkRecords, ackedBefore, ackedEnd, present, acked)

	// Both agents killed (SIGKILL) along the way: the source's right after
	// the request (its copy starts over under a new key), the fork's once
	// the copy is published. The fork still completes and mounts.
	if _, err := e.c.ForkVolume(e.ctx, "vy", "vy-far2", dst); err != nil {
		t.Fatal(err)
	}
	e.kill9(src)
	if err := e.bed.StartAgent(src); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(2 * time.Minute)
	for {
		v, err := e.c.GetVolume(e.ctx, "vy-far2")
		if err == nil && (v.ForkExport != nil || v.State == fsm.VolCreated) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the copy of vy-far2 was never published: %+v %v", v, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	e.kill9(dst)
	if err := e.bed.StartAgent(dst); err != nil {
		t.Fatal(err)
	}
	fv2 := waitCreated(t, e, "vy-far2")
	key2 := e.recoverKey("vy-far2")
	if _, err := b.MountLocal(e.ctx, "vy-far2", datapath.LayoutOf(*fv2.Layout), key2, fmnt); err != nil {
		t.Fatalf("mount the second fork on %s: %v", dst, err)
	}
	n2, _, err := workload.Scan(filepath.Join(fmnt, workload.RecordsFile))
	if uerr := b.Unmount(e.ctx, "vy-far2", fmnt); uerr != nil {
		t.Errorf("unmount the second fork: %v", uerr)
	}
	if err != nil || n2 < ackedEnd {
		t.Fatalf("second fork holds %d records (%v); %d were acknowledged before it was asked for", n2, err, ackedEnd)
	}
	n, _ = workload.Acked(ack)
	e.waitAcked(ack, n+50, time.Minute)
	present, acked = e.verifyRecords("my", src, ack)
	t.Logf("fork across agent restarts: %d records; source %d present, %d acknowledged", n2, present, acked)
	e.assertNoKeysInLogs()
}
