package iscsi

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ferry-dev/ferry/internal/tlsutil"
)

// workerPKI is a cluster CA with worker certificates issued the way
// `ferry tls` does: source "worker-a" serves, target "worker-b" is admitted,
// "worker-c" is another worker of the same cluster, an operator certificate
// reuses the target's name, and a second CA issues its own "worker-b".
type workerPKI struct {
	dir, foreignDir string
}

func newWorkerPKI(t testing.TB) workerPKI {
	t.Helper()
	root := t.TempDir()
	p := workerPKI{dir: filepath.Join(root, "tls"), foreignDir: filepath.Join(root, "foreign")}
	ca, foreignCA := filepath.Join(root, "ca"), filepath.Join(root, "foreign-ca")
	for _, c := range []string{ca, foreignCA} {
		if err := tlsutil.InitCA(c); err != nil {
			t.Fatal(err)
		}
	}
	issue := func(caDir, dir, name, kind string) {
		if _, err := tlsutil.Issue(caDir, dir, name, kind, []string{"127.0.0.1"}, tlsutil.IssueOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	issue(ca, p.dir, "worker-a", tlsutil.KindWorker)
	issue(ca, p.dir, "worker-b", tlsutil.KindWorker)
	issue(ca, p.dir, "worker-c", tlsutil.KindWorker)
	issue(ca, filepath.Join(root, "op"), "worker-b", tlsutil.KindOperator)
	issue(foreignCA, p.foreignDir, "worker-b", tlsutil.KindWorker)
	// The operator's certificate sits in its own folder (one name per
	// folder); copy it under another name next to the others.
	opCert, opKey := tlsutil.Files(filepath.Join(root, "op"), "worker-b")
	cert, key := tlsutil.Files(p.dir, "op-as-b")
	copyFile(t, opCert, cert)
	copyFile(t, opKey, key)
	return p
}

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// clientTo is name's client config (from dir) admitting only the source.
func (p workerPKI) clientTo(t testing.TB, dir, name, source string) *tls.Config {
	t.Helper()
	c, err := tlsutil.PeerClientConfig(dir, name, tlsutil.Identity{Name: source, Kind: tlsutil.KindWorker})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// serveTCP listens on loopback and runs handle for every connection (the
// connection is closed when handle returns), until the test ends.
func serveTCP(t testing.TB, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); handle(c) }()
		}
	}()
	return ln.Addr().String()
}

// echoServer answers every connection with what it reads: the export's
// backend in gate tests, open-iscsi's peer in tunnel tests.
func echoServer(t testing.TB) string {
	t.Helper()
	return serveTCP(t, func(c net.Conn) { _, _ = io.Copy(c, c) })
}

// startGate runs a gate admitting 127.0.0.1 and gt's TLS in front of an
// echo backend.
func startGate(t testing.TB, gt *GateTLS) string {
	t.Helper()
	return startGateWith(t, gt).ln.Addr().String()
}

// startGateWith is startGate returning the gate itself.
func startGateWith(t testing.TB, gt *GateTLS) *gate {
	t.Helper()
	allow, err := parseAllow([]string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g, err := newGate(testLogger(t), ln, allow, gt, echoServer(t))
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.serve() }()
	t.Cleanup(g.close)
	return g
}

// roundTrip sends a message through c and reports whether it came back.
func roundTrip(c net.Conn) error {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := []byte("iSCSI login request")
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return io.ErrUnexpectedEOF
	}
	return nil
}

func TestGateAdmitsOnlyTheTargetWorkersCertificate(t *testing.T) {
	p := newWorkerPKI(t)
	gt, err := GateTLSFromDir(p.dir, "worker-a", "worker-b")
	if err != nil {
		t.Fatal(err)
	}
	addr := startGate(t, gt)
	dial := func(cfg *tls.Config) error {
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
		if err != nil {
			return err
		}
		defer c.Close()
		// TLS 1.3: a refused client certificate shows on the first read.
		return roundTrip(c)
	}
	if err := dial(p.clientTo(t, p.dir, "worker-b", "worker-a")); err != nil {
		t.Fatalf("the target's certificate was refused: %v", err)
	}
	for name, cfg := range map[string]*tls.Config{
		"another worker":         p.clientTo(t, p.dir, "worker-c", "worker-a"),
		"operator with its name": p.clientTo(t, p.dir, "op-as-b", "worker-a"),
		"another CA's worker-b":  p.clientTo(t, p.foreignDir, "worker-b", "worker-a"),
		"no client certificate":  {InsecureSkipVerify: true, MinVersion: tls.VersionTLS13},
	} {
		if err := dial(cfg); err == nil {
			t.Errorf("%s: the gate admitted it", name)
		}
	}
	// Plain TCP (the iSCSI login of a client without TLS) never reaches the target.
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := roundTrip(c); err == nil {
		t.Error("a plain TCP client reached the target behind the gate")
	}
}

func TestGateTLSNeedsClientCAForAPeer(t *testing.T) {
	p := newWorkerPKI(t)
	gt, err := GateTLSFromDir(p.dir, "worker-a", "worker-b")
	if err != nil {
		t.Fatal(err)
	}
	gt.ClientCAPEM = nil
	if _, err := gt.config(nil); err == nil {
		t.Fatal("a gate admitting one peer without a CA to verify it was accepted")
	}
}

func TestInitiatorRefusesAnExportServedByAnotherWorker(t *testing.T) {
	p := newWorkerPKI(t)
	// worker-c serves, pretending to be the source worker-a.
	gt, err := GateTLSFromDir(p.dir, "worker-c", "worker-b")
	if err != nil {
		t.Fatal(err)
	}
	addr := startGate(t, gt)
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, p.clientTo(t, p.dir, "worker-b", "worker-a"))
	if err == nil {
		c.Close()
		t.Fatal("the target accepted an export whose certificate names worker-c, not the source worker-a")
	}
}

func TestExportOverWorkerTLS(t *testing.T) {
	p := newWorkerPKI(t)
	image, want := randomImage(t, 1<<20)
	gt, err := GateTLSFromDir(p.dir, "worker-a", "worker-b")
	if err != nil {
		t.Fatal(err)
	}
	e, _ := startTestExport(t, image, func(c *ExportConfig) { c.TLS = gt })
	ctx := context.Background()
	cfg := InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Timeout: 3 * time.Second, TLS: p.clientTo(t, p.dir, "worker-b", "worker-a")}
	l, err := Dial(ctx, testLogger(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make([]byte, len(want))
	if _, err := l.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("read through the TLS gate differs from the image")
	}
	cfg.TLS = p.clientTo(t, p.dir, "worker-c", "worker-a")
	if l2, err := Dial(ctx, testLogger(t), cfg); err == nil {
		l2.Close()
		t.Fatal("another worker's certificate logged into the export")
	}
	cfg.TLS = nil
	if l3, err := Dial(ctx, testLogger(t), cfg); err == nil {
		l3.Close()
		t.Fatal("a plain iSCSI initiator logged into a TLS export")
	}
}
