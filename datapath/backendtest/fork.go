package backendtest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/luks"
)

const forkVol = "bt1-fork"

var forkPass = []byte("backendtest-fork-passphrase")

// testFork forks a mounted volume while a writer keeps writing records into
// it. The fork, mounted on its own, must hold every record written before
// the fork began, a prefix of the records without holes or torn files, and
// nothing written after the fork returned; the source keeps all of them;
// the fork's LUKS2 master key differs from the source's.
func testFork(t *testing.T, newBackend Factory) {
	ctx := ctxFor(t)
	b := fresh(t, newBackend, t.TempDir())
	data := pattern(1<<20, 4)
	layout := createWithData(t, ctx, b, data)
	if !b.Capabilities().Fork {
		if _, _, err := b.Fork(ctx, vol, pass, forkVol, forkPass); !errors.Is(err, datapath.ErrNotSupported) {
			t.Fatalf("Fork on a backend without the capability: %v, want ErrNotSupported", err)
		}
		return
	}
	mnt := b.MountPoint("m")
	if _, err := b.MountLocal(ctx, vol, layout, pass, mnt); err != nil {
		t.Fatal(err)
	}
	rec := func(dir string, i int) string { return filepath.Join(dir, fmt.Sprintf("rec-%05d", i)) }
	recData := func(i int) []byte { return pattern(4096+i, byte(i)) }
	var (
		stop    atomic.Bool
		written atomic.Int64
		wg      sync.WaitGroup
		werr    error
	)
	writeRec := func(i int) error {
		if err := os.WriteFile(rec(mnt, i), recData(i), 0o644); err != nil {
			return err
		}
		written.Store(int64(i + 1))
		return nil
	}
	for i := range 20 {
		if err := writeRec(i); err != nil {
			t.Fatal(err)
		}
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 20; !stop.Load(); i++ {
			if werr = writeRec(i); werr != nil {
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	time.Sleep(50 * time.Millisecond)
	before := int(written.Load())
	fl, st, err := b.Fork(ctx, vol, pass, forkVol, forkPass)
	after := int(written.Load())
	// The source takes writes again after the fork: wait for one (a busy
	// host may take a while), bounded.
	for deadline := time.Now().Add(10 * time.Second); int(written.Load()) <= after && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	stop.Store(true)
	wg.Wait()
	if err != nil {
		t.Fatalf("Fork: %v", err)
	}
	if werr != nil {
		t.Fatalf("writer during the fork: %v", werr)
	}
	total := int(written.Load())
	if total <= after {
		t.Fatalf("the source took no writes after the fork (%d records, %d at fork end): was it left frozen?", total, after)
	}
	t.Logf("fork: source frozen %v, %d ciphertext bytes copied aside, %d re-encrypted; records %d before, %d after, %d total",
		st.Frozen, st.CopiedBytes, st.Reencrypted, before, after, total)
	if fl.DataOffset != layout.DataOffset || fl.PayloadSize != layout.PayloadSize || fl.UUID == layout.UUID {
		t.Fatalf("fork layout %+v, source %+v: want the same geometry and another UUID", fl, layout)
	}
	if a, c := masterKey(t, b.DataPath(vol), pass), masterKey(t, b.DataPath(forkVol), forkPass); bytes.Equal(a, c) {
		t.Fatal("the fork has the source's LUKS2 master key")
	}
	if _, err := b.MountLocal(ctx, forkVol, fl, pass, b.MountPoint("f")); err == nil {
		t.Fatal("the fork opened with the source's passphrase")
	}

	fmnt := b.MountPoint("f")
	if _, err := b.MountLocal(ctx, forkVol, fl, forkPass, fmnt); err != nil {
		t.Fatalf("mount the fork: %v", err)
	}
	checkData(t, fmnt, data)
	n := 0
	for ; ; n++ {
		got, err := os.ReadFile(rec(fmnt, n))
		if errors.Is(err, os.ErrNotExist) {
			break
		}
		want := recData(n)
		if err == nil && bytes.Equal(got, want) {
			continue
		}
		// The record being written at the fork's instant: os.WriteFile
		// creates the file, then writes, and a freeze may fall between.
		// Only the last record present may be so, and only one the writer
		// had not finished before the fork began.
		_, next := os.Stat(rec(fmnt, n+1))
		if err == nil && n >= before && len(got) < len(want) && bytes.Equal(got, want[:len(got)]) && errors.Is(next, os.ErrNotExist) {
			t.Logf("fork record %d was being written at the fork's instant: %d of %d bytes", n, len(got), len(want))
			n++
			break
		}
		t.Fatalf("fork record %d: %v (%d of %d bytes; a later record exists: %v)", n, err, len(got), len(want), next == nil)
	}
	if n < before || n > after {
		t.Fatalf("fork holds records 0..%d; the freeze fell between %d and %d", n, before, after)
	}
	for i := n; i < total; i++ {
		if _, err := os.Stat(rec(fmnt, i)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("fork holds record %d past its point in time %d: %v", i, n, err)
		}
	}
	// Independent: writes to one never show in the other.
	if err := os.WriteFile(filepath.Join(fmnt, "only-fork"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(mnt, "only-fork")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a write to the fork shows in the source: %v", err)
	}
	for i := range total {
		if got, err := os.ReadFile(rec(mnt, i)); err != nil || !bytes.Equal(got, recData(i)) {
			t.Fatalf("source record %d after the fork: %v", i, err)
		}
	}
	if _, err := os.Stat(filepath.Join(b.VolumeDir(forkVol), "source.snapshot")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the fork's snapshot was left behind: %v", err)
	}
	for _, m := range []struct{ v, mnt string }{{forkVol, fmnt}, {vol, mnt}} {
		if err := b.Unmount(ctx, m.v, m.mnt); err != nil {
			t.Fatal(err)
		}
	}
}

func masterKey(t *testing.T, path string, pass []byte) []byte {
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
	k, err := h.Unlock(d, pass)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Wipe()
	return bytes.Clone(k.Bytes())
}
