package iscsi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/blockdev"
	"github.com/ferry-dev/ferry/blockdev/blockdevtest"
	"github.com/ferry-dev/ferry/internal/testenv"
)

func needRoot(t testing.TB) {
	t.Helper()
	testenv.Root(t, "the export runs in a private network namespace")
}

func testIQN(t testing.TB) string {
	return MigrationIQN("dev.ferry.test", fmt.Sprintf("m%d", rand.Int63()), time.Now())
}

// startTestExport exports image on a loopback port and stops it at cleanup.
func startTestExport(t testing.TB, image string, mod func(*ExportConfig)) (*Export, ExportConfig) {
	t.Helper()
	needRoot(t)
	cfg := ExportConfig{
		Path: image, Listen: "127.0.0.1:0", Allow: []string{"127.0.0.1"}, IQN: testIQN(t),
		StateDir: filepath.Join(t.TempDir(), "export"), LogLevel: "warn",
	}
	if mod != nil {
		mod(&cfg)
	}
	e, err := StartExport(context.Background(), testLogger(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Stop() })
	return e, cfg
}

func dialExport(t testing.TB, e *Export, timeout time.Duration) *LUN {
	t.Helper()
	l, err := Dial(context.Background(), testLogger(t), InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Timeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func TestExportReadByteExact(t *testing.T) {
	const size = 16 << 20
	image, want := randomImage(t, size)
	e, _ := startTestExport(t, image, nil)
	l := dialExport(t, e, 5*time.Second)
	if l.Size() != size {
		t.Fatalf("Size = %d, want %d", l.Size(), size)
	}
	got := make([]byte, size)
	if _, err := l.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("LUN content differs from the exported image")
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed))
			for i := 0; i < 40; i++ {
				n := 1 + rng.Intn(200<<10)
				off := rng.Int63n(size - int64(n))
				b := make([]byte, n)
				if _, err := l.ReadAt(b, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(b, want[off:off+int64(n)]) {
					errs <- fmt.Errorf("read of %d at %d differs", n, off)
					return
				}
			}
		}(int64(g))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestExportRefusesWrites(t *testing.T) {
	image, want := randomImage(t, 1<<20)
	e, _ := startTestExport(t, image, nil)
	l := dialExport(t, e, 5*time.Second)
	err := l.writeImmediate(context.Background(), make([]byte, 4096), 0)
	if !IsWriteProtected(err) {
		t.Fatalf("WRITE(16): err = %v, want DATA PROTECT check condition", err)
	}
	got, _ := os.ReadFile(image)
	if !bytes.Equal(got, want) {
		t.Fatal("the exported image changed")
	}
}

func TestExportConformance(t *testing.T) {
	initial := make([]byte, 1<<20)
	rand.New(rand.NewSource(7)).Read(initial)
	blockdevtest.Run(t, func(t *testing.T, size int64) blockdev.Device {
		path := filepath.Join(t.TempDir(), "image")
		if err := os.WriteFile(path, initial[:size], 0o600); err != nil {
			t.Fatal(err)
		}
		e, _ := startTestExport(t, path, nil)
		return dialExport(t, e, 5*time.Second)
	}, blockdevtest.Options{ReadOnly: true, Initial: initial})
}

func TestExportGateRefusesOtherAddresses(t *testing.T) {
	image, _ := randomImage(t, 1<<20)
	// Only 127.0.0.2 is admitted; we connect from 127.0.0.1.
	e, cfg := startTestExport(t, image, func(c *ExportConfig) { c.Allow = []string{"127.0.0.2/32"} })
	if c, err := net.Dial("tcp", e.Portal()); err == nil { // the reset may already hit the dial
		req := new(pdu)
		req.bhs[0] = opLoginReq | flagImmediate
		req.bhs[1] = 0x81
		req.data = encodeText([][2]string{{"InitiatorName", defaultInitiatorName}, {"TargetName", e.IQN()}, {"SessionType", "Normal"}, {"AuthMethod", "None"}})
		_, _ = c.Write(req.marshal())
		_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
		n, err := c.Read(make([]byte, 64))
		c.Close()
		if n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("refused peer read %d bytes, err %v; want the connection closed with nothing", n, err)
		}
	}
	if _, err := Dial(context.Background(), testLogger(t), InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Timeout: time.Second}); err == nil {
		t.Fatal("initiator on a refused address logged in")
	}
	// The same export admits an allowed address.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	c2, err := d.Dial("tcp", e.Portal())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if _, err := login(c2, time.Now().Add(5*time.Second), randomISID(), defaultInitiatorName, e.IQN()); err != nil {
		t.Fatalf("login from the allowed address: %v", err)
	}
	// The gate, not gotgt, dealt with the refused peers.
	log, _ := os.ReadFile(filepath.Join(cfg.StateDir, logFileName))
	if !bytes.Contains(log, []byte("gate refused")) {
		t.Fatalf("export log has no gate refusal:\n%s", log)
	}
}

func TestExportStopLeavesNoTrace(t *testing.T) {
	image, _ := randomImage(t, 1<<20)
	e, cfg := startTestExport(t, image, nil)
	pid := e.PID()
	if err := e.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := net.DialTimeout("tcp", e.Portal(), time.Second); err == nil {
		t.Fatal("gate still listening after Stop")
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("export process %d still exists after Stop (kill 0: %v)", pid, err)
	}
	if _, err := os.Stat(cfg.StateDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("state directory left behind: %v", err)
	}
}
