package iscsi

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/internal/tlsutil"
)

// serialOf is the serial (tlsutil.SerialString) of name's certificate in dir.
func serialOf(t testing.TB, dir, name string) string {
	t.Helper()
	cf, _ := tlsutil.Files(dir, name)
	b, err := os.ReadFile(cf)
	if err != nil {
		t.Fatal(err)
	}
	c, err := tlsutil.ParseCertPEM(b)
	if err != nil {
		t.Fatal(err)
	}
	return tlsutil.SerialString(c.SerialNumber)
}

// countingBackend stands in for gotgt: it counts the connections that
// reach it and echoes what they send.
func countingBackend(t testing.TB, n *atomic.Int64) string {
	t.Helper()
	return serveTCP(t, func(c net.Conn) {
		n.Add(1)
		_, _ = io.Copy(c, c)
	})
}

func gateWithBackend(t testing.TB, gt *GateTLS, backend string) *gate {
	t.Helper()
	allow, err := parseAllow([]string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g, err := newGate(testLogger(t), ln, allow, gt, backend)
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.serve() }()
	t.Cleanup(g.close)
	return g
}

func dialGate(addr string, cfg *tls.Config) (*tls.Conn, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return nil, err
	}
	// TLS 1.3: a refused client certificate shows on the first read.
	if err := roundTrip(c); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func TestGateRefusesARevokedTargetCertificate(t *testing.T) {
	p := newWorkerPKI(t)
	target := serialOf(t, p.dir, "worker-b")
	var reached atomic.Int64

	// The target's own certificate is revoked: the handshake fails and not
	// one byte reaches the target behind the gate.
	gt, err := GateTLSFromDir(p.dir, "worker-a", "worker-b")
	if err != nil {
		t.Fatal(err)
	}
	gt.Denied = []string{target}
	g := gateWithBackend(t, gt, countingBackend(t, &reached))
	if c, err := dialGate(g.ln.Addr().String(), p.clientTo(t, p.dir, "worker-b", "worker-a")); err == nil {
		c.Close()
		t.Fatal("the gate admitted the target's revoked certificate")
	}
	time.Sleep(100 * time.Millisecond) // a spliced connection would have reached the backend by now
	if n := reached.Load(); n != 0 {
		t.Fatalf("%d connection(s) of a revoked certificate reached the target", n)
	}

	// Another serial on the list leaves the target's certificate admitted.
	gt2, err := GateTLSFromDir(p.dir, "worker-a", "worker-b")
	if err != nil {
		t.Fatal(err)
	}
	gt2.Denied = []string{serialOf(t, p.dir, "worker-c")}
	g2 := gateWithBackend(t, gt2, countingBackend(t, &reached))
	c, err := dialGate(g2.ln.Addr().String(), p.clientTo(t, p.dir, "worker-b", "worker-a"))
	if err != nil {
		t.Fatalf("the gate refused the target's good certificate: %v", err)
	}
	c.Close()
	if reached.Load() != 1 {
		t.Fatalf("%d connections reached the target, want the good one alone", reached.Load())
	}

	// A list the gate cannot match is refused, not half taken.
	bad := *gt2
	bad.Denied = []string{"0A"}
	if _, err := newGate(testLogger(t), g2.ln, g2.allow, &bad, "127.0.0.1:1"); err == nil {
		t.Fatal("a gate took a serial that is not canonical")
	}
}

func TestGateCutsALiveConnectionWhenItsCertificateIsRevoked(t *testing.T) {
	p := newWorkerPKI(t)
	var reached atomic.Int64
	gt, err := GateTLSFromDir(p.dir, "worker-a", "worker-b")
	if err != nil {
		t.Fatal(err)
	}
	g := gateWithBackend(t, gt, countingBackend(t, &reached))
	addr, cfg := g.ln.Addr().String(), p.clientTo(t, p.dir, "worker-b", "worker-a")
	c, err := dialGate(addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := g.setDenied([]string{serialOf(t, p.dir, "worker-c")}); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(c); err != nil {
		t.Fatalf("revoking another certificate cut the target: %v", err)
	}
	if err := g.setDenied([]string{serialOf(t, p.dir, "worker-b"), serialOf(t, p.dir, "worker-c")}); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(c); err == nil {
		t.Fatal("a connection of a revoked certificate still reads through the gate")
	}
	if c2, err := dialGate(addr, cfg); err == nil {
		c2.Close()
		t.Fatal("the gate admitted a new connection of a revoked certificate")
	}
	if err := g.setDenied([]string{"xyz"}); err == nil {
		t.Fatal("a malformed deny list was taken")
	}
	if !g.deny.Denied(serialOf(t, p.dir, "worker-b")) {
		t.Fatal("a refused update replaced the deny list")
	}
}

func TestTunnelRefusesARevokedSource(t *testing.T) {
	p := newWorkerPKI(t)
	gt, err := GateTLSFromDir(p.dir, "worker-a", "worker-b")
	if err != nil {
		t.Fatal(err)
	}
	gateAddr := startGate(t, gt)
	var deny DenyList
	tun, err := StartTunnel(testLogger(t), "127.0.0.1:0", gateAddr, p.clientTo(t, p.dir, "worker-b", "worker-a"), deny.Denied)
	if err != nil {
		t.Fatal(err)
	}
	defer tun.Close()
	c, err := net.DialTimeout("tcp", tun.Addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := roundTrip(c); err != nil {
		t.Fatalf("through the tunnel before the revocation: %v", err)
	}
	// The source's certificate is revoked: its live connection is cut
	// within the recheck period, and no new one is made.
	if _, err := deny.Set([]string{serialOf(t, p.dir, "worker-a")}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(denyRecheck + 3*time.Second)
	for roundTrip(c) == nil {
		if time.Now().After(deadline) {
			t.Fatal("the tunnel still carries a connection to a revoked source")
		}
		time.Sleep(100 * time.Millisecond)
	}
	c2, err := net.DialTimeout("tcp", tun.Addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if err := roundTrip(c2); err == nil {
		t.Fatal("the tunnel reached a source whose certificate is revoked")
	}
}

func TestDenyListTakesCanonicalSerialsOnly(t *testing.T) {
	var d DenyList
	if d.Denied("a1") {
		t.Fatal("an empty list denies")
	}
	if changed, err := d.Set([]string{"a1", "b"}); err != nil || !changed {
		t.Fatalf("set: %v %v", changed, err)
	}
	if changed, err := d.Set([]string{"b", "a1"}); err != nil || changed {
		t.Fatalf("the same list again reported a change: %v %v", changed, err)
	}
	for _, bad := range []string{"A1", "0a1", "", "-1", "0", "a1 ", "g"} {
		if _, err := d.Set([]string{bad}); err == nil {
			t.Errorf("serial %q was taken", bad)
		}
	}
	if got := d.Serials(); len(got) != 2 || got[0] != "a1" || got[1] != "b" {
		t.Fatalf("serials %q", got)
	}
	var nilList *DenyList
	if nilList.Denied("a1") || nilList.Serials() != nil {
		t.Fatal("a nil list denies")
	}
}

// The export child takes a new deny list over its control socket and cuts
// the target's live session when its certificate is revoked.
func TestExportSetDeniedCutsTheRevokedTarget(t *testing.T) {
	p := newWorkerPKI(t)
	image, want := randomImage(t, 1<<20)
	gt, err := GateTLSFromDir(p.dir, "worker-a", "worker-b")
	if err != nil {
		t.Fatal(err)
	}
	e, _ := startTestExport(t, image, func(c *ExportConfig) { c.TLS = gt })
	ctx := context.Background()
	cfg := InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Timeout: 2 * time.Second, Sessions: 1, TLS: p.clientTo(t, p.dir, "worker-b", "worker-a")}
	l, err := Dial(ctx, testLogger(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make([]byte, len(want))
	if _, err := l.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read before the revocation: %v", err)
	}
	if err := e.SetDenied(ctx, []string{serialOf(t, p.dir, "worker-b")}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.ReadAt(got, 0); err == nil {
		t.Fatal("the revoked target's session still reads the export")
	}
	if l2, err := Dial(ctx, testLogger(t), cfg); err == nil {
		l2.Close()
		t.Fatal("the revoked target logged into the export again")
	}
	if err := e.SetDenied(ctx, []string{"not hex"}); err == nil {
		t.Fatal("the export child took a malformed deny list")
	}
}
