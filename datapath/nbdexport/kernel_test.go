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
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

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

// TestKernelNBDSignalledSenders: writers whose threads are signalled all
// the time (as a Go program's are: SIGURG, SIGCHLD) write 1 MiB blocks
// with O_DIRECT, so the kernel sends each request from their threads. A
// send that sleeps on a full socket and is cut short by a signal makes
// kernels before 6.13 resend it under another tag, and the reply then
// matches nothing until the timeout; the export's send buffer keeps the
// kernel's sends from sleeping. No write may take the timeout, and every
// block must read back.
func TestKernelNBDSignalledSenders(t *testing.T) {
	needNBD(t)
	const (
		writers = 24
		span    = 4 << 20 // each writer's own part of the device
		block   = 1 << 20
		timeout = 6 * time.Second
	)
	dev := blockdev.NewMem(writers * span)
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
	e, err := Attach(context.Background(), log, dev, Options{Connections: 2, Timeout: timeout, SendBuffer: testSendBuffer()})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()

	stop := make(chan struct{})
	var signals atomic.Int64
	sigDone := make(chan struct{})
	go func() { // SIGURG every thread of this process: Go ignores unsolicited ones
		defer close(sigDone)
		pid := os.Getpid()
		for {
			select {
			case <-stop:
				return
			default:
			}
			tasks, _ := os.ReadDir("/proc/self/task")
			for _, task := range tasks {
				if tid, err := strconv.Atoi(task.Name()); err == nil && unix.Tgkill(pid, tid, unix.SIGURG) == nil {
					signals.Add(1)
				}
			}
			time.Sleep(100 * time.Microsecond)
		}
	}()

	type result struct {
		writes  int
		slowest time.Duration
		last    []byte // the last block written at each offset, in order
		err     error
	}
	results := make([]result, writers)
	deadline := time.Now().Add(4 * time.Second)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := &results[w]
			f, err := os.OpenFile(e.Path(), os.O_RDWR|unix.O_DIRECT, 0)
			if err != nil {
				r.err = err
				return
			}
			defer f.Close()
			buf := alignedBlock(block)
			r.last = make([]byte, span)
			for i := 0; time.Now().Before(deadline); i++ {
				off := int64(i%(span/block)) * block
				rand.Read(buf)
				t0 := time.Now()
				if _, err := f.WriteAt(buf, int64(w)*span+off); err != nil {
					r.err = err
					return
				}
				r.slowest = max(r.slowest, time.Since(t0))
				copy(r.last[off:], buf)
				r.writes++
			}
		}()
	}
	wg.Wait()
	close(stop)
	<-sigDone
	total := 0
	for w, r := range results {
		if r.err != nil {
			t.Fatalf("writer %d: %v", w, r.err)
		}
		total += r.writes
		if r.slowest >= timeout/2 {
			t.Errorf("writer %d: a 1 MiB write took %s (the kernel's timeout is %s): a request went unanswered", w, r.slowest, timeout)
		}
	}
	sched, _ := os.ReadFile(filepath.Join("/sys/block", filepath.Base(e.Path()), "queue", "scheduler"))
	t.Logf("%d writes of 1 MiB by %d writers while %d signals landed (scheduler %s)", total, writers, signals.Load(), bytes.TrimSpace(sched))
	if !bytes.Contains(sched, []byte("[none]")) {
		t.Errorf("the device's scheduler is %q, want none", bytes.TrimSpace(sched))
	}
	if out, err := exec.Command("dmesg").Output(); err == nil {
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, "nbd") {
				t.Logf("dmesg: %s", l)
			}
		}
	}
	if total < writers || signals.Load() < 1000 {
		t.Fatalf("too little happened to tell: %d writes, %d signals", total, signals.Load())
	}
	got := make([]byte, writers*span)
	if _, err := dev.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for w, r := range results {
		if !bytes.Equal(got[w*span:(w+1)*span], r.last) {
			t.Errorf("writer %d's part of the device is not what it wrote last", w)
		}
	}
}

// alignedBlock is n bytes aligned for O_DIRECT.
func alignedBlock(n int) []byte {
	b := make([]byte, n+4096)
	off := 4096 - int(uintptr(unsafe.Pointer(&b[0]))&4095)
	return b[off : off+n : off+n]
}

// testSendBuffer is the export's default, or FERRY_NBD_TEST_SENDBUF (-1:
// the system's default) to show what happens without it.
func testSendBuffer() int {
	if v, err := strconv.Atoi(os.Getenv("FERRY_NBD_TEST_SENDBUF")); err == nil {
		return v
	}
	return 0
}
