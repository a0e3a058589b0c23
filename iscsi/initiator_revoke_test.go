package iscsi

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"
)

// The userspace data path's initiator checks the source's certificate
// against the deny list: a source revoked while its sessions run is cut,
// every read after that fails at once naming the revocation (no re-issue
// until Timeout), and a new login is refused at the handshake.
func TestInitiatorRefusesARevokedSource(t *testing.T) {
	p := newWorkerPKI(t)
	image, want := randomImage(t, 1<<20)
	gt, err := GateTLSFromDir(p.dir, "worker-a", "worker-b")
	if err != nil {
		t.Fatal(err)
	}
	e, _ := startTestExport(t, image, func(c *ExportConfig) { c.TLS = gt })
	deny := &DenyList{}
	const timeout = 5 * time.Second
	cfg := InitiatorConfig{Portal: e.Portal(), IQN: e.IQN(), Timeout: timeout, MaxTransfer: 64 << 10,
		TLS: p.clientTo(t, p.dir, "worker-b", "worker-a"), Denied: deny.Denied}
	ctx := context.Background()
	l, err := Dial(ctx, testLogger(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	got := make([]byte, len(want))
	if _, err := l.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read before the revocation: %v", err)
	}
	if n := l.CutDenied(); n != 0 {
		t.Fatalf("CutDenied ended %d sessions before any revocation", n)
	}
	source := serialOf(t, p.dir, "worker-a")
	if _, err := deny.Set([]string{serialOf(t, p.dir, "worker-c"), source}); err != nil {
		t.Fatal(err)
	}
	if n := l.CutDenied(); n == 0 {
		t.Fatal("CutDenied ended no session of the revoked source")
	}
	start := time.Now()
	_, err = l.ReadAt(got, 0)
	var rev *RevokedError
	if !errors.As(err, &rev) || rev.Serial != source {
		t.Fatalf("read after the revocation: %v, want a *RevokedError naming %s", err, source)
	}
	if took := time.Since(start); took > timeout/2 {
		t.Errorf("the refused read took %v: a revocation must fail it at once, not after retries", took)
	}
	t.Logf("read after the revocation: %v", err)
	if l2, err := Dial(ctx, testLogger(t), cfg); err == nil || !errors.As(err, &rev) {
		if l2 != nil {
			l2.Close()
		}
		t.Fatalf("a new login to the revoked source: %v, want a *RevokedError", err)
	}
	// The other worker's revocation alone refuses nothing.
	if _, err := deny.Set([]string{serialOf(t, p.dir, "worker-c")}); err != nil {
		t.Fatal(err)
	}
	// A session refused a moment ago may still be backing off its
	// reconnect: reads resume within seconds, not necessarily at once.
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := l.ReadAt(got, 0)
		if err == nil && bytes.Equal(got, want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("read once the source is no longer denied: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
