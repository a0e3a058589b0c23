package userspace

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath/loopdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// BenchmarkForkFreeze forks a mounted volume holding FERRY_FORK_DATA_MIB
// (default 256) MiB of written data and reports how long the source's
// filesystem stayed frozen, next to the time `cp --sparse=always` takes to
// copy the same ciphertext file (how long a copy made during the freeze
// froze it before the copy-on-write snapshot), in the same run:
//
//	go test -run '^$' -bench ForkFreeze -benchtime 1x ./datapath/userspace
func BenchmarkForkFreeze(b *testing.B) {
	err := hostReady()
	testenv.Require(b, fmt.Sprint(err), err == nil)
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	dataMiB := benchEnv(b, "FERRY_FORK_DATA_MIB", 256)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := b.TempDir()
	v := &Backend{DataDir: dir, Exe: exe, Log: zerolog.Nop(), Loops: loopdev.System{}, FastKDF: true}
	pass, forkPass := []byte("bench-source-passphrase"), []byte("bench-fork-passphrase")
	layout, err := v.Create(ctx, "src", (dataMiB+64)<<20, pass)
	if err != nil {
		b.Fatal(err)
	}
	mnt := v.MountPoint("m")
	if _, err := v.MountLocal(ctx, "src", layout, pass, mnt); err != nil {
		b.Fatal(err)
	}
	defer v.CleanupAll(context.Background())
	f, err := os.Create(filepath.Join(mnt, "data"))
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for range dataMiB {
		rand.Read(buf)
		if _, err := f.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	f.Close()
	var frozen, cp time.Duration
	for i := 0; i < b.N; i++ {
		fork := fmt.Sprintf("fork%d", i)
		_, st, err := v.Fork(ctx, "src", pass, fork, forkPass)
		if err != nil {
			b.Fatal(err)
		}
		frozen += st.Frozen
		// The reference: copying the ciphertext file aside, as the fork did
		// while the filesystem was frozen before the snapshot existed.
		exec.Command("sync").Run()
		dst := filepath.Join(dir, "cp-ref")
		start := time.Now()
		if out, err := exec.Command("cp", "--sparse=always", v.DataPath("src"), dst).CombinedOutput(); err != nil {
			b.Fatalf("cp: %v: %s", err, out)
		}
		cp += time.Since(start)
		os.Remove(dst)
		if err := v.Remove(ctx, fork); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(frozen.Microseconds())/1000/float64(b.N), "frozen-ms")
	b.ReportMetric(float64(cp.Microseconds())/1000/float64(b.N), "cp-ms")
	b.ReportMetric(float64(frozen)/float64(cp), "frozen/cp")
}
