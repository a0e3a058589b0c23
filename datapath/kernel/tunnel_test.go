package kernel

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/ferry-dev/ferry/datapath"
	"github.com/ferry-dev/ferry/internal/tlsutil"
)

type noLoops struct{}

func (noLoops) Attach(string, bool) (string, error)        { return "", nil }
func (noLoops) Detach(string) error                        { return nil }
func (noLoops) FindByBackingFile(string) ([]string, error) { return nil, nil }

// tlsEcho stands in for the source's gate: it presents name's certificate
// from dir and echoes.
func tlsEcho(t *testing.T, dir, name string) string {
	t.Helper()
	cfg, err := tlsutil.ServerConfig(dir, name)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
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
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	return ln.Addr().String()
}

func echoes(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("login")); err != nil {
		return err
	}
	b := make([]byte, 5)
	if _, err := io.ReadFull(c, b); err != nil {
		return err
	}
	if string(b) != "login" {
		return io.ErrUnexpectedEOF
	}
	return nil
}

// open-iscsi (a fake iscsiadm and sysfs here, a plain TCP client for its
// connection) logs into the loopback tunnel, never the source's TLS
// portal; the tunnel follows the clone: adopted on the recorded portal by a
// new backend (an agent restart), closed when the source is released.
func TestKernelCloneGoesThroughTheTLSTunnel(t *testing.T) {
	root := t.TempDir()
	ca, dir := filepath.Join(root, "ca"), filepath.Join(root, "tls")
	if err := tlsutil.InitCA(ca); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"worker-a", "worker-b"} {
		if _, err := tlsutil.Issue(ca, dir, n, tlsutil.KindWorker, []string{"127.0.0.1"}, tlsutil.IssueOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	source := tlsEcho(t, dir, "worker-a")
	const iqn = "iqn.2026-12.dev.ferry:mig-t"
	sys := t.TempDir()
	fake := &fakeIscsiadm{}
	data := t.TempDir()
	newBackend := func() *Backend {
		return &Backend{DataDir: data, Log: zerolog.Nop(), Loops: noLoops{}, TLS: &datapath.PeerTLS{Dir: dir, Name: "worker-b"},
			ISCSI: &OpenISCSI{Log: zerolog.Nop(), SysRoot: sys, DiskTimeout: time.Second, run: fake.run}}
	}
	v := newBackend()
	spec := datapath.CloneSpec{Volume: "vol-t", Portal: source, IQN: iqn, Source: "worker-a"}
	if _, err := v.loginSource(context.Background(), datapath.CloneSpec{Volume: "vol-t", Portal: source, IQN: iqn}); err == nil {
		t.Fatal("a clone over TLS without a source worker to check was started")
	}
	ctx := context.Background()
	// The session appears once iscsiadm logged in (not on a timer: on a
	// loaded host the tunnel's start outlasted it, the session was there
	// first and no login was made).
	fake.onLogin = func() { fakeSession(t, sys, "1", iqn, "null") }
	if d, err := v.loginSource(ctx, spec); err != nil || d != "/dev/null" {
		t.Fatalf("login through the tunnel: %q %v", d, err)
	}
	rec, ok := v.readRecord("vol-t")
	if !ok || rec.SourcePortal != source || rec.Source != "worker-a" || !strings.HasPrefix(rec.Portal, "127.0.0.1:") {
		t.Fatalf("record %+v", rec)
	}
	fake.mu.Lock()
	calls := strings.Join(fake.calls, "|")
	fake.mu.Unlock()
	if !strings.Contains(calls, "-p "+rec.Portal+" --login") || strings.Contains(calls, source) {
		t.Fatalf("open-iscsi calls %q: want a login to the tunnel %s, never to the source %s", calls, rec.Portal, source)
	}
	if err := echoes(rec.Portal); err != nil {
		t.Fatalf("through the tunnel: %v", err)
	}
	// Re-running the step keeps the same tunnel.
	if _, err := v.loginSource(ctx, spec); err != nil {
		t.Fatal(err)
	}
	if r2, _ := v.readRecord("vol-t"); r2.Portal != rec.Portal {
		t.Fatalf("the tunnel moved from %s to %s", rec.Portal, r2.Portal)
	}
	// An agent restart: the old process's tunnel is gone, a new backend
	// re-listens where open-iscsi reconnects.
	v.stopTunnel("vol-t")
	if err := echoes(rec.Portal); err == nil {
		t.Fatal("the tunnel outlived stopTunnel")
	}
	v2 := newBackend()
	if err := v2.adoptTunnel("vol-t"); err != nil {
		t.Fatal(err)
	}
	if err := echoes(rec.Portal); err != nil {
		t.Fatalf("adopted tunnel: %v", err)
	}
	// Releasing the source (dissolve, detach) logs out of the tunnel's
	// portal and closes it.
	fake.calls = nil
	if err := v2.releaseSource(ctx, "vol-t"); err != nil {
		t.Fatal(err)
	}
	if len(fake.calls) == 0 || !strings.Contains(fake.calls[0], "-p "+rec.Portal+" --logout") {
		t.Fatalf("logout calls %q, want one on %s", fake.calls, rec.Portal)
	}
	if err := echoes(rec.Portal); err == nil {
		t.Fatal("the tunnel outlived its clone")
	}
}

// A tunnel only ever forwards to the source worker.
func TestKernelTunnelRefusesAnotherWorkersExport(t *testing.T) {
	root := t.TempDir()
	ca, dir := filepath.Join(root, "ca"), filepath.Join(root, "tls")
	if err := tlsutil.InitCA(ca); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"worker-b", "worker-c"} {
		if _, err := tlsutil.Issue(ca, dir, n, tlsutil.KindWorker, []string{"127.0.0.1"}, tlsutil.IssueOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	v := &Backend{DataDir: t.TempDir(), Log: zerolog.Nop(), TLS: &datapath.PeerTLS{Dir: dir, Name: "worker-b"}}
	r := kernelCloneRecord{IQN: "iqn.2026-12.dev.ferry:x", SourcePortal: tlsEcho(t, dir, "worker-c"), Source: "worker-a"}
	if err := v.ensureTunnel("vol-x", &r); err != nil {
		t.Fatal(err)
	}
	defer v.stopTunnel("vol-x")
	if err := echoes(r.Portal); err == nil {
		t.Fatal("the tunnel reached worker-c's export for a clone of worker-a's")
	}
}
