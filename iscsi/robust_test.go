package iscsi

import (
	"bytes"
	"context"
	"errors"
	"math/rand"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// rawSession logs in with a bare connection, for sending hand-made PDUs.
func rawSession(t *testing.T, e *Export) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", e.Portal())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := login(c, time.Now().Add(5*time.Second), randomISID(), defaultInitiatorName, e.IQN()); err != nil {
		t.Fatal(err)
	}
	return c
}

// exportServes checks a fresh initiator reads the right bytes.
func exportServes(t *testing.T, e *Export, want []byte) {
	t.Helper()
	l, err := Dial(context.Background(), testLogger(t), InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Timeout: 10 * time.Second})
	if err != nil {
		t.Fatalf("export no longer serves: %v", err)
	}
	defer l.Close()
	got := make([]byte, len(want))
	if _, err := l.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("content differs")
	}
}

func TestExportSurvivesHostilePDUs(t *testing.T) {
	image, want := randomImage(t, 1<<20)
	e, _ := startTestExport(t, image, nil)

	t.Run("garbage", func(t *testing.T) {
		for i := 0; i < 3; i++ {
			c, err := net.Dial("tcp", e.Portal())
			if err != nil {
				t.Fatal(err)
			}
			junk := make([]byte, 4096)
			rand.New(rand.NewSource(int64(i))).Read(junk)
			_, _ = c.Write(junk)
			time.Sleep(50 * time.Millisecond)
			c.Close()
		}
		exportServes(t, e, want)
	})
	t.Run("garbage after login", func(t *testing.T) {
		c := rawSession(t, e)
		junk := bytes.Repeat([]byte{0xff}, 4096)
		_, _ = c.Write(junk)
		time.Sleep(50 * time.Millisecond)
		exportServes(t, e, want)
	})
	t.Run("ORWRITE(16)", func(t *testing.T) {
		l, err := Dial(context.Background(), testLogger(t), InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Timeout: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		cdb := cdbWrite16(0, 8)
		cdb[0] = 0x8b // ORWRITE(16): panics gotgt's own handler
		tk := newTask("ORWRITE(16)", cdb, nil)
		tk.out = make([]byte, 4096)
		if err := l.do(context.Background(), tk); !IsWriteProtected(err) {
			t.Fatalf("ORWRITE(16): %v, want DATA PROTECT", err)
		}
		exportServes(t, e, want)
	})
	t.Run("UNMAP and WRITE SAME", func(t *testing.T) {
		l, err := Dial(context.Background(), testLogger(t), InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Timeout: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		unmap := [16]byte{0x42, 0, 0, 0, 0, 0, 0, 0, 24}
		tk := newTask("UNMAP", unmap, nil)
		tk.out = []byte{0, 22, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0}
		if err := l.do(context.Background(), tk); !IsWriteProtected(err) {
			t.Fatalf("UNMAP: %v, want DATA PROTECT", err)
		}
		ws := cdbWrite16(0, 8)
		ws[0] = 0x93
		tk = newTask("WRITE SAME(16)", ws, nil)
		tk.out = make([]byte, 512)
		if err := l.do(context.Background(), tk); !IsWriteProtected(err) {
			t.Fatalf("WRITE SAME(16): %v, want DATA PROTECT", err)
		}
	})
	t.Run("non-immediate NOP-Out", func(t *testing.T) {
		c := rawSession(t, e)
		p := new(pdu)
		p.bhs[0] = opNOPOut // no immediate bit: stalls gotgt's session
		p.bhs[1] = flagFinal
		put32(p.bhs[16:20], 7)
		put32(p.bhs[20:24], reservedTag)
		put32(p.bhs[24:28], 1)
		_, _ = c.Write(p.marshal())
		time.Sleep(100 * time.Millisecond)
		exportServes(t, e, want) // other sessions are unaffected
	})
	got, _ := os.ReadFile(image)
	if !bytes.Equal(got, want) {
		t.Fatal("the exported image changed")
	}
	select {
	case <-e.Done():
		t.Fatalf("export ended: %v", e.Err())
	default:
	}
}

// readLoop reads the whole LUN repeatedly until stop closes, checking bytes.
func readLoop(l *LUN, want []byte, stop <-chan struct{}) error {
	got := make([]byte, len(want))
	for {
		select {
		case <-stop:
			return nil
		default:
		}
		if _, err := l.ReadAt(got, 0); err != nil {
			return err
		}
		if !bytes.Equal(got, want) {
			return errors.New("content differs")
		}
	}
}

func TestInitiatorRidesOutExportCrash(t *testing.T) {
	image, want := randomImage(t, 8<<20)
	e, _ := startTestExport(t, image, nil)
	l, err := Dial(context.Background(), testLogger(t), InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Timeout: 10 * time.Second, MaxTransfer: 128 << 10, QueueDepth: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	stop := make(chan struct{})
	errc := make(chan error, 1)
	go func() { errc <- readLoop(l, want, stop) }()
	time.Sleep(150 * time.Millisecond)
	pid := e.PID()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil { // as if gotgt panicked
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for e.PID() == pid && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if e.PID() == pid {
		t.Fatal("supervisor did not restart the export process")
	}
	time.Sleep(300 * time.Millisecond) // reads continue on the new process
	close(stop)
	if err := <-errc; err != nil {
		t.Fatalf("read across the export crash: %v", err)
	}
}

func TestInitiatorBoundedFailureAndReconnect(t *testing.T) {
	image, want := randomImage(t, 8<<20)
	e, cfg := startTestExport(t, image, nil)
	const timeout = 2 * time.Second
	l, err := Dial(context.Background(), testLogger(t), InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Timeout: timeout, MaxTransfer: 128 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	check := func(what string, since time.Time, err error) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: read kept succeeding", what)
		}
		if d := time.Since(since); d > timeout+time.Second {
			t.Fatalf("%s: error after %s, want within %s: %v", what, d, timeout, err)
		}
		if !errors.Is(err, ErrTimeout) {
			t.Fatalf("%s: %v, want ErrTimeout", what, err)
		}
	}

	// Partition: the export process freezes; nothing answers.
	stop := make(chan struct{})
	errc := make(chan error, 1)
	go func() { errc <- readLoop(l, want, stop) }()
	time.Sleep(100 * time.Millisecond)
	pid := e.PID()
	_ = syscall.Kill(pid, syscall.SIGSTOP)
	frozen := time.Now()
	check("frozen export", frozen, <-errc)
	_ = syscall.Kill(pid, syscall.SIGCONT)
	if err := readLoopOnce(l, want); err != nil {
		t.Fatalf("after the export thawed: %v", err)
	}

	// Gone: the export stops mid-read; then it comes back on the same portal.
	go func() { errc <- readLoop(l, want, stop) }()
	time.Sleep(100 * time.Millisecond)
	_ = e.Stop()
	gone := time.Now()
	check("stopped export", gone, <-errc)
	cfg.Listen = e.Portal()
	e2, err := StartExport(context.Background(), testLogger(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Stop()
	if err := readLoopOnce(l, want); err != nil {
		t.Fatalf("after the export restarted: %v", err)
	}
	close(stop)
}

func readLoopOnce(l *LUN, want []byte) error {
	got := make([]byte, len(want))
	if _, err := l.ReadAt(got, 0); err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		return errors.New("content differs")
	}
	return nil
}

func TestExportAdoptedAfterAgentCrash(t *testing.T) {
	image, want := randomImage(t, 1<<20)
	e1, cfg := startTestExport(t, image, nil)
	// The agent dies without stopping its export: its supervisor and its
	// copy of the listener are gone, the export process lives on.
	e1.mu.Lock()
	e1.stopping = true
	e1.mu.Unlock()
	e1.ln.Close()
	close(e1.done)

	e2, err := StartExport(context.Background(), testLogger(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if e2.PID() != e1.PID() || e2.Portal() != e1.Portal() {
		t.Fatalf("StartExport did not adopt: pid %d/%d portal %s/%s", e2.PID(), e1.PID(), e2.Portal(), e1.Portal())
	}
	e3, err := AdoptExport(testLogger(t), cfg.StateDir)
	if err != nil || e3.PID() != e1.PID() {
		t.Fatalf("AdoptExport: %v", err)
	}
	exportServes(t, e2, want)
	if err := e3.Stop(); err != nil {
		t.Fatal(err)
	}
	// The process ends at once; its zombie lingers until reaped by its
	// parent (here the test's first supervisor, for a real agent init).
	deadline := time.Now().Add(3 * time.Second)
	for syscall.Kill(e1.PID(), 0) == nil && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if err := syscall.Kill(e1.PID(), 0); !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("adopted export process still exists after Stop: %v", err)
	}
	if _, err := os.Stat(cfg.StateDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("state directory left behind: %v", err)
	}
	if _, err := AdoptExport(testLogger(t), cfg.StateDir); err == nil {
		t.Fatal("AdoptExport of a stopped export succeeded")
	}
}

func TestIdleSessionKeptAliveByImmediateNOPs(t *testing.T) {
	image, want := randomImage(t, 1<<20)
	e, _ := startTestExport(t, image, nil)
	l, err := Dial(context.Background(), testLogger(t), InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Timeout: 900 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	sessions := func() []*session {
		var out []*session
		for _, p := range l.paths {
			p.mu.Lock()
			out = append(out, p.sess)
			p.mu.Unlock()
		}
		return out
	}
	first := sessions()
	// Idle for several timeouts: only NOP-Out/NOP-In cross the wire, and
	// the session must survive on them (a non-immediate NOP would stall gotgt).
	time.Sleep(3 * time.Second)
	if err := readLoopOnce(l, want); err != nil {
		t.Fatal(err)
	}
	now := sessions()
	same := first[0] != nil
	for i, s := range first {
		if s != nil && now[i] != s { // sessions logged in on first use may be new
			same = false
		}
	}
	if !same {
		t.Fatal("the idle session died and was replaced: keepalive failed")
	}
}

// The export moves: it stops at one portal and comes back at another (the
// source restarted with another address). Retarget moves the initiator
// there; reads in flight at the move finish on the new session.
func TestInitiatorRetargetsToMovedExport(t *testing.T) {
	image, want := randomImage(t, 8<<20)
	e, cfg := startTestExport(t, image, nil)
	l, err := Dial(context.Background(), testLogger(t), InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Timeout: 5 * time.Second, MaxTransfer: 128 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := readLoopOnce(l, want); err != nil {
		t.Fatal(err)
	}
	// A wrong address changes nothing.
	if err := l.Retarget(context.Background(), "127.0.0.1:1", e.IQN()); err == nil {
		t.Fatal("retarget to a closed port succeeded")
	}
	if p, _ := l.Portal(); p != e.Portal() {
		t.Fatalf("a failed retarget moved the LUN to %s", p)
	}
	_ = e.Stop()
	cfg.Listen = "127.0.0.1:0" // a new port, on the address the gate admits
	e2, err := StartExport(context.Background(), testLogger(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Stop()
	if e2.Portal() == e.Portal() {
		t.Fatal("the restarted export has the same portal; the test needs another one")
	}
	if err := l.Retarget(context.Background(), e2.Portal(), e2.IQN()); err != nil {
		t.Fatalf("retarget to the moved export: %v", err)
	}
	if err := readLoopOnce(l, want); err != nil {
		t.Fatalf("read after the move: %v", err)
	}
	if p, iqn := l.Portal(); p != e2.Portal() || iqn != e2.IQN() {
		t.Fatalf("LUN at %s %s, want %s %s", p, iqn, e2.Portal(), e2.IQN())
	}
	// Moving to where it is changes nothing.
	if err := l.Retarget(context.Background(), e2.Portal(), e2.IQN()); err != nil {
		t.Fatal(err)
	}
}
