package nbdexport

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/internal/testenv"
)

// needNBD skips where the kernel has no NBD (the development machines);
// inside the test VM, which loads the nbd module, that is a failure.
func needNBD(t *testing.T) {
	t.Helper()
	testenv.Guest(t, "root and the kernel's nbd module (/sys/block/nbd0)", os.Geteuid() == 0 && Available())
}

// TestKernelNBDAttach: a file served to the kernel reads and writes
// through /dev/nbdN as itself; a discard reaches the file; detaching
// frees the device and flushes.
func TestKernelNBDAttach(t *testing.T) {
	needNBD(t)
	const size = 32 << 20
	path := filepath.Join(t.TempDir(), "vol.img")
	want := make([]byte, size)
	rand.Read(want)
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := blockdev.OpenFile(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	log := zerolog.New(zerolog.NewTestWriter(t))
	e, err := Attach(context.Background(), log, f, Options{Connections: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	name := filepath.Base(e.Path())
	if b, err := os.ReadFile(filepath.Join("/sys/block", name, "size")); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(size/512) {
		t.Fatalf("kernel size of %s: %q %v", name, b, err)
	}
	// A second device at the same time gets another node.
	other := blockdev.NewMem(1 << 20)
	e2, err := Attach(context.Background(), log, other, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if e2.Path() == e.Path() {
		t.Fatalf("both on %s", e.Path())
	}
	if err := e2.Close(); err != nil {
		t.Fatal(err)
	}

	// QD1 latency of the device against a loop device over the same file
	// (logged: a figure of the VM, not a goal).
	loop, err := exec.Command("losetup", "-f", "--show", path).Output()
	if err == nil {
		l := strings.TrimSpace(string(loop))
		for _, dev := range []string{l, e.Path()} {
			out, err := exec.Command("fio", "--name=qd1", "--filename="+dev, "--direct=1", "--rw=randread", "--bs=4k",
				"--iodepth=1", "--ioengine=psync", "--time_based", "--runtime=1", "--readonly", "--output-format=terse", "--terse-version=3").Output()
			if f := strings.Split(string(out), ";"); err == nil && len(f) > 15 {
				t.Logf("%s: 4k random read QD1: %s IOPS, mean completion %s µs", dev, f[7], f[15])
			} else {
				t.Logf("fio on %s: %v", dev, err)
			}
		}
		exec.Command("losetup", "-d", l).Run()
	} else {
		t.Logf("losetup for the latency comparison: %v", err)
	}

	d, err := os.OpenFile(e.Path(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := d.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read through %s: %v, equal %v", e.Path(), err, bytes.Equal(got, want))
	}
	patch := make([]byte, 1<<20)
	rand.Read(patch)
	if _, err := d.WriteAt(patch, 8<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.Sync(); err != nil {
		t.Fatal(err)
	}
	d.Close()
	copy(want[8<<20:], patch)
	if out, err := exec.Command("blkdiscard", "-o", strconv.Itoa(16<<20), "-l", strconv.Itoa(1<<20), e.Path()).CombinedOutput(); err != nil {
		t.Fatalf("blkdiscard: %v %s", err, out)
	}
	clear(want[16<<20 : 17<<20]) // a file punches discarded ranges
	if err := e.Close(); err != nil {
		t.Fatalf("detach: %v", err)
	}
	if _, err := os.Stat(filepath.Join("/sys/block", name, "pid")); err == nil {
		t.Fatalf("%s still has a server after Close", name)
	}
	got, err = os.ReadFile(path)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the file after detach: %v, equal %v", err, bytes.Equal(got, want))
	}
}
