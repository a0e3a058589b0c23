package iscsi

import (
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/internal/testenv"

	"github.com/rs/zerolog"
)

func testLogger(t testing.TB) zerolog.Logger {
	return zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel)
}

// randomImage writes size random bytes to a temp file and returns its path and content.
func randomImage(t testing.TB, size int) (string, []byte) {
	t.Helper()
	data := make([]byte, size)
	rand.New(rand.NewSource(int64(size))).Read(data)
	path := filepath.Join(t.TempDir(), "image")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, data
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startTgtd runs Debian's tgtd on loopback with image as LUN 1 and returns
// its portal and IQN. Each instance has its own control port.
func startTgtd(t testing.TB, image string) (portal, iqn string) {
	t.Helper()
	testenv.Tools(t, "apt-get install tgt", "tgtd")
	testenv.Root(t, "to run tgtd")
	port := freePort(t)
	ctl := strconv.Itoa(1000 + rand.Intn(30000)) // tgtadm accepts small control ports only
	portal = fmt.Sprintf("127.0.0.1:%d", port)
	iqn = fmt.Sprintf("iqn.2026-01.dev.ferry.test:tgtd%d", port)
	cmd := exec.Command("tgtd", "-f", "--control-port", ctl, "--iscsi", "portal="+portal)
	logPath := filepath.Join(t.TempDir(), "tgtd.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting tgtd: %v", err)
	}
	t.Cleanup(func() {
		_ = exec.Command("tgtadm", "-C", ctl, "--op", "delete", "--mode", "system").Run()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	adm := func(args ...string) {
		t.Helper()
		var err error
		var b []byte
		for i := 0; i < 50; i++ { // tgtd needs a moment to open its control socket
			b, err = exec.Command("tgtadm", append([]string{"-C", ctl, "--lld", "iscsi"}, args...)...).CombinedOutput()
			if err == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		tgtdLog, _ := os.ReadFile(logPath)
		t.Fatalf("tgtadm %v: %v: %s (tgtd: %s)", args, err, b, tgtdLog)
	}
	adm("--op", "new", "--mode", "target", "--tid", "1", "-T", iqn)
	adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", image)
	adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
	return portal, iqn
}
