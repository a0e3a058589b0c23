package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/datapath/userspace"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// TestCloneCLI runs `ferry clone create --loop` in-process and drives it
// through its control socket: status, enable-hydration, dissolve on
// completion, remove.
func TestCloneCLI(t *testing.T) {
	testenv.Root(t, "FUSE and loop devices")
	testenv.Tools(t, "apt-get install util-linux", "losetup")
	testenv.Paths(t, "modprobe fuse", "/dev/fuse")
	ctx := context.Background()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	data := make([]byte, 16<<20)
	rand.New(rand.NewSource(1)).Read(data[:8<<20]) // second half stays a hole
	if err := os.WriteFile(src, data[:8<<20], 0o600); err != nil {
		t.Fatal(err)
	}
	os.Truncate(src, 16<<20)
	meta := filepath.Join(dir, "meta")
	dest := filepath.Join(dir, "dest")

	cmd := newCloneCreate()
	pr, pw := io.Pipe()
	cmd.SetOut(pw)
	cmd.SetArgs([]string{"--source", src, "--dest", dest, "--meta", meta, "--mount-dir", filepath.Join(dir, "mnt"), "--loop", "--region-size", "8k"})
	exited := make(chan error, 1)
	go func() { exited <- cmd.Execute() }()
	var ready userspace.Ready
	line, err := bufio.NewReader(pr).ReadBytes('\n')
	go io.Copy(io.Discard, pr)
	if err != nil || json.Unmarshal(line, &ready) != nil || ready.Loop == "" {
		t.Fatalf("ready line %q: %v", line, err)
	}
	t.Cleanup(func() {
		loopdev.Detach(ready.Loop)
		cloneOp(ctx, "", meta, "remove", nil)
	})

	r, err := cloneStatus(ctx, "", meta)
	if err != nil {
		t.Fatal(err)
	}
	p := r.Engine
	if p.TotalRegions != 2048 || p.RegionSize != 8192 || p.HydrationEnabled || p.SkippedKnownZeroBytes < 8<<20-8192 {
		t.Fatalf("status after create: %+v", p)
	}
	f, err := os.Open(ready.Loop)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	if _, err := f.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, data[1<<20:2<<20]) {
		t.Fatalf("read through the loop device: %v / differs from the source", err)
	}
	f.Close()
	if err := cloneOp(ctx, "", meta, "bogus", nil); err == nil {
		t.Fatal("unknown op accepted")
	}
	if err := cloneOp(ctx, "", meta, "set-tunables", nil); err == nil {
		t.Fatal("set-tunables without tunables accepted")
	}
	if err := cloneOp(ctx, "", meta, "enable-hydration", nil); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		r, err = cloneStatus(ctx, "", meta)
		if err != nil {
			t.Fatal(err)
		}
		if r.Dissolved {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not dissolved after 30 s: %+v", r.Engine)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if r.Engine.FetchedBytes > 8<<20+1<<20 {
		t.Fatalf("fetched %d bytes from a source with 8 MiB of data", r.Engine.FetchedBytes)
	}
	d, _ := os.ReadFile(dest)
	if !bytes.Equal(d, data) {
		t.Fatal("destination differs from the source after hydration")
	}
	// The operator's view: `ferry clone status --json` prints the record.
	var out bytes.Buffer
	rootCmd.SetOut(&out)
	rootCmd.SetArgs([]string{"clone", "status", "--json", "--meta", meta})
	err = rootCmd.Execute()
	rootCmd.SetArgs(nil)
	rootCmd.SetOut(nil)
	if err != nil {
		t.Fatal(err)
	}
	var st map[string]any
	if err := json.Unmarshal(out.Bytes(), &st); err != nil {
		t.Fatalf("status --json output %q: %v", out.String(), err)
	}
	if st["hydrated_regions"] != float64(2048) || st["complete"] != true || st["dissolved"] != true || st["file"] != ready.File {
		t.Fatalf("status --json: %v", st)
	}
	if err := cloneOp(ctx, "", meta, "remove", nil); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("clone create exited with %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("clone create still running after remove")
	}
	if l, _ := loopdev.FindByBackingFile(ready.File); len(l) != 0 {
		t.Fatalf("loop device left attached: %v", l)
	}
	if _, err := os.Stat(meta + ".sock"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("control socket left behind: %v", err)
	}
	// Bad input fails with a usage error and changes nothing.
	bad := newCloneCreate()
	bad.SetArgs([]string{"--source", src, "--dest", dest, "--meta", meta, "--mount-dir", dir, "--region-size", "3k"})
	bad.SetOut(io.Discard)
	var ee *exitError
	if err := bad.Execute(); !errors.As(err, &ee) || ee.code != ExitUsage {
		t.Fatalf("bad region size: %v, want a usage error", err)
	}
}
